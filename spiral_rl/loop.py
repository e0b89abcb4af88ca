"""The closed loop: think (plan) - act (generate) - reflect (critic), one episode per task.

    plan = planner.plan(task)
    for each sub-action:
        for attempt in 0..max_retries:                      inner loop: refine this segment
            segment = generator(memory context, prompt, new seed, guidance)
            verdict = critic(segment, sub-action, memory, next sub-action)
            accept -> stop; replan -> stop; refine -> re-phrase with the feedback, new seed,
                                                       stronger guidance, try again
        memory.commit(best attempt)
        drift (replan) or budget exhausted -> planner.replan(rest, memory)   outer loop, capped

Modes, for comparison: "open_loop" generates one segment per reference step from the whole
instruction, with no plan and no critic in the loop; "plan_only" plans and generates each
sub-action once; "spiral" is the full loop. In every mode each committed segment is scored by
the critic against the reference sub-action, so the modes are measured by the same yardstick.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from spiral_rl.agents.planner import PlanError
from spiral_rl.memory import WorldMemory
from spiral_rl.records import Segment, SubAction, Task, Verdict

MODES = ("open_loop", "plan_only", "spiral")


class Generator(Protocol):
    """Produces one segment. Returns (T, H, W, 3) uint8 frames following memory.context()."""

    def __call__(self, memory: WorldMemory, sub: SubAction, prompt: str, seed: int,
                 guidance: float) -> np.ndarray: ...


@dataclass
class Attempt:
    prompt: str
    seed: int
    guidance: float
    verdict: Verdict


@dataclass
class StepRecord:
    sub_action: SubAction
    attempts: list[Attempt]
    committed: int  # index of the attempt that went into memory (the best one)
    context: np.ndarray | None = None  # (K, H, W, 3) uint8: memory's frames before the step
    objects: tuple = ()  # memory's object states before the step (the critic's reference)

    @property
    def verdict(self) -> Verdict:
        return self.attempts[self.committed].verdict


@dataclass
class Episode:
    task_id: str
    mode: str
    instruction: str
    steps: list[StepRecord]
    video: np.ndarray  # (1 + sum T, H, W, 3) uint8: first frame and every committed segment
    replans: int = 0
    aborted: str = ""
    planned: int = 0  # steps in the final plan

    @property
    def success(self) -> bool:
        """Every planned step was carried out and its committed segment passed the critic."""
        return (not self.aborted and len(self.steps) == self.planned
                and all(s.verdict.decision != "refine" for s in self.steps))

    def to_json(self) -> str:
        return json.dumps({
            "task_id": self.task_id, "mode": self.mode, "instruction": self.instruction,
            "success": self.success, "replans": self.replans, "aborted": self.aborted,
            "steps": [{"sub_action": s.sub_action.text, "committed": s.committed,
                       "pre": [p.text for p in s.sub_action.pre], "post": [p.text for p in s.sub_action.post],
                       "attempts": [{"prompt": a.prompt, "seed": a.seed, "guidance": a.guidance,
                                     "decision": a.verdict.decision, "reward": round(a.verdict.reward, 4),
                                     "scores": {k: round(v, 4) for k, v in a.verdict.scores.items()},
                                     "failures": list(a.verdict.failures), "feedback": a.verdict.feedback}
                                    for a in s.attempts]} for s in self.steps]}, indent=1)


@dataclass(frozen=True)
class LoopSettings:
    mode: str = "spiral"
    max_retries: int = 2
    max_replans: int = 2
    guidance: float = 1.0  # first attempt's classifier-free guidance
    retry_guidance_step: float = 0.0  # added per retry ("stronger guidance"); needs a CFG-trained model
    feedback_in_prompt: bool = False  # append the critic's feedback to the prompt (text models only)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"loop mode {self.mode!r} must be one of {', '.join(MODES)}")


def refine_prompt(sub: SubAction, verdict: Verdict | None, settings: LoopSettings) -> str:
    """The prompt of the next attempt: the sub-action, re-phrased with the critic's feedback when
    the generator reads free text (a closed-vocabulary encoder would see only unknown words)."""
    if verdict is None or not settings.feedback_in_prompt:
        return sub.text
    return f"{sub.text}. Avoid this: {verdict.feedback}"


class ClosedLoop:
    def __init__(self, planner, critic, generator: Generator, settings: LoopSettings):
        self.planner, self.critic, self.generator, self.settings = planner, critic, generator, settings

    def run(self, task: Task, memory: WorldMemory, seed: int = 0) -> Episode:
        mode = self.settings.mode
        if mode == "open_loop":
            return self._open_loop(task, memory, seed)
        plan = self.planner.plan(task.instruction, task.scene)
        episode = Episode(task.task_id, mode, task.instruction, [], task.first_frame[None], planned=len(plan))
        video, k = [task.first_frame], 0
        while k < len(plan):
            nxt = plan[k + 1] if k + 1 < len(plan) else None
            step, frames = self._step(plan[k], nxt, memory, seed + 1000 * k, retries=mode == "spiral")
            episode.steps.append(step)
            video.extend(frames)
            k += 1
            if mode == "spiral" and step.verdict.decision != "accept" and k < len(plan):
                # Outer loop: the critic saw drift, or retries ran out on a flawed segment; the rest
                # of the plan assumes a world that no longer exists, so re-plan it from memory.
                if episode.replans == self.settings.max_replans:
                    episode.aborted = "re-plan budget exhausted"
                    break
                episode.replans += 1
                try:
                    plan = plan[:k] + self.planner.replan(plan[k:], memory.objects)
                except PlanError as e:
                    episode.aborted = f"re-plan failed: {e}"
                    break
        episode.planned, episode.video = len(plan), np.stack(video)
        return episode

    def _step(self, sub: SubAction, nxt: SubAction | None, memory: WorldMemory, seed: int,
              retries: bool) -> tuple[StepRecord, np.ndarray]:
        """Inner loop for one sub-action; commits the best attempt to memory and returns it."""
        s = self.settings
        context, objects = memory.context(), memory.objects  # before the step: a GRPO prompt
        attempts, segments, verdict = [], [], None
        for a in range((s.max_retries if retries else 0) + 1):
            prompt = refine_prompt(sub, verdict, s)
            guidance = s.guidance + a * s.retry_guidance_step
            frames = self.generator(memory, sub, prompt, seed + a, guidance)
            segment = Segment(frames, sub, context, seed=seed + a, attempt=a)
            verdict = self.critic.score(segment, sub, memory, nxt if retries else None)
            attempts.append(Attempt(prompt, seed + a, guidance, verdict))
            segments.append(segment)
            if verdict.decision != "refine":
                break
        best = max(range(len(attempts)), key=lambda i: attempts[i].verdict.reward)
        memory.commit(segments[best], attempts[best].verdict, attempts=len(attempts))
        return StepRecord(sub, attempts, best, context, objects), segments[best].frames

    def _open_loop(self, task: Task, memory: WorldMemory, seed: int) -> Episode:
        """One generation per reference step from the whole instruction; the critic only measures."""
        plan = task.reference_plan
        episode = Episode(task.task_id, "open_loop", task.instruction, [], task.first_frame[None], planned=len(plan))
        video = [task.first_frame]
        for k, sub in enumerate(plan):
            context, objects = memory.context(), memory.objects
            frames = self.generator(memory, sub, task.instruction, seed + 1000 * k, self.settings.guidance)
            segment = Segment(frames, sub, context, seed=seed + 1000 * k)
            verdict = self.critic.score(segment, sub, memory)
            memory.commit(segment, verdict)
            episode.steps.append(StepRecord(sub, [Attempt(task.instruction, seed + 1000 * k,
                                                          self.settings.guidance, verdict)], 0, context, objects))
            video.extend(frames)
        episode.video = np.stack(video)
        return episode
