"""Three batching choices of the CPU policy-improvement run (configs/grpo_improve.yaml), each timed
side by side with its baseline in one process, on the run's own model, tasks and batch:

    python benchmarks/grpo_cpu_costs.py            # -> results/grpo_cpu_costs.json
    python benchmarks/grpo_cpu_costs.py --quick    # 4 tasks, 16 segments, 1 repetition; temp output

1. Closed-loop episodes: spiral_rl.evaluate over --tasks val tasks in every loop mode (what the
   run's evaluations and, per iteration, its rollout episodes do), one episode at a time
   (loop.episode_batch=1, the baseline) against side by side (the config's loop.episode_batch:
   ClosedLoop.run_many hands a round's pending segments to the world model as one batch). Whether
   the two tables are equal is recorded (each segment has its own seed; only float order differs).
2. SDE sampling: the config's groups (grpo.prompts_per_iter x G segments, grpo.sample_steps) drawn
   in one batch (cluster.rollout_micro_batch=0, the baseline) against slices of the config's
   cluster.rollout_micro_batch; the samples are checked equal to float rounding.
3. The learner: one GRPO update of the config's batch (grpo.prompts_per_iter x G SDE segments from
   closed-loop prompts, every step of the window), the whole batch per pass (cluster.micro_batch=0,
   the baseline) against micro-batches of the config's cluster.micro_batch and twice it. lr 0, so
   every repetition sees the same weights; repetitions interleaved, medians compared.

CPU ratios only (an absolute CPU time says little about another host). Any config override goes
after the options, e.g. `grpo.prompts_per_iter=8`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import checkpoint_id, cpu_name, write_record  # noqa: E402  (benchmarks/ is first on sys.path)
from actors.rollout import RolloutWorker, group_settings, loop_settings  # noqa: E402
from spiral_rl.agents.critic import CriticAgent  # noqa: E402
from spiral_rl.config import load_config_or_exit  # noqa: E402
from spiral_rl.evaluate import evaluate  # noqa: E402
from spiral_rl.grpo import GRPOLearner, GRPOSettings  # noqa: E402
from spiral_rl.records import SCORE_DIMS  # noqa: E402
from spiral_rl.rollout import draw_window, sample_sde, score_groups, to_batch  # noqa: E402
from spiral_rl.world.tasks import TaskSampler  # noqa: E402
from spiral_rl.world_model import WorldModel  # noqa: E402

CONFIG = ROOT / "configs" / "grpo_improve.yaml"


def time_episodes(worker, cfg, tasks, width: int) -> tuple[float, dict]:
    """Seconds to evaluate `tasks` in every mode with `width` episodes side by side, and the table."""
    cfg = replace(cfg, loop=replace(cfg.loop, episode_batch=width))
    t0 = time.perf_counter()
    table = evaluate(worker.planner, worker.critic, worker.generator, tasks, cfg, loop_settings(cfg), seed=0)
    return time.perf_counter() - t0, table


def closed_loop_prompts(worker, count: int) -> list:
    """`count` GRPO prompts from closed-loop episodes of train tasks, as the driver gets them."""
    prompts, episodes = [], 0
    while len(prompts) < count:
        found, _ = worker.episodes("train", episodes, list(range(episodes, episodes + 8)))
        prompts, episodes = prompts + found, episodes + 8
    return prompts[:count]


def time_sampling(worker, cfg, prompts, window, micro_batch: int):
    """Seconds to draw the groups of `prompts` in slices of micro_batch (0: one batch), and them."""
    settings = replace(group_settings(cfg), micro_batch=micro_batch)
    t0 = time.perf_counter()
    samples = sample_sde(worker.model, prompts, settings, np.random.default_rng(cfg.run.seed), window)
    return time.perf_counter() - t0, samples


def learner_batch(samples, critic, cfg, device):
    """The learner batch the driver builds from `samples`: critic -> group advantages -> records."""
    weights = {d: float(getattr(cfg.reward.weights, d)) for d in SCORE_DIMS}
    groups, _ = score_groups(samples, critic.score_batch(*samples.critic_inputs()), weights,
                             cfg.reward.aggregation, 0)
    return to_batch([r for grp in groups for r in grp], device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=16, help="val tasks evaluated in every mode, per width")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each sampling and learner variant")
    ap.add_argument("--quick", action="store_true", help="4 tasks, 16 segments, 1 repetition; temp output")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/grpo_cpu_costs.json)")
    ap.add_argument("overrides", nargs="*", help="config key=value (on top of configs/grpo_improve.yaml)")
    args = ap.parse_intermixed_args()
    quick = (["grpo.prompts_per_iter=2", "model.sample_steps=3", "loop.episode_batch=4", "cluster.micro_batch=8",
              "cluster.rollout_micro_batch=8"] if args.quick else [])
    if args.quick:
        args.tasks, args.reps = 4, 1
    cfg = load_config_or_exit([str(CONFIG), *args.overrides, *quick])
    torch.manual_seed(cfg.run.seed)
    worker = RolloutWorker(cfg, model=WorldModel.from_config(cfg))  # the local run's setup: threads untouched
    critic = CriticAgent.from_config(cfg)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; checkpoint "
          f"{cfg.model.pretrained_path}", flush=True)

    width = cfg.loop.episode_batch
    tasks = TaskSampler(cfg.world).tasks("val", args.tasks)
    time_episodes(worker, cfg, tasks[:2], width)  # warm-up: first-call allocations
    alone_s, alone = time_episodes(worker, cfg, tasks, 1)
    together_s, together = time_episodes(worker, cfg, tasks, width)
    equal = alone == together  # batched matmuls round differently: a verdict at a threshold could flip
    print(f"episodes ({args.tasks} val tasks x 3 modes): one at a time {alone_s:.1f} s, {width} side by side "
          f"{together_s:.1f} s: {alone_s / together_s:.2f}x (tables {'equal' if equal else 'DIFFER'})", flush=True)

    segments = cfg.grpo.prompts_per_iter * cfg.grpo.group_size
    prompts = closed_loop_prompts(worker, cfg.grpo.prompts_per_iter)
    window = draw_window(group_settings(cfg), np.random.default_rng(cfg.run.seed))
    slice_size = cfg.cluster.rollout_micro_batch or 16  # the config's slices, or 16 where it samples whole
    whole_t, slice_t = [], []
    for rep in range(args.reps):  # interleaved, as the learner's sizes below
        t, whole = time_sampling(worker, cfg, prompts, window, 0)
        whole_t.append(t)
        t, sliced = time_sampling(worker, cfg, prompts, window, slice_size)
        slice_t.append(t)
    same = bool(np.abs(whole.latents - sliced.latents).max() < 1e-4)
    sample_speedup = statistics.median(whole_t) / statistics.median(slice_t)
    print(f"SDE sampling ({segments} segments x {cfg.grpo.sample_steps} steps): one batch "
          f"{statistics.median(whole_t):.1f} s, slices of {slice_size} {statistics.median(slice_t):.1f} s: "
          f"{sample_speedup:.2f}x (samples {'equal' if same else 'DIFFER'})", flush=True)
    batch = learner_batch(whole, critic, cfg, worker.model.device)
    m0 = cfg.cluster.micro_batch or 16
    sizes = [0] + [m for m in (m0, 2 * m0) if m < segments and segments % m == 0]
    learner = GRPOLearner(worker.model, GRPOSettings.from_config(cfg), lr=0.0)
    times: dict[int, list[float]] = {m: [] for m in sizes}
    learner.update(batch, check_ratio=True)  # warm-up, and the rollout matches the policy (ratio 1)
    for rep in range(args.reps):
        for m in sizes:
            learner.micro_batch = m
            t0 = time.perf_counter()
            learner.update(batch, check_ratio=True)  # lr 0: the weights never move
            times[m].append(time.perf_counter() - t0)
        print(f"learner rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{m or 'whole'} {times[m][-1]:.1f} s" for m in sizes), flush=True)
    median = {m: statistics.median(t) for m, t in times.items()}
    best = min((m for m in sizes if m), key=median.get, default=0)
    speedup = {f"micro_{m}": round(median[0] / median[m], 3) for m in sizes if m}
    print(f"learner ({segments} segments x {len(batch.steps)} steps): whole batch {median[0]:.1f} s; "
          + ", ".join(f"micro {m}: {median[0] / median[m]:.2f}x" for m in sizes if m), flush=True)

    metrics = {"episode_tasks": args.tasks, "episode_batch": width,
               "episodes_one_at_a_time_s": round(alone_s, 2), "episodes_side_by_side_s": round(together_s, 2),
               "episodes_speedup": round(alone_s / together_s, 3), "episode_tables_equal": equal,
               "sampling_one_batch_s": round(statistics.median(whole_t), 2), "sampling_micro_batch": slice_size,
               "sampling_sliced_s": round(statistics.median(slice_t), 2), "sampling_speedup": round(sample_speedup, 3),
               "sampling_samples_equal": same,
               "learner_segments": segments, "learner_steps": len(batch.steps),
               "learner_whole_batch_s": round(median[0], 2),
               "learner_micro_s": {str(m): round(median[m], 2) for m in sizes if m},
               "learner_speedup_vs_whole_batch": speedup, "learner_best_micro_batch": best,
               "threads": torch.get_num_threads(), "repetitions": args.reps}
    write_record("grpo_cpu_costs", f"{cpu_name()}, {torch.get_num_threads()} threads",
                 {"config": "configs/grpo_improve.yaml", "overrides": args.overrides,
                  **checkpoint_id(cfg.model.pretrained_path, ROOT)}, metrics, args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
