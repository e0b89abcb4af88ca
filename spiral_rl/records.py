"""Typed records that cross process boundaries.

They hold numpy arrays and plain Python values, never torch tensors: Ray pickles numpy ~100x
faster than tensors, and a record must stay readable without the model that produced it.
Coordinates are canvas fractions: x to the right, y downwards, both in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

SCORE_DIMS = ("action_completeness", "physical_fidelity", "temporal_consistency", "visual_quality")


@dataclass(frozen=True)
class ObjectState:
    """One object of the built-in world. (x, y) is the centroid of its pixels; size its half-extent."""

    colour: str
    shape: str
    x: float
    y: float
    size: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def pos(self) -> np.ndarray:
        return np.array([self.x, self.y])

    def moved_to(self, x: float, y: float) -> "ObjectState":
        return replace(self, x=float(x), y=float(y))


@dataclass(frozen=True)
class Predicate:
    """A condition over object states that the critic can check on a track.

    kind: "at" (args: name, x, y, tol), "in_region" (name, region), "touches" (a, b, tol),
    "rose" (name, height), "visible" (name). `when` is "end" (checked on the last frame) or
    "during" (on the whole segment). `text` is the human sentence the critic feeds back.
    """

    kind: str
    args: tuple
    text: str
    when: str = "end"


@dataclass(frozen=True)
class SubAction:
    """One object-centric step of a plan.

    verb: "move" | "move_to" | "push" | "jump" | "swap"; subject: the acting object's name;
    objects: the other objects it acts on (pushed object, swap partner); args: verb arguments
    (direction, region); pre / post: conditions before and after the step.
    """

    verb: str
    subject: str
    objects: tuple[str, ...] = ()
    args: tuple[tuple[str, Any], ...] = ()
    text: str = ""
    pre: tuple[Predicate, ...] = ()
    post: tuple[Predicate, ...] = ()

    @property
    def arg(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def involved(self) -> tuple[str, ...]:
        return (self.subject, *self.objects)


@dataclass
class Task:
    """An instruction on a scene. `reference_plan` is the ground truth, for evaluation only."""

    task_id: str
    split: str
    seed: int
    instruction: str
    kind: str  # "single" | "chain" | "abstract"
    scene: tuple[ObjectState, ...]
    first_frame: np.ndarray  # (H, W, 3) uint8
    reference_plan: tuple[SubAction, ...] = ()


@dataclass
class Prompt:
    """A GRPO prompt, taken from a closed-loop episode where the loop needed a segment.

    context: (K, H, W, 3) uint8 frames from memory; objects: memory's last known states (the
    critic's reference); next_action: the following step, whose pre-conditions the critic checks;
    retried: the critic rejected the loop's first attempt at this step; first_completeness: that
    attempt's action completeness.
    """

    context: np.ndarray
    sub_action: SubAction
    objects: tuple[ObjectState, ...]
    next_action: SubAction | None = None
    task_id: str = ""
    retried: bool = False
    first_completeness: float = 1.0


@dataclass
class Segment:
    """Frames generated for one sub-action. frames: (T, H, W, 3) uint8, following `context`."""

    frames: np.ndarray
    sub_action: SubAction
    context: np.ndarray | None = None  # (K, H, W, 3) uint8: the frames it was conditioned on
    seed: int = 0
    attempt: int = 0


@dataclass
class Verdict:
    """The critic's judgement of one segment.

    scores: one value in [0, 1] per SCORE_DIMS entry; reward: configured weighted sum;
    decision: "accept" | "refine" | "replan"; failures: short failure kinds (e.g. "vanished");
    end_states: the objects as perceived on the segment's last frame (memory commits these).
    """

    scores: dict[str, float]
    reward: float
    decision: str
    feedback: str
    failures: tuple[str, ...] = ()
    end_states: tuple[ObjectState, ...] = ()
    details: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.decision == "accept"
