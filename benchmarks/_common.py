"""Helpers the GPU benchmarks share: timing, the diffusers Wan reference model, result records.

Not a benchmark itself. Scripts in benchmarks/ import it as `_common` (python puts a script's own
directory first on sys.path).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from actors.cluster import cpu_name  # imports no Ray; the scripts also take it from here

RESULTS = Path(__file__).resolve().parent / "results"
# NVIDIA's H100 SXM datasheet rate for dense bf16 matmul (no sparsity): the MFU denominator.
H100_BF16_DENSE_FLOPS = 989e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"{cpu_name()} CPU, torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() over `iters` runs after `warmup` untimed ones. On CUDA each run is
    bracketed by events (device time, no host clock) and synchronised, so no run overlaps the next."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (METHOD.md's measure: bf16 lands between 1e-3 and 1e-2)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- the diffusers reference


def diffusers_wan_kwargs(cfg) -> dict:
    """WanTransformer3DModel's constructor arguments for our DiTConfig (the inverse of
    wan_compat.config_from_diffusers)."""
    return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                cross_attn_norm=cfg.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=cfg.eps,
                rope_max_seq_len=1024)


def build_diffusers_wan(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random diffusers WanTransformer3DModel of our config's shape, in `dtype` the way
    `from_pretrained(torch_dtype=dtype)` leaves it: the modules in `_keep_in_fp32_modules`
    (time embedder, norms, scale-shift tables) stay fp32. Built on the device (a 5B model's init
    on the CPU takes minutes)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**diffusers_wan_kwargs(cfg))
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for mname, module in model.named_modules():
        # Cast tensor by tensor: model.to(dtype) and back would round the float64 RoPE tables
        # and the fp32 tables through dtype first.
        for pname, p in module.named_parameters(recurse=False):
            if not any(k in f"{mname}.{pname}".split(".") for k in keep):
                p.data = p.data.to(dtype)
        for bname, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and not any(k in mname.split(".") for k in keep):
                module._buffers[bname] = b.to(dtype)
    return model


def build_ours_from(reference, cfg, device: torch.device, dtype: torch.dtype, **overrides):
    """Our DiT of the same shape, holding the reference's weights (wan_compat, strict)."""
    from spiral_rl.models.dit import DiT
    from spiral_rl.models.wan_compat import load_wan_state_dict

    with torch.device(device):
        model = DiT(cfg, **overrides)
    model = model.to(dtype)
    load_wan_state_dict(model, reference.state_dict())
    return model


# --------------------------------------------------------------------------- analytic FLOPs


def dit_forward_flops(cfg, tokens: int, text_len: int, batch: int = 1) -> float:
    """Matmul FLOPs of one DiT forward (2 per multiply-add), per sample times batch:

        per block  2 N (4 D^2 + 2 D^2 + 2 D F)   self-attn q,k,v,o; cross-attn q,o; FFN
                 + 2 L (2 D^2)                    cross-attn k, v from the L text tokens
                 + 4 N^2 D + 4 N L D              self- and cross-attention scores and values
        outside  2 N C p D + 2 L (T D + D^2) + 2 N D C p   patch embedding, text MLP, head

    N video tokens, L text tokens, D width, F FFN width, C channels, p patch volume, T text width.
    Elementwise work, norms and the timestep MLP are not counted. A backward costs 2x a forward,
    so a training step is 3x this (recomputation under activation checkpointing not counted)."""
    n, l, d, f = tokens, text_len, cfg.dim, cfg.ffn_dim
    cp = cfg.in_channels * math.prod(cfg.patch_size)
    block = 2 * n * (6 * d * d + 2 * d * f) + 2 * l * 2 * d * d + 4 * n * n * d + 4 * n * l * d
    outside = 2 * n * cp * d + 2 * l * (cfg.text_dim * d + d * d) + 2 * n * d * cfg.out_channels * math.prod(cfg.patch_size)
    return float(batch * (cfg.num_layers * block + outside))


# --------------------------------------------------------------------------- records


def checkpoint_id(path: str | Path, root: str | Path = ".") -> dict:
    """{"checkpoint": path, "sha256": first 16 hex digits} of a world-model checkpoint (a file or a
    dir holding world_model.pt; a relative path is read under `root`), so a result names the
    weights it was measured on even after checkpoints/tiny_sft.pt is replaced."""
    from spiral_rl.world_model import checkpoint_file

    file = checkpoint_file(Path(root) / path)
    return {"checkpoint": str(path), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()[:16]}


def split_options(argv: list[str], allowed: set[str], usage: str) -> tuple[dict[str, str], list[str]]:
    """argv -> ({'--key': value} for each --key=value, the other arguments); exits naming any
    option outside `allowed` or given without '=value'."""
    opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--") and "=" in a}
    bad = sorted(set(opts) - allowed) + [a for a in argv if a.startswith("--") and "=" not in a]
    if bad:
        sys.exit(f"unknown option(s) {bad}; {usage}")
    return opts, [a for a in argv if not a.startswith("--")]


def write_record(name: str, device: str, config: dict, metrics: dict, quick: bool, out: str | None) -> Path:
    """benchmarks/results/<name>.json as {"command", "device", "date", "config", "metrics"}; a
    --quick run writes to the temp dir instead, so it never replaces a GPU result."""
    record = {"command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
              "device": device, "date": datetime.date.today().isoformat(), "config": config,
              "metrics": metrics}
    path = Path(out) if out else (Path(tempfile.gettempdir()) / f"{name}_quick.json" if quick
                                  else RESULTS / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def kernel_breakdown(step: Callable[[], object], device: torch.device, top: int = 12) -> dict:
    """Profile one call of step(): GPU time per kernel class (matmul, attention, triton-fused,
    other) and the top kernels by time. CUDA only; {} elsewhere."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    rows = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages()
            if getattr(e, "device_time_total", 0) > 0 and not e.key.startswith(("aten::", "autograd::"))]
    classes = {"attention": ("fmha", "flash", "cudnn", "attention", "sdpa"),
               "matmul": ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "wgmma"), "triton_fused": ("triton",)}
    share: dict[str, float] = {k: 0.0 for k in [*classes, "other"]}
    for key, ms in rows:
        low = key.lower()
        kind = next((k for k, pats in classes.items() if any(p in low for p in pats)), "other")
        share[kind] += ms
    total = sum(share.values()) or 1.0
    rows.sort(key=lambda r: -r[1])
    return {"total_kernel_ms": total, "ms_by_class": share,
            "top_kernels_ms": [[k[:120], round(ms, 3)] for k, ms in rows[:top]]}
