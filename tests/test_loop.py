"""Closed loop: modes, retry with feedback, re-planning (CPU, scripted stand-in generator)."""
import numpy as np
import pytest

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.agents.planner import PlanAgent
from spiral_rl.loop import ClosedLoop, LoopSettings
from spiral_rl.memory import WorldMemory
from spiral_rl.world.scripted import ScriptedGenerator
from spiral_rl.world.tasks import TaskSampler


@pytest.fixture
def parts(cfg):
    sampler = TaskSampler(cfg.world)
    return sampler, PlanAgent(sampler.physics), CriticAgent.from_config(cfg)


def run(cfg, parts, settings, failure_rate, n=8, generator=None):
    sampler, planner, critic = parts
    gen = generator or ScriptedGenerator(planner.physics, cfg.world.frame_size, failure_rate)
    loop = ClosedLoop(planner, critic, gen, settings)
    tasks = [t for t in sampler.tasks("val", 30) if len(t.reference_plan) >= 2][:n]
    return [loop.run(t, WorldMemory.from_task(t, cfg), seed=100 * i) for i, t in enumerate(tasks)], gen


def test_a_perfect_generator_succeeds_first_time_in_every_mode(cfg, parts):
    for mode in ("open_loop", "plan_only", "spiral"):
        episodes, _ = run(cfg, parts, LoopSettings(mode), failure_rate=0.0)
        assert all(e.success for e in episodes), mode
        assert all(len(s.attempts) == 1 for e in episodes for s in e.steps)
        frames = cfg.world.segment_frames
        assert all(e.video.shape[0] == 1 + frames * len(e.steps) for e in episodes)


def test_only_spiral_retries_and_retries_use_feedback_new_seeds_and_stronger_guidance(cfg, parts):
    settings = LoopSettings("spiral", max_retries=3, retry_guidance_step=0.5, feedback_in_prompt=True)
    episodes, gen = run(cfg, parts, settings, failure_rate=1.0, n=3)
    step = episodes[0].steps[0]
    assert len(step.attempts) == 4 and all(a.verdict.decision == "refine" for a in step.attempts)
    assert len({a.seed for a in step.attempts}) == 4
    assert [a.guidance for a in step.attempts] == [1.0, 1.5, 2.0, 2.5]
    assert step.attempts[1].prompt.endswith(step.attempts[0].verdict.feedback)
    assert step.committed == int(np.argmax([a.verdict.reward for a in step.attempts]))
    assert not any(e.success for e in episodes)
    for mode in ("open_loop", "plan_only"):
        eps, _ = run(cfg, parts, LoopSettings(mode, max_retries=3), failure_rate=1.0, n=3)
        assert all(len(s.attempts) == 1 for e in eps for s in e.steps)
    eps, _ = run(cfg, parts, LoopSettings("open_loop"), failure_rate=0.0, n=2)
    assert all(a.prompt == e.instruction for e in eps for s in e.steps for a in s.attempts)


def test_spiral_recovers_from_flaws_that_plan_only_commits(cfg, parts):
    spiral, _ = run(cfg, parts, LoopSettings("spiral", max_retries=4), failure_rate=0.5, n=10)
    plan_only, _ = run(cfg, parts, LoopSettings("plan_only"), failure_rate=0.5, n=10)
    assert sum(e.success for e in spiral) >= 2 * max(1, sum(e.success for e in plan_only))


class DisplaceBystander:
    """Wraps the perfect stand-in; on its first call also drags a bystander that the next step needs."""

    def __init__(self, inner, victim):
        self.inner, self.victim, self.calls = inner, victim, 0

    def __call__(self, memory, sub, prompt, seed, guidance):
        self.calls += 1
        if self.calls > 1:
            return self.inner(memory, sub, prompt, seed, guidance)
        from spiral_rl.world.dataset import render_track
        from spiral_rl.world.actions import Step, make_sub_action
        scene = memory.objects
        _, _, track = make_sub_action(scene, Step(sub.verb, sub.subject, sub.objects, sub.args), self.inner.physics)
        k = [o.name for o in scene].index(self.victim)
        drift = np.linspace(0, 1, track.shape[0])[:, None] * np.array([0.0, 0.12 if scene[k].y < 0.5 else -0.12])
        track = track.copy()
        track[:, k] += drift
        return render_track(scene, track, self.inner.frame_size)


def test_drift_against_the_next_steps_preconditions_triggers_a_replan(cfg, parts):
    sampler, planner, critic = parts
    candidates = [t for t in sampler.tasks("val", 300)
                  if len(t.reference_plan) >= 2 and t.reference_plan[1].verb == "jump"
                  and t.reference_plan[1].subject not in t.reference_plan[0].involved][:6]
    replanned = []
    for task in candidates:
        inner = ScriptedGenerator(planner.physics, cfg.world.frame_size, 0.0)
        gen = DisplaceBystander(inner, task.reference_plan[1].subject)
        ep = ClosedLoop(planner, critic, gen, LoopSettings("spiral", max_retries=0)).run(
            task, WorldMemory.from_task(task, cfg))
        first = ep.steps[0].attempts[0].verdict
        assert "bystander_moved" in first.failures and first.decision == "refine"
        assert ep.replans == 1  # retries exhausted on a drifted world: the rest is re-planned
        if ep.aborted:  # the drifted object has no room left to jump: a clear PlanError, recorded
            assert ep.aborted.startswith("re-plan failed: step 1 ('make the")
            continue
        # the re-planned step's pre-condition names where the object is now, not where it started
        moved, original = ep.steps[1].sub_action.pre[-1].args[1:3], task.reference_plan[1].pre[-1].args[1:3]
        assert abs(moved[1] - original[1]) > 0.05
        assert ep.steps[1].verdict.decision != "refine"
        replanned.append(task.task_id)
    assert len(candidates) == 6 and len(replanned) >= 2


def test_evaluation_breaks_completeness_down_by_verb_and_merges_across_workers(cfg, parts):
    """spiral_rl.evaluate reports completeness per verb (weighted back, it is the overall mean), and
    actors.rollout.merge_evaluations joins two workers' halves into the whole list's numbers."""
    from actors.rollout import merge_evaluations
    from spiral_rl.evaluate import evaluate
    sampler, planner, critic = parts
    gen = ScriptedGenerator(planner.physics, cfg.world.frame_size, 0.4)
    tasks = sampler.tasks("val", 8)
    base = LoopSettings("spiral")
    whole = evaluate(planner, critic, gen, tasks, cfg, base, modes=("plan_only",), seed=5)["plan_only"]
    by_verb = whole["by_verb"]
    assert len(by_verb) >= 2 and sum(v["steps"] for v in by_verb.values()) == whole["steps"]
    assert sum(v["action_completeness"] * v["steps"] for v in by_verb.values()) / whole["steps"] == \
        pytest.approx(whole["action_completeness"])
    assert min(v["action_completeness"] for v in by_verb.values()) < 1.0  # failures were injected
    halves = [evaluate(planner, critic, gen, tasks[:3], cfg, base, modes=("plan_only",), seed=5),
              evaluate(planner, critic, gen, tasks[3:], cfg, base, modes=("plan_only",), seed=5 + 30_000)]
    merged = merge_evaluations(halves)["plan_only"]
    for key in ("success_rate", "attempts_per_step", "action_completeness", "physical_fidelity"):
        assert merged[key] == pytest.approx(whole[key]), key
    for verb, v in by_verb.items():
        assert merged["by_verb"][verb]["steps"] == v["steps"]
        assert merged["by_verb"][verb]["action_completeness"] == pytest.approx(v["action_completeness"])


class BatchingGenerator(ScriptedGenerator):
    """The scripted generator with a `batch` method that records each batch's size."""

    def __init__(self, *args):
        super().__init__(*args)
        self.batches: list[int] = []

    def batch(self, requests):
        self.batches.append(len(requests))
        return [self(r.memory, r.sub, r.prompt, r.seed, r.guidance) for r in requests]


@pytest.mark.parametrize("mode", ["open_loop", "plan_only", "spiral"])
def test_episodes_side_by_side_match_one_at_a_time(cfg, parts, mode):
    """run_many advances episodes together and hands their pending segments to the generator's
    `batch` in one call, without changing any attempt, verdict, re-plan or frame."""
    sampler, planner, critic = parts
    settings = LoopSettings(mode, max_retries=2)
    tasks = sampler.tasks("val", 7)
    jobs = lambda: [(t, WorldMemory.from_task(t, cfg), 100 * i) for i, t in enumerate(tasks)]  # noqa: E731
    alone = [ClosedLoop(planner, critic, ScriptedGenerator(planner.physics, cfg.world.frame_size, 0.5), settings)
             .run(t, m, s) for t, m, s in jobs()]
    gen = BatchingGenerator(planner.physics, cfg.world.frame_size, 0.5)
    together = ClosedLoop(planner, critic, gen, settings).run_many(jobs(), side_by_side=3)
    assert [e.to_json() for e in together] == [e.to_json() for e in alone]
    assert all(np.array_equal(a.video, b.video) for a, b in zip(alone, together))
    requests = sum(len(s.attempts) for e in alone for s in e.steps)
    assert sum(gen.batches) == requests and max(gen.batches) == 3 and len(gen.batches) < requests
    if mode == "spiral":
        assert any(len(s.attempts) > 1 for e in alone for s in e.steps)  # retries desynchronise episodes


def test_a_batch_generator_that_drops_segments_fails_loudly(cfg, parts):
    sampler, planner, critic = parts
    gen = BatchingGenerator(planner.physics, cfg.world.frame_size, 0.0)
    gen.batch = lambda requests: [gen(r.memory, r.sub, r.prompt, r.seed, r.guidance) for r in requests[1:]]
    tasks = sampler.tasks("val", 2)
    with pytest.raises(ValueError, match="returned 1 segments for 2 requests"):
        ClosedLoop(planner, critic, gen, LoopSettings("plan_only")).run_many(
            [(t, WorldMemory.from_task(t, cfg), i) for i, t in enumerate(tasks)])
