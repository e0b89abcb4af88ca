"""The ActWM-Bench-like evaluation: held-out tasks, every loop mode, one table.

Per mode: task success (every step's committed segment passed the critic), mean critic score
per dimension of committed segments, and attempts per sub-action. "One-shot" numbers come from
plan_only (each sub-action generated once, no retry), which is what GRPO should raise; spiral's
attempts per sub-action is what it should lower.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from spiral_rl.loop import ClosedLoop, Episode, LoopSettings
from spiral_rl.memory import WorldMemory
from spiral_rl.records import SCORE_DIMS, Task


def summarise(episodes: Sequence[Episode]) -> dict:
    steps = [s for e in episodes for s in e.steps]
    out = {"tasks": len(episodes), "success_rate": float(np.mean([e.success for e in episodes])) if episodes else 0.0,
           "attempts_per_step": float(np.mean([len(s.attempts) for s in steps])) if steps else 0.0,
           "steps": len(steps)}
    for d in SCORE_DIMS:
        out[d] = float(np.mean([s.verdict.scores[d] for s in steps])) if steps else 0.0
    return out


def evaluate(planner, critic, generator, tasks: Sequence[Task], cfg, base: LoopSettings,
             modes: Sequence[str] = ("open_loop", "plan_only", "spiral"), seed: int = 0) -> dict[str, dict]:
    """{mode: summary} over `tasks`; the same seeds in every mode, so modes differ only by the loop."""
    results = {}
    for mode in modes:
        settings = LoopSettings(mode, base.max_retries, base.max_replans, base.guidance,
                                base.retry_guidance_step, base.feedback_in_prompt)
        loop = ClosedLoop(planner, critic, generator, settings)
        episodes = [loop.run(t, WorldMemory.from_task(t, cfg), seed=seed + 10_000 * i) for i, t in enumerate(tasks)]
        results[mode] = summarise(episodes)
    return results


def format_table(results: dict[str, dict]) -> str:
    cols = ["success_rate", "attempts_per_step", *SCORE_DIMS]
    head = f"{'mode':<10}" + "".join(f"{c[:14]:>16}" for c in cols)
    rows = [f"{m:<10}" + "".join(f"{r[c]:>16.3f}" for c in cols) for m, r in results.items()]
    return "\n".join([head, *rows])
