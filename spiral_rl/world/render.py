"""Rasterise object states into frames (hard edges, exact palette colours, no anti-aliasing).

Exact colours make ground truth unambiguous: every pixel of a rendered frame is either the
background or one object's palette colour, which the critic's accuracy tests rely on.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from spiral_rl.records import ObjectState
from spiral_rl.world.scene import BACKGROUND, PALETTE


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in canvas units
    return c[None, :], c[:, None]  # px (1, W), py (H, 1)


def shape_mask(obj: ObjectState, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """(H, W) bool mask of one object on a pixel grid."""
    dx, dy, s = px - obj.x, py - obj.y, obj.size
    if obj.shape == "square":
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if obj.shape == "circle":
        return dx * dx + dy * dy <= s * s
    if obj.shape == "triangle":  # apex up, base 2s, height 2s, centroid at (x, y)
        return (dy <= 2.0 * s / 3.0) & (np.abs(dx) <= (dy + 4.0 * s / 3.0) / 2.0)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render_frame(objects: Sequence[ObjectState], size: int) -> np.ndarray:
    """(H, W, 3) uint8 frame; later objects are drawn over earlier ones."""
    px, py = _grid(size)
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    for obj in objects:
        frame[shape_mask(obj, px, py)] = PALETTE[obj.colour]
    return frame


def render_frames(frames: Sequence[Sequence[ObjectState]], size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 video from T lists of object states."""
    return np.stack([render_frame(objs, size) for objs in frames])
