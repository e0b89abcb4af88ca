"""Rollouts for GRPO: prompts from closed-loop episodes -> groups of SDE samples -> scored records.

For P prompts the world model samples G segments each in ONE batched SDE call (P * G samples),
all sharing one window of noisy denoising steps (Flow-GRPO / MixGRPO: the importance ratio is
only defined on those steps, and group members must be comparable). The critic scores every
segment; grpo.group_advantages turns the scores into advantages; each sample becomes a
replay.ScoredSegment (fp32 latents and log-probs, numpy only). `to_batch` stacks stored records
back into the learner's GRPOBatch. The stages are separate functions (sample_sde -> critic ->
score_groups) so that the distributed driver can run them on different actors; `sample_groups`
chains them in one process. `grpo_batch_plan` spells out what the grpo / cluster config keys resolve to.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spiral_rl.flow import Trajectory, sde_sample
from spiral_rl.grpo import GRPOBatch, group_advantages
from spiral_rl.loop import Episode, GenerationRequest
from spiral_rl.models.dit import frames_to_tensor, tensor_to_frames
from spiral_rl.records import SCORE_DIMS, Prompt
from spiral_rl.replay import ScoredSegment


@dataclass(frozen=True)
class GroupSettings:
    group_size: int = 4
    sample_steps: int = 10
    noise_level: float = 0.7
    window: int = 0  # noisy steps per rollout (0: all); its start is drawn per call
    train_steps: int = 0  # steps of the window the learner trains on (0: all of the window)
    guidance: float = 1.0
    shared_noise: bool = False  # one initial noise per group (grpo.shared_noise; config.py says why)
    micro_batch: int = 0  # samples per forward (cluster.rollout_micro_batch; 0: all at once)


class RecordedObjects:
    """What the critic reads from a memory: the last known object states."""

    def __init__(self, objects):
        self.objects = objects


def prompts_from_episodes(episodes: Sequence[Episode]) -> list[Prompt]:
    """One prompt per executed step: where the loop needed a segment, from what memory held then."""
    prompts = []
    for ep in episodes:
        for k, step in enumerate(ep.steps):
            nxt = ep.steps[k + 1].sub_action if k + 1 < len(ep.steps) else None
            first = step.attempts[0].verdict
            prompts.append(Prompt(step.context, step.sub_action, tuple(step.objects), nxt, ep.task_id,
                                  retried=not first.accepted,
                                  first_completeness=float(first.scores["action_completeness"])))
    return prompts


def draw_window(settings: GroupSettings, rng: np.random.Generator) -> tuple[int, int]:
    """[start, end) of the noisy steps, drawn once per call. The last step is always deterministic:
    noise injected there stays in the sample (sigma_t * sqrt(|dt|) is largest at the last, widest
    step of a shifted schedule), and the critic's quality check would then score the sampler's
    noise instead of the policy."""
    last = settings.sample_steps - 1  # noisy steps may use [0, last)
    if last < 1:
        raise ValueError(f"grpo.sample_steps={settings.sample_steps} leaves no noisy step; use >= 2")
    if settings.window <= 0 or settings.window >= last:
        return 0, last
    start = int(rng.integers(0, last - settings.window + 1))
    return start, start + settings.window


def grpo_batch_plan(cfg) -> dict[str, int]:
    """What the grpo and cluster keys resolve to per iteration (launch/grpo.py prints it). In
    cluster.mode=local one process takes the whole batch, in micro-batches of cluster.micro_batch."""
    g, k = cfg.grpo, cfg.cluster
    start, end = draw_window(GroupSettings(g.group_size, g.sample_steps, g.noise_level, g.window),
                             np.random.default_rng(0))
    window = end - start  # where it starts is drawn; its size is not
    trained = min(g.train_steps, window) if g.train_steps else window
    segments = g.prompts_per_iter * g.group_size
    ranks = max(1, k.learner_ranks) if k.mode == "ray" else 1
    per_rank = segments // ranks
    micro = k.micro_batch or per_rank
    micro_batches = max(1, per_rank // micro)
    return {"prompts_per_iter": g.prompts_per_iter, "group_size": g.group_size,
            "segments_per_learner_step": segments, "learner_ranks": ranks, "per_rank_batch": per_rank,
            "micro_batch": micro, "micro_batches_per_rank": micro_batches, "sde_window_steps": window,
            "trained_steps_per_update": trained,
            "grad_accumulation": micro_batches * trained,  # backward passes per optimizer step
            "updates_per_iter": g.updates_per_iter}


@dataclass
class Samples:
    """G SDE samples for each of P prompts, before scoring: numpy only, what a rollout worker
    returns (sample p * G + j is member j of prompt p's group). All share one window."""

    prompts: list[Prompt]
    group_size: int
    seeds: list[int]  # per sample: its initial noise
    window: tuple[int, int]  # the shared SDE window [start, end)
    frames: np.ndarray  # (P * G, T, H, W, 3) uint8
    latents: np.ndarray  # (S + 1, P * G, C, T', H', W') fp32
    log_probs: np.ndarray  # (S, P * G) fp32
    timesteps: np.ndarray  # (S + 1,) fp32
    noise_level: float
    guidance: float
    seconds: float = 0.0  # wall time of the sampling

    def __len__(self) -> int:
        return len(self.seeds)

    def critic_inputs(self) -> tuple[list[np.ndarray], list, list, list]:
        """(frames, sub-actions, memories, next actions) per sample: CriticAgent.score_batch's arguments."""
        g = self.group_size
        return (list(self.frames), [p.sub_action for p in self.prompts for _ in range(g)],
                [RecordedObjects(p.objects) for p in self.prompts for _ in range(g)],
                [p.next_action for p in self.prompts for _ in range(g)])

    @staticmethod
    def concat(parts: Sequence["Samples"]) -> "Samples":
        """Join the samples of several workers (same window, group size and noise) in order."""
        first = parts[0]
        for p in parts[1:]:
            if (p.window, p.group_size, p.noise_level, p.guidance) != (first.window, first.group_size,
                                                                       first.noise_level, first.guidance):
                raise ValueError("samples to join must share window, group size, noise level and guidance")
        return Samples([q for p in parts for q in p.prompts], first.group_size, [s for p in parts for s in p.seeds],
                       first.window, np.concatenate([p.frames for p in parts]),
                       np.concatenate([p.latents for p in parts], axis=1),
                       np.concatenate([p.log_probs for p in parts], axis=1), first.timesteps, first.noise_level,
                       first.guidance, max(p.seconds for p in parts))


@torch.no_grad()
def sample_sde(model, prompts: Sequence[Prompt], settings: GroupSettings, rng: np.random.Generator,
               window: tuple[int, int] | None = None) -> Samples:
    """G SDE samples per prompt; window: the shared SDE window (None: drawn here). Sampled in
    slices of settings.micro_batch with every sample's noise drawn first (its initial noise from its
    own seed, the window's from one generator for the call), so slicing changes speed, not samples."""
    g, t0 = settings.group_size, time.perf_counter()
    contexts = np.stack([p.context for p in prompts]).repeat(g, axis=0)  # (P * G, K, H, W, 3)
    texts = [p.sub_action.text for p in prompts for _ in range(g)]
    seeds = rng.integers(0, 2**31 - 1, size=len(texts)).tolist()
    if settings.shared_noise:  # every member takes its group's first seed; drawn as many either way,
        # so the window drawn next from rng is the same with and without it
        seeds = [seeds[i - i % g] for i in range(len(seeds))]
    window = tuple(window) if window is not None else draw_window(settings, rng)
    size = settings.micro_batch or len(texts)
    slices = [slice(a, a + size) for a in range(0, len(texts), size)]
    inputs = [model.prepare(contexts[b], texts[b], seed=seeds[b], guidance=settings.guidance) for b in slices]
    step_noise = None
    if settings.noise_level > 0:  # (window steps, P * G, C, T, H, W), drawn on the CPU as the initial noise is
        shape = (window[1] - window[0], len(texts), *inputs[0].noise.shape[1:])
        step_noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(seeds[0])))
    parts = [sde_sample(model.velocity, inp.context, inp.cond, inp.noise, settings.sample_steps, settings.noise_level,
                        model.cfg.shift, settings.guidance, inp.uncond, sde_window=window,
                        step_noise=None if step_noise is None else step_noise[:, b])
             for inp, b in zip(inputs, slices)]
    latents = torch.cat([t.latents for t in parts], dim=1)  # (S + 1, P * G, C, T, H, W)
    log_probs = torch.cat([t.log_probs for t in parts], dim=1)  # (S, P * G)
    return Samples(list(prompts), g, seeds, parts[0].window, tensor_to_frames(latents[-1]),  # (P * G, T, H, W, 3)
                   latents.cpu().numpy(), log_probs.cpu().numpy(), parts[0].timesteps.cpu().numpy(),
                   settings.noise_level, settings.guidance, time.perf_counter() - t0)


def score_groups(samples: Samples, verdicts: Sequence, weights: dict, aggregation: str,
                 policy_version: int) -> tuple[list[list[ScoredSegment]], dict]:
    """Verdicts (one per sample) -> rewards -> group advantages -> (groups of ScoredSegment, stats)."""
    g, prompts = samples.group_size, samples.prompts
    if len(verdicts) != len(samples):
        raise ValueError(f"got {len(verdicts)} verdicts for {len(samples)} samples")
    scores = np.array([[v.scores[d] for d in SCORE_DIMS] for v in verdicts]).reshape(len(prompts), g, -1)
    rewards, adv, degenerate = group_advantages(scores, np.array([weights[d] for d in SCORE_DIMS]), aggregation)
    groups, created, seeds = [], time.time(), samples.seeds
    for p, prompt in enumerate(prompts):
        gid = f"v{policy_version}-{prompt.task_id}-{p}-{seeds[p * g]}"
        group = []
        for j in range(g):
            b = p * g + j
            group.append(ScoredSegment(
                gid, prompt.sub_action.text, prompt.context, samples.frames[b],
                np.ascontiguousarray(samples.latents[:, b]), np.ascontiguousarray(samples.log_probs[:, b]),
                samples.timesteps, samples.window, float(rewards[p, j]), dict(verdicts[b].scores),
                policy_version, float(adv[p, j]), created,
                {"noise_level": samples.noise_level, "guidance": samples.guidance,
                 "decision": verdicts[b].decision}))
        groups.append(group)
    stats = {"prompts": len(prompts), "segments": len(samples), "degenerate_groups": int(degenerate.sum()),
             "reward_mean": float(rewards.mean()),
             **{f"score/{d}": float(scores[..., k].mean()) for k, d in enumerate(SCORE_DIMS)}}
    return groups, stats


def sample_groups(model, critic, prompts: Sequence[Prompt], settings: GroupSettings, weights: dict,
                  aggregation: str, policy_version: int, rng: np.random.Generator
                  ) -> tuple[list[list[ScoredSegment]], dict]:
    """G SDE samples per prompt, scored; -> (groups of ScoredSegment, stats). In one process:
    sample_sde, then the critic, then score_groups (the distributed driver runs them on actors)."""
    samples = sample_sde(model, prompts, settings, rng)
    t0 = time.perf_counter()
    verdicts = critic.score_batch(*samples.critic_inputs())
    groups, stats = score_groups(samples, verdicts, weights, aggregation, policy_version)
    stats.update(sample_s=samples.seconds, critic_s=time.perf_counter() - t0)
    return groups, stats


def to_batch(records: Sequence[ScoredSegment], device: torch.device | str = "cpu",
             train_steps: int = 0, rng: np.random.Generator | None = None) -> GRPOBatch:
    """Stack stored records (sharing one SDE window) into the learner's batch.

    train_steps > 0 trains on that many steps of the window, drawn once for the whole batch."""
    windows = {tuple(r.sde_window) for r in records}
    if len(windows) != 1:
        raise ValueError(f"records of one batch must share one SDE window, got {sorted(windows)}")
    window = windows.pop()
    levels = {r.meta["noise_level"] for r in records}
    guidance = {r.meta["guidance"] for r in records}
    if len(levels) != 1 or len(guidance) != 1:
        raise ValueError("records of one batch must share noise_level and guidance")
    latents = torch.from_numpy(np.stack([r.latents for r in records], axis=1)).to(device)  # (S + 1, B, ...)
    log_probs = torch.from_numpy(np.stack([r.log_probs for r in records], axis=1)).to(device)  # (S, B)
    traj = Trajectory(latents, log_probs, int(np.prod(latents.shape[2:])),
                      torch.from_numpy(np.array(records[0].timesteps)).to(device), levels.pop(), window, latents[-1])
    steps = list(range(*window))
    if train_steps and train_steps < len(steps):
        steps = sorted((rng or np.random.default_rng()).choice(steps, size=train_steps, replace=False).tolist())
    context = frames_to_tensor(torch.from_numpy(np.stack([r.context for r in records]))).to(device)
    adv = torch.tensor([r.advantage for r in records], dtype=torch.float32, device=device)
    return GRPOBatch(context, [r.prompt for r in records], traj, adv, steps, guidance.pop())


class ModelGenerator:
    """loop.Generator backed by a WorldModel: deterministic ODE sampling from memory's frames."""

    def __init__(self, model, num_steps: int | None = None):
        self.model, self.num_steps = model, num_steps

    def __call__(self, memory, sub, prompt: str, seed: int, guidance: float) -> np.ndarray:
        return self.batch([GenerationRequest(memory, sub, prompt, seed, guidance)])[0]

    def batch(self, requests: Sequence[GenerationRequest]) -> list[np.ndarray]:
        """Each request's (T, H, W, 3) uint8 segment; one generate call per guidance value, each
        sample from its own seed (so a segment does not depend on its batch, up to float order)."""
        out: list[np.ndarray | None] = [None] * len(requests)
        for guidance in sorted({r.guidance for r in requests}):
            idx = [i for i, r in enumerate(requests) if r.guidance == guidance]
            frames = self.model.generate(np.stack([requests[i].memory.context() for i in idx]),
                                         [requests[i].prompt for i in idx], seed=[requests[i].seed for i in idx],
                                         num_steps=self.num_steps, guidance=guidance)  # (B, T, H, W, 3)
            for i, f in zip(idx, frames):
                out[i] = f
        return out
