"""spiral_rl.models: attention backends, the Wan-layout DiT (checked against diffusers), the
built-in text encoder, presets and Wan checkpoint loading. CPU, fp32, a few seconds each."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from spiral_rl.models import (DiT, DiTConfig, WordTokenizer, attention,
                              attention_reference, available_backends, build_model,
                              build_text_encoder, count_parameters, frame_timesteps,
                              frames_to_tensor, param_count, preset_config, tensor_to_frames,
                              world_vocabulary)
from spiral_rl.models.attention import flash_attn_usable
from spiral_rl.models.presets import PRESETS
from spiral_rl.models.wan_compat import (LoadReport, WanLoadError, config_from_diffusers,
                                         load_wan_pretrained, load_wan_state_dict, wan_key)

# A tiny Wan: head_dim 16 splits into RoPE parts (frame 8, height 4, width 4) as Wan requires.
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# Wan2.2-TI2V-5B's transformer/config.json (Wan-AI/Wan2.2-TI2V-5B-Diffusers).
WAN22_5B_DIFFUSERS = dict(_class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=24,
                          attention_head_dim=128, in_channels=48, out_channels=48, text_dim=4096, freq_dim=256,
                          ffn_dim=14336, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                          eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
                          pos_embed_seq_len=None)


def small_dit(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(**dict(dim=32, num_heads=2, num_layers=2, ffn_dim=64, text_dim=16,
                                freq_dim=32, patch_size=(1, 4, 4)) | kw))


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("masked", [False, True])
def test_attention_backends_match_reference(backend, masked):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (10, 7, 7))
    mask = None
    if masked:  # key padding: sample 0 sees all 7 keys, sample 1 only the first 4
        mask = torch.arange(7)[None, :] < torch.tensor([[7], [4]])
    out = attention(q, k, v, mask, backend=backend)
    assert out.shape == (2, 3, 10, 16)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    if masked:  # padded keys must have no influence at all
        k2, v2 = k.clone(), v.clone()
        k2[1, :, 4:], v2[1, :, 4:] = 100.0, -100.0
        torch.testing.assert_close(attention(q, k2, v2, mask, backend=backend)[1], out[1], atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_backend_and_mask():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, backend="xformers")
    with pytest.raises(TypeError, match="bool"):
        attention(q, q, q, mask=torch.ones(1, 4))
    assert not flash_attn_usable(q)  # CPU fp32: flash-attn never applies
    with pytest.raises(RuntimeError, match="flash-attn"):
        attention(q, q, q, backend="flash_attn")


def test_importing_the_models_leaves_torch_dynamo_out_until_a_model_compiles():
    """Rollout workers and critic servers import the models and never compile: torch._dynamo would
    cost ~2 s of their start. Only DiT.compile_blocks marks the device check constant for
    torch.compile (importing dynamo then)."""
    code = ("import sys, importlib; import spiral_rl.models, spiral_rl.world_model; "
            "assert 'torch._dynamo' not in sys.modules, 'imported at import time'; "
            "from spiral_rl.models import DiT; from spiral_rl.models.presets import preset_config; "
            "DiT(preset_config('tiny')).compile_blocks(); "
            "a = importlib.import_module('spiral_rl.models.attention'); "
            "assert a._hopper_or_newer._dynamo_marked_constant")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- DiT


def test_dit_shapes_and_timestep_forms():
    model = small_dit().eval()
    x, text = torch.randn(2, 3, 5, 16, 24), torch.randn(2, 6, 16)
    t_frames = frame_timesteps(torch.tensor([0.3, 0.9]), num_context=2, num_frames=5)
    assert t_frames.tolist()[0][:3] == [0.0, 0.0, pytest.approx(0.3)]
    with torch.no_grad():
        out = model(x, t_frames, text, torch.ones(2, 6, dtype=torch.bool))
        assert out.shape == x.shape and out.dtype == torch.float32
        # One timestep per sample equals the same timestep repeated for every frame.
        t = torch.tensor([0.3, 0.9])
        torch.testing.assert_close(model(x, t, text), model(x, t[:, None].expand(2, 5), text))
        torch.testing.assert_close(model(x[:1], torch.tensor(0.3), text[:1]), model(x[:1], t[:1], text[:1]))
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.zeros(2, 3), text)
    with pytest.raises(ValueError, match="divide by patch_size"):
        model(torch.randn(1, 3, 2, 10, 16), torch.zeros(1), text[:1])


def test_dit_text_mask_ignores_padding():
    model = small_dit()
    for p in model.parameters():  # Wan's init zeroes the output; give it a signal to compare
        torch.nn.init.normal_(p, std=0.2)
    x, t, text = torch.randn(1, 3, 2, 8, 8), torch.tensor([0.5]), torch.randn(1, 6, 16)
    mask = torch.tensor([[True, True, True, False, False, False]])
    with torch.no_grad():
        ref = model(x, t, text[:, :3])
        torch.testing.assert_close(model(x, t, text, mask), ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x, t, text), ref, atol=1e-3)


def test_gradient_checkpointing_gives_identical_gradients():
    x, t, text = torch.randn(2, 3, 3, 8, 8), torch.rand(2, 3), torch.randn(2, 4, 16)
    grads = []
    for ckpt in (False, True):
        model = small_dit(gradient_checkpointing=ckpt)
        torch.nn.init.normal_(model.head.proj.weight, std=0.1)  # non-zero so every grad flows
        model(x, t, text).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "norm_k" not in n)


def test_tiny_model_overfits_one_batch(world_cfg):
    """Plain MSE on a fixed flow-matching target built from real world frames."""
    from spiral_rl.world.dataset import SegmentDataset
    torch.manual_seed(0)
    ex = SegmentDataset(world_cfg, "train", 1)[0]
    clean = frames_to_tensor(np.concatenate([ex.context, ex.frames[:2]]))[None]  # (1, 3, 4, 32, 32)
    clean = clean.expand(2, -1, -1, -1, -1)
    noise = torch.randn_like(clean)
    sigma = frame_timesteps(torch.tensor([0.5, 0.8]), num_context=2, num_frames=4)  # (2, 4)
    s = sigma[:, None, :, None, None]
    x, target = (1 - s) * clean + s * noise, noise - clean  # rectified flow: x_s and its velocity
    model, text_encoder = build_model("tiny"), build_text_encoder("tiny")
    params = [*model.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        emb, mask = text_encoder([ex.sub_action.text, "make the green triangle jump"])
        loss = (model(x, sigma, emb, mask) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_residual_dtype_option():
    """fp32_residual=False stores the residual in the weights' dtype: identical in fp32, and in
    bf16 the same function to bf16 rounding (each add is still computed in fp32)."""
    x, t, text = torch.randn(1, 3, 2, 8, 8), torch.tensor([0.5]), torch.randn(1, 4, 16)
    model = small_dit()
    torch.nn.init.normal_(model.head.proj.weight, std=0.1)
    with torch.no_grad():
        ref = model(x, t, text)
        model.fp32_residual = False
        torch.testing.assert_close(model(x, t, text), ref)
        low = model.to(torch.bfloat16)(x, t, text)
        model.fp32_residual = True
        high = model(x, t, text)
    assert (low - high).norm() < 2e-2 * high.norm()
    assert DiTConfig(fp32_residual=False).fp32_residual is False


def test_bf16_weights_forward_keeps_fp32_residual():
    model = small_dit()
    x, t, text = torch.randn(1, 3, 2, 8, 8), torch.tensor([0.5]), torch.randn(1, 4, 16)
    torch.nn.init.normal_(model.head.proj.weight, std=0.1)
    with torch.no_grad():
        ref = model(x, t, text)
        out = model.to(torch.bfloat16)(x, t, text)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_pixel_conversion_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 4, 8, 8, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 3, 4, 8, 8) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(tensor_to_frames(x), frames)


# --------------------------------------------------------------------------- text


def test_tokenizer_round_trip_unknown_words_and_padding():
    tok = WordTokenizer(max_len=12)
    assert world_vocabulary() == world_vocabulary() and tok.vocab[:3] == ["<pad>", "<unk>", "<bos>"]
    text = "push the red square into the blue circle"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("Move the red square to the top-left corner.")) == \
        "move the red square to the top-left corner"
    assert tok.decode(tok.encode("make the purple hexagon jump")) == "make the <unk> <unk> jump"
    ids, mask = tok(["", "swap the red circle and the cyan square", "move the red square left " * 5])
    assert ids.shape == mask.shape == (3, 12)
    assert mask.sum(1).tolist() == [1, 9, 12]  # empty text keeps <bos>; the long one is truncated
    assert (ids[~mask] == 0).all()


def test_vocabulary_covers_every_world_text(world_cfg):
    from spiral_rl.world.tasks import TaskSampler
    tok, sampler = WordTokenizer(max_len=64), TaskSampler(world_cfg)
    for split in ("train", "heldout"):
        for task in sampler.tasks(split, 40):
            for text in [task.instruction, *(s.text for s in task.reference_plan)]:
                ids = tok.encode(text)
                assert 1 not in ids, text  # no <unk>
                assert len(ids) < 64, text  # never truncated


def test_text_encoder_outputs():
    enc = build_text_encoder("tiny", max_len=16)
    emb, mask = enc(["make the green triangle jump", "move the blue triangle to the top-left corner"])
    assert emb.shape == (2, 16, preset_config("tiny").text_dim) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [6, 9]
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()
    with pytest.raises(TypeError):
        enc("a single string")


# --------------------------------------------------------------------------- presets


def test_preset_parameter_counts():
    tiny = build_model("tiny", patch_size=4)
    assert count_parameters(tiny) == param_count(tiny.cfg)
    with torch.device("meta"):  # shapes only, no memory
        small = build_model("small")
    assert count_parameters(small) == param_count(small.cfg)
    assert 100e6 < param_count(small.cfg) < 500e6
    # wan2.2-5b is checked on its config only: never instantiated here.
    wan = preset_config("wan2.2-5b")
    assert (wan.dim, wan.num_layers, wan.num_heads, wan.head_dim, wan.ffn_dim) == (3072, 30, 24, 128, 14336)
    assert (wan.in_channels, wan.out_channels, wan.text_dim, wan.patch_size) == (48, 48, 4096, (1, 2, 2))
    assert 4.9e9 < param_count(wan) < 5.1e9
    assert config_from_diffusers(WAN22_5B_DIFFUSERS) == wan
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")
    with pytest.raises(ValueError, match="external encoder"):
        build_text_encoder("wan2.2-5b")
    # the 5B blocks on the built-in world's pixels (the scaling runs): Wan's shape, pixel in/out
    pixel = preset_config("wan2.2-5b-pixel", in_channels=6)
    assert (pixel.dim, pixel.num_layers, pixel.num_heads, pixel.ffn_dim) == (3072, 30, 24, 14336)
    assert (pixel.out_channels, pixel.patch_size) == (3, (1, 4, 4))
    assert 4.9e9 < param_count(pixel) < 5.1e9
    with torch.device("meta"):
        assert count_parameters(build_model("wan2.2-5b-pixel", in_channels=6)) == param_count(pixel)
    assert set(PRESETS) == {"tiny", "small", "wan2.2-5b-pixel", "wan2.2-5b"}


# --------------------------------------------------------------------------- Wan compatibility


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A tiny random diffusers WanTransformer3DModel, saved with save_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**TINY_WAN).eval()
    path = tmp_path_factory.mktemp("wan")
    ref.save_pretrained(path)
    return ref, path


def wan_inputs(b=2, f=5, h=8, w=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, f, h, w, generator=g), torch.randn(b, 7, 32, generator=g), torch.rand(b, generator=g)


def test_matches_diffusers_wan(wan_dir):
    ref, path = wan_dir
    model = DiT(config_from_diffusers(path)).eval()
    report = load_wan_state_dict(model, path)
    assert report.ok and report.format == "diffusers"
    x, text, sigma = wan_inputs()
    scale = model.cfg.timestep_scale
    with torch.no_grad():
        # One timestep per sample (Wan2.1 / 14B style).
        ours = model(x, sigma, text)
        theirs = ref(x, sigma * scale, text, return_dict=False)[0]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert theirs.abs().mean() > 0.1  # a real signal, not two zeros
        # Wan2.2 TI2V style: per-token timesteps, 0 on the 2 clean context frames.
        t = frame_timesteps(sigma, num_context=2, num_frames=5)  # (B, F)
        per_token = (t * scale)[:, :, None].expand(-1, -1, (8 // 2) * (12 // 2)).flatten(1)  # (B, N)
        ours = model(x, t, text)
        theirs = ref(x, per_token, text, return_dict=False)[0]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_original_wan_format_matches_diffusers_converter(wan_dir):
    """Our original-format names, run through diffusers' own converter, load into diffusers."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    _, path = wan_dir
    model = DiT(config_from_diffusers(path))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    original = {"model.diffusion_model." + wan_key(k, "original"): v.clone() for k, v in model.state_dict().items()}
    ref = WanTransformer3DModel(**TINY_WAN).eval()
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(original)), strict=True)
    again = DiT(model.cfg)
    assert load_wan_state_dict(again, original).format == "original"
    x, text, sigma = wan_inputs(f=3)
    with torch.no_grad():
        torch.testing.assert_close(again(x, sigma, text), model(x, sigma, text), atol=0, rtol=0)
        torch.testing.assert_close(model(x, sigma, text), ref(x, sigma * 1000, text, return_dict=False)[0],
                                   atol=1e-5, rtol=1e-5)


def test_load_wan_pretrained_builds_on_meta(wan_dir):
    ref, path = wan_dir
    model = load_wan_pretrained(path).eval()
    x, text, sigma = wan_inputs(f=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma, text), ref(x, sigma * 1000, text, return_dict=False)[0],
                                   atol=1e-5, rtol=1e-5)


def test_strict_loading_names_bad_keys(wan_dir):
    ref, _ = wan_dir
    sd = ref.state_dict()
    del sd["blocks.1.attn2.to_k.weight"]
    sd["blocks.0.attn2.add_k_proj.weight"] = torch.zeros(32, 32)
    sd["proj_out.bias"] = torch.zeros(3)
    model = DiT(config_from_diffusers(ref.config))
    with pytest.raises(WanLoadError) as err:
        load_wan_state_dict(model, sd)
    msg = str(err.value)
    assert "blocks.1.cross_attn.k.weight (expected blocks.1.attn2.to_k.weight)" in msg
    assert "blocks.0.attn2.add_k_proj.weight" in msg and "head.proj.bias" in msg
    report = load_wan_state_dict(model, sd, strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert len(report.missing) == 1 and len(report.unexpected) == 1 and len(report.mismatched) == 1
    with pytest.raises(WanLoadError, match="not a Wan transformer"):
        load_wan_state_dict(model, {"foo.weight": torch.zeros(1)})
    with pytest.raises(WanLoadError, match="I2V"):
        config_from_diffusers(WAN22_5B_DIFFUSERS | {"image_dim": 1280})


def test_missing_or_corrupt_checkpoint_gives_clear_error(tmp_path):
    model = small_dit()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_wan_state_dict(model, tmp_path / "nope")
    with pytest.raises(WanLoadError, match="no weights in"):
        load_wan_state_dict(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(WAN22_5B_DIFFUSERS))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WanLoadError, match="could not read weights from .*diffusion_pytorch_model"):
        load_wan_state_dict(model, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WanLoadError, match="corrupt config"):
        config_from_diffusers(tmp_path)
