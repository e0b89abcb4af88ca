"""Rollouts end to end on a tiny random model: episodes -> prompts -> SDE groups -> critic ->
replay -> learner batch, with the first importance ratio exactly 1 after the round trip (CPU)."""
import numpy as np
import pytest
import torch

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.agents.planner import PlanAgent
from spiral_rl.config import load_config
from spiral_rl.grpo import GRPOLearner, GRPOSettings
from spiral_rl.loop import ClosedLoop, GenerationRequest, LoopSettings
from spiral_rl.memory import WorldMemory
from spiral_rl.replay import ReplayStore
from spiral_rl.rollout import GroupSettings, ModelGenerator, prompts_from_episodes, sample_groups, sample_sde, to_batch
from spiral_rl.world.scripted import ScriptedGenerator
from spiral_rl.world.tasks import TaskSampler
from spiral_rl.world_model import WorldModel


@pytest.fixture
def setup():
    torch.manual_seed(0)
    cfg = load_config(["world.frame_size=16", "world.segment_frames=4"])
    sampler = TaskSampler(cfg.world)
    planner, critic = PlanAgent.from_config(cfg), CriticAgent.from_config(cfg)
    return cfg, sampler, planner, critic, WorldModel(cfg.model, cfg.world.segment_frames)


def test_groups_share_a_window_and_survive_the_replay_round_trip_with_ratio_one(setup, tmp_path):
    cfg, sampler, planner, critic, model = setup
    loop = ClosedLoop(planner, critic, ScriptedGenerator(planner.physics, 16, 0.0), LoopSettings("spiral"))
    tasks = sampler.tasks("train", 3)
    episodes = [loop.run(t, WorldMemory.from_task(t, cfg), seed=i) for i, t in enumerate(tasks)]
    prompts = prompts_from_episodes(episodes)
    assert len(prompts) == sum(len(e.steps) for e in episodes) >= 3
    assert np.array_equal(prompts[0].context[-1], tasks[0].first_frame)
    settings = GroupSettings(group_size=3, sample_steps=6, noise_level=0.7, window=3)
    weights = {"action_completeness": 0.5, "physical_fidelity": 0.25, "temporal_consistency": 0.15, "visual_quality": 0.1}
    groups, stats = sample_groups(model, critic, prompts[:2], settings, weights, "weighted_sum", 0,
                                  np.random.default_rng(0))
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    assert len({r.sde_window for g in groups for r in g}) == 1 and groups[0][0].sde_window[1] - groups[0][0].sde_window[0] == 3
    assert all(r.latents.dtype == np.float32 and r.latents.shape == (7, 3, 4, 16, 16) for g in groups for r in g)
    for g in groups:
        adv = np.array([r.advantage for r in g])
        assert abs(adv.sum()) < 1e-6  # group-normalised (or all zero for a degenerate group)
    assert stats["segments"] == 6 and 0 <= stats["degenerate_groups"] <= 2

    store = ReplayStore(tmp_path / "replay")
    for g in groups:
        store.append_many(g)
    records = [r for g in store.latest_groups(2) for r in g]
    batch = to_batch(records, train_steps=2, rng=np.random.default_rng(0))
    assert len(batch.steps) == 2 and all(s in batch.trajectory.sde_steps for s in batch.steps)
    stats = GRPOLearner(model, GRPOSettings()).update(batch, check_ratio=True)
    assert stats["first_ratio_max_dev"] < 1e-4


def test_model_generator_is_a_loop_generator(setup):
    cfg, sampler, planner, critic, model = setup
    task = sampler.task("val", 0)
    loop = ClosedLoop(planner, critic, ModelGenerator(model, num_steps=2), LoopSettings("spiral", max_retries=1))
    ep = loop.run(task, WorldMemory.from_task(task, cfg))
    assert ep.video.shape[1:] == (16, 16, 3) and len(ep.steps) >= 1
    assert all(a.verdict.decision in ("accept", "refine", "replan") for s in ep.steps for a in s.attempts)


def test_model_generator_batches_episodes_without_changing_them(setup):
    """ModelGenerator.batch samples a round's segments in one call per guidance value; each from
    its own seed, so episodes run side by side reach the same verdicts as one at a time."""
    cfg, sampler, planner, critic, model = setup
    tasks = sampler.tasks("val", 4)
    loop = ClosedLoop(planner, critic, ModelGenerator(model, num_steps=2), LoopSettings("spiral", max_retries=1))
    jobs = lambda: [(t, WorldMemory.from_task(t, cfg), 7 * i) for i, t in enumerate(tasks)]  # noqa: E731
    alone = [loop.run(t, m, s) for t, m, s in jobs()]
    together = loop.run_many(jobs())
    for a, b in zip(alone, together):
        assert [[x.verdict.decision for x in s.attempts] for s in a.steps] == \
            [[x.verdict.decision for x in s.attempts] for s in b.steps]
        assert np.abs(a.video.astype(int) - b.video.astype(int)).max() <= 1  # float order only
    memory = WorldMemory.from_task(tasks[0], cfg)
    reqs = [GenerationRequest(memory, tasks[0].reference_plan[0], "push", seed, g) for seed, g in
            [(1, 1.0), (2, 2.0), (3, 1.0)]]
    gen = ModelGenerator(model, num_steps=2)
    for r, f in zip(reqs, gen.batch(reqs)):  # guidance groups are split and put back in request order
        alone = gen(memory, r.sub, r.prompt, r.seed, r.guidance)
        assert np.abs(f.astype(int) - alone.astype(int)).max() <= 1
    assert np.abs(gen.batch(reqs[:1])[0].astype(int) - gen.batch(reqs[1:2])[0].astype(int)).max() > 1


def test_prompts_mark_retried_steps_and_focus_puts_them_first():
    """A step whose first attempt the critic rejected becomes a `retried` prompt; with
    grpo.prompt_focus=retried launch/grpo.py's choose_prompts takes every such prompt before any other,
    with 'incomplete' the prompts of least first-try completeness."""
    import importlib.util
    from pathlib import Path
    cfg = load_config(["world.frame_size=32", "world.segment_frames=4"])  # at 16 px most first tries fail
    sampler, planner, critic = TaskSampler(cfg.world), PlanAgent.from_config(cfg), CriticAgent.from_config(cfg)
    loop = ClosedLoop(planner, critic, ScriptedGenerator(planner.physics, 32, 0.3),
                      LoopSettings("spiral", max_retries=2))
    episodes = [loop.run(t, WorldMemory.from_task(t, cfg), seed=i) for i, t in enumerate(sampler.tasks("train", 6))]
    prompts = prompts_from_episodes(episodes)
    flags = [p.retried for p in prompts]
    assert flags == [s.attempts[0].verdict.decision != "accept" for e in episodes for s in e.steps]
    n_retried = sum(flags)
    assert 0 < n_retried < len(prompts) - 1  # this seed gives both kinds, so the test can tell them apart

    spec = importlib.util.spec_from_file_location("grpo_driver", Path(__file__).parents[1] / "launch" / "grpo.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    n = n_retried + 1
    chosen, repeats = driver.choose_prompts(prompts, n, np.random.default_rng(0), "retried")
    assert repeats == 0 and len(chosen) == n and sum(p.retried for p in chosen) == n_retried
    plain = [driver.choose_prompts(prompts, n, np.random.default_rng(s))[0] for s in range(20)]
    assert min(sum(p.retried for p in c) for c in plain) < n_retried  # uniform draws leave some out

    firsts = [p.first_completeness for p in prompts]
    assert firsts == [s.attempts[0].verdict.scores["action_completeness"] for e in episodes for s in e.steps]
    assert min(firsts) < 1.0
    chosen, _ = driver.choose_prompts(prompts, 3, np.random.default_rng(0), "incomplete")
    assert sorted(p.first_completeness for p in chosen) == sorted(firsts)[:3]


def test_shared_noise_gives_a_group_one_initial_noise(setup):
    """grpo.shared_noise: the members of a group start from one noise, so with no noisy step they
    are the same sample, and they differ only through the window's SDE noise; by default each
    member draws its own initial noise."""
    cfg, sampler, planner, critic, model = setup
    loop = ClosedLoop(planner, critic, ScriptedGenerator(planner.physics, 16, 0.0), LoopSettings("spiral"))
    tasks = sampler.tasks("train", 2)
    prompts = prompts_from_episodes([loop.run(t, WorldMemory.from_task(t, cfg), seed=i) for i, t in enumerate(tasks)])[:2]
    for shared in (True, False):
        noisy, still = (sample_sde(model, prompts, GroupSettings(3, 4, level, shared_noise=shared),
                                   np.random.default_rng(0), window=(0, 3)) for level in (0.7, 0.0))  # 0: ODE
        same = [len(set(s.seeds[p * 3:(p + 1) * 3])) == 1 for s in (still, noisy) for p in range(2)]
        assert all(same) == shared and any(same) == shared
        assert np.array_equal(still.latents[-1, 0], still.latents[-1, 2]) == shared
        assert not np.array_equal(noisy.latents[-1, 0], noisy.latents[-1, 2])  # the window's noise differs
        assert not np.array_equal(still.latents[-1, 0], still.latents[-1, 3])  # another prompt, another noise


def test_sampling_in_slices_draws_the_same_samples(setup):
    """cluster.rollout_micro_batch: the groups sampled 4 segments per forward (ragged: 6 = 4 + 2)
    are the whole batch's samples, noise for noise (the window's noise is drawn for the whole call
    first), up to float rounding, with the same log-probs and window."""
    cfg, sampler, planner, critic, model = setup
    loop = ClosedLoop(planner, critic, ScriptedGenerator(planner.physics, 16, 0.0), LoopSettings("spiral"))
    tasks = sampler.tasks("train", 2)
    prompts = prompts_from_episodes([loop.run(t, WorldMemory.from_task(t, cfg), seed=i) for i, t in enumerate(tasks)])[:2]
    whole, sliced = (sample_sde(model, prompts, GroupSettings(3, 5, 0.7, window=3, micro_batch=m),
                                np.random.default_rng(0)) for m in (0, 4))
    assert whole.window == sliced.window and whole.seeds == sliced.seeds
    assert np.abs(whole.latents - sliced.latents).max() < 1e-5
    np.testing.assert_allclose(sliced.log_probs, whole.log_probs, rtol=1e-4, atol=1e-2)
    assert (whole.log_probs[slice(*whole.window)] != 0).all()  # the window's steps carry densities
    assert np.abs(whole.frames.astype(int) - sliced.frames.astype(int)).max() <= 1
