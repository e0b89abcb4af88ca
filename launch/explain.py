"""Show one task end to end: its instruction, the plan with conditions, and the critic's verdicts
on the ground-truth segment of each step and on a corrupted copy of it.

    python launch/explain.py                       # val task 0, corruption 'stopped_short'
    python launch/explain.py heldout 3 vanished world.frame_size=64

Arguments: [split] [index] [corruption] then config files / key=value overrides.
"""
from __future__ import annotations

import sys

import numpy as np

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.agents.planner import PlanAgent
from spiral_rl.config import load_config_or_exit
from spiral_rl.memory import WorldMemory
from spiral_rl.records import Segment
from spiral_rl.world.corruptions import CORRUPTIONS, corrupt
from spiral_rl.world.dataset import ground_truth_segment
from spiral_rl.world.tasks import SPLITS, TaskSampler


def show(label: str, verdict) -> None:
    scores = ", ".join(f"{d} {v:.2f}" for d, v in verdict.scores.items())
    print(f"    {label:<22} {verdict.decision:<7} reward {verdict.reward:.2f} | {scores}")
    print(f"    {'':<22} feedback: {verdict.feedback}")


def main(argv: list[str]) -> int:
    split = argv.pop(0) if argv and argv[0] in SPLITS else "val"
    index = int(argv.pop(0)) if argv and argv[0].isdigit() else 0
    kind = argv.pop(0) if argv and argv[0] in CORRUPTIONS else "stopped_short"
    cfg = load_config_or_exit(argv)
    sampler = TaskSampler(cfg.world)
    task = sampler.task(split, index)
    planner, critic = PlanAgent.from_config(cfg), CriticAgent.from_config(cfg)
    plan = planner.plan(task.instruction, task.scene)
    print(f"task {task.task_id} ({task.kind}): {task.instruction!r}")
    print("scene: " + ", ".join(f"{o.name} at ({o.x:.2f}, {o.y:.2f})" for o in task.scene))
    memory = WorldMemory.from_task(task, cfg)
    scene, rng = task.scene, np.random.default_rng(0)
    for k, sub in enumerate(plan):
        nxt = plan[k + 1] if k + 1 < len(plan) else None
        print(f"  step {k + 1}: {sub.text!r}")
        print(f"    pre:  {'; '.join(p.text for p in sub.pre)}")
        print(f"    post: {'; '.join(p.text for p in sub.post)}")
        frames, track, end = ground_truth_segment(scene, sub, planner.physics, cfg.world.frame_size)
        truth = critic.score(Segment(frames, sub), sub, memory, nxt)
        show("ground truth", truth)
        bad = corrupt(kind, scene, sub, track, cfg.world.frame_size, rng)
        if bad is not None:
            show(f"corrupted ({kind})", critic.score(Segment(bad, sub), sub, memory, nxt))
        memory.commit(Segment(frames, sub), truth)
        scene = end
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
