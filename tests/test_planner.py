"""PlanAgent: parses every instruction the world produces into its canonical plan (CPU)."""
import numpy as np
import pytest

from spiral_rl.agents.planner import PlanAgent, PlanError
from spiral_rl.records import ObjectState
from spiral_rl.world.actions import Step, make_sub_action
from spiral_rl.world.dynamics import Physics
from spiral_rl.world.goals import GOAL_CHECKS, GOALS
from spiral_rl.world.predicates import degree
from spiral_rl.world.tasks import TaskSampler


@pytest.fixture
def sampler(world_cfg):
    return TaskSampler(world_cfg)


def test_plans_equal_reference_plans_for_every_split_and_kind(sampler):
    planner = PlanAgent(sampler.physics)
    kinds = set()
    for split in ("train", "val", "test", "heldout"):
        for i in range(150):
            task = sampler.task(split, i)
            assert planner.plan(task.instruction, task.scene) == list(task.reference_plan), task.instruction
            kinds.add(task.kind)
    assert kinds == {"single", "chain", "abstract"}


def test_sub_actions_carry_checkable_conditions(sampler):
    task = next(t for t in sampler.tasks("val", 50) if t.kind == "chain")
    names = [o.name for o in task.scene]
    start = np.array([[o.x, o.y] for o in task.scene])[None]  # a 1-frame track: the scene as it is
    first = task.reference_plan[0]
    assert first.text and first.pre and first.post
    assert {p.kind for p in first.pre} == {"visible", "at"}
    assert all(degree(p, start, names) == 1.0 for p in first.pre)  # the plan's assumptions hold now
    assert any(degree(p, start, names) < 1.0 for p in first.post)  # and the goal does not hold yet


def test_surface_variants_parse_to_the_same_plan():
    scene = (ObjectState("red", "square", 0.5, 0.5, 0.1), ObjectState("blue", "circle", 0.75, 0.7, 0.1))
    planner = PlanAgent(Physics())
    a = planner.plan("move the red square left, then swap the red square and the blue circle", scene)
    b = planner.plan("Move the red square left; then swap the red square with the blue circle.", scene)
    c = planner.plan("move the red square left and then swap red square and blue circle", scene)
    assert a == b == c and [s.verb for s in a] == ["move", "swap"]
    assert planner.plan("move the red square to the center", (scene[1], scene[0].moved_to(0.8, 0.2)))[0].arg == {"region": "centre"}


@pytest.mark.parametrize("goal", list(GOALS))
def test_abstract_goals_resolve_against_the_scene_and_reach_their_outcome(sampler, goal):
    planner = PlanAgent(sampler.physics)
    resolved = 0
    for i in range(60):
        scene = sampler.task("train", i).scene
        try:
            plan = planner.plan(goal, scene)
        except PlanError as e:
            assert "impossible" in str(e)
            continue
        resolved += 1
        now = scene
        for sub in plan:  # execute the plan in the exact world
            now = make_sub_action(now, Step(sub.verb, sub.subject, sub.objects, sub.args), planner.physics)[1]
        if goal in GOAL_CHECKS:
            assert GOAL_CHECKS[goal](now), (goal, scene)
    assert resolved >= 20  # the rest are scenes where every route collides: PlanError, checked above


def test_bad_input_gets_clear_errors():
    scene = (ObjectState("red", "square", 0.11, 0.5, 0.1), ObjectState("blue", "circle", 0.6, 0.5, 0.1))
    planner = PlanAgent(Physics())
    with pytest.raises(PlanError, match="cannot parse 'dance the red square'; expected clauses joined by 'then'"):
        planner.plan("dance the red square", scene)
    with pytest.raises(PlanError, match="empty instruction"):
        planner.plan("  ", scene)
    with pytest.raises(PlanError, match=r"no 'green triangle' in the scene \(objects: blue circle, red square\)"):
        planner.plan("make the green triangle jump", scene)
    with pytest.raises(PlanError, match="no 'red circle' in the scene"):
        planner.plan("make the blue circle jump, then make the red circle jump", scene)
    with pytest.raises(PlanError, match=r"step 1 \('move the red square left'\) is impossible: .*too close to the left edge"):
        planner.plan("move the red square left", scene)
    with pytest.raises(PlanError, match="names the red square twice"):
        planner.plan("swap the red square and the red square", scene)
    crowded = (ObjectState("red", "square", 0.5, 0.5, 0.1), ObjectState("blue", "square", 0.25, 0.5, 0.1),
               ObjectState("green", "square", 0.75, 0.5, 0.1), ObjectState("cyan", "square", 0.5, 0.15, 0.1))
    with pytest.raises(PlanError, match="goal 'clear the centre' is impossible"):
        PlanAgent(Physics(move_step=0.25)).plan("clear the centre",
                                                crowded + (ObjectState("yellow", "square", 0.5, 0.85, 0.1),))


def test_replan_recomputes_conditions_from_the_current_scene(sampler):
    task = next(t for t in sampler.tasks("val", 50) if len(t.reference_plan) >= 2)
    planner = PlanAgent(sampler.physics)
    rest = task.reference_plan[1:]
    drifted = tuple(o.moved_to(o.x, o.y) for o in task.scene)
    new = planner.replan(rest, drifted)
    assert [s.text for s in new] == [s.text for s in planner.replan(rest, drifted)]
    assert [s.verb for s in new] == [s.verb for s in rest]
