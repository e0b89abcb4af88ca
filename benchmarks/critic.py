"""Critic benchmark: scores of ground truth and of every corruption, and throughput on one core.

    python benchmarks/critic.py            # 200 val tasks -> benchmarks/results/critic.json
    python benchmarks/critic.py --quick    # 20 tasks, a few seconds; prints, writes a temp file
    python benchmarks/critic.py world.frame_size=64   # any config override

Throughput is measured on ONE core: thread pools are capped before numpy is imported and the
process is pinned to a single CPU. Segments are scored in batches (score_batch), which is how
the RL loop calls the critic; rendering the segments is not timed.
"""
import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported, or its BLAS pool is already running

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from spiral_rl.agents.critic import CriticAgent  # noqa: E402
from spiral_rl.config import load_config  # noqa: E402
from spiral_rl.records import SCORE_DIMS  # noqa: E402
from spiral_rl.world.corruptions import CORRUPTIONS, corrupt  # noqa: E402
from spiral_rl.world.dataset import ground_truth_segment  # noqa: E402
from spiral_rl.world.tasks import TaskSampler  # noqa: E402

from _common import cpu_name  # noqa: E402 (benchmarks/, first on sys.path)

RESULTS = Path(__file__).resolve().parent / "results" / "critic.json"


def build(cfg, n_tasks: int):
    """Ground-truth segments of every reference-plan step of n_tasks val tasks, and each corruption
    of them. Memory for a step is the exact scene before it (what a perfect critic would commit)."""
    sampler, size = TaskSampler(cfg.world), cfg.world.frame_size
    gt, bad = [], {kind: [] for kind in CORRUPTIONS}
    for i, task in enumerate(sampler.tasks("val", n_tasks)):
        scene = task.scene
        for j, sub in enumerate(task.reference_plan):
            frames, track, end = ground_truth_segment(scene, sub, sampler.physics, size)
            memory = SimpleNamespace(objects=scene)
            gt.append((frames, sub, memory))
            for k, kind in enumerate(CORRUPTIONS):
                f = corrupt(kind, scene, sub, track, size, np.random.default_rng([i, j, k]))
                if f is not None:
                    bad[kind].append((f, sub, memory))
            scene = end
    return gt, bad


def evaluate(critic, segs):
    """Mean score per dimension, and the verdicts."""
    verdicts = critic.score_batch(*zip(*segs))
    return {d: float(np.mean([v.scores[d] for v in verdicts])) for d in SCORE_DIMS}, verdicts


def throughput(critic, segs, batch: int, seconds: float) -> float:
    """Segments per second of score_batch over `segs`, median of repeated passes."""
    critic.score_batch(*zip(*segs[:batch]))  # warm-up: builds the colour lookup table
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t0 = time.perf_counter()
        for i in range(0, len(segs), batch):
            critic.score_batch(*zip(*segs[i:i + batch]))
        rates.append(len(segs) / (time.perf_counter() - t0))
    return float(np.median(rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config files / key=value overrides (spiral_rl.config)")
    ap.add_argument("--quick", action="store_true", help="20 tasks, short timing; never overwrites the results file")
    ap.add_argument("--tasks", type=int, default=None, help="val tasks (default 200, quick 20)")
    ap.add_argument("--batch", type=int, default=256, help="segments per score_batch call")
    ap.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, whatever the thread caps miss

    cfg = load_config(args.overrides)
    critic = CriticAgent.from_config(cfg)
    n_tasks = args.tasks or (20 if args.quick else 200)
    gt, bad = build(cfg, n_tasks)
    bad = {k: segs for k, segs in bad.items() if segs}
    gt_scores, gt_verdicts = evaluate(critic, gt)
    metrics = {"ground_truth": gt_scores, "corruptions": {}, "failure_named": {},
               "accepted": {"ground_truth": float(np.mean([v.accepted for v in gt_verdicts]))},
               "segments": {"ground_truth": len(gt), **{k: len(segs) for k, segs in bad.items()}}}
    for kind, segs in bad.items():
        metrics["corruptions"][kind], verdicts = evaluate(critic, segs)
        metrics["failure_named"][kind] = float(np.mean([CORRUPTIONS[kind].failure in v.failures for v in verdicts]))
        metrics["accepted"][kind] = float(np.mean([v.accepted for v in verdicts]))
    mixed = gt + [s for segs in bad.values() for s in segs]
    metrics["segments_per_s"] = throughput(critic, mixed, args.batch, 2.0 if args.quick else 10.0)
    metrics["segments_per_s_unbatched"] = throughput(critic, mixed[:200], 1, 1.0 if args.quick else 3.0)

    w = cfg.world
    print(f"critic on {n_tasks} val tasks, {w.frame_size}x{w.frame_size} px, {w.segment_frames} frames, 1 core")
    print(f"{'segments':<16}" + "".join(f"{d[:12]:>14}" for d in SCORE_DIMS) + f"{'n':>6}{'accepted':>10}{'named':>8}")
    for name, row in [("ground_truth", gt_scores), *metrics["corruptions"].items()]:
        named = metrics["failure_named"].get(name)
        print(f"{name:<16}" + "".join(f"{row[d]:>14.3f}" for d in SCORE_DIMS) + f"{metrics['segments'][name]:>6}"
              f"{metrics['accepted'][name]:>10.2f}" + (f"{named:>8.2f}" if named is not None else ""))
    print(f"throughput: {metrics['segments_per_s']:.0f} segments/s batched ({args.batch} per call), "
          f"{metrics['segments_per_s_unbatched']:.0f} segments/s one at a time")

    record = {"command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
              "device": f"{cpu_name()}, 1 core",
              "date": datetime.date.today().isoformat(),
              "config": {"frame_size": w.frame_size, "segment_frames": w.segment_frames, "tasks": n_tasks,
                         "batch": args.batch},
              "metrics": metrics}
    out = args.out or (Path(tempfile.gettempdir()) / "critic_quick.json" if args.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
