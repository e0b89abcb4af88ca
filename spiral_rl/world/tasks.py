"""Task sampling: deterministic (split, index) -> Task, with held-out verb-shape compositions.

Every task is generated from its own seed, SeedSequence([world.seed, split id, index]), so a task
is reproducible on its own and splits never share a seed stream. Tasks of the "heldout" split
each use at least one held-out composition (e.g. a triangle jumping); tasks of every other split
use none, so a model trained on "train" has never seen them.
"""
from __future__ import annotations

import numpy as np

from spiral_rl.records import SubAction, Task
from spiral_rl.world.actions import REGION_WORDS, Step, make_sub_action, step_text
from spiral_rl.world.dynamics import DIRECTIONS, PERCEPTION_SLACK, Infeasible, Physics, VERBS
from spiral_rl.world.goals import GOALS
from spiral_rl.world.language import join_clauses
from spiral_rl.world.render import render_frame
from spiral_rl.world.scene import find, sample_scene

SPLITS = {"train": 0, "val": 1, "test": 2, "heldout": 3}
KINDS = ("single", "chain", "abstract")


def composition(sub: SubAction, scene) -> str:
    """'verb:shape' of a step's acting object, the unit of the held-out split (shapes never change)."""
    return f"{sub.verb}:{scene[find(scene, sub.subject)].shape}"


class TaskSampler:
    """Tasks for RL and evaluation. `task(split, index)` is a pure function of its arguments."""

    def __init__(self, world_cfg):
        self.cfg = world_cfg
        self.physics = Physics.from_config(world_cfg)
        self.heldout = frozenset(world_cfg.heldout_compositions)
        mix = world_cfg.task_mix
        weights = np.array([mix.single, mix.chain, mix.abstract], dtype=np.float64)
        self.kind_p = weights / weights.sum()

    def task(self, split: str, index: int) -> Task:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        seed = np.random.SeedSequence([self.cfg.seed, SPLITS[split], index])
        rng = np.random.default_rng(seed)
        for _ in range(1000):
            n = int(rng.integers(self.cfg.min_objects, self.cfg.max_objects + 1))
            scene = sample_scene(rng, n, self.cfg.size_min, self.cfg.size_max)
            kind = KINDS[int(rng.choice(3, p=self.kind_p))]
            found = self._instruction(rng, scene, kind)
            if found is None:
                continue
            instruction, plan = found
            uses_heldout = any(composition(s, scene) in self.heldout for s in plan)
            if uses_heldout != (split == "heldout"):
                continue
            frame = render_frame(scene, self.cfg.frame_size)
            return Task(f"{split}-{index}", split, int(seed.generate_state(1)[0]), instruction, kind,
                        scene, frame, tuple(plan))
        raise RuntimeError(f"no valid task for {split}-{index} after 1000 draws; relax world.heldout_compositions")

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        return [self.task(split, i) for i in range(start, start + n)]

    def _instruction(self, rng, scene, kind) -> tuple[str, list[SubAction]] | None:
        if kind == "abstract":
            goal = list(GOALS)[int(rng.integers(len(GOALS)))]
            try:
                plan = self._build(scene, GOALS[goal](scene, self.physics))
            except Infeasible:
                return None
            return (goal, plan) if plan else None  # an already-satisfied goal is no task
        length = 1 if kind == "single" else int(rng.integers(2, self.cfg.max_chain + 1))
        steps, plan, now = [], [], scene
        for _ in range(length):
            for _ in range(50):
                step = _random_step(rng, now)
                try:
                    sub, after, _ = make_sub_action(now, step, self.physics, PERCEPTION_SLACK)
                except Infeasible:
                    continue
                steps.append(step)
                plan.append(sub)
                now = after
                break
            else:
                return None
        return join_clauses([step_text(s) for s in steps]), plan

    def _build(self, scene, steps) -> list[SubAction]:
        plan = []
        for step in steps:
            sub, scene, _ = make_sub_action(scene, step, self.physics, PERCEPTION_SLACK)
            plan.append(sub)
        return plan


def _random_step(rng, scene) -> Step:
    verb = VERBS[int(rng.integers(len(VERBS)))]
    order = rng.permutation(len(scene))
    subject, other = scene[order[0]].name, scene[order[1]].name
    if verb == "move":
        return Step(verb, subject, (), (("direction", list(DIRECTIONS)[int(rng.integers(4))]),))
    if verb == "move_to":
        return Step(verb, subject, (), (("region", list(REGION_WORDS)[int(rng.integers(len(REGION_WORDS)))]),))
    if verb == "jump":
        return Step(verb, subject)
    return Step(verb, subject, (other,))

