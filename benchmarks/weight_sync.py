"""Weight-sync transport on its own: the bucketed broadcast of actors/weight_sync.py, learner rank 0
-> N rollout processes, with the receivers' manifest check. Needs only torch and numpy (no Ray).

    python benchmarks/weight_sync.py                       # CPU, gloo: 1 source + 1 receiver, 50 M params
    python benchmarks/weight_sync.py --params 1e9 --receivers 1 --out benchmarks/results/weight_sync_gpu.json
                                                           # GPUs (one per process, NCCL) when there are 1 + N

Each process owns a stack of fp32 Linear layers of --params parameters in total; the source fills
its weights from a seed, every sync broadcasts them in --bucket-mb buckets, each receiver copies
them into its own parameters and verifies them (per-bucket count, sum, sum of squares, position-
weighted sum) against the source's manifest. Prints and writes seconds per sync and GB/s.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from actors.weight_sync import BroadcastGroup  # noqa: E402


def model(params: int, width: int = 4096) -> torch.nn.Module:
    layers = max(1, int(params) // (width * width))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def worker(rank: int, size: int, port: int, args, results) -> None:
    use_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= size
    device = torch.device("cuda", rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(rank)  # receivers start from other weights than the source's
    net = model(args.params).to(device)
    group = BroadcastGroup("127.0.0.1", port, rank, size, device)
    bucket = int(args.bucket_mb * 2**20)
    times = []
    for it in range(args.iters + 1):
        if rank == 0:
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(1e-3)  # "an update": every sync carries new weights
        if use_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if rank == 0:
            group.send(dict(net.named_parameters()), bucket)
            info = None
        else:
            info = group.receive(net, bucket)  # raises WeightSyncError on any mismatch
        if use_gpu:
            torch.cuda.synchronize()
        if it:  # the first sync warms NCCL up
            times.append(time.perf_counter() - t0)
    if rank == 1:
        numel = sum(p.numel() for p in net.parameters())
        results.put({"device": torch.cuda.get_device_name(device) if use_gpu else "cpu",
                     "backend": "nccl" if use_gpu else "gloo", "receivers": size - 1, "params": numel,
                     "bucket_mb": args.bucket_mb, "buckets": info["buckets"], "verified": True,
                     "seconds_per_sync": sorted(times)[len(times) // 2],
                     "gb_per_s": 4 * numel / 1e9 / sorted(times)[len(times) // 2]})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=5e7)
    ap.add_argument("--receivers", type=int, default=1)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
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
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
