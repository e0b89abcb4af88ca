"""Rectified flow: loss, ODE / SDE samplers, GRPO transition log-probs (CPU, a few seconds)."""
import copy
import math

import pytest
import torch
from torch import nn

from spiral_rl.flow import (Trajectory, flow_matching_loss, kl_to_reference, ode_sample,
                            reduce_logprob, sde_sample, sde_sigma, step_log_prob, timesteps)

B, C, K, T, H, W = 3, 2, 2, 3, 4, 4


class TinyVelocity(nn.Module):
    """Conv3d over (x, t) channels plus a per-channel conditioning bias: cond is (B, C)."""

    def __init__(self, seed=0, out_dtype=None):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(C + 1, C, 3, padding=1)
        self.cond_scale = nn.Parameter(torch.randn(C))
        self.out_dtype = out_dtype
        self.calls = []  # (x, t, cond) of every call, to inspect what the model received

    def forward(self, x, t, cond):
        self.calls.append((x, t, cond))
        tt = t[:, None, :, None, None].expand(-1, 1, -1, x.shape[3], x.shape[4])
        v = self.conv(torch.cat([x, tt], 1)) + (cond * self.cond_scale)[:, :, None, None, None]
        return v if self.out_dtype is None else v.to(self.out_dtype)


def gaussian_velocity(mu, s):
    """Exact velocity E[eps - x0 | x_t = x] for data x0 ~ N(mu, s^2 I): with a = 1 - t,
    x_t ~ N(a mu, a^2 s^2 + t^2), so v(x, t) = (t - a s^2) / var_t (x - a mu) - mu."""
    def velocity(x, t, cond):
        tt = t[:, None, :, None, None].to(x.dtype)
        a = 1 - tt
        var = a**2 * s**2 + tt**2
        return (tt - a * s**2) / var * (x - a * mu) - mu
    return velocity


def make_inputs(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, C, K, H, W, generator=g)
    noise = torch.randn(batch, C, T, H, W, generator=g)
    cond = torch.randn(batch, C, generator=g)
    return context, noise, cond


def rollout(model, noise_level=0.7, steps=8, **kw):
    context, noise, cond = make_inputs()
    traj = sde_sample(model, context, cond, noise, steps, noise_level, shift=kw.pop("shift", 3.0),
                      generator=torch.Generator().manual_seed(1), **kw)
    return traj, context, cond


# --------------------------------------------------------------------------- schedule


def test_timesteps_run_from_one_to_zero_with_shift():
    ts = timesteps(10, shift=3.0)
    assert ts.shape == (11,) and ts[0] == 1 and ts[-1] == 0 and (ts.diff() < 0).all()
    t = torch.linspace(1, 0, 11)
    torch.testing.assert_close(ts, 3 * t / (1 + 2 * t))
    assert (ts[1:-1] > t[1:-1]).all()  # shift > 1 lingers at high noise


# --------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("kw", [{}, {"guidance": 4.0, "uncond": torch.zeros(B, C)},
                                {"sde_window": (2, 6)}])
def test_recomputed_log_probs_equal_recorded_ones(kw):
    model = TinyVelocity()
    traj, context, cond = rollout(model, **kw)
    assert isinstance(traj, Trajectory) and traj.latents.shape == (9, B, C, T, H, W)
    assert traj.numel == C * T * H * W and traj.sample.equal(traj.latents[-1])
    kw.pop("sde_window", None)
    lp = step_log_prob(model, context, cond, traj, **kw)
    assert lp.shape == (len(traj.sde_steps), B)
    torch.testing.assert_close(lp, traj.log_probs[list(traj.sde_steps)], rtol=1e-5, atol=1e-5)
    lp.sum().backward()  # differentiable w.r.t. the model's parameters
    assert model.conv.weight.grad.abs().sum() > 0 and model.cond_scale.grad.abs().sum() > 0


def test_window_steps_are_deterministic_outside_and_rejected_by_step_log_prob():
    model = TinyVelocity()
    traj, context, cond = rollout(model, sde_window=(2, 6))
    assert traj.window == (2, 6) and list(traj.sde_steps) == [2, 3, 4, 5]
    assert (traj.log_probs[[0, 1, 6, 7]] == 0).all() and (traj.log_probs[2:6] != 0).all()
    # Before the window it is exactly the ODE; after it, Euler from wherever the SDE left off.
    ode = sde_sample(model, context, cond, traj.latents[0], 8, 0.0, shift=3.0)
    assert traj.latents[:3].equal(ode.latents[:3]) and not traj.latents[3].equal(ode.latents[3])
    with pytest.raises(ValueError, match="step_indices"):
        step_log_prob(model, context, cond, traj, step_indices=[1])


def test_step_log_prob_matches_float64_gaussian_density():
    model = TinyVelocity()
    traj, context, cond = rollout(model)
    steps = [0, 3, 7]  # includes the guarded t = 1 step and the last step into t = 0
    lp = step_log_prob(model, context, cond, traj, step_indices=steps)
    ref_model = copy.deepcopy(model).double()
    ts, a, ref = traj.timesteps.double().tolist(), traj.noise_level, []
    for i in steps:
        x, x_next = traj.latents[i].double(), traj.latents[i + 1].double()
        t, dt = ts[i], ts[i + 1] - ts[i]
        frame_t = torch.cat([torch.zeros(B, K), torch.full((B, T), t)], 1).double()
        v = ref_model(torch.cat([context.double(), x], 2), frame_t, cond.double())[:, :, K:]
        t_den = ts[1] if t == 1 else t  # Flow-GRPO: 1 - t at the first step uses t_1
        sigma = a * math.sqrt(t / (1 - t_den))
        mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
        var = sigma**2 * -dt
        logpdf = -(x_next - mean) ** 2 / (2 * var) - 0.5 * math.log(2 * math.pi * var)
        ref.append(logpdf.flatten(1).sum(1))
    torch.testing.assert_close(lp.double(), torch.stack(ref), rtol=1e-5, atol=1e-4)


def test_reduce_logprob_and_kl():
    lp = torch.tensor([[-96.0, 48.0]])
    assert reduce_logprob(lp, 96, "sum").equal(lp)
    assert reduce_logprob(lp, 96, "mean").equal(torch.tensor([[-1.0, 0.5]]))
    with pytest.raises(ValueError, match="mode"):
        reduce_logprob(lp, 96, "max")

    policy, ref = TinyVelocity(seed=0), TinyVelocity(seed=1)
    traj, context, cond = rollout(policy)
    _, mean, std = step_log_prob(policy, context, cond, traj, [1, 4], return_mean=True)
    _, mean_ref, std_ref = step_log_prob(ref, context, cond, traj, [1, 4], return_mean=True)
    assert mean.shape == (2, B, C, T, H, W) and std.equal(std_ref)
    kl = kl_to_reference(mean, mean_ref, std)
    p = torch.distributions.Normal(mean.double(), std.double().view(2, 1, 1, 1, 1, 1))
    q = torch.distributions.Normal(mean_ref.double(), std.double().view(2, 1, 1, 1, 1, 1))
    expected = torch.distributions.kl_divergence(p, q).flatten(2).sum(2)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    assert (kl_to_reference(mean, mean, std) == 0).all()


# --------------------------------------------------------------------------- samplers


def test_sde_with_zero_noise_is_the_ode():
    model = TinyVelocity()
    context, noise, cond = make_inputs()
    uncond = torch.zeros(B, C)
    x0 = ode_sample(model, context, cond, noise, 6, shift=2.0, guidance=3.0, uncond=uncond)
    traj = sde_sample(model, context, cond, noise, 6, 0.0, 2.0, 3.0, uncond)
    torch.testing.assert_close(traj.sample, x0, atol=1e-6, rtol=0)
    assert len(traj.sde_steps) == 0 and (traj.log_probs == 0).all()


def test_sde_and_ode_marginals_match_gaussian_data():
    mu, s, n = 0.5, 0.5, 4000
    velocity = gaussian_velocity(mu, s)
    g = torch.Generator().manual_seed(0)
    context, noise = torch.zeros(n, 1, 1, 2, 2), torch.randn(n, 1, 2, 2, 2, generator=g)
    x_ode = ode_sample(velocity, context, None, noise, 40)
    x_sde = sde_sample(velocity, context, None, noise, 40, 0.7, generator=g).sample
    # 32000 values: Monte-Carlo error ~0.003 on the mean and std; the rest is O(1/steps) Euler bias
    # (the SDE's guarded first step included).
    for x in (x_ode, x_sde):
        assert abs(x.mean().item() - mu) < 0.02 and abs(x.std().item() - s) < 0.03
    # The SDE really is stochastic: same start noise, different endpoints.
    assert (x_sde - x_ode).abs().mean() > 0.05


def test_cfg_uses_one_batched_call_and_guidance_one_is_conditional():
    model = TinyVelocity()
    context, noise, cond = make_inputs()
    uncond = torch.zeros(B, C)
    x_cond = ode_sample(model, context, cond, noise, 4)
    model.calls.clear()
    x_g1 = ode_sample(model, context, cond, noise, 4, guidance=1.0, uncond=uncond)
    assert x_g1.equal(x_cond) and [c[0].shape[0] for c in model.calls] == [B] * 4

    model.calls.clear()
    x_g = ode_sample(model, context, cond, noise, 1, guidance=3.0, uncond=uncond)
    assert [c[0].shape[0] for c in model.calls] == [2 * B]  # one call per step, batch 2B
    t = torch.cat([torch.zeros(B, K), torch.ones(B, T)], 1)
    xin = torch.cat([context, noise], 2)
    v_c, v_u = model(xin, t, cond)[:, :, K:], model(xin, t, uncond)[:, :, K:]
    torch.testing.assert_close(x_g, noise - (v_u + 3.0 * (v_c - v_u)))  # one Euler step, dt = -1


def test_fp32_latents_and_log_probs_with_bf16_model():
    model = TinyVelocity(out_dtype=torch.bfloat16)
    traj, context, cond = rollout(model)
    assert traj.latents.dtype == traj.log_probs.dtype == traj.sample.dtype == torch.float32
    lp = step_log_prob(model, context, cond, traj)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, traj.log_probs, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- training loss


def test_flow_matching_loss_trains_a_tiny_model():
    torch.manual_seed(0)
    model = TinyVelocity()
    data = torch.randn(1, C, T, H, W).expand(8, -1, -1, -1, -1) + 0.1 * torch.randn(8, C, T, H, W)
    context, cond = torch.randn(8, C, K, H, W), torch.zeros(8, C)

    def held_out_loss():  # fixed t and eps (same seed every time), 32 draws per example
        with torch.no_grad():
            return flow_matching_loss(model, data.repeat(32, 1, 1, 1, 1),
                                      context.repeat(32, 1, 1, 1, 1), cond.repeat(32, 1),
                                      generator=torch.Generator().manual_seed(123))[0].item()

    before = held_out_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        loss, stats = flow_matching_loss(model, data, context, cond, generator=g,
                                         t_sampling="uniform" if step % 2 else "logit_normal",
                                         shift=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # A linear-in-t conv cannot reach zero (near t = 0, eps - x0 is mostly unpredictable noise
    # to it); it went 2.21 -> 1.62 when written.
    assert held_out_loss() < 0.85 * before


def test_flow_matching_loss_never_noises_context():
    model = TinyVelocity()
    context, x0, cond = make_inputs()
    loss, stats = flow_matching_loss(model, x0, context, cond, generator=torch.Generator())
    (x, t, _), = model.calls
    assert x[:, :, :K].equal(context) and (t[:, :K] == 0).all()
    assert (t[:, K:] == t[:, K:K + 1]).all() and 0 < stats["t_mean"] < 1
    # Only target frames enter the loss: the context frames' output gets zero gradient.
    out = {}

    def velocity(x, t, c):
        out["v"] = model(x, t, c)
        out["v"].retain_grad()
        return out["v"]

    flow_matching_loss(velocity, x0, context, cond)[0].backward()
    assert (out["v"].grad[:, :, :K] == 0).all() and out["v"].grad[:, :, K:].abs().sum() > 0


# --------------------------------------------------------------------------- errors


def test_bad_arguments_name_themselves():
    model = TinyVelocity()
    context, noise, cond = make_inputs()
    with pytest.raises(ValueError, match="noise_level"):
        sde_sample(model, context, cond, noise, 4, -0.1)
    for steps in (0, -2):
        with pytest.raises(ValueError, match="num_steps"):
            sde_sample(model, context, cond, noise, steps, 0.5)
        with pytest.raises(ValueError, match="num_steps"):
            ode_sample(model, context, cond, noise, steps)
    for window in [(3, 2), (0, 5), (-1, 2), (2, 2), (1,)]:
        with pytest.raises(ValueError, match="sde_window"):
            sde_sample(model, context, cond, noise, 4, 0.5, sde_window=window)
    with pytest.raises(ValueError, match="shift"):
        timesteps(4, shift=0.0)
    with pytest.raises(ValueError, match="uncond"):
        ode_sample(model, context, cond, noise, 2, guidance=2.0)
    with pytest.raises(ValueError, match="t_sampling"):
        flow_matching_loss(model, noise, context, cond, t_sampling="beta")
    assert sde_sigma(1.0, 0.7, 0.9) == pytest.approx(0.7 * math.sqrt(1 / 0.1))
