"""Evaluation: segments scored by the critic, and the ActWM-Bench-like table of loop modes.

Segment level (pre-training): ODE-sample each val example's segment from its ground-truth
context and score it (`score_examples`); seeds are per example, so results do not depend on
batching or on how examples are split over ranks.

Episode level (the benchmark): held-out tasks, every loop mode, one table.

Per mode: task success (every step's committed segment passed the critic), mean critic score
per dimension of committed segments, and attempts per sub-action. "One-shot" numbers come from
plan_only (each sub-action generated once, no retry), which is what GRPO should raise; spiral's
attempts per sub-action is what it should lower.
"""
from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Sequence

import numpy as np

from spiral_rl.loop import ClosedLoop, Episode, LoopSettings
from spiral_rl.memory import WorldMemory
from spiral_rl.records import SCORE_DIMS, Task

VAL_SEED = 12345  # noise of validation losses and evaluation samples: fixed, so runs compare


def collate(examples) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """SegmentExamples -> context (B, K, H, W, 3) uint8, frames (B, T, H, W, 3) uint8, texts."""
    return (np.stack([e.context for e in examples]), np.stack([e.frames for e in examples]),
            [e.sub_action.text for e in examples])


def hash_id(example) -> int:
    """A stable int per example (its task id and step text), for per-example seeds."""
    return zlib.crc32(f"{example.task_id}/{example.sub_action.text}".encode())


def score_examples(model, examples, critic, batch_size: int, context_frames: int) -> list[dict]:
    """ODE-sample each example's segment (model None: take the ground truth) and score it."""
    rows = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        context, truth, texts = collate(chunk)
        frames = truth if model is None else model.generate(context, texts, seed=[VAL_SEED + hash_id(e) for e in chunk])
        memories = [WorldMemory(e.context, e.scene, context_frames) for e in chunk]
        for e, v in zip(chunk, critic.score_batch(list(frames), [e.sub_action for e in chunk], memories)):
            rows.append({"verb": e.sub_action.verb, "decision": v.decision, **v.scores})
    return rows


def summarise_rows(rows: list[dict]) -> dict:
    """Mean score per dimension, acceptance rate and count of score_examples rows."""
    mean = lambda rs, d: round(float(np.mean([r[d] for r in rs])), 4) if rs else None  # noqa: E731
    out = {d: mean(rows, d) for d in SCORE_DIMS}
    out["accepted"] = round(float(np.mean([r["decision"] == "accept" for r in rows])), 4) if rows else None
    out["segments"] = len(rows)
    return out


def summarise(episodes: Sequence[Episode]) -> dict:
    steps = [s for e in episodes for s in e.steps]
    out = {"tasks": len(episodes), "success_rate": float(np.mean([e.success for e in episodes])) if episodes else 0.0,
           "attempts_per_step": float(np.mean([len(s.attempts) for s in steps])) if steps else 0.0,
           "steps": len(steps)}
    for d in SCORE_DIMS:
        out[d] = float(np.mean([s.verdict.scores[d] for s in steps])) if steps else 0.0
    # Per verb, because a mean over steps hides which skill is missing (one verb can hold a mode's gap).
    out["by_verb"] = {}
    for verb in sorted({s.sub_action.verb for s in steps}):
        done = [s.verdict.scores["action_completeness"] for s in steps if s.sub_action.verb == verb]
        out["by_verb"][verb] = {"steps": len(done), "action_completeness": float(np.mean(done))}
    return out


def run_mode(planner, critic, generator, tasks: Sequence[Task], cfg, base: LoopSettings, mode: str,
             seed: int = 0) -> list[Episode]:
    """One episode per task in `mode` (base's budgets); task i gets seed + 10_000 i, so every mode
    (and every caller: evaluate, benchmarks/loop_gain.py) sees the same noise on the same task."""
    loop = ClosedLoop(planner, critic, generator, replace(base, mode=mode))
    return loop.run_many([(t, WorldMemory.from_task(t, cfg), seed + 10_000 * i) for i, t in enumerate(tasks)],
                         cfg.loop.episode_batch)


def evaluate(planner, critic, generator, tasks: Sequence[Task], cfg, base: LoopSettings,
             modes: Sequence[str] = ("open_loop", "plan_only", "spiral"), seed: int = 0) -> dict[str, dict]:
    """{mode: summary} over `tasks`; the same seeds in every mode, so modes differ only by the loop."""
    return {mode: summarise(run_mode(planner, critic, generator, tasks, cfg, base, mode, seed)) for mode in modes}


def format_table(results: dict[str, dict]) -> str:
    """One row per mode, then each mode's completeness per verb (score / steps)."""
    cols = ["success_rate", "attempts_per_step", *SCORE_DIMS]
    head = f"{'mode':<10}" + "".join(f"{c[:14]:>16}" for c in cols)
    rows = [f"{m:<10}" + "".join(f"{r[c]:>16.3f}" for c in cols) for m, r in results.items()]
    verbs = [f"{m:<10}completeness by verb: " + "  ".join(f"{v} {d['action_completeness']:.2f}/{d['steps']}"
                                                          for v, d in r.get("by_verb", {}).items())
             for m, r in results.items()]
    return "\n".join([head, *rows, *verbs])
