"""Rectified-flow math for the video world model: training loss, ODE / SDE samplers, GRPO log-probs.

Convention (rectified flow, as SD3 / Wan): flow time t in [0, 1], t = 1 is pure noise, t = 0 data,

    x_t = (1 - t) x0 + t eps,        target velocity  v = eps - x0,

and sampling integrates dx = v dt from t = 1 down to t = 0 (dt < 0).

Shapes: B batch, C latent channels, K context frames, T generated (target) frames, H x W latent
grid, S sampler steps. The model is any callable `velocity(x, t, cond) -> v` with x, v of shape
(B, C, K + T, H, W) and a per-frame time t of shape (B, K + T). The first K frames are clean
context: they are never noised, always get t = 0, and are re-inserted unchanged before every call,
so every function here works on the target frames (B, C, T, H, W) plus a `context` (B, C, K, H, W).

GRPO needs a policy with a density. The SDE sampler of Flow-GRPO (arXiv 2505.05470, ODE-to-SDE)
turns the deterministic ODE into a Gaussian Markov chain with the same marginals; each step's
transition log N(x_{i+1}; mean_i, std_i^2) is recorded at rollout and recomputed under the current
model by `step_log_prob` for the importance ratio. Both go through `_transition` (the only copy of
the mean / std formulas) and `_gaussian_logprob_sum`, so an unchanged model gives ratio exactly 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]  # (x, t, cond) -> v

# sigma_t ~ sqrt(t / (1 - t)) blows up at t = 1; even the Flow-GRPO guard (below) needs 1 - t > 0.
_MIN_ONE_MINUS_T = 1e-3
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 / Wan timestep shift t' = shift t / (1 + (shift - 1) t): shift > 1 spends more of the
    schedule (and of the training signal) at high noise, which large / high-res latents need."""
    if not shift > 0:
        raise ValueError(f"shift={shift} must be > 0")
    return shift * t / (1 + (shift - 1) * t)


def timesteps(num_steps: int, shift: float = 1.0) -> Tensor:
    """(num_steps + 1,) float32 schedule, strictly decreasing from exactly 1 to exactly 0."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an int >= 1")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


# --------------------------------------------------------------------------- model calls


def _cat_cond(a: Any, b: Any) -> Any:
    """Stack two conditionings along the batch: tensors are concatenated on dim 0, dicts and
    tuples field by field, lists (per-sample items such as prompts) joined, None stays None."""
    if a is None and b is None:
        return None
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(_cat_cond(x, y) for x, y in zip(a, b))
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    raise TypeError(f"cannot batch cond {type(a).__name__} with uncond {type(b).__name__}: use "
                    "batch-first tensors, or dicts / tuples of them, or per-sample lists")


def _predict(velocity: VelocityFn, context: Tensor, x: Tensor, t: float | Tensor, cond: Any,
             guidance: float = 1.0, uncond: Any = None) -> Tensor:
    """Velocity on the target frames. x: (B, C, T, H, W); t: scalar or (B,) time of the target
    frames; context: (B, C, K, H, W). Returns (B, C, T, H, W) float32, with CFG when asked.

    Classifier-free guidance v = v_u + g (v_c - v_u) evaluates conditional and unconditional in
    ONE call on a 2B batch rather than two passes: the weights are read (and, under ZeRO-3 / FSDP,
    gathered) once, and the rollout and the GRPO recomputation see the identical batch, so kernels
    whose numerics depend on batch layout cannot make the first importance ratio drift from 1."""
    B, K, T = x.shape[0], context.shape[2], x.shape[2]
    if context.shape[:2] != x.shape[:2] or context.shape[3:] != x.shape[3:]:
        raise ValueError(f"context {tuple(context.shape)} does not match target {tuple(x.shape)} "
                         "in (B, C, _, H, W)")
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(B)
    frame_t = torch.cat([t.new_zeros(B, K), t[:, None].expand(B, T)], dim=1)  # context at t = 0
    xin = torch.cat([context.to(x.dtype), x], dim=2)
    cfg = guidance != 1.0
    if cfg and uncond is None:
        raise ValueError(f"guidance={guidance} needs an `uncond` conditioning (or guidance=1)")
    if cfg:
        xin, frame_t = xin.repeat(2, 1, 1, 1, 1), frame_t.repeat(2, 1)
        cond = _cat_cond(cond, uncond)
    v = velocity(xin, frame_t, cond)
    if v.shape != xin.shape:
        raise ValueError(f"velocity returned {tuple(v.shape)}, expected {tuple(xin.shape)}")
    v = v[:, :, K:].float()  # fp32 from here on, whatever precision the model ran in
    if cfg:
        v_c, v_u = v.chunk(2)
        v = v_u + guidance * (v_c - v_u)
    return v


# --------------------------------------------------------------------------- training


def flow_matching_loss(velocity: VelocityFn, x0_target: Tensor, context: Tensor, cond: Any,
                       generator: torch.Generator | None = None, t_sampling: str = "logit_normal",
                       shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                       ) -> tuple[Tensor, dict]:
    """Rectified-flow loss E ||v_theta(x_t, t) - (eps - x0)||^2 on the target frames only.

    x0_target: (B, C, T, H, W) clean latents; context: (B, C, K, H, W), never noised. One t per
    sample, shared by its target frames (the samplers denoise all target frames together).
    t_sampling: 'uniform' or 'logit_normal' (SD3: t = sigmoid(N(logit_mean, logit_std^2)), which
    concentrates training on mid noise levels); then the shift, as used at sampling time.
    Returns (scalar loss, {'loss', 't_mean'} floats for logging)."""
    if t_sampling not in ("uniform", "logit_normal"):
        raise ValueError(f"t_sampling={t_sampling!r} must be 'uniform' or 'logit_normal'")
    x0 = x0_target.float()
    B, dev = x0.shape[0], x0.device
    if t_sampling == "uniform":
        t = torch.rand(B, generator=generator, device=dev)
    else:
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(B, generator=generator, device=dev))
    t = shift_time(t, shift)
    eps = torch.randn(x0.shape, generator=generator, device=dev)
    tb = t.view(B, 1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    loss = (_predict(velocity, context, x_t, t, cond) - (eps - x0)).pow(2).mean()
    return loss, {"loss": loss.item(), "t_mean": t.mean().item()}


# --------------------------------------------------------------------------- sampling


def sde_sigma(t: float, noise_level: float, t_cap: float) -> float:
    """Flow-GRPO diffusion coefficient sigma_t = a sqrt(t / (1 - t)), a = noise_level. At t = 1 it
    is infinite, so (as Flow-GRPO's sampler does) 1 - t is evaluated at t_cap = the schedule's
    second time t_1 when t = 1, and never below _MIN_ONE_MINUS_T."""
    t_den = min(t_cap, 1.0 - _MIN_ONE_MINUS_T) if t >= 1.0 else t
    return noise_level * math.sqrt(t / max(1.0 - t_den, _MIN_ONE_MINUS_T))


def _transition(x: Tensor, v: Tensor, t: float, t_next: float, noise_level: float,
                t_cap: float) -> tuple[Tensor, float]:
    """THE step formula (rollout, recomputation and the ODE all use it): x_{t+dt} ~ N(mean, std^2),

        mean = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt,     std = sigma_t sqrt(|dt|),

    the Euler-Maruyama step of the reverse SDE dx = [v - sigma_t^2 / 2 * score] dt + sigma_t dw
    with the rectified-flow score s = -E[eps | x_t] / t = -(x + (1 - t) v) / t (from x = (1 - t) x0
    + t eps and v = eps - x0; Flow-GRPO's ODE-to-SDE conversion). Adding the score term and the
    noise leaves every marginal p_t unchanged, so the SDE samples what the ODE samples.
    noise_level = 0 gives sigma = 0: mean = x + v dt (Euler), std = 0."""
    dt = t_next - t
    sigma = sde_sigma(t, noise_level, t_cap)
    mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, sigma * math.sqrt(-dt)


def _gaussian_logprob_sum(x_next: Tensor, mean: Tensor, std: float) -> Tensor:
    """(B,) sum over elements of log N(x_next; mean, std^2 I)."""
    sq = (x_next - mean).pow(2).flatten(1).sum(1)
    return -sq / (2 * std**2) - x_next[0].numel() * (math.log(std) + _LOG_SQRT_2PI)


def reduce_logprob(logp_sum: Tensor, numel: int, mode: str = "sum") -> Tensor:
    """Reduce per-step log-probs (summed over the `numel` latent elements) for the GRPO ratio.

    The PPO clip range must match the reduction. 'mean' (Flow-GRPO) makes exp(mean diff) a
    per-element geometric-mean ratio that moves very little per update, so the clip range is tiny
    (Flow-GRPO's configs use 1e-4 to 1e-3). 'sum' is the true ratio of the Gaussian transitions:
    its log is ~numel times larger, so a clip range tuned for 'mean' clips nearly every sample under
    'sum' (scale it: log(1 + eps_sum) ~ numel * log(1 + eps_mean)). Use the same mode for the KL."""
    if mode == "sum":
        return logp_sum
    if mode == "mean":
        return logp_sum / numel
    raise ValueError(f"mode={mode!r} must be 'sum' or 'mean'")


@dataclass
class Trajectory:
    """One SDE rollout, everything the GRPO update needs to recompute its transition densities."""
    latents: Tensor  # (S + 1, B, C, T, H, W) fp32; [0] = noise at t = 1, [-1] = sample
    log_probs: Tensor  # (S, B) fp32, sum over numel elements; 0 on deterministic (ODE) steps
    numel: int  # C * T * H * W, the element count behind each log-prob sum
    timesteps: Tensor  # (S + 1,) fp32, 1 -> 0
    noise_level: float
    window: tuple[int, int]  # [start, end) step indices that injected noise
    sample: Tensor  # (B, C, T, H, W) fp32, == latents[-1]

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel() - 1

    @property
    def sde_steps(self) -> range:
        """Steps with a Gaussian transition (a density for the ratio); none if noise_level=0."""
        return range(*self.window) if self.noise_level > 0 else range(0)


def _check_window(window: Sequence[int] | None, num_steps: int) -> tuple[int, int]:
    if window is None:
        return 0, num_steps
    ok = (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(i, int) and not isinstance(i, bool) for i in window)
          and 0 <= window[0] < window[1] <= num_steps)
    if not ok:
        raise ValueError(f"sde_window={window!r} must be (start, end) ints with "
                         f"0 <= start < end <= num_steps={num_steps}")
    return int(window[0]), int(window[1])


@torch.no_grad()
def ode_sample(velocity: VelocityFn, context: Tensor, cond: Any, noise: Tensor, num_steps: int,
               shift: float = 1.0, guidance: float = 1.0, uncond: Any = None) -> Tensor:
    """Deterministic Euler from t = 1 to 0: x <- x + v dt. noise: (B, C, T, H, W) at t = 1.
    Returns the sample x0 (B, C, T, H, W) float32."""
    ts = timesteps(num_steps, shift).tolist()
    x = noise.float()
    for i in range(num_steps):
        v = _predict(velocity, context, x, ts[i], cond, guidance, uncond)
        x, _ = _transition(x, v, ts[i], ts[i + 1], 0.0, ts[1])
    return x


@torch.no_grad()
def sde_sample(velocity: VelocityFn, context: Tensor, cond: Any, noise: Tensor, num_steps: int,
               noise_level: float, shift: float = 1.0, guidance: float = 1.0, uncond: Any = None,
               generator: torch.Generator | None = None,
               sde_window: Sequence[int] | None = None, step_noise: Tensor | None = None) -> Trajectory:
    """Flow-GRPO SDE rollout (see `_transition`), recording latents and transition log-probs.

    noise: (B, C, T, H, W) at t = 1; step_noise: (end - start, B, C, T, H, W), the window's
    injected noise drawn by the caller (so a batch sampled in slices gets the noise it would get
    whole), or None to draw it from `generator` step by step. Steps i in sde_window = [start, end)
    inject noise and record log N(x_{i+1}; mean_i, std_i^2); the others are deterministic ODE steps (MixGRPO /
    Flow-GRPO-Fast: fewer steps to train on, the rest cheap). The window is an argument, never
    drawn here, because all members of a GRPO group must share it for their advantages to compare.
    Latents are kept fp32 even if the model runs bf16: bf16 rounding moves a stored x_{i+1} by up
    to 2^-8 relative, a sizable fraction of std at small t, and summed over every latent element
    that shifts the recomputed log-prob far beyond the clip range: the first ratio is not 1."""
    if not noise_level >= 0:
        raise ValueError(f"noise_level={noise_level} must be >= 0")
    ts_tensor = timesteps(num_steps, shift)
    ts = ts_tensor.tolist()
    start, end = _check_window(sde_window, num_steps)
    x = noise.float()
    latents, log_probs = [x], torch.zeros(num_steps, x.shape[0], device=x.device)
    for i in range(num_steps):
        v = _predict(velocity, context, x, ts[i], cond, guidance, uncond)
        stochastic = start <= i < end and noise_level > 0
        mean, std = _transition(x, v, ts[i], ts[i + 1], noise_level if stochastic else 0.0, ts[1])
        if stochastic:
            eps = (torch.randn(x.shape, generator=generator, device=x.device) if step_noise is None
                   else step_noise[i - start].to(x.device, torch.float32))
            x = mean + std * eps
            log_probs[i] = _gaussian_logprob_sum(x, mean, std)
        else:
            x = mean
        latents.append(x)
    return Trajectory(torch.stack(latents), log_probs, x[0].numel(), ts_tensor, float(noise_level),
                      (start, end), x)


def step_log_prob(velocity: VelocityFn, context: Tensor, cond: Any, trajectory: Trajectory,
                  step_indices: Sequence[int] | None = None, guidance: float = 1.0,
                  uncond: Any = None, return_mean: bool = False):
    """(S', B) log-probs (sums over trajectory.numel elements) of the recorded transitions
    latents[i] -> latents[i + 1], i in step_indices (default: all of trajectory.sde_steps), under
    the CURRENT model: differentiable w.r.t. its parameters (log pi_theta for the GRPO ratio).
    context / cond / guidance / uncond must be those of the rollout.

    One model call per step, on the same batch layout as the rollout, so unchanged weights give
    the recorded values (bit-for-bit with deterministic kernels); for memory on a real model, call
    it with one step index at a time and backward before the next.
    return_mean=True also returns means (S', B, C, T, H, W) and stds (S',) for `kl_to_reference`."""
    steps = list(trajectory.sde_steps if step_indices is None else step_indices)
    if not steps:
        raise ValueError(f"step_indices={step_indices!r} is empty")
    ts, lp, means, stds = trajectory.timesteps.tolist(), [], [], []
    for i in steps:
        if i not in trajectory.sde_steps:
            raise ValueError(f"step_indices contains {i}, not a stochastic step of this trajectory "
                             f"(sde_steps={trajectory.sde_steps}): deterministic steps have no "
                             "density")
        x, x_next = trajectory.latents[i], trajectory.latents[i + 1]
        v = _predict(velocity, context, x, ts[i], cond, guidance, uncond)
        mean, std = _transition(x, v, ts[i], ts[i + 1], trajectory.noise_level, ts[1])
        lp.append(_gaussian_logprob_sum(x_next, mean, std))
        means.append(mean)
        stds.append(std)
    if return_mean:
        return torch.stack(lp), torch.stack(means), torch.tensor(stds, device=lp[0].device)
    return torch.stack(lp)


def kl_to_reference(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """(S', B) KL(N(mean, std^2) || N(mean_ref, std^2)) per step, summed over elements:
    ||mean - mean_ref||^2 / (2 std^2), exact for equal-variance Gaussians (both policies share the
    SDE's std). mean, mean_ref: (S', B, ...) from step_log_prob(return_mean=True); std: (S',).
    Reduce with `reduce_logprob(kl, numel, mode)` using the same mode as the log-probs."""
    sq = (mean - mean_ref).pow(2).flatten(2).sum(2)
    return sq / (2 * std.to(sq)[:, None] ** 2)
