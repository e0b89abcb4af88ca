"""Weight-sync transport on its own: the bucketed broadcast of actors/weight_sync.py, learner rank 0
-> N rollout processes, with the receivers' manifest check. Needs only torch and numpy (no Ray).

    python benchmarks/weight_sync.py --model wan2.2-5b --dtype bf16 --bucket-mb 64 256
                                       # 2 GPUs (NCCL): Wan2.2-5B's DiT in bf16 -> results/weight_sync.json
    python benchmarks/weight_sync.py --quick   # CPU, gloo, a small Linear stack; seconds; temp output
    python benchmarks/weight_sync.py --params 5e7   # CPU, gloo: 1 source + 1 receiver, 50 M fp32 params

Each process owns the same model (--model: a stack of Linear layers of --params parameters, or a
preset DiT such as wan2.2-5b) in --dtype; receivers start from other weights than the source's.
Every sync the source changes its weights ("an update"), broadcasts them in --bucket-mb buckets
of --dtype values, and each receiver copies them into its own parameters and verifies them (per-
bucket count, sum, sum of squares, position-weighted sum) against the source's manifest. The time
of a sync is the receiver's, from the moment both sides start to its verified parameters; the
figure is the median over --iters syncs after one warm-up. With several --bucket-mb values each
is measured in the same processes. GPUs are used (one per process) when there are 1 + N of them.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as C  # noqa: E402
from actors.weight_sync import BroadcastGroup  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model(args, device: torch.device) -> torch.nn.Module:
    """The model every process holds, built on its device in --dtype."""
    dtype = DTYPES[args.dtype]
    if args.model == "linear":
        layers = max(1, int(args.params) // (args.width * args.width))
        with torch.device(device):
            net = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width, bias=False) for _ in range(layers)])
        return net.to(dtype)
    from spiral_rl.models.presets import build_model
    with torch.device(device):
        return build_model(args.model).to(dtype)


def worker(rank: int, size: int, port: int, args, results) -> None:
    use_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= size
    device = torch.device("cuda", rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(rank)  # receivers start from other weights than the source's
    net = model(args, device)
    group = BroadcastGroup("127.0.0.1", port, rank, size, device)
    wire = DTYPES[args.dtype]
    runs = []
    for bucket_mb in args.bucket_mb:
        bucket, times = int(bucket_mb * 2**20), []
        for it in range(args.iters + 1):
            if rank == 0:
                with torch.no_grad():
                    for p in net.parameters():
                        p.add_(1e-3)  # "an update": every sync carries new weights
            if use_gpu:
                torch.cuda.synchronize()
            group._bcast(torch.zeros(1, device=device))  # both sides start the clock together
            t0 = time.perf_counter()
            if rank == 0:
                group.send(dict(net.named_parameters()), bucket, wire)
                info = None
            else:
                info = group.receive(net, bucket, wire)  # raises WeightSyncError on any mismatch
            if use_gpu:
                torch.cuda.synchronize()
            if it:  # the first sync warms NCCL up
                times.append(time.perf_counter() - t0)
        if rank == 1:
            numel = sum(p.numel() for p in net.parameters())
            med = sorted(times)[len(times) // 2]
            runs.append({"bucket_mb": bucket_mb, "buckets": info["buckets"], "verified": True, "seconds": med,
                         "all_seconds": times, "gb_per_s": wire.itemsize * numel / 1e9 / med})
    if rank == 1:
        results.put({"device": C.device_name(device), "backend": "nccl" if use_gpu else "gloo",
                     "receivers": size - 1, "params": sum(p.numel() for p in net.parameters()),
                     "param_tensors": len(list(net.parameters())), "runs": runs})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU, a small Linear stack; writes a temp file")
    ap.add_argument("--model", default="linear", help="'linear' or a model preset (wan2.2-5b, small, tiny)")
    ap.add_argument("--params", type=float, default=5e7, help="--model linear: parameters in total")
    ap.add_argument("--width", type=int, default=4096, help="--model linear: layer width")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and wire dtype")
    ap.add_argument("--receivers", type=int, default=1)
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[64.0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.model, args.params, args.width, args.iters = "linear", 2e5, 256, 2
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    size = 1 + args.receivers
    procs = [ctx.Process(target=worker, args=(r, size, port, args, results)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print(f"a process failed: exit codes {[p.exitcode for p in procs]}")
        return 1
    res = results.get()
    best = min(res["runs"], key=lambda r: r["seconds"])
    metrics = {"seconds": best["seconds"], "bucket_mb": best["bucket_mb"], "gb_per_s": best["gb_per_s"], **res}
    print(f"{res['device']} ({res['backend']}): {res['params'] / 1e9:.2f} B params in {res['param_tensors']} tensors, "
          f"{args.dtype}, 1 -> {res['receivers']} receiver(s)")
    for r in res["runs"]:
        print(f"  bucket {r['bucket_mb']:6.0f} MB: {r['buckets']:5d} buckets, {r['seconds']:.3f} s per verified sync, "
              f"{r['gb_per_s']:.1f} GB/s")
    C.write_record("weight_sync", res["device"], {"model": args.model, "dtype": args.dtype, "iters": args.iters,
                   "receivers": args.receivers}, metrics, args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
