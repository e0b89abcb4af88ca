"""CriticAgent: ground truth passes, every corruption is caught and named, decisions and reward (CPU)."""
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
import pytest

from spiral_rl.agents.critic import CriticAgent, CriticSettings
from spiral_rl.memory import WorldMemory
from spiral_rl.records import SCORE_DIMS, Segment
from spiral_rl.world.actions import Step, make_sub_action
from spiral_rl.world.corruptions import CORRUPTIONS, corrupt
from spiral_rl.world.dataset import ground_truth_segment
from spiral_rl.world.dynamics import Infeasible, Physics
from spiral_rl.world.render import render_frame
from spiral_rl.world.tasks import TaskSampler

WORLD = SimpleNamespace(frame_size=32, segment_frames=8, context_frames=2, min_objects=2, max_objects=4,
                        size_min=0.09, size_max=0.12, move_step=0.25, push_distance=0.2, jump_height=0.2,
                        max_chain=4, task_mix=SimpleNamespace(single=0.4, chain=0.4, abstract=0.2),
                        heldout_compositions=["jump:triangle", "push:circle"], seed=0)
CRITIC = CriticAgent(CriticSettings(segment_frames=WORLD.segment_frames))


@lru_cache(maxsize=None)
def cases(size: int, n_tasks: int = 60):
    """Every reference-plan step of n_tasks val tasks, with memory advanced along the plan by
    committing each ground-truth segment with the critic's verdict (so memory holds perceived,
    not exact, states). Each case: scene, sub, next sub (or None), track, frames, memory."""
    sampler = TaskSampler(WORLD)
    out = []
    for task in sampler.tasks("val", n_tasks):
        memory = WorldMemory(render_frame(task.scene, size), task.scene, WORLD.context_frames)
        scene, plan = task.scene, task.reference_plan
        for j, sub in enumerate(plan):
            frames, track, end = ground_truth_segment(scene, sub, sampler.physics, size)
            before = SimpleNamespace(objects=memory.objects)  # what the critic reads of memory
            nxt = plan[j + 1] if j + 1 < len(plan) else None
            out.append(SimpleNamespace(scene=scene, sub=sub, next=nxt, track=track, frames=frames, memory=before))
            memory.commit(Segment(frames, sub), CRITIC.score(frames, sub, before))
            scene = end
    return out


def score(cs, frames=None, critic=CRITIC, next_actions=None):
    frames = [c.frames for c in cs] if frames is None else frames
    return critic.score_batch(frames, [c.sub for c in cs], [c.memory for c in cs], next_actions)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_ground_truth_scores_high_on_every_dimension_and_is_accepted(size):
    cs = cases(size)
    assert len(cs) >= 40
    verdicts = score(cs)
    for dim in SCORE_DIMS:
        assert min(v.scores[dim] for v in verdicts) >= 0.95, dim
    assert all(v.decision == "accept" and not v.failures for v in verdicts)
    for c, v in zip(cs, verdicts):
        assert len(v.end_states) == len(c.scene)
        end = c.track[-1]
        assert all(np.hypot(*(o.pos - end[k])) * size < 1.0 for k, o in enumerate(v.end_states))
        assert [(o.colour, o.shape) for o in v.end_states] == [(o.colour, o.shape) for o in c.scene]


@lru_cache(maxsize=None)
def corrupted(kind: str, size: int = 32):
    """(cases, verdicts) of the cases `kind` applies to, each corrupted with its own seed."""
    cs, frames = [], []
    for i, c in enumerate(cases(size)):
        f = corrupt(kind, c.scene, c.sub, c.track, size, np.random.default_rng([i, list(CORRUPTIONS).index(kind)]))
        if f is not None:
            cs.append(c)
            frames.append(f)
    return cs, score(cs, frames)


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_corruption_lowers_its_dimension_and_is_named(kind):
    dim, failure = CORRUPTIONS[kind].breaks, CORRUPTIONS[kind].failure
    cs, verdicts = corrupted(kind)
    assert len(cs) >= 30, f"{kind} applied to only {len(cs)} segments"
    gt = np.mean([v.scores[dim] for v in score(cs)])
    bad = np.mean([v.scores[dim] for v in verdicts])
    assert bad <= 0.7 and bad <= gt - 0.25, (kind, dim, bad, gt)
    named = np.mean([failure in v.failures for v in verdicts])
    assert named >= 0.8, (kind, named)
    assert np.mean([v.decision == "refine" for v in verdicts]) >= 0.8


def test_feedback_names_the_object_and_what_went_wrong():
    for c, v in zip(*corrupted("vanished")):
        assert v.feedback.startswith(f"the {c.sub.subject} vanished in frames 5-8"), v.feedback
    for c, v in zip(*corrupted("bystander_moved")):
        moved = [o.name for o in c.scene if o.name not in c.sub.involved]
        assert any(f"the {m} moved" in v.feedback for m in moved)
        assert "although the step does not involve it" in v.feedback
    short = [(c, v) for c, v in zip(*corrupted("stopped_short")) if v.failures == ("incomplete",)]
    assert len(short) >= 30
    for c, v in short:
        assert any(v.feedback.startswith(f"the {c.sub.subject} stopped short: '{p.text}' holds to 0.")
                   for p in c.sub.post), v.feedback
    for c, v in zip(*corrupted("recolour")):
        assert v.feedback.startswith(f"the {c.sub.subject} turned "), v.feedback


def test_visual_quality_does_not_depend_on_frame_size():
    ratios = {}
    for size in (32, 64, 128):
        cs = cases(size)[:20]
        for kind in ("noise", "blur"):
            frames = [corrupt(kind, c.scene, c.sub, c.track, size, np.random.default_rng(i)) for i, c in enumerate(cs)]
            vs = score(cs, frames)
            assert np.mean([v.scores["visual_quality"] for v in vs]) <= 0.3
            ratios[kind, size] = np.mean([v.details["off_palette_ratio"] for v in vs])
    for kind in ("noise", "blur"):
        r = [ratios[kind, s] for s in (32, 64, 128)]
        assert max(r) / min(r) < 1.6, (kind, r)


def _stale_step(scene, sub, rng):
    """A next step planned when a bystander of `sub` was elsewhere: its pre-conditions are stale."""
    for k in rng.permutation(len(scene)):
        o = scene[k]
        if o.name in sub.involved:
            continue
        for dx, dy in ((0.2, 0), (-0.2, 0), (0, 0.2), (0, -0.2)):
            believed = scene[:k] + (o.moved_to(o.x + dx, o.y + dy),) + scene[k + 1:]
            try:
                return make_sub_action(believed, Step("jump", o.name), Physics.from_config(WORLD))[0]
            except Infeasible:
                continue
    return None


def test_replan_when_the_next_step_assumes_a_state_that_no_longer_holds():
    cs = [c for c in cases(32) if c.next is not None]
    assert all(v.decision == "accept" for v in score(cs, next_actions=[c.next for c in cs]))
    rng = np.random.default_rng(0)
    pairs = [(c, s) for c in cases(32) if (s := _stale_step(c.scene, c.sub, rng)) is not None]
    assert len(pairs) >= 20
    verdicts = score([c for c, _ in pairs], next_actions=[s for _, s in pairs])
    assert all(v.decision == "replan" for v in verdicts)
    for (_, stale), v in zip(pairs, verdicts):
        assert any(f"'{p.text}' holds to 0.00" in v.feedback for p in stale.pre if p.kind == "at"), v.feedback
    assert all(v.scores == w.scores for v, w in zip(verdicts, score([c for c, _ in pairs])))
    # A failing segment is refined first: replanning is only for steps that went right.
    cs = [c for c, _ in pairs][:10]
    frames = [corrupt("vanished", c.scene, c.sub, c.track, 32, None) for c in cs]
    assert all(v.decision == "refine" for v in score(cs, frames, next_actions=[s for _, s in pairs][:10]))


def test_reward_is_the_configured_weighted_sum_and_batching_changes_nothing():
    weights = dict(zip(SCORE_DIMS, (0.1, 0.2, 0.3, 0.4)))
    critic = CriticAgent(CriticSettings(weights=weights))
    cs, _ = corrupted("stopped_short")
    frames = [corrupt("stopped_short", c.scene, c.sub, c.track, 32, None) for c in cs[:12]]
    batch = score(cs[:12], frames, critic=critic)
    for c, f, v in zip(cs, frames, batch):
        assert v.reward == pytest.approx(sum(weights[d] * v.scores[d] for d in SCORE_DIMS))
        single = critic.score(Segment(f, c.sub), c.sub, c.memory)
        assert single.scores == v.scores and single.feedback == v.feedback and single.failures == v.failures
    assert len({round(v.reward, 6) for v in batch}) > 1  # rewards vary: the test could fail


def test_from_config_reads_thresholds_weights_and_tolerances():
    config = pytest.importorskip("spiral_rl.config")
    default = CriticAgent.from_config(config.load_config([])).settings
    assert default == CriticSettings()
    cfg = config.load_config(["critic.thresholds.visual_quality=0.7", "reward.weights.action_completeness=2.0",
                              "critic.bystander_tolerance=0.1", "world.segment_frames=6"])
    s = CriticAgent.from_config(cfg).settings
    assert s.thresholds["visual_quality"] == 0.7 and s.weights["action_completeness"] == 2.0
    assert s.bystander_tolerance == 0.1 and s.segment_frames == 6
