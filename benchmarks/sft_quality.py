"""World-model quality bar: ODE samples of val segments scored by the CriticAgent.

    python benchmarks/sft_quality.py checkpoints/tiny_sft.pt                      # 16 val tasks
    python benchmarks/sft_quality.py runs/sft/world_model.pt train.num_val_tasks=32

Loads a checkpoint made by launch/sft.py (its sampling settings, e.g. model.shift, come from
the checkpoint), generates every step of the reference plans of train.num_val_tasks val tasks
from their ground-truth context with the deterministic ODE sampler (model.sample_steps), and
scores each segment with the critic. Writes benchmarks/results/sft_quality.json, with the run's
training minutes and devices when the checkpoint sits in a launch/sft.py output directory (its
eval.json). The issue's bar: mean action_completeness >= 0.6 and physical_fidelity >= 0.8.
"""
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.config import load_config_or_exit
from spiral_rl.evaluate import score_examples, summarise_rows
from spiral_rl.world.dataset import SegmentDataset
from spiral_rl.world_model import WorldModel

from _common import checkpoint_id, cpu_name  # benchmarks/ is first on sys.path

BAR = {"action_completeness": 0.6, "physical_fidelity": 0.8}


def main(argv: list[str]) -> int:
    if not argv or "=" in argv[0]:
        sys.exit("usage: python benchmarks/sft_quality.py CHECKPOINT [--out=JSON] [config overrides]")
    outs = [a for a in argv[1:] if a.startswith("--out=")]
    ckpt_path, cfg = argv[0], load_config_or_exit([a for a in argv[1:] if a not in outs])
    model = WorldModel.load(ckpt_path).eval()
    val = SegmentDataset(cfg.world, "val", cfg.train.num_val_tasks).examples
    critic = CriticAgent.from_config(cfg)
    with torch.no_grad():
        rows = score_examples(model, val, critic, 16, cfg.world.context_frames)
    scores = summarise_rows(rows)
    by_verb = {v: summarise_rows([r for r in rows if r["verb"] == v]) for v in sorted({r["verb"] for r in rows})}
    # A launch/sft.py run keeps eval.json beside its world_model.pt: how long and where it trained.
    run_eval = Path(ckpt_path).parent / "eval.json"
    training = None
    if run_eval.is_file():
        run = json.loads(run_eval.read_text())
        training = {"minutes": run.get("train_minutes"), "devices": run.get("devices"), "steps": run["steps"],
                    "eval_json": str(run_eval)}
    trained_on = (f"trained on {' then '.join(training['devices'])}" if training and training["devices"]
                  else "where the checkpoint was trained: checkpoints/README.md or its run")
    device = f"{cpu_name()} (sampling and scoring; {trained_on})"
    record = {"command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/sft_quality.py", *argv]),
              "device": device, "date": datetime.date.today().isoformat(),
              "config": checkpoint_id(ckpt_path),
              "metrics": {"checkpoint": ckpt_path, "sample_steps": model.cfg.sample_steps, "shift": model.cfg.shift,
                          "scores": scores, "by_verb": by_verb, "training": training,
                          "bar": BAR, "bar_met": all(scores[k] >= v for k, v in BAR.items())}}
    out = Path(outs[-1].split("=", 1)[1]) if outs else Path(__file__).parent / "results" / "sft_quality.json"
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(scores), f"\nbar {BAR}: {'met' if record['metrics']['bar_met'] else 'NOT met'}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
