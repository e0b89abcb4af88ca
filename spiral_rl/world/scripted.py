"""A scripted stand-in for the world model: exact motion, with failures injected at a known rate.

It renders the sub-action's exact motion from the objects' remembered states and, with
probability `failure_rate` per call, replaces the segment by one of the world's failure kinds
(corruptions.py). Because every flaw is injected on purpose and recorded, it tests the loop and
the critic end to end (does the critic catch each flaw? does the loop retry and re-plan?)
before any world model is trained. It is a loop.Generator.
"""
from __future__ import annotations

import numpy as np

from spiral_rl.memory import WorldMemory
from spiral_rl.records import SubAction
from spiral_rl.world.actions import Step, make_sub_action
from spiral_rl.world.corruptions import CORRUPTIONS, corrupt
from spiral_rl.world.dataset import render_track
from spiral_rl.world.dynamics import Infeasible, Physics


class ScriptedGenerator:
    def __init__(self, physics: Physics, frame_size: int, failure_rate: float = 0.5):
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate={failure_rate} must be in [0, 1]")
        self.physics, self.frame_size, self.failure_rate = physics, frame_size, failure_rate
        self.injected: dict[int, str] = {}  # seed -> the flaw injected by that call ('' if none)

    def __call__(self, memory: WorldMemory, sub: SubAction, prompt: str, seed: int, guidance: float) -> np.ndarray:
        """(T, H, W, 3) uint8; deterministic in `seed`."""
        rng = np.random.default_rng(seed)
        scene = memory.objects
        try:
            _, _, track = make_sub_action(scene, Step(sub.verb, sub.subject, sub.objects, sub.args), self.physics)
        except Infeasible:  # the remembered scene drifted so far that the step does not fit: stand still
            track = np.repeat(np.array([[o.x, o.y] for o in scene])[None], self.physics.frames + 1, axis=0)
        self.injected[seed] = ""
        if rng.random() < self.failure_rate:
            for kind in rng.permutation(list(CORRUPTIONS)):
                frames = corrupt(str(kind), scene, sub, track, self.frame_size, rng)
                if frames is not None:
                    self.injected[seed] = str(kind)
                    return frames
        return render_track(scene, track, self.frame_size)
