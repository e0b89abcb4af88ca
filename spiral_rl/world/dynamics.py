"""Ground-truth motion of every verb: exact trajectories of all objects for one sub-action.

A track is a (T + 1, N, 2) array of object centroids: frame 0 is the state before the step (the
last context frame), frames 1..T are the segment. Motions are eased (smoothstep) so speeds are
finite and a teleport is always distinguishable from real motion. A step whose motion would
leave the canvas or make two objects overlap is infeasible: the task sampler skips it and the
planner reports it as an impossible goal.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spiral_rl.records import ObjectState
from spiral_rl.world.scene import extent, find, inside_canvas, outside_by, reach

DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

_LO, _HI = 1.0 / 6.0, 5.0 / 6.0
# Region -> (target x or None to keep x, target y or None to keep y). Side regions change one
# coordinate only, so several objects can be sent to the same side without colliding.
REGION_TARGETS: dict[str, tuple[float | None, float | None]] = {
    "left": (_LO, None), "right": (_HI, None), "top": (None, _LO), "bottom": (None, _HI),
    "centre": (0.5, 0.5),
    "top_left": (_LO, _LO), "top_right": (_HI, _LO),
    "bottom_left": (_LO, _HI), "bottom_right": (_HI, _HI),
}
# Region -> (x_min, x_max, y_min, y_max): thirds of the canvas.
REGION_BOXES: dict[str, tuple[float, float, float, float]] = {
    "left": (0, 1 / 3, 0, 1), "right": (2 / 3, 1, 0, 1),
    "top": (0, 1, 0, 1 / 3), "bottom": (0, 1, 2 / 3, 1),
    "centre": (1 / 3, 2 / 3, 1 / 3, 2 / 3),
    "top_left": (0, 1 / 3, 0, 1 / 3), "top_right": (2 / 3, 1, 0, 1 / 3),
    "bottom_left": (0, 1 / 3, 2 / 3, 1), "bottom_right": (2 / 3, 1, 2 / 3, 1),
}
VERBS = ("move", "move_to", "push", "jump", "swap")
PERCEPTION_SLACK = 0.03  # canvas fraction: about a pixel at 32 px, the error of perceived positions
MIN_REGION_TRAVEL = 0.1  # canvas fraction; twice the critic's smallest progress span


class Infeasible(ValueError):
    """The step cannot be carried out in this scene (it names why)."""


@dataclass(frozen=True)
class Physics:
    """Verb magnitudes (canvas fractions) and frames per segment, from WorldConfig."""

    frames: int = 8
    move_step: float = 0.25
    push_distance: float = 0.2
    jump_height: float = 0.2

    @classmethod
    def from_config(cls, world_cfg) -> "Physics":
        return cls(world_cfg.segment_frames, world_cfg.move_step, world_cfg.push_distance,
                   world_cfg.jump_height)


def in_region(x: float, y: float, region: str) -> bool:
    return region_distance(x, y, region) == 0.0


def region_distance(x: float, y: float, region: str) -> float:
    """Distance from (x, y) to the region's box (0 inside it)."""
    x0, x1, y0, y1 = REGION_BOXES[region]
    return float(np.hypot(max(x0 - x, 0.0, x - x1), max(y0 - y, 0.0, y - y1)))


def _ease(frames: int) -> np.ndarray:
    u = np.arange(frames + 1, dtype=np.float64) / frames
    return u * u * (3.0 - 2.0 * u)  # (T + 1,)


def _free_travel(obj: ObjectState, d: np.ndarray) -> float:
    """How far obj can travel along unit axis direction d before touching the canvas edge."""
    left, right, up, down = extent(obj.shape, obj.size)
    limits = []
    if d[0] < 0: limits.append((obj.x - left) / -d[0])
    if d[0] > 0: limits.append((1.0 - right - obj.x) / d[0])
    if d[1] < 0: limits.append((obj.y - up) / -d[1])
    if d[1] > 0: limits.append((1.0 - down - obj.y) / d[1])
    return max(0.0, min(limits))


def _clamp_target(obj: ObjectState, x: float, y: float) -> tuple[float, float]:
    left, right, up, down = extent(obj.shape, obj.size)
    return float(np.clip(x, left, 1.0 - right)), float(np.clip(y, up, 1.0 - down))


def simulate(scene, verb: str, subject: str, objects=(), args=None, physics=Physics(), margin: float = 0.0):
    """Exact motion of one step.

    margin: extra distance a move, push or jump must have room for (canvas fraction). The task
    sampler asks for PERCEPTION_SLACK, so a sampled step stays feasible when it is re-simulated
    from positions perceived from pixels (off by up to a pixel); the motion itself is unchanged.

    Returns (track, end_scene): track (T + 1, N, 2) float64 centroids in scene order, end_scene
    the objects at frame T. Raises Infeasible (with the reason) or KeyError (unknown object).
    """
    scene, args, T = tuple(scene), dict(args or {}), physics.frames
    i = find(scene, subject)
    a = scene[i]
    track = np.repeat(np.array([[o.x, o.y] for o in scene])[None], T + 1, axis=0)
    e = _ease(T)[:, None]  # (T + 1, 1)
    contact: tuple[int, int] | None = None

    if verb == "move":
        d = np.array(DIRECTIONS[args["direction"]])
        dist = min(physics.move_step, _free_travel(a, d))
        if dist < 0.5 * physics.move_step + margin:
            raise Infeasible(f"the {subject} is too close to the {args['direction']} edge to move {args['direction']}")
        track[:, i] = a.pos + d * dist * e
    elif verb == "move_to":
        region = args["region"]
        # A step that ends a hair's breadth from where it started teaches nothing and would let a
        # segment that does not move pass as complete: require a real distance to the region.
        if region_distance(a.x, a.y, region) < MIN_REGION_TRAVEL + margin:
            raise Infeasible(f"the {subject} is already in or at the edge of the {region.replace('_', '-')} region")
        tx, ty = REGION_TARGETS[region]
        target = np.array(_clamp_target(a, a.x if tx is None else tx, a.y if ty is None else ty))
        track[:, i] = a.pos + (target - a.pos) * e
    elif verb == "push":
        j = find(scene, objects[0])
        b = scene[j]
        gap = b.pos - a.pos
        dist = float(np.hypot(*gap))
        u = gap / max(dist, 1e-9)
        approach = dist - reach(a) - reach(b)
        if approach < -PERCEPTION_SLACK:
            raise Infeasible(f"the {subject} already overlaps the {b.name}")
        approach = max(approach, 0.0)  # already touching, up to perception error: push at once
        push = physics.push_distance
        for _ in range(20):  # shorten the push until both objects stay on the canvas
            if inside_canvas(b, *(b.pos + u * push)) and inside_canvas(a, *(a.pos + u * (approach + push))):
                break
            push *= 0.85
        if push < 0.5 * physics.push_distance + margin:
            raise Infeasible(f"the {b.name} cannot be pushed that way: it would leave the canvas")
        travel = (approach + push) * e  # (T + 1, 1) distance covered by the pusher
        track[:, i] = a.pos + u * travel
        track[:, j] = b.pos + u * np.maximum(travel - approach, 0.0)
        contact = (i, j)
    elif verb == "jump":
        up = extent(a.shape, a.size)[2]
        h = min(physics.jump_height, a.y - up)
        if h < 0.5 * physics.jump_height + margin:
            raise Infeasible(f"the {subject} is too close to the top edge to jump")
        arc = np.sin(np.pi * np.arange(T + 1) / T)  # up and back, no easing: a ballistic hop
        track[:, i, 1] = a.y - h * arc
    elif verb == "swap":
        j = find(scene, objects[0])
        b = scene[j]
        if i == j:
            raise Infeasible(f"cannot swap the {subject} with itself")
        d = b.pos - a.pos
        normal = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-9)
        bump = np.sin(np.pi * e)
        # Side-step so the two pass each other without touching; wider arcs and the other side
        # are tried, in a fixed order, when an arc would hit a bystander or the canvas edge.
        # share: how much of the side-step the subject takes (1.0: the partner goes straight).
        first = ""
        for share, scale, side in [(h, k, sd) for h in (0.5, 1.0, 0.0) for k in (0.75, 1.0, 1.3)
                                   for sd in (1.0, -1.0)]:
            offset = side * normal * 2.0 * scale * (reach(a) + reach(b)) * bump
            track[:, i] = a.pos + d * e + share * offset
            track[:, j] = b.pos - d * e - (1.0 - share) * offset
            problem = _problem(scene, track, None)
            if not problem:
                break
            first = first or problem
        else:
            raise Infeasible(first)
    else:
        raise Infeasible(f"unknown verb {verb!r} (verbs: {', '.join(VERBS)})")

    problem = _problem(scene, track, contact)
    if problem:
        raise Infeasible(problem)
    end = tuple(o.moved_to(*track[-1, k]) for k, o in enumerate(scene))
    return track, end


def _problem(scene, track: np.ndarray, contact) -> str:
    """'' if no object leaves the canvas and no two overlap in any frame, else the reason.

    Scenes perceived from pixels (memory, re-planning) are off by up to a pixel, so touching
    objects can look slightly overlapped and an object at the edge slightly outside. What is
    checked is that motion never makes either worse than it is at frame 0.
    """
    for k, o in enumerate(scene):
        start = outside_by(o, *track[0, k])
        if any(outside_by(o, *track[t, k]) > start + 1e-9 for t in range(1, track.shape[0])):
            return f"the {o.name} would leave the canvas"
    n = len(scene)
    for p in range(n):
        for q in range(p + 1, n):
            dist = np.hypot(*(track[:, p] - track[:, q]).T)  # (T + 1,)
            limit = min(reach(scene[p]) + reach(scene[q]), dist[0])
            if contact and {p, q} == set(contact):
                limit -= 1e-6
            if np.any(dist < limit - 1e-9):
                return f"the {scene[p].name} and the {scene[q].name} would collide"
    return ""
