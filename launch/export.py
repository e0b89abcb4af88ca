"""Export any launch/sft.py checkpoint (not only the final one) as a world_model.pt.

    python launch/export.py runs/sft/ray/sft/checkpoint_step0030000      # -> runs/sft/export_step0030000/
    python launch/export.py COPIED_CHECKPOINT_DIR --config=runs/sft/config.yaml --out=DIR

launch/sft.py exports weights only at the end of a run; this turns an intermediate Ray Train /
DeepSpeed checkpoint into the same two files, so a run can be scored, sampled or post-trained
(model.pretrained_path) from any step without stopping it. It plays the part of verl's model
merger. The weights are the fp32 masters, whatever the ZeRO stage and world size: DeepSpeed's
own zero_to_fp32 where the checkpoint has optimizer shards (ZeRO 1-3, bf16), else the module's
fp32 parameters (ZeRO-0 without bf16 keeps the masters there). Writes into --out:
    world_model.pt  the weights (WorldModel.load, model.pretrained_path)
    eval.json       launch/sft.py's record up to this step: training minutes, devices, loss curve,
                    and the run's last evaluation before it (`scores_step` says which step that was)
The run's config defaults to the config.yaml launch/sft.py wrote beside `ray/` (three levels up).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from spiral_rl.config import load_config_or_exit
from spiral_rl.world_model import CHECKPOINT_NAME, WorldModel

from sft import eval_record, saved_step  # launch/ is first on sys.path


def read_checkpoint(ckpt_dir: Path) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """(step, history, fp32 state dict) of one launch/sft.py checkpoint_step<N>/ directory."""
    step = saved_step(ckpt_dir)
    if step is None:
        sys.exit(f"{ckpt_dir}: not a launch/sft.py checkpoint (no DeepSpeed 'latest' file); "
                 f"pass a run's ray/sft/checkpoint_step<N>/")
    tag_dir = ckpt_dir / f"step{step}"
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():  # ZeRO-3 names its rank-0 file differently
        states = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if not states.is_file():
        sys.exit(f"{tag_dir}: no DeepSpeed model states file; the checkpoint is incomplete")
    client = torch.load(states, map_location="cpu", weights_only=False)  # our own run's pickle
    if list(tag_dir.glob("*optim_states.pt")):  # fp32 masters live in the optimizer shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir))
    else:
        state = client["module"]
    return step, client["history"], state  # WorldModel.save writes fp32 whatever the shards held


def main(argv: list[str]) -> int:
    opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--") and "=" in a}
    rest = [a for a in argv if not a.startswith("--")]
    if len(rest) != 1 or set(opts) - {"--config", "--out"}:
        sys.exit("usage: python launch/export.py CHECKPOINT_DIR [--config=RUN_CONFIG.yaml] [--out=DIR]")
    ckpt_dir = Path(rest[0])
    step, history, state = read_checkpoint(ckpt_dir)
    run_out = ckpt_dir.resolve().parent.parent.parent  # run.output_dir/ray/sft/checkpoint_step<N>
    config = Path(opts.get("--config", run_out / "config.yaml"))
    if not config.is_file():
        sys.exit(f"{config}: no run config; pass --config= the config.yaml launch/sft.py wrote for this run")
    cfg = load_config_or_exit([str(config)])
    out = Path(opts.get("--out", run_out / f"export_step{step:07d}"))

    model = WorldModel(cfg.model, cfg.world.segment_frames, cfg.world.context_frames)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        sys.exit(f"{ckpt_dir} does not match {config}'s model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.save(out / CHECKPOINT_NAME)
    record = eval_record(cfg, history)
    record |= {"steps": step, "scores_step": history["val"][-1]["step"], "exported_from": str(ckpt_dir)}
    (out / "eval.json").write_text(json.dumps(record, indent=1))
    s = record["scores"]
    print(f"step {step}: {out / CHECKPOINT_NAME}; {record['train_minutes']:.1f} training minutes on "
          f"{', '.join(record['devices'])}; the run's evaluation at step {record['scores_step']}: "
          f"completeness {s['action_completeness']:.3f}, fidelity {s['physical_fidelity']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
