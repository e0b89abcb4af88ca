"""Learner memory: peak GPU memory per rank of the 5B DiT under DeepSpeed ZeRO-2 / ZeRO-3 with AdamW.

    python benchmarks/memory.py             # K GPUs (default 2), one rank each -> results/memory.json
    python benchmarks/memory.py --quick     # CPU, gloo, a tiny Wan, 2 ranks; code paths only, temp output

Each rank holds the Wan2.2-TI2V-5B-shaped DiT in bf16 inside a DeepSpeed engine configured as
actors/learner.py configures it (bf16 with fp32 master weights, torch's AdamW, gradient clipping,
micro-batch 1), and runs fwd + bwd + optimizer step twice per setting (the first step allocates
AdamW's state) on latents of F x 30 x 52 (F latent frames, 390 tokens each) with 512 text tokens.
Settings per ZeRO stage: activation checkpointing on at 13, 26 and 39 frames (5070, 10140, 15210
tokens), and off at 13 frames. Larger settings are not run: an out-of-memory on one rank would
leave the other waiting in a collective.

The largest tokens-per-sample that fits is a linear extrapolation to the GPU's memory of the peak
reserved memory (what the allocator holds: the figure that must fit) against tokens: fitted over
the three checkpointed points; without checkpointing through the model-state baseline (after the
steps, no activations) and the one measured point. Activations grow linearly in tokens because
attention never materialises the N x N scores.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _common as C
from spiral_rl.models.dit import DiT
from spiral_rl.models.presets import param_count, preset_config

GIB = 2**30


def ds_config(stage: int, bf16: bool) -> dict:
    """actors/learner.py's deepspeed_config for one micro-batch of one sample per rank."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero |= {"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                      "weight_decay": 0.0, "torch_adam": True}},
            "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
            "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def model_state_gib(params: int, stage: int, ranks: int) -> float:
    """Bytes of model state per rank, the ZeRO paper's accounting for bf16 + fp32 AdamW: bf16
    params (2) and grads (2), fp32 master, m, v (12); ZeRO-2 shards grads and optimizer state,
    ZeRO-3 also the params."""
    per_param = 2 + (2 + 12) / ranks if stage == 2 else 16 / ranks
    return params * per_param / GIB


def rank_main(rank: int, world: int, port: int, args, queue) -> None:
    use_gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda", rank) if use_gpu else torch.device("cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")  # DeepSpeed's calls
    import deepspeed
    import deepspeed.comm.torch as ds_comm
    ds_comm.build_shm_op = lambda: None  # as actors/learner.py: an inference-only op whose JIT build can hang
    if use_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{port}", timeout=datetime.timedelta(seconds=120))  # a rank left alone in a collective fails, not hangs
    cfg, stage = args.cfg, args.stage
    dtype = torch.bfloat16 if use_gpu else torch.float32
    out = []
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(cfg)
    model = model.to(dtype)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, use_gpu), dist_init_required=False)
    for frames, ckpt in args.plan:
        engine.module.gradient_checkpointing = ckpt
        g = torch.Generator(device).manual_seed(rank)
        x = torch.randn(1, cfg.in_channels, frames, *args.hw, generator=g, device=device)
        t = torch.rand(1, frames, generator=g, device=device)
        text = torch.randn(1, args.text_len, cfg.text_dim, generator=g, device=device)
        if use_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        losses, oom = [], False
        try:
            for _ in range(2):
                loss = (engine(x, t, text).float() - x).square().mean()
                engine.backward(loss)
                engine.step()
                losses.append(float(loss.detach()))
        except torch.OutOfMemoryError:  # shapes are equal on every rank, so every rank gets here
            oom = True
        row = {"stage": stage, "checkpointing": ckpt, "frames": frames,
               "tokens": frames * (args.hw[0] // cfg.patch_size[1]) * (args.hw[1] // cfg.patch_size[2]),
               "losses": losses, "oom": oom}
        if use_gpu and not oom:
            stats = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device),
                                  torch.cuda.memory_allocated(device)], dtype=torch.float64, device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the worst rank is the one that must fit
            row |= {"peak_allocated_gib": float(stats[0]) / GIB, "peak_reserved_gib": float(stats[1]) / GIB,
                    "after_step_allocated_gib": float(stats[2]) / GIB}
        out.append(row)
        if rank == 0:
            print(f"  ZeRO-{stage} ckpt={'on ' if ckpt else 'off'} {row['tokens']:6d} tokens: "
                  + ("out of memory" if oom else
                     f"peak {row['peak_allocated_gib']:.1f} GiB allocated, {row['peak_reserved_gib']:.1f} reserved"
                     if use_gpu else f"losses {losses}"), flush=True)
        if oom:  # the engine may be half way through a step: measure nothing more with it
            break
    if rank == 0:
        total = torch.cuda.get_device_properties(device).total_memory / GIB if use_gpu else None
        queue.put({"rows": out, "device_total_gib": total, "device": C.device_name(device)})
    dist.destroy_process_group()


def fit_max_tokens(rows: list[dict], budget_gib: float) -> dict:
    """Per (stage, checkpointing): peak reserved = a + b * tokens, and the tokens where it meets
    budget. Where the peak does not grow with tokens over the measured range (it is set by the
    optimizer step or gradient buffers, not by activations) nothing can be extrapolated: the
    largest measured size is reported as a lower bound."""
    fits = {}
    for stage in sorted({r["stage"] for r in rows}):
        for ckpt in (True, False):
            ok = [r for r in rows if r["stage"] == stage and r["checkpointing"] == ckpt and not r["oom"]]
            if not ok:
                continue
            pts = [(r["tokens"], r["peak_reserved_gib"]) for r in ok]
            if len(pts) == 1:  # through the model-state baseline: memory held with no activations
                base = min(r["after_step_allocated_gib"] for r in rows if r["stage"] == stage and not r["oom"])
                pts = [(0, base)] + pts
            n, mem = np.array(pts, dtype=float).T
            b, a = np.polyfit(n, mem, 1)
            alloc_growth = max(r["peak_allocated_gib"] for r in ok) - min(r["peak_allocated_gib"] for r in ok)
            growing = b > 0 and (len(ok) == 1 or alloc_growth > 0.05)
            fits[f"zero{stage}_ckpt_{'on' if ckpt else 'off'}"] = {
                "gib_fixed": float(a), "mib_per_token": float(b * 1024), "points": len(pts),
                "max_tokens": int((budget_gib - a) / b) if growing else None,
                "at_least_tokens": max(r["tokens"] for r in ok),
                "note": None if growing else "peak allocated does not grow with tokens over the measured range "
                                             "(set by the optimizer step / gradient buffers): no extrapolation"}
    return fits


def refit(path: str) -> int:
    """Recompute the fits of a GPU record from its measured rows (no GPU needed); the record keeps
    its measuring command, date and device, and gains an `analysis` entry naming this command."""
    import json
    import shlex
    from pathlib import Path
    rec = json.loads(Path(path).read_text())
    m = rec["metrics"]
    m["max_tokens_fit"] = fit_max_tokens(m["rows"], m["device_total_gib"])
    rec["analysis"] = {"command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
                       "date": datetime.date.today().isoformat()}
    Path(path).write_text(json.dumps(rec, indent=2) + "\n")
    for k, f in m["max_tokens_fit"].items():
        print(k, f)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--out", default=None)
    ap.add_argument("--refit", default=None, metavar="RECORD", help="recompute the fits of a record, no run")
    args = ap.parse_args()
    if args.refit:
        return refit(args.refit)
    if args.quick:
        args.cfg = preset_config("wan2.2-5b", dim=32, num_heads=2, num_layers=2, ffn_dim=64, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32)
        args.hw, args.text_len, args.plan = (8, 12), 7, [(2, True), (2, False)]
    else:
        args.cfg = preset_config("wan2.2-5b")
        args.hw, args.text_len = (30, 52), 512
        args.plan = [(13, True), (26, True), (39, True), (13, False)]
    rows = []
    for stage in args.stages:  # fresh processes per stage: nothing of one engine stays in the next's figures
        args.stage = stage
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=rank_main, args=(r, args.ranks, port, args, queue)) for r in range(args.ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs) or queue.empty():
            print(f"ZeRO-{stage}: a rank failed: exit codes {[p.exitcode for p in procs]}")
            continue
        res = queue.get()
        rows += res["rows"]
        report(rows, res, args)  # after every stage, so a run cut short still leaves its figures
    return 0 if rows else 1


def report(rows: list[dict], res: dict, args) -> None:
    params = param_count(args.cfg)
    stages = sorted({r["stage"] for r in rows})
    analytic = {f"zero{s}": model_state_gib(params, s, args.ranks) for s in stages}
    metrics = {"ranks": args.ranks, "params": params, "rows": rows, "model_state_gib_analytic": analytic,
               "device_total_gib": res["device_total_gib"]}
    if res["device_total_gib"]:
        metrics["max_tokens_fit"] = fit_max_tokens(rows, res["device_total_gib"])
        # Without sharding (one rank, no offload) the model state alone is 16 bytes a parameter.
        metrics["single_gpu_unsharded_model_state_gib"] = params * 16 / GIB
        print(f"{'setting':<22}{'tokens':>8}{'peak alloc':>12}{'peak resv':>11}   (GiB per rank, {args.ranks} ranks)")
        for r in rows:
            print(f"ZeRO-{r['stage']} ckpt {'on ' if r['checkpointing'] else 'off'}      {r['tokens']:8d}"
                  + ("      out of memory" if r["oom"] else f"{r['peak_allocated_gib']:12.1f}{r['peak_reserved_gib']:11.1f}"))
        print("model state per rank, analytic (GiB):", {k: round(v, 1) for k, v in analytic.items()})
        for k, f in metrics["max_tokens_fit"].items():
            print(f"{k}: {f['gib_fixed']:.1f} GiB + {f['mib_per_token']:.2f} MiB/token -> max "
                  f"{f['max_tokens'] or '>= ' + str(f['at_least_tokens'])} tokens per sample in "
                  f"{res['device_total_gib']:.1f} GiB")
    C.write_record("memory", res["device"], {"preset": "wan2.2-5b" if not args.quick else "tiny wan",
                   "latent_hw": list(args.hw), "text_len": args.text_len, "plan": args.plan, "stages": args.stages},
                   metrics, args.quick, args.out)

if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
