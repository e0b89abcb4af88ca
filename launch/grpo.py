"""GRPO post-training of the world model with the closed loop's critic as reward.

    python launch/grpo.py configs/grpo_ci.yaml model.pretrained_path=runs/sft_ci run.output_dir=runs/grpo_ci
        # CI size, one process (cluster.mode=local), ~1 min on 2 cores
    python launch/grpo.py configs/grpo_ray_ci.yaml model.pretrained_path=runs/sft_ci run.output_dir=runs/grpo_ray_ci
        # CI size on a local Ray: 1 rollout worker, 2 critic servers, 2 DeepSpeed learner ranks (gloo)
    python launch/grpo.py model.pretrained_path=runs/sft run.output_dir=runs/grpo
        # the embedded default: local Ray, CPU, 2 ZeRO-2 learner ranks
    python launch/grpo.py model.pretrained_path=runs/sft run.output_dir=runs/grpo grpo.resume=true
        # continue from the latest checkpoint in run.output_dir
    ray job submit --working-dir . -- python3 launch/grpo.py model.pretrained_path=/shared/sft \\
        run.output_dir=/shared/runs/grpo cluster.learner_gpus=1 cluster.rollout_gpus=1 cluster.rollout_workers=4
        # a cluster: run.output_dir and model.pretrained_path on storage every node sees

Single controller: this driver owns the iteration and times each stage,

    rollout   closed-loop episodes on train tasks with the current model -> prompts (where the loop
              needed a segment, with what memory held then); exactly grpo.prompts_per_iter of them
    sample    G SDE samples per prompt, one shared window of noisy steps drawn here
    critic    scores (CriticServers, load-balanced, retried) -> rewards -> group advantages
    replay    every group appended durably (the replay store)
    learner   grpo.updates_per_iter GRPO steps on the iteration's groups; the first asserts rho == 1
    sync      learner weights -> rollout workers, verified on arrival (cluster.mode=ray)
    eval      every grpo.eval_every iterations: open-loop / plan-only / SPIRAL on val tasks

The stages (actors/stages.py): cluster.mode=local runs every one in this process (GRPOLearner);
cluster.mode=ray runs them on actors: N RolloutWorkers, M CriticServers, one ReplayStoreActor and
a LearnerGroup of K DeepSpeed ranks. With no cluster address it starts a local Ray; under
`ray job submit` it joins. grpo.pipeline=true overlaps iteration n+1's rollout with iteration n's
learner step (one update off-policy).

Writes into run.output_dir: config.yaml, metrics.jsonl (one line per iteration), tb/ (TensorBoard),
eval.jsonl, replay/, checkpoints/ (learner, driver state; latest.json names the newest),
world_model.pt (the post-trained weights), rewards.png (reward per dimension), summary.json.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from actors.rollout import group_settings
from actors.stages import LocalStages, RayStages
from spiral_rl.config import config_to_dict, load_config_or_exit, save_config
from spiral_rl.evaluate import format_table
from spiral_rl.records import SCORE_DIMS
from spiral_rl.rollout import draw_window, grpo_batch_plan, score_groups

STAGES = ("rollout", "sample", "critic", "replay", "learner", "sync")
KEEP_CHECKPOINTS = 2


# --------------------------------------------------------------------------- the driver


def print_plan(cfg) -> None:
    """Every derived batch quantity, with the keys it comes from."""
    p, g, ray = grpo_batch_plan(cfg), cfg.grpo, cfg.cluster.mode == "ray"
    rows = [("prompts per iteration", p["prompts_per_iter"], f"grpo.prompts_per_iter, from grpo.episodes_per_iter="
             f"{g.episodes_per_iter} closed-loop episodes"),
            ("group size G", p["group_size"], "grpo.group_size"),
            ("segments per learner step", p["segments_per_learner_step"], "prompts x G"),
            ("learner ranks", p["learner_ranks"], "cluster.learner_ranks" if ray else "cluster.mode=local: one process"),
            ("per-rank batch", p["per_rank_batch"], "segments / ranks"),
            ("micro-batch", p["micro_batch"], f"cluster.micro_batch -> {p['micro_batches_per_rank']} per rank"
             if cfg.cluster.micro_batch else "cluster.micro_batch=0: the whole batch"),
            ("trained steps per update", p["trained_steps_per_update"],
             f"grpo.train_steps of a window of {p['sde_window_steps']} (grpo.window) of {g.sample_steps} SDE steps"),
            ("gradient accumulation", p["grad_accumulation"], "backward passes per optimizer step: micro-batches x steps"),
            ("updates per iteration", p["updates_per_iter"], "grpo.updates_per_iter"),
            ("iterations", g.iterations, "grpo.iterations")]
    print("derived quantities:\n" + "\n".join(f"  {name:<27}{value:>6}   {why}" for name, value, why in rows), flush=True)


# grpo.prompt_focus -> sort key over prompts (smallest first); 'all' draws uniformly.
FOCUS_ORDER = {"retried": lambda p: not p.retried, "incomplete": lambda p: p.first_completeness}


def choose_prompts(prompts: list, n: int, rng: np.random.Generator, focus: str = "all") -> tuple[list, int]:
    """Exactly n prompts: a random subset, or all of them topped up by repeats (each repeat is a new
    group with new seeds). focus='retried' fills the subset with the steps the critic rejected at
    first try before any other; 'incomplete' with the steps whose first try was least complete.
    Returns (prompts, repeats)."""
    if len(prompts) >= n:
        if focus in FOCUS_ORDER:  # a stable sort of a random order: ties stay random
            picked = sorted(rng.permutation(len(prompts)), key=lambda i: FOCUS_ORDER[focus](prompts[i]))[:n]
        else:
            picked = rng.choice(len(prompts), n, replace=False)
        return [prompts[i] for i in sorted(picked)], 0
    extra = rng.choice(len(prompts), n - len(prompts), replace=True)
    return prompts + [prompts[i] for i in extra], n - len(prompts)


def draw_steps(window: tuple[int, int], train_steps: int, rng: np.random.Generator) -> list[int]:
    """The window's steps an update trains on (all, or train_steps of them), shared by every rank."""
    steps = list(range(*window))
    if train_steps and train_steps < len(steps):
        steps = sorted(rng.choice(steps, size=train_steps, replace=False).tolist())
    return steps


def plot_rewards(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU image may lack it; metrics.jsonl holds the same curves
        print(f"matplotlib is not installed: {path.name} not drawn (metrics.jsonl has the curves)", flush=True)
        return
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


class Checkpoints:
    """checkpoints/learner/<tag>/ (the learner's own format), checkpoints/driver-<tag>.json
    (iteration, task cursor, replay position, first eval), checkpoints/latest.json (written
    last, atomically: a checkpoint exists once it is named there). Keeps the newest KEEP_CHECKPOINTS."""

    def __init__(self, out: Path):
        self.dir = out / "checkpoints"

    def latest(self) -> dict | None:
        path = self.dir / "latest.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, stages, iteration: int, driver_state: dict) -> str:
        tag = f"iter{iteration:06d}"  # never "latest": DeepSpeed's pointer file has that name
        (self.dir / "learner").mkdir(parents=True, exist_ok=True)
        stages.save(self.dir / "learner", tag, {"iteration": iteration})
        (self.dir / f"driver-{tag}.json").write_text(json.dumps(driver_state))
        tmp = self.dir / "latest.json.tmp"
        tmp.write_text(json.dumps({"iteration": iteration, "tag": tag}))
        os.replace(tmp, self.dir / "latest.json")
        for old in sorted(self.dir.glob("driver-iter*.json"))[:-KEEP_CHECKPOINTS]:
            old_tag = old.stem[len("driver-"):]
            shutil.rmtree(self.dir / "learner" / old_tag, ignore_errors=True)
            old.unlink()
        return tag

    def load(self, stages) -> dict:
        latest = self.latest()
        stages.load(self.dir / "learner", latest["tag"])
        return json.loads((self.dir / f"driver-{latest['tag']}.json").read_text())


def keep_rows(path: Path, last_iteration: int) -> list[dict]:
    """The JSONL rows up to last_iteration (a resumed run drops what came after its checkpoint)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["iteration"] <= last_iteration]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main(argv: list[str]) -> int:
    cfg = load_config_or_exit(argv)
    g = cfg.grpo
    if not cfg.model.pretrained_path and not g.random_init:
        sys.exit("grpo needs a pre-trained world model: set model.pretrained_path (see launch/sft.py); "
                 "grpo.random_init=true allows random weights, for throughput benchmarks")
    # actors may start elsewhere: give them an absolute path ('' is random init, not the cwd)
    if cfg.model.pretrained_path and Path(cfg.model.pretrained_path).exists():
        cfg.model.pretrained_path = str(Path(cfg.model.pretrained_path).resolve())
    out = Path(cfg.run.output_dir).resolve()
    ckpts = Checkpoints(out)
    latest = ckpts.latest()
    if latest and not g.resume:
        sys.exit(f"{ckpts.dir} holds a checkpoint of an earlier run (iteration {latest['iteration']}); pass "
                 "grpo.resume=true to continue it, or pick another run.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    print_plan(cfg)
    if cfg.cluster.mode == "ray":
        from actors.cluster import set_local_env
        set_local_env(cfg)  # before Ray is imported
        stages = RayStages(cfg, out)
    else:
        stages = LocalStages(cfg, out)
    try:
        return run(cfg, stages, out, ckpts, latest if g.resume else None)
    finally:
        stages.shutdown()


def produce(cfg, stages, it: int, task_index: int, version: int) -> dict:
    """Iteration `it`'s data: closed-loop episodes -> prompts -> SDE groups -> critic -> replay.
    Seeded per iteration ([run.seed, it]), so a pipelined run, a resumed run and a plain run draw
    the same prompts, windows and noise. `version`: updates applied to the weights that sample."""
    g, rng = cfg.grpo, np.random.default_rng([cfg.run.seed, it])
    weights = {d: getattr(cfg.reward.weights, d) for d in SCORE_DIMS}
    times = {}
    t0 = time.perf_counter()
    found, ep = stages.episodes(task_index, rng.integers(0, 2**31, size=g.episodes_per_iter).tolist())
    prompts, repeats = choose_prompts(found, g.prompts_per_iter, rng, g.prompt_focus)
    times["rollout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples = stages.sample(prompts, draw_window(group_settings(cfg), rng), int(rng.integers(2**31)))
    times["sample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    verdicts = stages.score(samples)
    groups, stats = score_groups(samples, verdicts, weights, cfg.reward.aggregation, version)
    times["critic"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stages.store(groups)
    times["replay"] = time.perf_counter() - t0
    return {"groups": groups, "stats": stats, "window": samples.window, "found": len(found), "repeats": repeats,
            "retried": sum(p.retried for p in prompts), "episodes": ep, "times": times, "version": version}


def run(cfg, stages, out: Path, ckpts: Checkpoints, resume: dict | None) -> int:
    g = cfg.grpo
    print(stages.describe(), flush=True)
    try:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tb"))
    except ImportError:  # tensorboard is in the [dist] extra
        tb = None

    def run_eval(iteration: int) -> dict:
        t0 = time.perf_counter()
        res = stages.evaluate(cfg.run.split, g.eval_tasks, cfg.run.seed)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"iteration": iteration, **res}) + "\n")
        print(f"eval @ {iteration} ({time.perf_counter() - t0:.0f} s, {g.eval_tasks} {cfg.run.split} tasks)\n"
              + format_table(res), flush=True)
        return res

    if resume:
        state = ckpts.load(stages)
        rows = keep_rows(out / "metrics.jsonl", state["iteration"])
        keep_rows(out / "eval.jsonl", state["iteration"])
        first, start, task_index = state["first_eval"], state["iteration"] + 1, state["task_index"]
        print(f"resumed from {ckpts.dir / 'learner' / resume['tag']} at iteration {state['iteration']}; replay holds "
              f"{stages.replay_stats()['records']} records ({state['replay_records']} at the checkpoint)", flush=True)
    else:
        first, rows, start, task_index = None, [], 1, 0
    sync = stages.sync(start - 1)  # the rollout workers start from the learner's weights, verified
    if sync:
        print(f"weight sync: {sync['params']} params in {sync['buckets']} bucket(s) verified on every rollout "
              f"worker ({sync['seconds']:.2f} s)", flush=True)
    if first is None:
        first = run_eval(0)

    def checkpoint(iteration: int) -> None:
        tag = ckpts.save(stages, iteration, {"iteration": iteration, "task_index": task_index,
                                             "first_eval": first,
                                             "replay_records": stages.replay_stats()["records"]})
        print(f"checkpoint {tag} -> {ckpts.dir}", flush=True)

    # One-step-off-policy pipelining (grpo.pipeline): iteration it+1's rollouts run on the rollout
    # workers, with the weights that sampled iteration it, while the learner trains on iteration
    # it. The lock makes the lag exactly one update: the weight sync after learning waits until
    # that rollout is done, so no rollout mixes two weight versions.
    pool = ThreadPoolExecutor(1) if g.pipeline else None
    worker_lock = threading.Lock()

    def produce_locked(it: int, index: int, version: int) -> dict:
        with worker_lock:
            return produce(cfg, stages, it, index, version)

    pending = None
    for it in range(start, g.iterations + 1):
        t_iter = time.perf_counter()
        # pending: this iteration's data, produced during the last one; else (the first iteration,
        # or not pipelined) produce it now, on-policy
        data = pending.result() if pending else produce_locked(it, task_index, it - 1)
        task_index += g.episodes_per_iter
        pending = (pool.submit(produce_locked, it + 1, task_index, it - 1)
                   if pool and it < g.iterations else None)
        lag = (it - 1) - data["version"]  # updates between the sampling weights and the learner's

        times = {**dict.fromkeys(STAGES, 0.0), **data["times"]}
        groups, stats = data["groups"], data["stats"]
        step_rng = np.random.default_rng([cfg.run.seed, it, 1])
        t0 = time.perf_counter()
        records = [r for grp in groups for r in grp]
        upd: dict = {}
        if any(r.advantage != 0 for r in records):  # else every group is degenerate: nothing to learn
            for u in range(g.updates_per_iter):
                # rho == 1 holds only on-policy; a lagged batch's first ratio is the off-policy correction
                upd = stages.learn(records, draw_steps(data["window"], g.train_steps, step_rng),
                                   check_ratio=(u == 0 and lag == 0))
            times["learner"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with worker_lock:
                stages.sync(it)
            times["sync"] = time.perf_counter() - t0

        elapsed = time.perf_counter() - t_iter
        ep = data["episodes"]
        memory = {"memory/learner_peak_gib": upd.pop("peak_memory_gib")} if "peak_memory_gib" in upd else {}
        row = {"iteration": it, **stats, "prompts_found": data["found"], "prompts_repeated": data["repeats"],
               "prompts_retried": data["retried"], "policy_lag": lag,
               **{f"loss/{k}": v for k, v in upd.items()}, **memory,
               "episode_success": float(np.mean(ep["success"])), "attempts_per_step": float(np.mean(ep["attempts"])),
               **{f"time/{k}": round(v, 3) for k, v in times.items()}, "time/iteration": round(elapsed, 3),
               "segments_per_s": stats["segments"] / elapsed}
        rows.append(row)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    tb.add_scalar(k, v, it)
            tb.flush()
        split = " ".join(f"{k} {v:.1f}s" for k, v in times.items())
        print(f"[{it}/{g.iterations}] reward {stats['reward_mean']:.3f} | "
              + " ".join(f"{d[:8]} {stats[f'score/{d}']:.2f}" for d in SCORE_DIMS)
              + f" | success {row['episode_success']:.2f} | degenerate {stats['degenerate_groups']}/{stats['prompts']}"
              + f" | ratio0 {upd.get('first_ratio_max_dev', float('nan')):.1e} clip {upd.get('clip_frac', 0):.2f}"
              + f" | {row['segments_per_s']:.2f} seg/s | {split} | wall {elapsed:.1f}s", flush=True)
        if g.eval_every and it % g.eval_every == 0 and it != g.iterations:
            if pending is not None:  # evaluate the learner's weights, not mid-rollout: let it finish
                pending.result()
            run_eval(it)
        if g.checkpoint_every and it % g.checkpoint_every == 0 and it != g.iterations:
            checkpoint(it)
    if pool:
        pool.shutdown()

    last = run_eval(g.iterations)
    if g.save_final:
        if start <= g.iterations:
            checkpoint(g.iterations)
        stages.final_model().save(out / "world_model.pt")
    if tb is not None:
        tb.close()
    plot_rewards(rows, out / "rewards.png")
    summary = {"before": first, "after": last, "config": config_to_dict(cfg), "replay": stages.replay_stats(),
               "iterations": g.iterations, "mode": cfg.cluster.mode}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{stages.replay_line()}\nwrote {out}/summary.json, metrics.jsonl, rewards.png"
          + (", world_model.pt, checkpoints/" if g.save_final else " (grpo.save_final=false: no final weights)"),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
