"""WorldModel: shapes, loss, deterministic ODE generation, checkpoint round trip and its errors.
CPU, tiny preset, a few seconds in all."""
import numpy as np
import pytest
import torch

from spiral_rl.config import load_config
from spiral_rl.world.dataset import SegmentDataset
from spiral_rl.world_model import CheckpointError, WorldModel

TEXTS = ["move the red square left", "push the blue circle into the green triangle"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(["world.segment_frames=4", "model.sample_steps=3"])


@pytest.fixture(scope="module")
def batch(cfg):
    ds = SegmentDataset(cfg.world, "train", 2)
    ex = [ds[0], ds[1]]
    return (np.stack([e.context for e in ex]), np.stack([e.frames for e in ex]),
            [e.sub_action.text for e in ex])


def trained_ish(cfg) -> WorldModel:
    """A tiny model whose output projection is not zero (an untrained DiT predicts v = 0)."""
    torch.manual_seed(0)
    model = WorldModel.from_config(cfg)
    torch.nn.init.normal_(model.dit.head.proj.weight, std=0.02)
    return model


def test_shapes_and_loss(cfg, batch):
    context, frames, texts = batch
    assert context.shape == (2, 2, 32, 32, 3) and frames.shape == (2, 4, 32, 32, 3)
    model = trained_ish(cfg)
    loss, stats = model.loss(context, frames, texts, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and set(stats) == {"loss", "t_mean"}
    loss.backward()
    assert all(p.grad is not None for p in model.dit.parameters())
    assert model.text.token_embedding.weight.grad is not None  # text is trained through the DiT
    out = model.generate(context, texts, seed=0)
    assert out.shape == frames.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="uint8"):
        model.generate(context.astype(np.float32), texts, seed=0)
    with pytest.raises(ValueError, match="2 texts"):
        model.loss(context[:1], frames[:1], texts)


def test_generate_is_deterministic_for_a_seed(cfg, batch):
    context, _, texts = batch
    model = trained_ish(cfg)
    a, b = model.generate(context, texts, seed=7), model.generate(context, texts, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model.generate(context, texts, seed=8))
    # Per-sample seeds: a sample does not depend on the rest of the batch (up to float noise).
    both = model.generate(context, texts, seed=[3, 4]).astype(int)
    alone = model.generate(context[1:], texts[1:], seed=[4]).astype(int)
    assert np.abs(both[1] - alone[0]).max() <= 1
    gen = model.generate(context, texts, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(gen, a)


def test_guidance_uses_the_empty_prompt(cfg, batch):
    context, _, texts = batch
    model = trained_ish(cfg)
    plain = model.generate(context, texts, seed=1)
    assert not np.array_equal(plain, model.generate(context, texts, seed=1, guidance=3.0))


def test_save_load_round_trip_gives_identical_outputs(cfg, batch, tmp_path):
    context, _, texts = batch
    model = trained_ish(cfg)
    path = model.save(tmp_path / "run" / "world_model.pt")
    for source in (path, path.parent):  # the file or its run directory
        loaded = WorldModel.load(source)
        assert loaded.cfg.preset == "tiny" and loaded.num_frames == 4
        np.testing.assert_array_equal(loaded.generate(context, texts, seed=5), model.generate(context, texts, seed=5))
    # pretrained_path in the run config loads the same weights
    again = WorldModel.from_config(load_config(["world.segment_frames=4", "model.sample_steps=3",
                                                f"model.pretrained_path={path}"]))
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert WorldModel.load(path, sample_steps=1).cfg.sample_steps == 1
    with pytest.raises(ValueError, match="architecture"):
        WorldModel.load(path, preset="small")


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    for path in (tmp_path / "nope.pt", tmp_path):
        with pytest.raises(CheckpointError) as err:
            WorldModel.load(path)
        msg = str(err.value)
        assert str(path) in msg and "python launch/sft.py" in msg


def test_corrupt_checkpoint_errors(cfg, tmp_path):
    path = trained_ish(cfg).save(tmp_path / "world_model.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for bad, needle in [(truncated, "truncated or corrupt"), (garbage, "truncated or corrupt"),
                        (foreign, "not a world-model checkpoint")]:
        with pytest.raises(CheckpointError) as err:
            WorldModel.load(bad)
        assert str(bad) in str(err.value) and needle in str(err.value) and "launch/sft.py" in str(err.value)


def test_checkpoint_must_fit_the_configured_model(cfg, tmp_path):
    path = trained_ish(cfg).save(tmp_path / "world_model.pt")
    other = load_config(["model.max_text_len=32", f"model.pretrained_path={path}"])
    with pytest.raises(CheckpointError, match=r"model.max_text_len: checkpoint 64 vs config 32"):
        WorldModel.from_config(other)


def test_reference_frame_channels_and_context_length(cfg, batch):
    context, frames, texts = batch
    with_ref = WorldModel.from_config(cfg)
    assert with_ref.dit.cfg.in_channels == 6  # RGB + the last context frame's RGB (model.concat_context)
    plain = WorldModel.from_config(load_config(["world.segment_frames=4", "model.concat_context=false"]))
    assert plain.dit.cfg.in_channels == 3
    for model in (with_ref, plain):
        loss, _ = model.loss(context, frames, texts)
        assert torch.isfinite(loss)
    # the reference is the last clean context frame: changing an earlier context frame or a target
    # frame's noise leaves the reference input alone, changing the last context frame does not
    x = torch.zeros(1, 3, 6, 32, 32)
    cond = with_ref.encode_text(texts[:1])
    seen = []
    with_ref.dit.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 3:].clone()))
    with torch.no_grad():
        with_ref.velocity(x, torch.zeros(1, 6), cond)
        x[:, :, 1] = 1.0  # last context frame (K = 2)
        with_ref.velocity(x, torch.zeros(1, 6), cond)
    assert seen[0].abs().max() == 0 and (seen[1] == 1.0).all()
    with pytest.raises(ValueError, match="context has 1 frames; this model takes 2"):
        with_ref.loss(context[:, 1:], frames, texts)
