"""Closed-loop demo on the built-in world: plan -> generate -> critic -> retry / re-plan -> memory.

    python launch/demo.py                                   # 4 val tasks, output in runs/demo
    python launch/demo.py configs/tiny.yaml run.num_tasks=8 loop.max_retries=3

Until a trained world model is plugged in, segments come from the scripted stand-in
(spiral_rl/world/scripted.py): it renders the exact motion of the sub-action from the objects'
remembered states and, with probability FAILURE_RATE per attempt, injects one of the world's
failure kinds (wrong direction, vanished object, teleport, noise, ...). Everything else is the
real loop (spiral_rl/loop.py): the PlanAgent parses the instruction, the CriticAgent judges every
attempt from pixels alone, failed segments are regenerated with a new seed, stale plans are
re-planned, and memory commits the best attempt. Writes per task a GIF and a JSON record.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.agents.planner import PlanAgent
from spiral_rl.config import load_config_or_exit, save_config
from spiral_rl.loop import ClosedLoop, LoopSettings
from spiral_rl.memory import WorldMemory
from spiral_rl.world.scripted import ScriptedGenerator
from spiral_rl.world.tasks import TaskSampler

FAILURE_RATE = 0.5  # the stand-in generator's chance of a flawed segment per attempt


def main(argv: list[str]) -> int:
    cfg = load_config_or_exit(argv)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    sampler, planner, critic = TaskSampler(cfg.world), PlanAgent.from_config(cfg), CriticAgent.from_config(cfg)
    generator = ScriptedGenerator(planner.physics, cfg.world.frame_size, FAILURE_RATE)
    loop = ClosedLoop(planner, critic, generator,
                      LoopSettings(cfg.loop.mode, cfg.loop.max_retries, cfg.loop.max_replans))
    print(f"closed-loop demo ({cfg.loop.mode}): {cfg.run.num_tasks} {cfg.run.split} tasks, scripted stand-in "
          f"generator (failure rate {FAILURE_RATE}), max_retries={cfg.loop.max_retries} -> {out}")
    episodes, start = [], time.time()
    for n, task in enumerate(sampler.tasks(cfg.run.split, cfg.run.num_tasks)):
        ep = loop.run(task, WorldMemory.from_task(task, cfg), seed=cfg.run.seed * 1_000_003 + 10_000 * n)
        episodes.append(ep)
        record = json.loads(ep.to_json())
        for step in record["steps"]:  # the stand-in knows which flaw it injected: keep it beside the verdict
            for a in step["attempts"]:
                a["injected_flaw"] = generator.injected.get(a["seed"], "")
        (out / f"{task.task_id}.json").write_text(json.dumps(record, indent=1))
        scale = max(1, 128 // cfg.world.frame_size)  # upscale tiny frames so the GIF is viewable
        imageio.mimsave(out / f"{task.task_id}.gif", list(ep.video.repeat(scale, 1).repeat(scale, 2)), duration=0.15)
        print(f"[{n + 1}/{cfg.run.num_tasks}] {task.task_id}: {task.instruction!r}")
        for step in record["steps"]:
            for a in step["attempts"]:
                print(f"    {step['sub_action']!r} attempt (injected: {a['injected_flaw'] or 'none'}) -> "
                      f"{a['decision']} reward {a['reward']:.2f}: {a['feedback']}")
        n_att = sum(len(s.attempts) for s in ep.steps)
        print(f"    -> {'success' if ep.success else 'failed'} in {n_att} attempts, {ep.replans} re-plans"
              + (f" ({ep.aborted})" if ep.aborted else ""))
    solved = sum(e.success for e in episodes)
    per_step = float(np.mean([len(s.attempts) for e in episodes for s in e.steps]))
    summary = {"tasks": len(episodes), "success": solved, "attempts_per_step": round(per_step, 3),
               "seconds": round(time.time() - start, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {solved}/{len(episodes)} tasks succeeded, {per_step:.2f} attempts per step; "
          f"GIFs and JSON records in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
