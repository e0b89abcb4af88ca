"""Attention: spiral_rl's attention() per backend vs every kernel present, at the DiT's real shapes.

    python benchmarks/attention.py           # GPU, bf16 -> benchmarks/results/attention.json
    python benchmarks/attention.py --quick   # CPU, tiny shapes, seconds; correctness only, temp output

Shapes (head dim 128): the 5B learner's self-attention over 5070 video tokens (24 heads) and
twice that; its cross-attention from 5070 video tokens to 512 text tokens; the sampler's
self-attention of a Wan2.1-1.3B-shaped model over 3510 tokens with batch 16 (a group of 8, CFG
batched). Kernels: torch SDPA pinned to cuDNN / flash / memory-efficient, flash-attn's package when
importable, and our attention() with backend "auto" and "sdpa" (torch's own order).

FLOPs: forward 4 B H Lq Lk d (two matmuls); backward 2.5x that (five matmuls of the same size), so
fwd+bwd = 3.5x. Checked: every output against an fp32 reference (relative L2), and at the first
shape the gradients of q, k, v.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import _common as C
from spiral_rl.models.attention import attention, flash_attn_func

CASES = {  # name: (batch, heads, Lq, Lk)
    "self 5B learner (5070 tok)": (1, 24, 5070, 5070),
    "self 5B, 2x frames (10140 tok)": (1, 24, 10140, 10140),
    "cross 5B (5070 -> 512 text)": (1, 24, 5070, 512),
    "self 1.3B sampler (16 x 3510 tok)": (16, 12, 3510, 3510),
}
QUICK_CASES = {"self tiny": (1, 2, 64, 64), "cross tiny": (2, 2, 48, 16)}


def pinned(backend: SDPBackend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def kernels(device: torch.device) -> dict:
    """Every way to run the call here; the ours-* entries go through spiral_rl's attention()."""
    out = {"ours auto": lambda q, k, v: attention(q, k, v, backend="auto"),
           "ours sdpa (torch order)": lambda q, k, v: attention(q, k, v, backend="sdpa")}
    if device.type == "cuda":
        out |= {"sdpa cudnn": pinned(SDPBackend.CUDNN_ATTENTION), "sdpa flash": pinned(SDPBackend.FLASH_ATTENTION),
                "sdpa efficient": pinned(SDPBackend.EFFICIENT_ATTENTION)}
        if flash_attn_func is not None:
            out["flash-attn package"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    else:
        out["sdpa math"] = pinned(SDPBackend.MATH)
    return out


def reference(q, k, v, chunk: int = 4) -> torch.Tensor:
    """fp32 softmax(q k^T / sqrt(d)) v, a few heads at a time (the full score matrix of the
    largest case would be tens of GB)."""
    outs = []
    for h in range(0, q.shape[1], chunk):
        qs, ks, vs = (t[:, h:h + chunk].float() for t in (q, k, v))
        outs.append(torch.softmax(qs @ ks.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ vs)
    return torch.cat(outs, dim=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype, cases, hd = (torch.float32, QUICK_CASES, 32) if args.quick else (torch.bfloat16, CASES, 128)
    if args.quick:
        args.warmup, args.iters = 1, 2
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    print(C.device_name(device), dtype, f"head dim {hd}")
    results, ok = {}, True
    for ci, (name, (b, h, lq, lk)) in enumerate(cases.items()):
        g = torch.Generator(device).manual_seed(ci)
        q = torch.randn(b, h, lq, hd, generator=g, device=device).to(dtype)
        k, v = (torch.randn(b, h, lk, hd, generator=g, device=device).to(dtype) for _ in range(2))
        dout = torch.randn(b, h, lq, hd, generator=g, device=device).to(dtype)
        ref = reference(q, k, v)
        ref_grads = None
        if ci == 0:  # gradients once, at the learner's shape
            qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
            reference(qr, kr, vr).backward(dout.float())
            ref_grads = (qr.grad, kr.grad, vr.grad)
            del qr, kr, vr
        fwd_flops = 4.0 * b * h * lq * lk * hd
        row = {}
        for kname, fn in kernels(device).items():
            try:
                out = fn(q, k, v)
                err = C.rel_err(out, ref)
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                grad_err = None
                if ref_grads is not None:
                    fn(qg, kg, vg).backward(dout)
                    grad_err = max(C.rel_err(a.grad, r) for a, r in zip((qg, kg, vg), ref_grads))
                fwd = C.median_seconds(lambda: fn(q, k, v), device, args.warmup, args.iters)

                def fwd_bwd():
                    qg.grad = kg.grad = vg.grad = None
                    fn(qg, kg, vg).backward(dout)
                both = C.median_seconds(fwd_bwd, device, args.warmup, args.iters)
                row[kname] = {"fwd_ms": fwd * 1e3, "fwd_tflops": fwd_flops / fwd / 1e12,
                              "fwd_bwd_ms": both * 1e3, "fwd_bwd_tflops": 3.5 * fwd_flops / both / 1e12,
                              "rel_err": err, "grad_rel_err": grad_err}
                ok &= err < tol and (grad_err is None or grad_err < tol)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot take this call is a finding
                row[kname] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        timed = {k: r for k, r in row.items() if "error" not in r and not k.startswith("ours")}
        best = max(timed, key=lambda k: timed[k]["fwd_bwd_tflops"]) if timed else None
        ours = row.get("ours auto", {})
        results[name] = {"shape": {"batch": b, "heads": h, "lq": lq, "lk": lk, "head_dim": hd}, "kernels": row,
                         "best_kernel": best,
                         "ours_auto_fraction_of_best_fwd_bwd": (ours["fwd_bwd_tflops"] / timed[best]["fwd_bwd_tflops"]
                                                                if best and "fwd_bwd_tflops" in ours else None),
                         "ours_auto_fraction_of_best_fwd": (ours["fwd_tflops"] / max(r["fwd_tflops"] for r in timed.values())
                                                            if best and "fwd_tflops" in ours else None)}
        print(f"\n{name}: B={b} H={h} Lq={lq} Lk={lk} d={hd}")
        print(f"  {'kernel':<24}{'fwd ms':>9}{'TFLOP/s':>9}{'f+b ms':>9}{'TFLOP/s':>9}{'rel err':>10}{'grad err':>10}")
        for kname, r in row.items():
            if "error" in r:
                print(f"  {kname:<24}  {r['error'][:90]}")
                continue
            ge = f"{r['grad_rel_err']:10.1e}" if r["grad_rel_err"] is not None else f"{'':>10}"
            print(f"  {kname:<24}{r['fwd_ms']:9.3f}{r['fwd_tflops']:9.1f}{r['fwd_bwd_ms']:9.3f}"
                  f"{r['fwd_bwd_tflops']:9.1f}{r['rel_err']:10.1e}{ge}")
        if results[name]["ours_auto_fraction_of_best_fwd_bwd"] is not None:
            print(f"  best kernel: {best}; ours auto reaches {results[name]['ours_auto_fraction_of_best_fwd_bwd']:.0%} "
                  f"of it (fwd+bwd), {results[name]['ours_auto_fraction_of_best_fwd']:.0%} (fwd)")
    print(f"\nall outputs within {tol:g} of the fp32 reference: {ok}")
    C.write_record("attention", C.device_name(device), {"dtype": str(dtype), "head_dim": hd, "warmup": args.warmup,
                   "iters": args.iters}, {"cases": results, "all_correct": ok, "tolerance": tol}, args.quick, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
