"""Corruptions: turn a ground-truth segment into a known failure, to test and calibrate the critic.

Every corruption edits the exact object states (track, colour, shape) and re-renders, except the
two pixel-level ones (noise, blur), so the failure is exactly what its name says and nothing
else changes. All take (scene, sub, track, frame_size, rng): scene the objects before the step,
track its exact (T + 1, N, 2) centroids from dynamics.simulate, and return (T, H, W, 3) uint8
frames, or None when the scene cannot show that failure (no bystander to move, no spare colour,
no free place to teleport to, a step that cannot stop short). They are deterministic given the
rng (those that draw nothing accept rng=None).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple

import numpy as np

from spiral_rl.records import SCORE_DIMS, ObjectState, SubAction
from spiral_rl.world.predicates import degree
from spiral_rl.world.render import render_frames
from spiral_rl.world.scene import COLOUR_ORDER, SHAPES, extent, find, inside_canvas, overlapping

_ANGLES = np.linspace(0.0, 2.0 * np.pi, 16, endpoint=False)  # candidate directions of a displacement


def _render(scene, track: np.ndarray, frame_size: int, edit=None) -> np.ndarray:
    """Frames 1..T of `track`; edit(t, k, obj) -> ObjectState | None changes or drops an object."""
    frames = []
    for t in range(1, track.shape[0]):
        objs = [o.moved_to(*track[t, k]) for k, o in enumerate(scene)]
        if edit is not None:
            objs = [e for k, o in enumerate(objs) if (e := edit(t, k, o)) is not None]
        frames.append(objs)
    return render_frames(frames, frame_size)


def _clamp(obj: ObjectState, p: np.ndarray) -> np.ndarray:
    """(..., 2) positions moved just inside the canvas for obj's shape."""
    left, right, up, down = extent(obj.shape, obj.size)
    return np.stack([np.clip(p[..., 0], left, 1.0 - right), np.clip(p[..., 1], up, 1.0 - down)], -1)


def _fits(scene, track: np.ndarray, k: int, frames) -> bool:
    """Is object k inside the canvas and clear of every other object at the given track frames?"""
    for t in frames:
        a = scene[k].moved_to(*track[t, k])
        if not inside_canvas(a):
            return False
        if any(overlapping(a, o.moved_to(*track[t, j])) for j, o in enumerate(scene) if j != k):
            return False
    return True


def _directions(rng) -> np.ndarray:
    """(16, 2) unit vectors in a random order."""
    a = _ANGLES[rng.permutation(len(_ANGLES))]
    return np.stack([np.cos(a), np.sin(a)], -1)


def _ease(T: int) -> np.ndarray:
    u = np.arange(T + 1) / T
    return u * u * (3.0 - 2.0 * u)  # (T + 1,) as in dynamics: the corruption moves as smoothly as real motion


# --------------------------------------------------------------------------- action completeness


def wrong_direction(scene, sub: SubAction, track, frame_size, rng):
    """The subject's displacement mirrored (kept on the canvas); a pushed object stays put."""
    new = track.copy()
    for name in sub.involved:
        k = find(scene, name)
        if sub.verb == "push" and name != sub.subject:
            new[:, k] = track[0, k]  # nothing pushes it any more
        else:
            new[:, k] = _clamp(scene[k], 2.0 * track[0, k] - track[:, k])
    return _render(scene, new, frame_size)


def _stopped(sub: SubAction, track: np.ndarray, share: float) -> np.ndarray:
    """The exact motion frozen after `share` of its duration: every state on the way is valid (a
    push only moves the other object after contact, a swap keeps its side-step). A jump is a hop
    of `share` of the height instead, since freezing a hop would leave the subject in mid-air."""
    T = track.shape[0] - 1
    if sub.verb == "jump":
        return track[0] + share * (track - track[0])
    t = np.arange(T + 1) * share  # fractional frame index of the exact motion
    lo = np.floor(t).astype(int)
    hi = np.minimum(lo + 1, T)
    w = (t - lo)[:, None, None]
    return (1.0 - w) * track[lo] + w * track[hi]


def stopped_short(scene, sub: SubAction, track, frame_size, rng):
    """The step stops early: frozen at 45% of its duration (about 40% of the way, as motions are
    eased), or at 30% or never started where that is not short enough (a move_to may reach its
    region early). None when even not moving satisfies the step (it starts at its region's edge)."""
    names = [o.name for o in scene]
    for share in (0.45, 0.3, 0.0):
        new = _stopped(sub, track, share)
        if min((degree(p, new, names) for p in sub.post), default=0.0) < 0.7:
            return _render(scene, new, frame_size)
    return None


# --------------------------------------------------------------------------- physical fidelity


def vanished(scene, sub: SubAction, track, frame_size, rng):
    """The subject is missing from the middle of the segment on."""
    i, mid = find(scene, sub.subject), track.shape[0] // 2
    return _render(scene, track, frame_size, lambda t, k, o: None if k == i and t > mid else o)


def teleport(scene, sub: SubAction, track, frame_size, rng, distance: float = 0.4):
    """The subject jumps `distance` canvas away for 1-2 middle frames and comes back, so the
    step's end state (and its completeness) is untouched."""
    i, T = find(scene, sub.subject), track.shape[0] - 1
    frames = list(range(T // 2, T // 2 + int(rng.integers(1, 3))))
    for d in _directions(rng):
        new = track.copy()
        new[frames, i] += distance * d
        if _fits(scene, new, i, frames):
            return _render(scene, new, frame_size)
    return None


def recolour(scene, sub: SubAction, track, frame_size, rng):
    """The subject is drawn in a palette colour that is not in the scene from mid-segment on."""
    spare = [c for c in COLOUR_ORDER if c not in {o.colour for o in scene}]
    if not spare:
        return None
    colour, i, mid = spare[int(rng.integers(len(spare)))], find(scene, sub.subject), track.shape[0] // 2
    return _render(scene, track, frame_size, lambda t, k, o: replace(o, colour=colour) if k == i and t > mid else o)


def reshape(scene, sub: SubAction, track, frame_size, rng):
    """The subject is drawn as another shape (same size and centroid) from mid-segment on."""
    i, mid = find(scene, sub.subject), track.shape[0] // 2
    others = [s for s in SHAPES if s != scene[i].shape]
    shape = others[int(rng.integers(len(others)))]
    return _render(scene, track, frame_size, lambda t, k, o: replace(o, shape=shape) if k == i and t > mid else o)


def bystander_moved(scene, sub: SubAction, track, frame_size, rng, distance: float = 0.2):
    """An object the step does not involve drifts `distance` canvas, smoothly, without collisions."""
    bystanders = [k for k, o in enumerate(scene) if o.name not in sub.involved]
    T = track.shape[0] - 1
    for k in rng.permutation(bystanders) if bystanders else []:
        for d in _directions(rng):
            new = track.copy()
            new[:, k] = track[0, k] + distance * _ease(T)[:, None] * d
            if _fits(scene, new, k, range(T + 1)):
                return _render(scene, new, frame_size)
    return None


# --------------------------------------------------------------------------- temporal consistency


def discontinuity(scene, sub: SubAction, track, frame_size, rng, distance: float = 0.15):
    """The whole segment starts from a scene shifted `distance` canvas away from memory."""
    for d in _directions(rng):
        new = track.copy()
        new[1:] += distance * d
        if all(inside_canvas(o.moved_to(*new[t, k])) for k, o in enumerate(scene) for t in range(1, len(new))):
            return _render(scene, new, frame_size)
    return None


# --------------------------------------------------------------------------- visual quality


def noise(scene, sub: SubAction, track, frame_size, rng, sigma: float = 25.0):
    """Gaussian pixel noise of `sigma` (0-255 units) on every channel."""
    frames = _render(scene, track, frame_size).astype(np.float32)
    return np.clip(frames + rng.normal(0.0, sigma, frames.shape), 0, 255).round().astype(np.uint8)


def blur(scene, sub: SubAction, track, frame_size, rng, share: float = 0.03):
    """Box blur of radius ~3% of the frame width (at least 1 px), separable, edges replicated."""
    frames = _render(scene, track, frame_size).astype(np.float32)
    r = max(1, round(share * frame_size))
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(frames, pad, mode="edge"), axis=axis)
        n = frames.shape[axis]
        frames = (np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis) - np.take(c, np.arange(n), axis)) / (2 * r + 1)
    return np.clip(frames, 0, 255).round().astype(np.uint8)


class Corruption(NamedTuple):
    fn: Callable
    breaks: str  # the SCORE_DIMS entry it is meant to lower
    failure: str  # the failure kind the critic should name for it


CORRUPTIONS: dict[str, Corruption] = {
    "wrong_direction": Corruption(wrong_direction, "action_completeness", "wrong_direction"),
    "stopped_short": Corruption(stopped_short, "action_completeness", "incomplete"),
    "vanished": Corruption(vanished, "physical_fidelity", "vanished"),
    "teleport": Corruption(teleport, "physical_fidelity", "teleport"),
    "recolour": Corruption(recolour, "physical_fidelity", "recoloured"),
    "reshape": Corruption(reshape, "physical_fidelity", "reshaped"),
    "bystander_moved": Corruption(bystander_moved, "physical_fidelity", "bystander_moved"),
    "discontinuity": Corruption(discontinuity, "temporal_consistency", "discontinuity"),
    "noise": Corruption(noise, "visual_quality", "low_quality"),
    "blur": Corruption(blur, "visual_quality", "low_quality"),
}
assert all(c.breaks in SCORE_DIMS for c in CORRUPTIONS.values())


def corrupt(kind: str, scene, sub: SubAction, track: np.ndarray, frame_size: int, rng) -> np.ndarray | None:
    """(T, H, W, 3) uint8 frames of the ground-truth step with failure `kind`, or None (see module doc)."""
    if kind not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[kind].fn(tuple(scene), sub, np.asarray(track, dtype=np.float64), frame_size, rng)
