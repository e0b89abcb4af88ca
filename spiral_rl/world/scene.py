"""Scenes: a few coloured shapes on a plain background, sampled deterministically from a seed.

Colours are unique in a scene, so a colour names an object both in text ("the red square") and
in pixels (the critic segments frames by colour). The palette is spread out in RGB so that blur
and noise never turn one object colour into another.
"""
from __future__ import annotations

import math

import numpy as np

from spiral_rl.records import ObjectState

# Listed in spectrum order: "arrange the objects by colour from left to right" uses this order.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 210, 40),
    "green": (40, 180, 60),
    "cyan": (40, 200, 210),
    "blue": (50, 80, 230),
    "magenta": (210, 50, 200),
}
COLOUR_ORDER = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (25, 25, 30)
SHAPES = ("square", "circle", "triangle")

# Distance from the centroid to the farthest point of each shape, in units of its size.
# A triangle of base 2s and height 2s has its centroid 4s/3 below the apex.
_REACH = {"square": math.sqrt(2.0), "circle": 1.0, "triangle": 4.0 / 3.0}


def reach(obj: ObjectState) -> float:
    """Bounding-circle radius: two objects whose centres are farther apart than the sum never overlap."""
    return obj.size * _REACH[obj.shape]


def extent(shape: str, size: float) -> tuple[float, float, float, float]:
    """(left, right, up, down) extent of a shape around its centroid."""
    if shape == "triangle":
        return size, size, 4.0 * size / 3.0, 2.0 * size / 3.0
    return size, size, size, size


def outside_by(obj: ObjectState, x: float | None = None, y: float | None = None) -> float:
    """How far (canvas fraction) the object at (x, y) sticks out of the canvas; 0 when inside."""
    x = obj.x if x is None else x
    y = obj.y if y is None else y
    left, right, up, down = extent(obj.shape, obj.size)
    return max(0.0, left - x, x + right - 1.0, up - y, y + down - 1.0)


def inside_canvas(obj: ObjectState, x: float | None = None, y: float | None = None) -> bool:
    return outside_by(obj, x, y) <= 1e-9  # float round-off at the edge is not leaving it


def overlapping(a: ObjectState, b: ObjectState, slack: float = 0.0) -> bool:
    return float(np.hypot(a.x - b.x, a.y - b.y)) < reach(a) + reach(b) - slack


def sample_scene(
    rng: np.random.Generator,
    n_objects: int,
    size_min: float,
    size_max: float,
    gap: float = 0.04,
) -> tuple[ObjectState, ...]:
    """n_objects shapes with unique colours, inside the canvas, at least `gap` apart (reach-wise)."""
    if not 1 <= n_objects <= len(PALETTE):
        raise ValueError(f"n_objects must be in [1, {len(PALETTE)}], got {n_objects}")
    colours = rng.choice(len(PALETTE), size=n_objects, replace=False)
    objects: list[ObjectState] = []
    for c in colours:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = float(rng.uniform(size_min, size_max))
        for _ in range(1000):  # rejection sampling; 4 small objects always fit well before this
            x, y = rng.uniform(0.0, 1.0, size=2)
            obj = ObjectState(COLOUR_ORDER[int(c)], shape, float(x), float(y), size)
            if inside_canvas(obj) and not any(overlapping(obj, o, slack=-gap) for o in objects):
                objects.append(obj)
                break
        else:
            raise RuntimeError("could not place objects; lower world.size_max or world.max_objects")
    return tuple(objects)


def find(scene: tuple[ObjectState, ...] | list[ObjectState], name: str) -> int:
    """Index of the object called `name` ("red square"); KeyError naming the scene otherwise."""
    for i, o in enumerate(scene):
        if o.name == name:
            return i
    raise KeyError(f"no {name!r} in the scene (objects: {', '.join(o.name for o in scene)})")
