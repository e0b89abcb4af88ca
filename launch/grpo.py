"""GRPO post-training of the world model with the closed loop's critic as reward.

    python launch/grpo.py                                          # the embedded default (CPU)
    python launch/grpo.py configs/grpo_ci.yaml run.output_dir=runs/grpo_ci     # CI-sized smoke run
    python launch/grpo.py reward.weights.visual_quality=0 run.output_dir=runs/ablate_quality

Single controller: this driver owns the iteration and times each stage,

    rollout   closed-loop episodes on train tasks with the current model -> prompts (where the loop
              needed a segment, with what memory held then)
    sample    G SDE samples per prompt, one shared window of noisy steps (rollout.sample_groups)
    critic    scores -> rewards -> group advantages (grpo.group_advantages)
    replay    every group appended durably (replay.ReplayStore)
    learner   grpo.updates_per_iter GRPO steps on the iteration's groups; the first asserts rho == 1
    eval      every grpo.eval_every iterations: open-loop / plan-only / SPIRAL on val tasks

Writes into run.output_dir: config.yaml, metrics.jsonl (one line per iteration), eval.jsonl,
replay/, world_model.pt (the post-trained weights), rewards.png (reward per dimension).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.agents.planner import PlanAgent
from spiral_rl.config import config_to_dict, load_config_or_exit, save_config
from spiral_rl.evaluate import evaluate, format_table
from spiral_rl.grpo import GRPOLearner, GRPOSettings
from spiral_rl.loop import ClosedLoop, LoopSettings
from spiral_rl.memory import WorldMemory
from spiral_rl.records import SCORE_DIMS
from spiral_rl.replay import ReplayStore
from spiral_rl.rollout import GroupSettings, ModelGenerator, prompts_from_episodes, sample_groups, to_batch
from spiral_rl.world.tasks import TaskSampler
from spiral_rl.world_model import WorldModel


def plot_rewards(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    it = [r["iteration"] for r in rows]
    for d in SCORE_DIMS:
        ax.plot(it, [r[f"score/{d}"] for r in rows], label=d)
    ax.plot(it, [r["reward_mean"] for r in rows], "k--", label="reward")
    ax.set_xlabel("GRPO iteration")
    ax.set_ylabel("mean critic score of sampled segments")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    cfg = load_config_or_exit(argv)
    g = cfg.grpo
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    if not cfg.model.pretrained_path:
        sys.exit("grpo needs a pre-trained world model: set model.pretrained_path (see launch/sft.py)")
    model = WorldModel.from_config(cfg)
    sampler, planner, critic = TaskSampler(cfg.world), PlanAgent.from_config(cfg), CriticAgent.from_config(cfg)
    weights = {d: getattr(cfg.reward.weights, d) for d in SCORE_DIMS}
    loop_settings = LoopSettings("spiral", cfg.loop.max_retries, cfg.loop.max_replans, cfg.model.guidance)
    group = GroupSettings(g.group_size, g.sample_steps, g.noise_level, g.window, g.train_steps, cfg.model.guidance)
    learner = GRPOLearner(model, GRPOSettings(g.clip_range, g.kl_coef, g.reduction, adv_clip=g.adv_clip,
                                              max_grad_norm=g.max_grad_norm, aggregation=cfg.reward.aggregation),
                          lr=g.lr)
    replay = ReplayStore(out / "replay", capacity=g.replay_capacity)
    generator = ModelGenerator(model)
    val_tasks = sampler.tasks(cfg.run.split, g.eval_tasks)
    print(f"grpo: {g.iterations} iterations x {g.episodes_per_iter} episodes -> up to {g.prompts_per_iter} "
          f"prompts x G={g.group_size} = {g.prompts_per_iter * g.group_size} segments per learner step; "
          f"SDE {g.sample_steps} steps, window {g.window or g.sample_steps}, train on "
          f"{g.train_steps or g.window or g.sample_steps} of them, {g.updates_per_iter} update(s) per iteration",
          flush=True)

    def run_eval(iteration: int) -> dict:
        model.eval()
        t0 = time.perf_counter()
        res = evaluate(planner, critic, generator, val_tasks, cfg, loop_settings, seed=cfg.run.seed)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"iteration": iteration, **res}) + "\n")
        print(f"eval @ {iteration} ({time.perf_counter() - t0:.0f} s, {len(val_tasks)} {cfg.run.split} tasks)\n"
              + format_table(res), flush=True)
        return res

    first = run_eval(0)
    rows, task_index = [], 0
    for it in range(1, g.iterations + 1):
        times, t0 = {}, time.perf_counter()
        model.eval()
        loop = ClosedLoop(planner, critic, generator, loop_settings)
        tasks = sampler.tasks("train", g.episodes_per_iter, start=task_index)
        task_index += g.episodes_per_iter
        episodes = [loop.run(t, WorldMemory.from_task(t, cfg), seed=int(rng.integers(2**31))) for t in tasks]
        prompts = prompts_from_episodes(episodes)
        if len(prompts) > g.prompts_per_iter:
            prompts = [prompts[i] for i in sorted(rng.choice(len(prompts), g.prompts_per_iter, replace=False))]
        times["rollout"] = time.perf_counter() - t0
        groups, stats = sample_groups(model, critic, prompts, group, weights, cfg.reward.aggregation, it, rng)
        times["sample"], times["critic"] = stats.pop("sample_s"), stats.pop("critic_s")
        t1 = time.perf_counter()
        for grp in groups:
            replay.append_many(grp)
        times["replay"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        records = [r for grp in groups for r in grp if not np.isnan(r.advantage)]
        upd: dict = {}
        if any(r.advantage != 0 for r in records):
            for u in range(g.updates_per_iter):
                batch = to_batch(records, model.device, g.train_steps, rng)
                upd = learner.update(batch, check_ratio=(u == 0))
        times["learner"] = time.perf_counter() - t1
        row = {"iteration": it, **stats, **{f"loss/{k}": v for k, v in upd.items()},
               "episode_success": float(np.mean([e.success for e in episodes])),
               "attempts_per_step": float(np.mean([len(s.attempts) for e in episodes for s in e.steps])),
               **{f"time/{k}": round(v, 3) for k, v in times.items()},
               "segments_per_s": stats["segments"] / max(time.perf_counter() - t0, 1e-9)}
        rows.append(row)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        split = " ".join(f"{k} {v:.1f}s" for k, v in times.items())
        print(f"[{it}/{g.iterations}] reward {stats['reward_mean']:.3f} | "
              + " ".join(f"{d[:8]} {stats[f'score/{d}']:.2f}" for d in SCORE_DIMS)
              + f" | success {row['episode_success']:.2f} | degenerate {stats['degenerate_groups']}/{stats['prompts']}"
              + f" | ratio0 {upd.get('first_ratio_max_dev', float('nan')):.1e} clip {upd.get('clip_frac', 0):.2f}"
              + f" | {row['segments_per_s']:.1f} seg/s | {split}", flush=True)
        if g.eval_every and it % g.eval_every == 0 and it != g.iterations:
            run_eval(it)
    last = run_eval(g.iterations)
    model.save(out / "world_model.pt")
    plot_rewards(rows, out / "rewards.png")
    summary = {"before": first, "after": last, "config": config_to_dict(cfg), "replay": replay.stats()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{replay.log_line()}\nwrote {out}/summary.json, rewards.png, world_model.pt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
