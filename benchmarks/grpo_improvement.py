"""Issue 4's policy-improvement run: GRPO in one process on CPU, from the noisy-demonstration checkpoint.

    python benchmarks/grpo_improvement.py               # configs/grpo_improve.yaml -> results/grpo_improvement.json
    python benchmarks/grpo_improvement.py run.seed=1    # any config override; --out=PATH writes elsewhere

Runs `launch/grpo.py configs/grpo_improve.yaml` in a subprocess (its output echoed) and reads its
evaluation before and after GRPO on held-out val tasks (summary.json): open-loop vs SPIRAL success,
one-shot (plan_only) action completeness, retries per sub-action, one-shot physical fidelity, and
the wall time of the whole command, evaluations included. The bars: SPIRAL >= 1.5x open-loop
success, one-shot completeness +0.10, retries fall, fidelity not lower. Temporal consistency and
visual quality are reported beside them, since the reward trades them (README, Policy improvement).
The record is written either way; the exit status is 1 when a bar is missed.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkpoint_id, cpu_name, write_record  # noqa: E402
from distributed import improvement, run_driver  # noqa: E402

CONFIG = ROOT / "configs" / "grpo_improve.yaml"


def main(argv: list[str]) -> int:
    out = [a.split("=", 1)[1] for a in argv if a.startswith("--out=")]
    overrides = [a for a in argv if not a.startswith("--out=")]
    from spiral_rl.config import load_config_or_exit

    cfg = load_config_or_exit([str(CONFIG), *overrides])  # bad keys fail here, before the run
    tmp = Path(tempfile.mkdtemp(prefix="spiral_improve_"))
    res = run_driver("policy improvement", [str(CONFIG), *overrides], tmp, None, cfg.grpo.iterations)
    gain = improvement(res)
    before, after = res["eval_before"]["plan_only"], res["eval_after"]["plan_only"]
    for dim in ("temporal_consistency", "visual_quality"):
        gain[f"one_shot_{dim}_before"], gain[f"one_shot_{dim}_after"] = round(before[dim], 4), round(after[dim], 4)
    gain["run_dir"] = str(tmp)  # rewards.png (per-dimension reward curves) and world_model.pt are there
    print("policy improvement:", json.dumps(gain), flush=True)
    # The sections the result depends on, as the driver resolved and saved them (summary.json), so
    # the record still says what ran after the YAML file changes (its name and overrides would not).
    resolved = json.loads((tmp / "summary.json").read_text())["config"]
    config = {"config": "configs/grpo_improve.yaml", "overrides": overrides,
              **checkpoint_id(cfg.model.pretrained_path, ROOT),
              "resolved": {k: resolved[k] for k in ("model", "reward", "grpo", "loop")}}
    write_record("grpo_improvement", f"{cpu_name()}, {os.cpu_count()} cores (one process)", config, gain,
                 False, out[-1] if out else None)
    return 0 if all(gain["bars_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
