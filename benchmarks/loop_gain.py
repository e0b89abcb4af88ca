"""SPIRAL vs open-loop task success on a checkpoint, pooled over evaluation seeds, with an interval.

    python benchmarks/loop_gain.py       # the GRPO start and the shipped checkpoint -> results/loop_gain.json
    python benchmarks/loop_gain.py CKPT [CKPT ...] [--tasks=64] [--seeds=0,1,2,3] [--out=PATH] [overrides]

Issue 4's first bar (full SPIRAL succeeds on >= 1.5x as many tasks as open-loop) read off one
32-task evaluation swings between 1.2x and 2.0x with the evaluation seed alone, since a handful of
tasks decides it (benchmarks/RESULTS.md section 8). This runs open-loop and SPIRAL on the same val
tasks and noise seeds as the GRPO run's evaluation (spiral_rl.evaluate.run_mode: seed s here is
run.seed=s there, so `--tasks=32 --seeds=0` repeats a run's "before" figures), pools the
successes over seeds, and puts a 95% bootstrap interval on the ratio by resampling tasks, each task
with all its seeds (a task's seeds are not independent draws: a swap fails under every seed).
Loop budgets and sampling come from configs/grpo_improve.yaml plus any overrides.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkpoint_id, cpu_name, split_options, write_record  # noqa: E402

CONFIG = ROOT / "configs" / "grpo_improve.yaml"
DEFAULT_CHECKPOINTS = ("checkpoints/tiny_sft_noisy.pt", "checkpoints/tiny_sft.pt")
BOOTSTRAP = 2000
USAGE = "usage: python benchmarks/loop_gain.py [CKPT ...] [--tasks=64] [--seeds=0,1,2,3] [--out=PATH] [overrides]"


def successes(ckpt: str, overrides: list[str], tasks: int, seeds: list[int]) -> dict[str, np.ndarray]:
    """{mode: (tasks, seeds) bool}: which episodes succeeded, open-loop and SPIRAL."""
    from actors.rollout import RolloutWorker, loop_settings
    from spiral_rl.config import load_config_or_exit
    from spiral_rl.evaluate import run_mode
    from spiral_rl.world_model import WorldModel

    path = ckpt if Path(ckpt).exists() else ROOT / ckpt  # relative to here, else to the repository
    cfg = load_config_or_exit([str(CONFIG), f"model.pretrained_path={path}", *overrides])
    torch.manual_seed(cfg.run.seed)
    worker = RolloutWorker(cfg, model=WorldModel.from_config(cfg))  # torch's default threads, as the GRPO run
    worker.model.eval()
    val = worker.sampler.tasks(cfg.run.split, tasks, start=0)
    out = {}
    for mode in ("open_loop", "spiral"):
        cols = []
        for s in seeds:
            t0 = time.perf_counter()
            eps = run_mode(worker.planner, worker.critic, worker.generator, val, worker.cfg, loop_settings(worker.cfg),
                           mode, seed=s)
            cols.append([e.success for e in eps])
            print(f"{ckpt} {mode:<9} seed {s}: {sum(cols[-1])}/{tasks} succeeded ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        out[mode] = np.array(cols, dtype=bool).T
    return out


def ratio_interval(open_: np.ndarray, spiral: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of sum(spiral) / sum(open) over tasks resampled with replacement
    (rows: tasks, columns: seeds). A resample with no open-loop success counts as an infinite ratio."""
    n = open_.shape[0]
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    o, s = open_.sum(1)[idx].sum(1), spiral.sum(1)[idx].sum(1)
    ratios = np.where(o > 0, s / np.maximum(o, 1), np.inf)
    # No interpolation between order statistics: the neighbour of an infinite ratio would be NaN.
    return float(np.percentile(ratios, 2.5, method="lower")), float(np.percentile(ratios, 97.5, method="higher"))


def summary(res: dict[str, np.ndarray], seeds: list[int]) -> dict:
    o, s = res["open_loop"], res["spiral"]
    lo, hi = ratio_interval(o, s, np.random.default_rng(0))
    ratio = float(s.sum() / o.sum()) if o.sum() else float("inf")
    return {"episodes": int(o.size), "tasks": int(o.shape[0]), "seeds": seeds,
            "open_loop_success": round(float(o.mean()), 4), "spiral_success": round(float(s.mean()), 4),
            "ratio": round(ratio, 3) if o.sum() else None,  # JSON has no infinity: None = unbounded
            "ratio_ci95": [round(lo, 3), round(hi, 3) if np.isfinite(hi) else None],
            "per_seed": [{"seed": sd, "open_loop_success": round(float(o[:, j].mean()), 4),
                          "spiral_success": round(float(s[:, j].mean()), 4)} for j, sd in enumerate(seeds)],
            "bar_1.5x_met": bool(ratio >= 1.5)}


def main(argv: list[str]) -> int:
    opts, rest = split_options(argv, {"--tasks", "--seeds", "--out"}, USAGE)
    ckpts = [a for a in rest if "=" not in a] or list(DEFAULT_CHECKPOINTS)
    overrides = [a for a in rest if "=" in a]
    try:
        tasks, seeds = int(opts.get("--tasks", 64)), [int(x) for x in opts.get("--seeds", "0,1,2,3").split(",")]
    except ValueError:
        sys.exit("--tasks takes an integer and --seeds a comma-separated list of integers")
    if tasks < 1 or not seeds:
        sys.exit("--tasks must be >= 1 and --seeds must name at least one seed")
    for c in ckpts:
        if not (ROOT / c).exists() and not Path(c).exists():
            sys.exit(f"checkpoint {c!r} does not exist")
    t0 = time.perf_counter()
    metrics = {}
    for c in ckpts:
        m = summary(successes(c, overrides, tasks, seeds), seeds)
        metrics[c] = {**m, **checkpoint_id(c, ROOT)}
        print(f"{c}: open-loop {m['open_loop_success']:.3f}, SPIRAL {m['spiral_success']:.3f} over {m['episodes']} "
              f"episodes -> {m['ratio']}x (95% interval {m['ratio_ci95'][0]} to {m['ratio_ci95'][1]})", flush=True)
    metrics["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    config = {"config": "configs/grpo_improve.yaml", "overrides": overrides, "bootstrap": BOOTSTRAP}
    write_record("loop_gain", f"{cpu_name()}, {os.cpu_count()} cores (one process)", config, metrics, False,
                 opts.get("--out"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
