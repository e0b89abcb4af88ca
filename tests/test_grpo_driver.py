"""launch/grpo.py end to end on a tiny random checkpoint (CPU, ~1 min): every stage runs, the
first importance ratio of every update is 1, metrics / eval / replay / weights are written."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from spiral_rl.config import load_config
from spiral_rl.world_model import WorldModel

ROOT = Path(__file__).resolve().parents[1]


def test_grpo_driver_runs_every_stage(tmp_path):
    torch.manual_seed(0)
    WorldModel.from_config(load_config([])).save(tmp_path / "init" / "world_model.pt")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/grpo.py"), str(ROOT / "configs/grpo_ci.yaml"),
                           f"model.pretrained_path={tmp_path / 'init'}", f"run.output_dir={out}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert r["segments"] == 6 and set(r) >= {"time/rollout", "time/sample", "time/learner", "reward_mean"}
        assert 0 <= r["prompts_retried"] <= 2  # of grpo_ci's 2 prompts per iteration
        if "loss/first_ratio_max_dev" in r:  # a step ran (not every group degenerate)
            assert r["loss/first_ratio_max_dev"] < 1e-3
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 2] and set(evals[0]) >= {"open_loop", "plan_only", "spiral"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replay"]["records"] == 12 and (out / "rewards.png").exists()
    WorldModel.load(out / "world_model.pt")  # the post-trained weights load


def test_grpo_driver_refuses_to_start_without_a_pretrained_model(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/grpo.py"), f"run.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "model.pretrained_path" in proc.stderr
