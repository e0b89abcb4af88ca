"""Degrees to which object-centric conditions hold on a track of object positions.

The planner writes pre- and post-conditions as `Predicate`s; the critic evaluates them on the
track it perceived from pixels, so a degree is never computed from ground-truth states.
A degree is in [0, 1]: 1 when the condition holds within tolerance, falling linearly with the
share of the required progress that is missing, so "stopped halfway" scores about 0.5 and
"went the wrong way" scores 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from spiral_rl.records import Predicate
from spiral_rl.world.dynamics import region_distance

_MIN_SPAN = 0.05  # canvas fraction: the smallest distance a progress ratio is measured against


def _progress(d_start: float, d_end: float, tol: float) -> float:
    if not np.isfinite(d_end):
        return 0.0  # the object is not visible at the end
    if d_end <= tol:
        return 1.0
    span = max(d_start - tol, _MIN_SPAN) if np.isfinite(d_start) else _MIN_SPAN
    return float(np.clip(1.0 - (d_end - tol) / span, 0.0, 1.0))


def degree(pred: Predicate, track: np.ndarray, names: Sequence[str]) -> float:
    """Degree in [0, 1] to which `pred` holds.

    track: (T + 1, N, 2) centroids, frame 0 the state before the step, NaN where an object is
    not visible; names: the N object names in track order.
    """
    idx = {n: k for k, n in enumerate(names)}
    if pred.kind == "visible":
        return float(np.isfinite(track[-1, idx[pred.args[0]], 0]))
    if pred.kind == "at":
        name, x, y, tol = pred.args
        p = track[:, idx[name]]
        target = np.array([x, y])
        return _progress(float(np.hypot(*(p[0] - target))), float(np.hypot(*(p[-1] - target))), tol)
    if pred.kind == "in_region":
        name, region = pred.args
        p = track[:, idx[name]]
        return _progress(region_distance(*p[0], region), region_distance(*p[-1], region), 0.0)
    if pred.kind == "touches":
        a, b, contact, tol = pred.args
        gap = np.hypot(*(track[:, idx[a]] - track[:, idx[b]]).T) - contact  # (T + 1,)
        return _progress(float(gap[0]), float(gap[-1]), tol)
    if pred.kind == "rose":
        name, height = pred.args
        y = track[:, idx[name], 1]
        rise = np.nanmax(y[0] - y[1:]) if np.isfinite(y[1:]).any() else 0.0
        return float(np.clip(rise / (0.7 * height), 0.0, 1.0))
    raise ValueError(f"unknown predicate kind {pred.kind!r}")


def holds(pred: Predicate, track: np.ndarray, names: Sequence[str], threshold: float = 0.999) -> bool:
    return degree(pred, track, names) >= threshold
