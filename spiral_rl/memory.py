"""World memory: what the loop knows about the world so far.

It keeps (1) the last frames, which condition the world model's next segment, (2) keyframes, the
last frame of every committed segment, (3) one record per object: appearance and last known
state, which the critic uses as the reference for continuity and the planner for re-planning,
and (4) the executed plan with each step's verdict. All of it is bounded, so memory cost does
not grow with episode length.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from spiral_rl.records import ObjectState, Segment, SubAction, Verdict


@dataclass(frozen=True)
class Executed:
    """One committed step: the sub-action, its accepted (or best) attempt's scores, and attempts."""

    sub_action: SubAction
    scores: dict
    decision: str
    attempts: int


class WorldMemory:
    def __init__(self, first_frames: np.ndarray, scene, context_frames: int = 2,
                 max_keyframes: int = 16, max_history: int = 64):
        """first_frames: (H, W, 3) or (K, H, W, 3) uint8, the frames the task starts from."""
        frames = first_frames[None] if first_frames.ndim == 3 else first_frames
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"first_frames must be (K, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        self.context_frames = context_frames
        self._recent: deque[np.ndarray] = deque(frames, maxlen=context_frames)
        self.keyframes: deque[np.ndarray] = deque([frames[-1]], maxlen=max_keyframes)
        self.initial = tuple(scene)
        self.objects: tuple[ObjectState, ...] = tuple(scene)  # last known state of each object
        self.history: deque[Executed] = deque(maxlen=max_history)
        self.steps_done = 0

    @classmethod
    def from_task(cls, task, cfg) -> "WorldMemory":
        return cls(task.first_frame, task.scene, cfg.world.context_frames)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objects)

    def context(self) -> np.ndarray:
        """(K, H, W, 3) uint8: the last K frames, the first frame repeated while fewer exist."""
        frames = list(self._recent)
        frames = [frames[0]] * (self.context_frames - len(frames)) + frames
        return np.stack(frames)

    def last_frame(self) -> np.ndarray:
        return self._recent[-1]

    def commit(self, segment: Segment, verdict: Verdict, attempts: int = 1) -> None:
        """Append a committed segment: frames become context, perceived end states the new reference.

        Objects the critic could not see keep their last known state, so one bad frame does not
        erase an object from memory.
        """
        for frame in segment.frames:
            self._recent.append(frame)
        self.keyframes.append(segment.frames[-1])
        seen = {o.name: o for o in verdict.end_states}
        self.objects = tuple(seen.get(o.name, o) for o in self.objects)
        self.history.append(Executed(segment.sub_action, dict(verdict.scores), verdict.decision, attempts))
        self.steps_done += 1

    def summary(self) -> str:
        """One line per executed step, for text planners and logs."""
        lines = [f"{k + 1}. {e.sub_action.text} -> {e.decision} after {e.attempts} attempt(s)"
                 for k, e in enumerate(self.history)]
        state = "; ".join(f"{o.name} at ({o.x:.2f}, {o.y:.2f})" for o in self.objects)
        return "\n".join(lines + [f"objects: {state}"])

    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._recent) + sum(f.nbytes for f in self.keyframes)
