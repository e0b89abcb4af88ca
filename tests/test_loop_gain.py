"""benchmarks/loop_gain.py: the pooled ratio and its bootstrap interval by hand, and its episodes
are the GRPO run's evaluation episodes (same tasks, same noise), so the two can be read together."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import loop_gain  # noqa: E402


def test_interval_collapses_when_every_task_has_the_same_ratio():
    # Each task: 1 open-loop success and 2 SPIRAL successes over its 4 seeds, so any resample of
    # tasks has ratio 2 exactly.
    open_ = np.array([[1, 0, 0, 0]] * 5, dtype=bool)
    spiral = np.array([[1, 1, 0, 0]] * 5, dtype=bool)
    assert loop_gain.ratio_interval(open_, spiral, np.random.default_rng(0)) == (2.0, 2.0)


def test_summary_pools_over_tasks_and_seeds():
    open_ = np.array([[1, 0], [0, 0], [1, 1], [0, 0]], dtype=bool)    # 3 of 8
    spiral = np.array([[1, 1], [1, 0], [1, 1], [0, 1]], dtype=bool)   # 6 of 8
    m = loop_gain.summary({"open_loop": open_, "spiral": spiral}, [0, 1])
    assert (m["episodes"], m["tasks"]) == (8, 4)
    assert (m["open_loop_success"], m["spiral_success"], m["ratio"]) == (0.375, 0.75, 2.0)
    assert [r["open_loop_success"] for r in m["per_seed"]] == [0.5, 0.25]
    assert [r["spiral_success"] for r in m["per_seed"]] == [0.75, 0.75]
    lo, hi = m["ratio_ci95"]
    assert lo <= 2.0 and (hi is None or hi >= 2.0) and m["bar_1.5x_met"] is True


def test_interval_counts_resamples_without_an_open_loop_success_as_unbounded():
    open_ = np.array([[1], [0], [0]], dtype=bool)
    spiral = np.array([[1], [1], [1]], dtype=bool)
    lo, hi = loop_gain.ratio_interval(open_, spiral, np.random.default_rng(0))
    assert lo == 1.0 and hi == np.inf  # 1 of 3 tasks: a resample holds it 0 to 3 times
    m = loop_gain.summary({"open_loop": open_, "spiral": spiral}, [0])
    assert m["ratio"] == 3.0 and m["ratio_ci95"] == [1.0, None]  # JSON has no infinity


def test_episodes_are_the_grpo_evaluations():
    """seed s and n tasks here = RolloutWorker.evaluate(split, 0, n, s), the GRPO run's evaluation."""
    import torch

    from actors.rollout import RolloutWorker
    from spiral_rl.config import load_config
    from spiral_rl.world_model import WorldModel

    ckpt, n, seed = "checkpoints/tiny_sft_noisy.pt", 4, 0
    res = loop_gain.successes(ckpt, [], n, [seed])
    cfg = load_config([str(loop_gain.CONFIG), f"model.pretrained_path={ROOT / ckpt}"])
    torch.manual_seed(cfg.run.seed)
    ref = RolloutWorker(cfg, model=WorldModel.from_config(cfg)).evaluate("val", 0, n, seed)
    for mode in ("open_loop", "spiral"):
        assert res[mode].shape == (n, 1)
        assert res[mode].mean() == pytest.approx(ref[mode]["success_rate"])
    assert res["spiral"].any()  # not two empty columns agreeing


def test_bad_options_are_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loop_gain.py"), "--task=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--task" in proc.stderr and "usage" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loop_gain.py"), "no/such.pt"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no/such.pt" in proc.stderr
