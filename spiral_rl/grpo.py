"""GRPO for a flow-matching world model (Flow-GRPO, arXiv 2505.05470), the math in one place.

For every prompt p (context frames + sub-action text) a group of G segments is sampled with the
SDE sampler (flow.sde_sample), all members sharing one window of noisy denoising steps. The
critic scores each segment on D dimensions; the reward and the group-relative advantage are

    weighted_sum:       r_pg = sum_k w_k s_pgk,   A_pg = (r_pg - mean_g r_pg) / (std_g r_pg + eps)
    per_dim_normalise:  A_pg = sum_k w_k (s_pgk - mean_g s_pgk) / (std_g s_pgk + eps)
    gated:              r_pg = s_pg0 * sum_k w_k s_pgk (s_0: action completeness), A_pg as weighted_sum

(the first asks "which samples score best overall", the second "which are best on each axis",
so a dimension with a tiny spread is not drowned by one with a large spread; the third pays for
looking right only as far as the action was done: with fidelity alone in a sum, not moving the
object is the cheapest way to score, since a still object is copied exactly). A group whose
rewards are all equal carries no signal: its advantages are 0 and it is counted, not trained on.

The loss over the recorded steps s of the window, with log-probs reduced over latent elements
by `reduction` ("mean": per-element ratios, Flow-GRPO's clip range ~1e-4..1e-3; "sum": the
log-ratio is numel times larger and needs a far smaller clip range):

    rho_s = exp(log pi_theta(x_{s+1} | x_s) - log pi_old(x_{s+1} | x_s))
    L = mean_{p,g,s} max(-A rho_s, -A clip(rho_s, 1 - eps_clip, 1 + eps_clip)) + beta KL_s(pi_theta || pi_ref)

where the KL of two Gaussians with the same std is ||mu_theta - mu_ref||^2 / (2 std^2).

`step_loss` is the one copy of this loss for one step s: GRPOLearner (one process) and the
DeepSpeed learner group (actors/learner.py) both call it and only differ in how they accumulate
gradients over steps, micro-batches and ranks.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from spiral_rl.config import AGGREGATIONS
from spiral_rl.flow import Trajectory, kl_to_reference, reduce_logprob, step_log_prob


class RatioDriftError(RuntimeError):
    """The first importance ratio of an iteration is not 1: the stored rollout does not match the
    policy that produced it (bf16 storage, a different batch layout, stale weights)."""


@dataclass(frozen=True)
class GRPOSettings:
    clip_range: float = 1e-3
    kl_coef: float = 0.004
    reduction: str = "mean"  # how log-probs are reduced over latent elements: "mean" | "sum"
    adv_eps: float = 1e-4  # a group whose reward spread is below this is degenerate
    adv_clip: float = 5.0
    max_grad_norm: float = 1.0
    ratio_tol: float = 1e-3  # |rho - 1| allowed at the first update of an iteration
    aggregation: str = "weighted_sum"  # one of AGGREGATIONS

    @classmethod
    def from_config(cls, cfg) -> "GRPOSettings":
        g = cfg.grpo
        return cls(g.clip_range, g.kl_coef, g.reduction, adv_clip=g.adv_clip, max_grad_norm=g.max_grad_norm,
                   aggregation=cfg.reward.aggregation)

    def __post_init__(self):
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={self.reduction!r} must be 'mean' or 'sum'")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} must be one of {AGGREGATIONS}")


def reward(scores: np.ndarray, weights: np.ndarray, aggregation: str = "weighted_sum") -> np.ndarray:
    """scores: (..., D) in SCORE_DIMS order (action completeness first); weights: (D,) -> (...) rewards."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} must be one of {AGGREGATIONS}")
    scores = np.asarray(scores, dtype=np.float64)
    r = scores @ np.asarray(weights, dtype=np.float64)
    return scores[..., 0] * r if aggregation == "gated" else r


def group_advantages(scores: np.ndarray, weights: np.ndarray, aggregation: str = "weighted_sum",
                     eps: float = 1e-4, clip: float = 5.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scores: (P, G, D) critic scores (SCORE_DIMS order: action completeness first); weights: (D,)
    -> rewards (P, G), advantages (P, G), degenerate (P,) bool (groups whose reward spread is below
    eps: advantage 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[-1] != weights.shape[0]:
        raise ValueError(f"scores must be (P, G, D={weights.shape[0]}), got {scores.shape}")
    if scores.shape[1] < 2:
        raise ValueError(f"a group needs at least 2 members to compare, got G={scores.shape[1]}")
    rewards = reward(scores, weights, aggregation)  # (P, G)
    degenerate = rewards.std(axis=1) < eps  # (P,)
    if aggregation == "per_dim_normalise":
        z = (scores - scores.mean(1, keepdims=True)) / (scores.std(1, keepdims=True) + eps)  # (P, G, D)
        adv = z @ weights
    else:  # weighted_sum, gated (reward() refused anything else)
        adv = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + eps)
    adv[degenerate] = 0.0
    return rewards, np.clip(adv, -clip, clip), degenerate


def clipped_surrogate(logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip_range: float) -> tuple[Tensor, dict]:
    """PPO's clipped objective. logp_new, logp_old, adv: (B,) (already reduced) -> (loss, stats)."""
    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"ratio_mean": ratio.mean().item(),
                 "ratio_max_dev": (ratio - 1).abs().max().item(),
                 "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean().item()}  # k3 estimator, >= 0
    return loss, stats


@dataclass
class GRPOBatch:
    """One learner batch of B segments (whole groups) with their rollout record.

    context: (B, 3, K, H, W) in [-1, 1]; texts: B prompts; trajectory: the rollouts' SDE record
    (latents (S + 1, B, ...) and log_probs (S, B), fp32); advantages: (B,); steps: the recorded
    step indices to train on (a subset of trajectory.sde_steps, shared by the whole batch).
    """

    context: Tensor
    texts: Sequence[str]
    trajectory: Trajectory
    advantages: Tensor
    steps: Sequence[int]
    guidance: float = 1.0

    def __len__(self) -> int:
        return len(self.texts)

    def micro_batches(self, size: int) -> list["GRPOBatch"]:
        """Consecutive slices of `size` segments (size must divide the batch): gradient accumulation
        over equal slices averages to the whole batch's gradient, because the loss is a mean."""
        if size <= 0 or len(self) % size:
            raise ValueError(f"micro-batch size {size} must divide the batch of {len(self)} segments")
        t, out = self.trajectory, []
        for a in range(0, len(self), size):
            b = slice(a, a + size)
            traj = Trajectory(t.latents[:, b], t.log_probs[:, b], t.numel, t.timesteps, t.noise_level,
                              t.window, t.sample[b])
            out.append(GRPOBatch(self.context[b], list(self.texts)[b], traj, self.advantages[b],
                                 self.steps, self.guidance))
        return out


def check_batch(batch: GRPOBatch) -> None:
    """Refuse a batch whose steps are not in its SDE window, or whose rollout is not stored fp32."""
    traj, steps = batch.trajectory, list(batch.steps)
    if not steps or any(i not in traj.sde_steps for i in steps):
        raise ValueError(f"steps {steps} must be a non-empty subset of the SDE window {traj.sde_steps}")
    if traj.latents.dtype != torch.float32 or traj.log_probs.dtype != torch.float32:
        raise RatioDriftError(f"rollout stored as {traj.latents.dtype}/{traj.log_probs.dtype}: "
                              "latents and log-probs must be float32")


def check_first_ratio(ratio_max_dev: float, settings: GRPOSettings) -> None:
    """Raise if the importance ratio before any update is not 1 (see RatioDriftError)."""
    if ratio_max_dev > settings.ratio_tol:
        raise RatioDriftError(f"first importance ratio deviates from 1 by {ratio_max_dev:.2e} "
                              f"(> {settings.ratio_tol:g}) before any update: the rollout's latents / "
                              "log-probs do not match the policy (check fp32 storage and batch layout)")


def step_loss(policy, reference, batch: GRPOBatch, i: int, settings: GRPOSettings) -> tuple[Tensor, dict]:
    """The GRPO objective of recorded step i, a mean over the batch's segments:
    clipped surrogate + beta * KL to the reference. policy / reference: WorldModel-like (encode_text,
    velocity); the reference runs without gradient, and is None when kl_coef is 0. The one copy of
    the loss: GRPOLearner and the DeepSpeed learner (actors/learner.py) both call it. -> (loss, stats)."""
    s, traj = settings, batch.trajectory
    texts, guided = list(batch.texts), batch.guidance != 1.0
    # The text is encoded per step: each step's graph is freed by its own backward.
    cond = policy.encode_text(texts)
    uncond = policy.encode_text([""] * len(texts)) if guided else None
    logp, mean, std = step_log_prob(policy.velocity, batch.context, cond, traj, [i], batch.guidance, uncond,
                                    return_mean=True)
    adv = batch.advantages.to(traj.latents.device, torch.float32)
    logp_new = reduce_logprob(logp[0], traj.numel, s.reduction)  # (B,)
    logp_old = reduce_logprob(traj.log_probs[i], traj.numel, s.reduction)
    if reference is None:  # kl_coef == 0: no reference is kept, and none runs
        kl = torch.zeros_like(logp_new)
    else:
        with torch.no_grad():
            ref_cond = reference.encode_text(texts)
            ref_uncond = reference.encode_text([""] * len(texts)) if guided else None
            _, mean_ref, _ = step_log_prob(reference.velocity, batch.context, ref_cond, traj, [i], batch.guidance,
                                           ref_uncond, return_mean=True)
        kl = reduce_logprob(kl_to_reference(mean, mean_ref, std)[0], traj.numel, s.reduction)  # (B,)
    policy_loss, stats = clipped_surrogate(logp_new, logp_old, adv, s.clip_range)
    loss = policy_loss + s.kl_coef * kl.mean()
    stats.update(policy_loss=policy_loss.item(), kl=kl.mean().item(), loss=loss.item())
    return loss, stats


def make_reference(model: nn.Module, settings: GRPOSettings) -> nn.Module | None:
    """The frozen reference: a copy of the policy, or None when kl_coef is 0 (a model's worth of
    memory and one forward per trained step saved; DanceGRPO trains without one)."""
    if settings.kl_coef == 0:
        return None
    return copy.deepcopy(model).requires_grad_(False).eval()


def freeze_except(model: nn.Module, trainable: str) -> int:
    """Train only the parameters whose name contains one of the comma-separated substrings in
    `trainable` ('' = all); returns how many elements stay trainable. A substring that names no
    parameter is an error (a typo would otherwise freeze the whole model silently)."""
    patterns = [t.strip() for t in trainable.split(",") if t.strip()]
    if not patterns:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    names = [n for n, _ in model.named_parameters()]
    unknown = [t for t in patterns if not any(t in n for n in names)]
    if unknown:
        raise ValueError(f"grpo.trainable: {unknown} match no parameter name (e.g. {names[0]!r}, {names[-1]!r})")
    for n, p in model.named_parameters():
        p.requires_grad_(any(t in n for t in patterns))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class GRPOLearner:
    """Owns the policy's optimiser and a frozen reference copy; `update` is one GRPO step.

    micro_batch: segments per forward (0 = the whole batch; it must divide the batch). On a CPU
    slices with smaller activations run the same FLOPs faster than one pass over the whole batch
    (benchmarks/RESULTS.md, section 8); the gradient is the same mean either way."""

    def __init__(self, model: nn.Module, settings: GRPOSettings, lr: float = 1e-4,
                 weight_decay: float = 0.0, reference: nn.Module | None = None, micro_batch: int = 0):
        self.model, self.settings, self.micro_batch = model, settings, micro_batch
        self.reference = reference if reference is not None else make_reference(model, settings)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=lr, weight_decay=weight_decay)

    def update(self, batch: GRPOBatch, check_ratio: bool = True) -> dict:
        """Accumulates the loss of every (micro-batch, step) in batch.steps (one backward each, so
        only one pass's activations are alive), clips the gradient and steps the optimiser.

        check_ratio: assert rho == 1 on the first step of every micro-batch; pass True for the first
        update of an iteration (weights unchanged since the rollout), False for later ones."""
        check_batch(batch)
        steps = list(batch.steps)
        parts = batch.micro_batches(self.micro_batch) if self.micro_batch else [batch]
        n_pass = len(parts) * len(steps)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {"first_ratio_max_dev": 0.0}
        for part in parts:
            for n, i in enumerate(steps):
                loss, stats = step_loss(self.model, self.reference, part, i, self.settings)
                if n == 0:
                    if check_ratio:
                        check_first_ratio(stats["ratio_max_dev"], self.settings)
                    totals["first_ratio_max_dev"] = max(totals["first_ratio_max_dev"], stats["ratio_max_dev"])
                (loss / n_pass).backward()  # equal slices: the mean of the passes is the batch's mean
                for k, v in stats.items():  # means over passes; the ratio's deviation is the worst
                    totals[k] = max(totals.get(k, 0.0), v) if k == "ratio_max_dev" else totals.get(k, 0.0) + v / n_pass
        totals["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm))
        self.optimizer.step()
        return totals
