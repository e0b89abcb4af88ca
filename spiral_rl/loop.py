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

Episodes are coroutines that yield a GenerationRequest per segment: `ClosedLoop.run_many`
advances several side by side and generates their pending segments as one batch
(loop.episode_batch); on 2 CPU cores, 8 side by side ran an evaluation 1.41-1.49x faster than one
episode at a time (benchmarks/RESULTS.md, section 8).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

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


@dataclass
class GenerationRequest:
    """One segment an episode waits for: the Generator's arguments."""
    memory: WorldMemory
    sub: SubAction
    prompt: str
    seed: int
    guidance: float


def generate_all(generator: Generator, requests: Sequence[GenerationRequest]) -> list[np.ndarray]:
    """The frames of every request: in one call when the generator has `batch(requests)` (a model
    samples a batch for little more than one segment), else one call per request."""
    batch = getattr(generator, "batch", None)
    if batch is None:
        return [generator(r.memory, r.sub, r.prompt, r.seed, r.guidance) for r in requests]
    frames = list(batch(requests))
    if len(frames) != len(requests):  # a short answer would leave episodes waiting forever
        raise ValueError(f"{type(generator).__name__}.batch returned {len(frames)} segments for "
                         f"{len(requests)} requests")
    return frames


class ClosedLoop:
    """Episodes as coroutines: each yields a GenerationRequest where it needs a segment and takes
    the frames back, so `run_many` can advance many episodes side by side and generate their
    pending segments together. Every decision stays inside one episode; batching changes which
    segments share a forward pass, not what any episode does (seeds are per request)."""

    def __init__(self, planner, critic, generator: Generator, settings: LoopSettings):
        self.planner, self.critic, self.generator, self.settings = planner, critic, generator, settings

    def run(self, task: Task, memory: WorldMemory, seed: int = 0) -> Episode:
        return self.run_many([(task, memory, seed)])[0]

    def run_many(self, jobs: Sequence[tuple[Task, WorldMemory, int]], side_by_side: int = 0) -> list[Episode]:
        """One episode per (task, memory, seed), in order; side_by_side episodes at a time
        (0 = all), their pending segments generated in one generate_all call per round."""
        jobs, done = list(jobs), {}
        width = side_by_side or max(1, len(jobs))
        live: dict[int, tuple[Iterator, GenerationRequest]] = {}
        queue = iter(range(len(jobs)))

        def advance(i: int, coro: Iterator, frames: np.ndarray | None) -> None:
            try:
                live[i] = (coro, coro.send(frames))
            except StopIteration as stop:
                live.pop(i, None)
                done[i] = stop.value

        while True:
            while len(live) < width and (i := next(queue, None)) is not None:
                task, memory, seed = jobs[i]
                advance(i, self._episode(task, memory, seed), None)  # runs to its first request
            if not live:
                return [done[i] for i in range(len(jobs))]
            order = sorted(live)
            frames = generate_all(self.generator, [live[i][1] for i in order])
            for i, f in zip(order, frames):
                advance(i, live[i][0], f)

    def _episode(self, task: Task, memory: WorldMemory, seed: int):
        """Coroutine of one episode: yields GenerationRequests, returns the Episode."""
        mode = self.settings.mode
        if mode == "open_loop":
            return (yield from self._open_loop(task, memory, seed))
        plan = self.planner.plan(task.instruction, task.scene)
        episode = Episode(task.task_id, mode, task.instruction, [], task.first_frame[None], planned=len(plan))
        video, k = [task.first_frame], 0
        while k < len(plan):
            nxt = plan[k + 1] if k + 1 < len(plan) else None
            step, frames = yield from self._step(plan[k], nxt, memory, seed + 1000 * k, retries=mode == "spiral")
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

    def _step(self, sub: SubAction, nxt: SubAction | None, memory: WorldMemory, seed: int, retries: bool):
        """Inner loop for one sub-action (a coroutine); commits the best attempt to memory and
        returns (StepRecord, its frames)."""
        s = self.settings
        context, objects = memory.context(), memory.objects  # before the step: a GRPO prompt
        attempts, segments, verdict = [], [], None
        for a in range((s.max_retries if retries else 0) + 1):
            prompt = refine_prompt(sub, verdict, s)
            guidance = s.guidance + a * s.retry_guidance_step
            frames = yield GenerationRequest(memory, sub, prompt, seed + a, guidance)
            segment = Segment(frames, sub, context, seed=seed + a, attempt=a)
            verdict = self.critic.score(segment, sub, memory, nxt if retries else None)
            attempts.append(Attempt(prompt, seed + a, guidance, verdict))
            segments.append(segment)
            if verdict.decision != "refine":
                break
        best = max(range(len(attempts)), key=lambda i: attempts[i].verdict.reward)
        memory.commit(segments[best], attempts[best].verdict, attempts=len(attempts))
        return StepRecord(sub, attempts, best, context, objects), segments[best].frames

    def _open_loop(self, task: Task, memory: WorldMemory, seed: int):
        """One generation per reference step from the whole instruction; the critic only measures."""
        plan = task.reference_plan
        episode = Episode(task.task_id, "open_loop", task.instruction, [], task.first_frame[None], planned=len(plan))
        video = [task.first_frame]
        for k, sub in enumerate(plan):
            context, objects = memory.context(), memory.objects
            frames = yield GenerationRequest(memory, sub, task.instruction, seed + 1000 * k, self.settings.guidance)
            segment = Segment(frames, sub, context, seed=seed + 1000 * k)
            verdict = self.critic.score(segment, sub, memory)
            memory.commit(segment, verdict)
            episode.steps.append(StepRecord(sub, [Attempt(task.instruction, seed + 1000 * k,
                                                          self.settings.guidance, verdict)], 0, context, objects))
            video.extend(frames)
        episode.video = np.stack(video)
        return episode
