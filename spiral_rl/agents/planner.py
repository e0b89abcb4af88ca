"""PlanAgent: instruction -> ordered, object-centric SubActions with pre- and post-conditions.

The built-in planner parses the world's instruction grammar, resolves abstract goals against the
scene it is given, and simulates each step so that every SubAction carries the conditions the
critic will check. Its plan for a sampled task equals the task's reference plan exactly.
"""
from __future__ import annotations

from typing import Sequence

from spiral_rl.records import ObjectState, SubAction
from spiral_rl.world.actions import Step, make_sub_action, step_text
from spiral_rl.world.dynamics import Infeasible, Physics
from spiral_rl.world.goals import GOALS
from spiral_rl.world.language import ParseError, parse_instruction


class PlanError(ValueError):
    """The instruction cannot be planned: unparsable, unknown object, or impossible goal."""


class PlanAgent:
    def __init__(self, physics: Physics = Physics()):
        self.physics = physics

    @classmethod
    def from_config(cls, cfg) -> "PlanAgent":
        if cfg.planner.kind != "builtin":
            raise NotImplementedError(f"planner.kind={cfg.planner.kind!r} is not available yet; use 'builtin'")
        return cls(Physics.from_config(cfg.world))

    def plan(self, instruction: str, scene: Sequence[ObjectState]) -> list[SubAction]:
        """Ordered SubActions for `instruction` starting from `scene` (objects as they are now)."""
        try:
            clauses = parse_instruction(instruction)
        except ParseError as e:
            raise PlanError(str(e)) from None
        return self.build(clauses, scene)

    def replan(self, remaining: Sequence[SubAction], scene: Sequence[ObjectState]) -> list[SubAction]:
        """The same remaining steps, with conditions recomputed from the scene as it now is."""
        return self.build([Step(s.verb, s.subject, s.objects, s.args) for s in remaining], scene)

    def build(self, clauses: Sequence[Step | str], scene: Sequence[ObjectState]) -> list[SubAction]:
        scene = tuple(scene)
        names = {o.name for o in scene}
        plan: list[SubAction] = []
        for clause in clauses:
            if isinstance(clause, str):  # an abstract goal, resolved against the current scene
                try:
                    steps = GOALS[clause](scene, self.physics)
                except Infeasible as e:
                    raise PlanError(f"goal {clause!r} is impossible in this scene: {e}") from None
            else:
                steps = [clause]
            for step in steps:
                unknown = [n for n in (step.subject, *step.objects) if n not in names]
                if unknown:
                    raise PlanError(f"no {unknown[0]!r} in the scene (objects: {', '.join(sorted(names))})")
                if step.subject in step.objects:
                    raise PlanError(f"step {len(plan) + 1} names the {step.subject} twice")
                try:
                    sub, scene, _ = make_sub_action(scene, step, self.physics)
                except Infeasible as e:
                    raise PlanError(f"step {len(plan) + 1} ({step_text(step)!r}) is impossible: {e}") from None
                plan.append(sub)
        return plan
