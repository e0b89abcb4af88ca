"""Multi-GPU scaling of the distributed GRPO driver (launch/grpo.py) on a 5B-shaped world model.

    python benchmarks/scaling.py --gpus 2,4            # results/scaling.json (merged with what it holds)
    python benchmarks/scaling.py --gpus 1 --iterations 4
    python benchmarks/scaling.py --gpus 4 --no-offload --micro-batch 16 --out benchmarks/results/scaling_no_offload.json
    python benchmarks/scaling.py --quick               # the same logic on CPU, tiny model, seconds

Model: preset wan2.2-5b-pixel, Wan2.2-TI2V-5B's transformer blocks (dim 3072, 30 layers, 24 heads
of 128, ffn 14336; 4.9B parameters) on the built-in world's 32 px frames (640 video tokens per
segment), random weights (grpo.random_init). fp32 weights with TF32 matmuls in rollout and learner
alike: bf16 autocast in the learner alone would break the rho == 1 guard.

Layout for N GPUs (weak scaling: the work per rollout worker is fixed, so the batch grows with N):
    N = 1   one learner rank and one rollout worker sharing the GPU (0.5 + 0.5)
    N >= 2  N/2 learner ranks (DeepSpeed ZeRO-3, NCCL) and N/2 rollout workers, one GPU each
Every configuration pipelines one step off-policy (grpo.pipeline), syncs weights learner ->
rollout by bucketed NCCL broadcast (verified on arrival), offloads the optimizer state to CPU
(fp32 weights, gradients and AdamW moments of 5.0B parameters are 80 GB: one learner rank does
not fit an 80 GB card without it), trains without a KL reference (grpo.kl_coef=0: a full fp32
copy would be 20 GB more per rank) and with activation checkpointing.

Per configuration: segments/s (iteration 1, the warm-up, left out), the time split, learner seconds
per update and its MFU (matmul FLOPs of 3 forwards per trained segment-step, recomputation not
counted, over K ranks x the dense TF32 datasheet rate), weight-sync seconds, each learner rank's peak
GPU memory, and GPU busy fractions (nvidia-smi every 100 ms). Scaling efficiency from N0 (the
smallest N >= 2 measured) to N: (samples/s at N / samples/s at N0) / (N / N0).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cpu_name, dit_forward_flops, write_record  # noqa: E402
from distributed import GPUSampler, run_driver  # noqa: E402

H100_TF32_DENSE_FLOPS = 494.7e12  # NVIDIA H100 SXM datasheet, dense (H200: the same compute)
PER_WORKER = {"episodes": 2, "prompts": 4}  # closed-loop episodes and prompts per rollout worker


def layout(n: int, gpu: bool) -> dict:
    """Learner ranks K, rollout workers R and their GPU shares for N GPUs."""
    if n == 1:
        return {"learners": 1, "rollouts": 1, "gpu_share": 0.5 if gpu else 0.0}
    if n % 2:
        raise SystemExit(f"--gpus {n}: N must be 1 or even (N/2 learner ranks + N/2 rollout workers)")
    return {"learners": n // 2, "rollouts": n // 2, "gpu_share": 1.0 if gpu else 0.0}


def overrides(n: int, quick: bool, gpu: bool, offload: bool = True, micro_batch: int = 4) -> list[str]:
    lay = layout(n, gpu)
    k, r, share = lay["learners"], lay["rollouts"], lay["gpu_share"]
    args = ["model.preset=tiny" if quick else "model.preset=wan2.2-5b-pixel", "grpo.random_init=true",
            "grpo.save_final=false", f"model.tf32={gpu}", "model.gradient_checkpointing=true",
            f"grpo.episodes_per_iter={PER_WORKER['episodes'] * r}", f"grpo.prompts_per_iter={PER_WORKER['prompts'] * r}",
            "grpo.group_size=2" if quick else "grpo.group_size=8", "grpo.sample_steps=8", "model.sample_steps=8",
            "grpo.window=4", "grpo.train_steps=2", "grpo.kl_coef=0", "grpo.pipeline=true", "grpo.eval_tasks=1",
            "grpo.eval_every=0", "grpo.checkpoint_every=0", "loop.max_retries=1", "loop.max_replans=1",
            f"cluster.learner_ranks={k}", f"cluster.rollout_workers={r}", f"cluster.critic_servers={r}",
            "cluster.zero_stage=3", f"cluster.offload_optimizer={str(offload).lower()}",
            f"cluster.micro_batch={micro_batch}",
            f"cluster.learner_gpus={share}", f"cluster.rollout_gpus={share}", "cluster.weight_sync=auto"]
    if quick:
        args += ["cluster.learner_cpus=1", "cluster.rollout_cpus=1", "cluster.critic_cpus=0.25",
                 "cluster.micro_batch=2", "grpo.sample_steps=4", "model.sample_steps=4", "grpo.window=2",
                 "grpo.train_steps=1"]
    else:
        args += ["cluster.learner_cpus=8", "cluster.rollout_cpus=4", "cluster.critic_cpus=2"]
    return args


def learner_flops(cfg_args: list[str], segments: int) -> float:
    """Matmul FLOPs of one update: 3 forwards per (segment, trained step)."""
    import torch
    from spiral_rl.config import load_config
    from spiral_rl.world_model import WorldModel
    cfg = load_config(cfg_args)
    with torch.device("meta"):  # the run's own DiT config, no memory
        dit = WorldModel(cfg.model, cfg.world.segment_frames, cfg.world.context_frames).dit.cfg
    _, ph, pw = dit.patch_size
    frames, side = cfg.world.segment_frames + cfg.world.context_frames, cfg.world.frame_size
    tokens = frames * (side // ph) * (side // pw)
    return 3 * dit_forward_flops(dit, tokens, cfg.model.max_text_len) * segments * cfg.grpo.train_steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="2,4", help="comma-separated GPU counts, each 1 or even")
    ap.add_argument("--iterations", type=int, default=4, help="per configuration; the first is warm-up")
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU, the logic only")
    ap.add_argument("--no-offload", action="store_true",
                    help="keep the optimizer state on the GPUs (needs K >= 2 learner ranks for 5B on 80 GB cards)")
    ap.add_argument("--micro-batch", type=int, default=4,
                    help="segment-steps per learner forward (cluster.micro_batch; ZeRO-3's per-call cost favours more)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/scaling.json)")
    args = ap.parse_args()
    import torch
    gpu = torch.cuda.is_available() and not args.quick
    if not gpu and not args.quick:
        raise SystemExit("no CUDA device: run with --quick for the logic on CPU")
    counts = [int(x) for x in args.gpus.split(",")]
    if gpu and max(counts) > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
    device = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}" if gpu
              else f"{cpu_name()} CPU (--quick: logic only)")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "scaling_quick.json" if args.quick
                                           else RESULTS / "scaling.json")
    # Merge with the runs already recorded on this device (a later call may add N = 1 or 8).
    old = json.loads(out.read_text()) if out.is_file() else {}
    runs = old.get("metrics", {}).get("runs", {}) if old.get("device") == device else {}
    tmp = Path(tempfile.mkdtemp(prefix="spiral_scaling_"))
    sampler = GPUSampler() if gpu else None
    try:
        for n in counts:
            lay = layout(n, gpu)
            if args.no_offload and lay["learners"] < 2 and not args.quick:
                raise SystemExit(f"--no-offload --gpus {n}: one learner rank cannot hold 80 GB of fp32 state")
            cfg_args = overrides(n, args.quick, gpu, offload=not args.no_offload, micro_batch=args.micro_batch)
            res = run_driver(f"{n} GPU(s)", cfg_args, tmp / f"n{n}", sampler, args.iterations)
            flops = learner_flops(cfg_args, res["segments_per_iteration"])
            res |= lay | {"gpus": n, "learner_tflop_per_update": round(flops / 1e12, 6),
                          "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}  # runs merge across calls
            if gpu and res["learner_update_s"] > 0:
                res["learner_mfu_tf32"] = round(flops / res["learner_update_s"] / lay["learners"]
                                                / H100_TF32_DENSE_FLOPS, 4)
            runs[str(n)] = res
            summarise_and_write(runs, device, args, out)
    finally:
        if sampler:
            sampler.stop()
    return 0


def summarise_and_write(runs: dict, device: str, args, out: Path) -> None:
    """Scaling efficiencies from the smallest N >= 2 measured; written after every configuration."""
    base = min((int(n) for n in runs if int(n) >= 2), default=None)
    eff = {}
    if base is not None:
        b = runs[str(base)]["samples_per_s"]
        eff = {f"{base}->{n}": round(runs[n]["samples_per_s"] / b / (int(n) / base), 3)
               for n in sorted(runs, key=int) if int(n) > base}
    table = {n: {k: runs[n].get(k) for k in ("samples_per_s", "iteration_s", "learner_update_s",
                                             "learner_mfu_tf32", "sync_s", "learner_peak_memory_gib")}
             for n in sorted(runs, key=int)}
    print("scaling:", json.dumps({"per_gpus": table, "efficiency": eff}), flush=True)
    config = {"preset": "tiny" if args.quick else "wan2.2-5b-pixel", "per_rollout_worker": PER_WORKER,
              "overrides_at_2": overrides(2, args.quick, not args.quick, offload=not args.no_offload,
                                                micro_batch=args.micro_batch)}
    write_record("scaling", device, config, {"runs": runs, "scaling_efficiency": eff,
                                             "samples_per_s": {n: runs[n]["samples_per_s"] for n in runs}},
                 args.quick, str(out))


if __name__ == "__main__":
    sys.exit(main())
