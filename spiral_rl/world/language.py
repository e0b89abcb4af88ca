"""The built-in world's instruction grammar: text -> clauses.

An instruction is one or more clauses joined by "then" ("move the red square left, then make
the blue circle jump"). A clause is a single verb on named objects, or an abstract goal (see
goals.py) that the planner resolves against the scene. Objects are named "<colour> <shape>".
"""
from __future__ import annotations

import re

from spiral_rl.world.actions import Step
from spiral_rl.world.goals import GOALS


class ParseError(ValueError):
    """The text is not in the instruction grammar."""


_OBJ = r"(?:the )?([a-z]+ [a-z]+)"
_REGIONS = {
    "left": "left", "left side": "left", "right": "right", "right side": "right",
    "top": "top", "top side": "top", "bottom": "bottom", "bottom side": "bottom",
    "centre": "centre", "middle": "centre",
    "top-left corner": "top_left", "top-right corner": "top_right",
    "bottom-left corner": "bottom_left", "bottom-right corner": "bottom_right",
}
_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"^move {_OBJ} (left|right|up|down)$"), "move"),
    (re.compile(rf"^move {_OBJ} to the ({'|'.join(sorted(_REGIONS, key=len, reverse=True))})$"), "move_to"),
    (re.compile(rf"^push {_OBJ} (?:into|against|towards|toward) {_OBJ}$"), "push"),
    (re.compile(rf"^(?:make|let) {_OBJ} jump$"), "jump"),
    (re.compile(rf"^swap {_OBJ} (?:and|with) {_OBJ}$"), "swap"),
]
GRAMMAR_HELP = (
    "clauses joined by 'then', each one of: 'move the <colour> <shape> left|right|up|down', "
    "'move the <colour> <shape> to the left side|right side|top|bottom|centre|<top-left|...> corner', "
    "'push the <colour> <shape> into the <colour> <shape>', 'make the <colour> <shape> jump', "
    "'swap the <colour> <shape> and the <colour> <shape>', or a goal: "
    + "; ".join(f"'{g}'" for g in GOALS)
)


def normalise(text: str) -> str:
    t = " ".join(text.lower().replace("center", "centre").replace("color", "colour").split())
    return t.rstrip(".!").strip()


def split_clauses(text: str) -> list[str]:
    parts = re.split(r"\s*(?:,|;)?\s*\b(?:and )?then\b,?\s*", normalise(text))
    return [p.strip(" ,;") for p in parts if p.strip(" ,;")]


def parse_clause(clause: str) -> Step | str:
    """A Step (names not yet checked against a scene) or the key of an abstract goal."""
    if clause in GOALS:
        return clause
    for pattern, verb in _PATTERNS:
        m = pattern.match(clause)
        if not m:
            continue
        names = m.groups()
        if verb == "move":
            return Step("move", names[0], (), (("direction", names[1]),))
        if verb == "move_to":
            return Step("move_to", names[0], (), (("region", _REGIONS[names[1]]),))
        if verb == "jump":
            return Step("jump", names[0])
        return Step(verb, names[0], (names[1],))
    raise ParseError(f"cannot parse {clause!r}; expected {GRAMMAR_HELP}")


def parse_instruction(text: str) -> list[Step | str]:
    if not isinstance(text, str) or not text.strip():
        raise ParseError(f"empty instruction; expected {GRAMMAR_HELP}")
    return [parse_clause(c) for c in split_clauses(text)]


def join_clauses(clauses: list[str]) -> str:
    return ", then ".join(clauses)
