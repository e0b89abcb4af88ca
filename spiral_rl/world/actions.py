"""Build a SubAction (prompt text, pre- and post-conditions) from a step of a plan.

A step is (verb, subject, objects, args). Its conditions come from simulating it exactly, so
the post-conditions state where the world's physics puts the objects, and the pre-conditions
state where the plan assumes they are (a violated pre-condition means the plan is stale).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from spiral_rl.records import ObjectState, Predicate, SubAction
from spiral_rl.world.dynamics import Physics, simulate
from spiral_rl.world.scene import find, reach

AT_TOL = 0.05  # canvas fraction: ~1.6 px at 32 px, several times the critic's localisation error
PRE_TOL = 0.1  # looser: a pre-condition only asks whether the plan's assumptions still hold

REGION_WORDS = {
    "left": "the left side", "right": "the right side", "top": "the top", "bottom": "the bottom",
    "centre": "the centre", "top_left": "the top-left corner", "top_right": "the top-right corner",
    "bottom_left": "the bottom-left corner", "bottom_right": "the bottom-right corner",
}


class Step(NamedTuple):
    verb: str
    subject: str
    objects: tuple[str, ...] = ()
    args: tuple[tuple[str, Any], ...] = ()


def step_text(step: Step) -> str:
    """The prompt for one step, in the world's instruction grammar (see language.py)."""
    a = dict(step.args)
    if step.verb == "move":
        return f"move the {step.subject} {a['direction']}"
    if step.verb == "move_to":
        return f"move the {step.subject} to {REGION_WORDS[a['region']]}"
    if step.verb == "push":
        return f"push the {step.subject} into the {step.objects[0]}"
    if step.verb == "jump":
        return f"make the {step.subject} jump"
    if step.verb == "swap":
        return f"swap the {step.subject} and the {step.objects[0]}"
    raise ValueError(f"unknown verb {step.verb!r}")


def _xy(pos) -> str:
    return f"({pos[0]:.2f}, {pos[1]:.2f})"


def _at(obj: ObjectState, pos: np.ndarray, tol: float, text: str) -> Predicate:
    return Predicate("at", (obj.name, round(float(pos[0]), 6), round(float(pos[1]), 6), tol), text)


def make_sub_action(scene, step: Step, physics: Physics, margin: float = 0.0) -> tuple[SubAction, tuple[ObjectState, ...], np.ndarray]:
    """SubAction for `step` in `scene`, the scene after it, and its exact track (T + 1, N, 2).

    Raises Infeasible if the world cannot carry the step out (see simulate for `margin`),
    KeyError for unknown objects.
    """
    scene = tuple(scene)
    track, end = simulate(scene, step.verb, step.subject, step.objects, dict(step.args), physics, margin)
    a = scene[find(scene, step.subject)]
    a_end = end[find(scene, step.subject)]
    pre = [Predicate("visible", (n,), f"the {n} is visible") for n in (step.subject, *step.objects)]
    for n in (step.subject, *step.objects):
        o = scene[find(scene, n)]
        pre.append(_at(o, o.pos, PRE_TOL, f"the {n} is near {_xy(o.pos)}"))
    post: list[Predicate] = []
    if step.verb == "move":
        post.append(_at(a, a_end.pos, AT_TOL, f"the {a.name} has moved {dict(step.args)['direction']} to {_xy(a_end.pos)}"))
    elif step.verb == "move_to":
        region = dict(step.args)["region"]
        post.append(Predicate("in_region", (a.name, region), f"the {a.name} is in {REGION_WORDS[region]}"))
    elif step.verb == "push":
        b = scene[find(scene, step.objects[0])]
        b_end = end[find(scene, b.name)]
        post.append(Predicate("touches", (a.name, b.name, round(reach(a) + reach(b), 6), AT_TOL),
                              f"the {a.name} touches the {b.name}"))
        post.append(_at(b, b_end.pos, AT_TOL, f"the {b.name} has been pushed to {_xy(b_end.pos)}"))
    elif step.verb == "jump":
        height = round(float(a.y - track[:, find(scene, a.name), 1].min()), 6)
        post.append(Predicate("rose", (a.name, height), f"the {a.name} jumped up", when="during"))
        post.append(_at(a, a.pos, AT_TOL, f"the {a.name} landed where it started"))
    elif step.verb == "swap":
        b = scene[find(scene, step.objects[0])]
        post.append(_at(a, b.pos, AT_TOL, f"the {a.name} is where the {b.name} was"))
        post.append(_at(b, a.pos, AT_TOL, f"the {b.name} is where the {a.name} was"))
    sub = SubAction(step.verb, step.subject, tuple(step.objects), tuple(step.args), step_text(step),
                    tuple(pre), tuple(post))
    return sub, end, track
