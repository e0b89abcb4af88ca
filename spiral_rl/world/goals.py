"""Abstract goals: instructions that name an outcome, not the steps ("clear the centre").

Each goal has a resolver, scene -> ordered steps (the canonical plan), and where the outcome is
a property of the final scene, a check that it holds. Resolvers simulate as they go, so a
returned plan is executable; a goal no plan can reach raises Infeasible.
"""
from __future__ import annotations

from typing import Callable

from spiral_rl.world.actions import Step, make_sub_action
from spiral_rl.world.dynamics import REGION_TARGETS, Infeasible, Physics, in_region
from spiral_rl.world.scene import COLOUR_ORDER

Scene = tuple


def _apply(scene: Scene, step: Step, physics: Physics) -> Scene:
    return make_sub_action(scene, step, physics)[1]


def _by_x(scene: Scene) -> list:
    return sorted(scene, key=lambda o: (o.x, o.name))


def sort_by_colour(scene: Scene, physics: Physics) -> list[Step]:
    """Selection sort by swaps: slot k (k-th from the left) gets the k-th colour of COLOUR_ORDER."""
    target = sorted(scene, key=lambda o: COLOUR_ORDER.index(o.colour))
    steps: list[Step] = []
    for k in range(len(scene)):
        here = _by_x(scene)[k]
        if here.name != target[k].name:
            step = Step("swap", here.name, (target[k].name,))
            scene = _apply(scene, step, physics)
            steps.append(step)
    return steps


def sorted_by_colour(scene: Scene) -> bool:
    return [o.colour for o in _by_x(scene)] == sorted((o.colour for o in scene), key=COLOUR_ORDER.index)


def clear_centre(scene: Scene, physics: Physics) -> list[Step]:
    """Each object in the centre, in colour order, goes to the nearest side it can reach."""
    steps: list[Step] = []
    for obj in sorted(scene, key=lambda o: COLOUR_ORDER.index(o.colour)):
        if not in_region(obj.x, obj.y, "centre"):
            continue

        def travel(side: str) -> float:
            tx, ty = REGION_TARGETS[side]
            return abs(obj.x - tx) if tx is not None else abs(obj.y - ty)

        for side in sorted(("left", "right", "top", "bottom"), key=travel):
            step = Step("move_to", obj.name, (), (("region", side),))
            try:
                scene = _apply(scene, step, physics)
            except Infeasible:
                continue
            steps.append(step)
            break
        else:
            raise Infeasible(f"cannot move the {obj.name} out of the centre without a collision")
    return steps


def centre_clear(scene: Scene) -> bool:
    return not any(in_region(o.x, o.y, "centre") for o in scene)


def swap_extremes(scene: Scene, physics: Physics) -> list[Step]:
    order = _by_x(scene)
    return [Step("swap", order[0].name, (order[-1].name,))]


def all_jump(scene: Scene, physics: Physics) -> list[Step]:
    return [Step("jump", o.name) for o in _by_x(scene)]


GOALS: dict[str, Callable[[Scene, Physics], list[Step]]] = {
    "arrange the objects by colour from left to right": sort_by_colour,
    "clear the centre": clear_centre,
    "swap the leftmost and the rightmost objects": swap_extremes,
    "make every object jump from left to right": all_jump,
}
# Goals whose outcome is a property of the final scene, checked independently of the resolver.
GOAL_CHECKS: dict[str, Callable[[Scene], bool]] = {
    "arrange the objects by colour from left to right": sorted_by_colour,
    "clear the centre": centre_clear,
}
