"""GRPO sampling: our group SDE sampler with log-probs vs a diffusers-pipeline-style loop, same weights.

    python benchmarks/sampling.py            # GPU, bf16 -> benchmarks/results/sampling.json
    python benchmarks/sampling.py --quick    # CPU, a tiny Wan, seconds; correctness only, temp output

Model: Wan2.1-T2V-1.3B's block shape (dim 1536, 12 heads x 128, FFN 8960, 16 latent channels,
umT5 text of 512 tokens) with 20 blocks instead of 30 (0.9 B parameters; --layers; the ratio does
not depend on depth, the device time does), random weights. Video: Flow-GRPO's Wan preset, 33 frames at
240x416 under Wan2.1's 4x8x8 VAE -> latents (16, 9, 30, 52) -> 9 * 15 * 26 = 3510 tokens.
One group: G = 8 samples of one prompt, 10 steps, CFG 4.5, shift 3.

Baseline, the loop inside diffusers' WanPipeline.__call__: diffusers' WanTransformer3DModel (eager,
default attention), per step a conditional and an unconditional forward of batch G, the guidance
mix, FlowMatchEulerDiscreteScheduler.step. It records latents and computes no log-probs (strictly
less work than ours). Ours: spiral_rl.flow.sde_sample on our DiT holding the same weights, the
group and its CFG pair in ONE forward of batch 2G, blocks torch.compile'd, Flow-GRPO SDE steps
with per-step log-probs on all but the last step. Also timed: ours eager, to split the gain.

Checked: both models give the same velocity (bf16 tolerance); the recorded log-probs equal a
recomputation by step_log_prob (what the learner's first ratio sees); the final deterministic
step's recorded latent equals its recomputed mean. Timings alternate baseline / ours per repeat.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import _common as C
from spiral_rl.flow import _predict, _transition, sde_sample, step_log_prob
from spiral_rl.models.presets import preset_config


def timed_once(fn, device) -> float:
    C.sync(device)
    t0 = time.perf_counter()
    fn()
    C.sync(device)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--latent", type=int, nargs=3, default=[9, 30, 52], help="latent frames, height, width")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=20, help="blocks (Wan2.1-1.3B has 30)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        cfg = preset_config("wan2.2-5b", dim=32, num_heads=2, num_layers=2, ffn_dim=64, in_channels=4,
                            out_channels=4, text_dim=32, freq_dim=32)
        dtype, compile_opts = torch.float32, {"backend": "aot_eager"}
        args.group, args.steps, args.latent, args.text_len, args.repeats = 2, 3, [2, 8, 12], 7, 1
    else:
        cfg = preset_config("wan2.2-5b", dim=1536, num_heads=12, num_layers=args.layers, ffn_dim=8960,
                            in_channels=16, out_channels=16)
        dtype, compile_opts = torch.bfloat16, {}
    G, S, (F_, H, W) = args.group, args.steps, args.latent
    tokens = F_ * (H // cfg.patch_size[1]) * (W // cfg.patch_size[2])
    print(f"{C.device_name(device)}: dim {cfg.dim} x {cfg.num_layers} layers, {tokens} tokens, G={G}, {S} steps, "
          f"CFG {args.guidance}, {dtype}")

    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(G, cfg.in_channels, F_, H, W, generator=g, device=device)
    text_c = torch.randn(1, args.text_len, cfg.text_dim, generator=g, device=device).to(dtype).expand(G, -1, -1)
    text_u = torch.randn(1, args.text_len, cfg.text_dim, generator=g, device=device).to(dtype).expand(G, -1, -1)

    ref = C.build_diffusers_wan(cfg, device, dtype).eval().requires_grad_(False)
    ours = C.build_ours_from(ref, cfg, device, dtype).eval().requires_grad_(False)

    # ---- the baseline: WanPipeline's denoising loop
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)

    @torch.no_grad()
    def pipeline():
        scheduler.set_timesteps(S, device=device)
        latents, traj = noise.clone(), [noise]
        for t in scheduler.timesteps:
            inp, ts = latents.to(dtype), t.expand(G)
            v_c = ref(inp, ts, text_c, return_dict=False)[0]
            v_u = ref(inp, ts, text_u, return_dict=False)[0]
            v = v_u + args.guidance * (v_c - v_u)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            traj.append(latents)
        return latents, traj

    # ---- ours: group + CFG in one forward, SDE steps with log-probs
    velocity = lambda x, t, cond: ours(x, t, cond)  # noqa: E731 - flow.py's VelocityFn
    context = noise.new_zeros(G, cfg.in_channels, 0, H, W)  # text-to-video: no context frames
    window = (0, S - 1)  # every step but the last is stochastic (rollout.draw_window's rule)

    @torch.no_grad()
    def ours_sample():
        return sde_sample(velocity, context, text_c, noise, S, args.noise_level, args.shift, args.guidance,
                          text_u, torch.Generator(device).manual_seed(1), window)

    # Same weights, same function: one velocity from each model.
    with torch.no_grad():
        x = noise.to(dtype)
        v_ref = ref(x, torch.full((G,), 600.0, device=device), text_c, return_dict=False)[0]
        v_ours = ours(x, torch.full((G,), 0.6, device=device), text_c)
    velocity_err = C.rel_err(v_ours, v_ref)

    seconds = {"pipeline": [], "ours_eager": [], "ours_compiled": []}
    pipeline()  # warm-up
    ours_sample()
    for _ in range(args.repeats):
        seconds["pipeline"].append(timed_once(pipeline, device))
        seconds["ours_eager"].append(timed_once(ours_sample, device))
    t0 = time.perf_counter()
    ours.compile_blocks(**compile_opts)
    ours_sample()  # compiles
    compile_s = time.perf_counter() - t0
    for _ in range(args.repeats):
        seconds["pipeline"].append(timed_once(pipeline, device))
        seconds["ours_compiled"].append(timed_once(ours_sample, device))
    med = {k: statistics.median(v) for k, v in seconds.items()}

    # ---- checks: recorded log-probs and latents equal a recomputation by the current model
    traj = ours_sample()
    with torch.no_grad():
        lp = step_log_prob(velocity, context, text_c, traj, guidance=args.guidance, uncond=text_u)
        last = S - 1
        v = _predict(velocity, context, traj.latents[last], traj.timesteps[last].item(), text_c, args.guidance, text_u)
        mean, _ = _transition(traj.latents[last], v, traj.timesteps[last].item(), 0.0, 0.0, traj.timesteps[1].item())
    recorded = traj.log_probs[list(traj.sde_steps)]
    dlp = (lp - recorded).abs()
    checks = {"velocity_rel_err_vs_diffusers": velocity_err,
              "logprob_max_abs_diff": float(dlp.max()),
              "logprob_max_abs_diff_per_element": float(dlp.max()) / traj.numel,
              "first_ratio_max_dev_sum": float((lp - recorded).exp().sub(1).abs().max()),
              "last_latent_rel_err": C.rel_err(traj.latents[-1], mean),
              "logprobs_finite": bool(torch.isfinite(traj.log_probs).all())}
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    checks["ok"] = (velocity_err < tol and checks["logprob_max_abs_diff_per_element"] < 1e-4
                    and checks["last_latent_rel_err"] < 1e-3 and checks["logprobs_finite"])

    per_s = {k: G / s for k, s in med.items()}
    m = {"samples_per_s": per_s, "seconds_per_group": med, "all_seconds": seconds,
         "speedup_vs_pipeline": med["pipeline"] / med["ours_compiled"],
         "speedup_eager_vs_pipeline": med["pipeline"] / med["ours_eager"],
         "compile_seconds": compile_s, "tokens": tokens, "forwards_per_group": {"pipeline": 2 * S, "ours": S},
         "tflop_per_group": 2 * S * C.dit_forward_flops(cfg, tokens, args.text_len, G) / 1e12,
         "checks": checks}
    m["mfu_ours"] = m["tflop_per_group"] * 1e12 / med["ours_compiled"] / C.H100_BF16_DENSE_FLOPS
    m["mfu_pipeline"] = m["tflop_per_group"] * 1e12 / med["pipeline"] / C.H100_BF16_DENSE_FLOPS
    print(f"{'sampler':<16}{'s / group':>10}{'samples/s':>11}{'MFU':>7}")
    for k in med:
        mfu = m["tflop_per_group"] * 1e12 / med[k] / C.H100_BF16_DENSE_FLOPS
        print(f"{k:<16}{med[k]:10.3f}{per_s[k]:11.2f}{mfu:7.1%}")
    print(f"speedup vs pipeline {m['speedup_vs_pipeline']:.2f}x (eager {m['speedup_eager_vs_pipeline']:.2f}x); "
          f"compile {compile_s:.0f} s")
    print("checks:", {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in checks.items()})
    C.write_record("sampling", C.device_name(device),
                   {"model": f"Wan2.1-1.3B blocks x {cfg.num_layers}" if not args.quick else "tiny wan", "latent": [cfg.in_channels, F_, H, W],
                    "group": G, "steps": S, "guidance": args.guidance, "noise_level": args.noise_level,
                    "shift": args.shift, "text_len": args.text_len, "repeats": args.repeats, "dtype": str(dtype)},
                   m, args.quick, args.out)
    return 0 if checks["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
