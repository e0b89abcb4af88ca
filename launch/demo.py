"""Closed-loop demo on the built-in world: plan -> generate -> critic -> retry / re-plan -> memory.

    python launch/demo.py                                   # 4 val tasks, output in runs/demo
    python launch/demo.py configs/tiny.yaml run.num_tasks=8 loop.max_retries=3

Until the world model is trained (launch/sft.py), segments come from a *scripted stand-in*
generator: it renders the exact motion of the sub-action from the objects' remembered states
and, with probability FAILURE_RATE per attempt, injects one of the world's failure kinds
(wrong direction, vanished object, teleport, noise, ...). Everything else is the real loop: the
PlanAgent parses the instruction, the CriticAgent judges every attempt from pixels alone, failed
segments are regenerated with a new seed, stale plans are re-planned, and memory commits the
best attempt. Writes per task an animated GIF and a JSON record of every attempt.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.agents.planner import PlanAgent, PlanError
from spiral_rl.config import load_config_or_exit, save_config
from spiral_rl.memory import WorldMemory
from spiral_rl.records import Segment
from spiral_rl.world.actions import Step, make_sub_action
from spiral_rl.world.corruptions import CORRUPTIONS, corrupt
from spiral_rl.world.dataset import render_track
from spiral_rl.world.dynamics import Infeasible
from spiral_rl.world.tasks import TaskSampler

FAILURE_RATE = 0.5  # the stand-in generator's chance of a flawed segment per attempt


def scripted_segment(memory, sub, physics, frame_size, rng) -> tuple[np.ndarray, str]:
    """(T, H, W, 3) uint8 frames for `sub` from the remembered scene, and the injected flaw ('' if none)."""
    scene = memory.objects
    try:
        _, _, track = make_sub_action(scene, Step(sub.verb, sub.subject, sub.objects, sub.args), physics)
    except Infeasible:  # the remembered scene drifted so far that the step no longer fits: stand still
        track = np.repeat(np.array([[o.x, o.y] for o in scene])[None], physics.frames + 1, axis=0)
    if rng.random() < FAILURE_RATE:
        for kind in rng.permutation(list(CORRUPTIONS)):
            frames = corrupt(str(kind), scene, sub, track, frame_size, rng)
            if frames is not None:
                return frames, str(kind)
    return render_track(scene, track, frame_size), ""


def run_episode(task, cfg, planner, critic, rng) -> tuple[dict, np.ndarray]:
    memory = WorldMemory.from_task(task, cfg)
    plan = planner.plan(task.instruction, task.scene)
    record = {"task_id": task.task_id, "instruction": task.instruction,
              "plan": [{"text": s.text, "pre": [p.text for p in s.pre], "post": [p.text for p in s.post]}
                       for s in plan], "steps": [], "replans": 0}
    video = [task.first_frame]
    k = 0
    while k < len(plan):
        sub, nxt = plan[k], plan[k + 1] if k + 1 < len(plan) else None
        attempts, best = [], None
        for attempt in range(cfg.loop.max_retries + 1):
            frames, flaw = scripted_segment(memory, sub, planner.physics, cfg.world.frame_size, rng)
            segment = Segment(frames, sub, memory.context(), seed=int(rng.integers(2**31)), attempt=attempt)
            verdict = critic.score(segment, sub, memory, nxt)
            attempts.append({"attempt": attempt, "injected_flaw": flaw, "decision": verdict.decision,
                             "scores": {d: round(v, 3) for d, v in verdict.scores.items()},
                             "reward": round(verdict.reward, 3), "feedback": verdict.feedback})
            if best is None or verdict.reward > best[1].reward:
                best = (segment, verdict)
            if verdict.decision != "refine":
                break
        segment, verdict = best
        memory.commit(segment, verdict, attempts=len(attempts))
        video.extend(segment.frames)
        record["steps"].append({"sub_action": sub.text, "attempts": attempts, "committed": verdict.decision})
        k += 1
        # Outer loop: the critic saw drift, or the retry budget ran out on a flawed segment, so the
        # rest of the plan assumes a world that no longer exists: re-plan it from memory.
        if verdict.decision != "accept" and k < len(plan):
            if record["replans"] == cfg.loop.max_replans:
                record["aborted"] = "re-plan budget exhausted"
                break
            record["replans"] += 1
            try:
                plan = plan[:k] + planner.replan(plan[k:], memory.objects)
            except PlanError as e:
                record["aborted"] = f"re-plan failed: {e}"
                break
    record["success"] = k == len(plan) and all(s["committed"] != "refine" for s in record["steps"])
    return record, np.stack(video)


def main(argv: list[str]) -> int:
    cfg = load_config_or_exit(argv)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    sampler, planner, critic = TaskSampler(cfg.world), PlanAgent.from_config(cfg), CriticAgent.from_config(cfg)
    rng = np.random.default_rng(cfg.run.seed)
    print(f"closed-loop demo: {cfg.run.num_tasks} {cfg.run.split} tasks, scripted stand-in generator "
          f"(failure rate {FAILURE_RATE}), max_retries={cfg.loop.max_retries} -> {out}")
    records, start = [], time.time()
    for task in sampler.tasks(cfg.run.split, cfg.run.num_tasks):
        record, video = run_episode(task, cfg, planner, critic, rng)
        records.append(record)
        scale = max(1, 128 // cfg.world.frame_size)  # upscale tiny frames so the GIF is viewable
        imageio.mimsave(out / f"{task.task_id}.gif", list(video.repeat(scale, 1).repeat(scale, 2)), duration=0.15)
        (out / f"{task.task_id}.json").write_text(json.dumps(record, indent=1))
        n_att = sum(len(s["attempts"]) for s in record["steps"])
        print(f"[{len(records)}/{cfg.run.num_tasks}] {task.task_id}: {task.instruction!r}")
        for step in record["steps"]:
            for a in step["attempts"]:
                flaw = a["injected_flaw"] or "none"
                print(f"    {step['sub_action']!r} attempt {a['attempt']} (injected: {flaw}) -> "
                      f"{a['decision']} reward {a['reward']:.2f}: {a['feedback']}")
        print(f"    -> {'success' if record['success'] else 'failed'} in {n_att} attempts, "
              f"{record['replans']} re-plans" + (f" ({record['aborted']})" if "aborted" in record else ""))
    solved = sum(r["success"] for r in records)
    mean_attempts = np.mean([len(s["attempts"]) for r in records for s in r["steps"]])
    summary = {"tasks": len(records), "success": solved, "attempts_per_step": round(float(mean_attempts), 3),
               "seconds": round(time.time() - start, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"done: {solved}/{len(records)} tasks succeeded, {mean_attempts:.2f} attempts per step; "
          f"GIFs and JSON records in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
