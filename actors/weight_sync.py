"""Learner -> rollout weight sync, and the check that a sync really happened.

Two transports, one verification:

    object store  (CPU)  the learner's rank 0 returns the whole state dict as numpy arrays: ONE
                         object, which Ray hands to every rollout worker (zero-copy on a node);
                         never one remote call per parameter, the field's most reported slowdown.
    broadcast     (GPU)  rank 0 and the N rollout workers form a sync group of 1 + N processes
                         (ProcessGroupNCCL on GPU, ProcessGroupGloo on CPU, built on a TCPStore,
                         separate from the learners' own group); parameters travel in flat
                         buckets of ~sync_bucket_mb, one broadcast per bucket.

Either way the learner describes what it sends with a `manifest`: the parameter names, grouped
into the same buckets, and per bucket the element count and three float64 sums (sum, sum of
squares, position-weighted sum). After loading, the rollout side recomputes the manifest from its
own model's parameters and `verify` compares: a sync that silently updated nothing, dropped or
reordered a parameter, or corrupted a value fails loudly, naming the bucket and its parameters.
"""
from __future__ import annotations

import datetime
import time
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

_WEIGHT_PERIOD = 251  # position weights 1..251 make the checksum sensitive to order, not only to values
_RTOL = 1e-12  # float64 sums of identical fp32 values agree to rounding of the reduction order


class WeightSyncError(RuntimeError):
    """The rollout side's weights do not match what the learner sent."""


def bucket_names(named: Sequence[tuple[str, int]], bucket_bytes: int, itemsize: int = 4) -> list[list[str]]:
    """Consecutive parameters grouped into buckets of at most bucket_bytes (itemsize bytes per
    value on the wire: 4 for fp32, 2 for bf16), one parameter per bucket at least.
    named: (name, numel) in order."""
    buckets, cur, size = [], [], 0
    for name, numel in named:
        if cur and size + itemsize * numel > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += itemsize * numel
    return buckets + ([cur] if cur else [])


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def bucket_stats(tensors: Sequence[torch.Tensor]) -> dict:
    """numel and float64 sum / sum of squares / position-weighted sum of a bucket's values."""
    flat = _flat(tensors)
    w = 1.0 + torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder_(_WEIGHT_PERIOD)
    return {"numel": int(flat.numel()), "sum": float(flat.sum()), "sumsq": float(flat.square().sum()),
            "weighted": float((flat * w).sum())}


def manifest(named: dict[str, torch.Tensor], bucket_bytes: int, itemsize: int = 4) -> dict:
    """What a sync sends: parameter count, buckets (names + stats). named: name -> tensor, in order."""
    buckets = bucket_names([(n, t.numel()) for n, t in named.items()], bucket_bytes, itemsize)
    return {"params": len(named), "numel": sum(t.numel() for t in named.values()),
            "buckets": [{"names": names, **bucket_stats([named[n] for n in names])} for names in buckets]}


def verify(expected: dict, params: dict[str, torch.Tensor]) -> dict:
    """Compare the rollout model's parameters (after loading) with the learner's manifest; raise
    WeightSyncError on any difference. Returns a short summary."""
    if len(params) != expected["params"]:
        raise WeightSyncError(f"weight sync: the rollout model has {len(params)} parameters, the learner sent "
                              f"{expected['params']}")
    for k, b in enumerate(expected["buckets"]):
        missing = [n for n in b["names"] if n not in params]
        if missing:
            raise WeightSyncError(f"weight sync: bucket {k} names parameters the rollout model lacks: {missing[:5]}")
        got = bucket_stats([params[n] for n in b["names"]])
        if got["numel"] != b["numel"]:
            raise WeightSyncError(f"weight sync: bucket {k} holds {got['numel']} values, the learner sent {b['numel']}")
        for key in ("sum", "sumsq", "weighted"):
            if abs(got[key] - b[key]) > _RTOL * max(1.0, abs(b[key])):
                raise WeightSyncError(
                    f"weight sync: bucket {k} ({len(b['names'])} params, {b['names'][0]} .. {b['names'][-1]}) "
                    f"differs from the learner's: {key} {got[key]!r} vs {b[key]!r}; the rollout weights are not "
                    "the learner's (a corrupted or partial sync)")
    return {"params": expected["params"], "numel": expected["numel"], "buckets": len(expected["buckets"])}


def load_numpy_state(model: torch.nn.Module, state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Copy a numpy state dict (parameters only) into model's parameters; names must match exactly.
    Returns the model's parameters by name (for `verify`)."""
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise WeightSyncError(f"weight sync: state dict does not fit the rollout model (missing {missing[:5]}, "
                              f"unexpected {extra[:5]})")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # arrays from the object store are read-only; we only read
        for name, p in params.items():
            src = torch.from_numpy(np.asarray(state[name]))
            if src.shape != p.shape:
                raise WeightSyncError(f"weight sync: {name} has shape {tuple(src.shape)}, the model {tuple(p.shape)}")
            p.copy_(src)
    return params


class BroadcastGroup:
    """A process group of the learner's rank 0 (group rank 0, the source) and N rollout workers
    (group ranks 1..N), apart from the learners' own group. Gloo on CPU, NCCL on GPU.

    wire_dtype (send and receive must agree): the dtype of the buckets on the wire. fp32 (the
    default) carries fp32 master weights exactly; bf16 halves the bytes when both sides hold
    bf16 weights (rollout models usually do). The manifest describes the values as sent."""

    def __init__(self, host: str, port: int, rank: int, size: int, device: torch.device, timeout_s: float = 300):
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.PrefixStore("weight_sync", dist.TCPStore(host, port, size, rank == 0, timeout=timeout))
        if device.type == "cuda":
            self.pg = dist.ProcessGroupNCCL(store, rank, size)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, size, timeout)
        self.rank, self.size, self.device = rank, size, device

    def _bcast(self, t: torch.Tensor) -> None:
        self.pg.broadcast(t, 0).wait()

    def send(self, named: dict[str, torch.Tensor], bucket_bytes: int,
             wire_dtype: torch.dtype = torch.float32) -> dict:
        """Rank 0: broadcast the manifest, then each bucket as one flat buffer of wire_dtype.
        Returns the manifest."""
        named = {n: t.detach().to(wire_dtype) for n, t in named.items()}  # no copy when already wire_dtype
        man = manifest(named, bucket_bytes, wire_dtype.itemsize)
        header = torch.tensor([[b["numel"], b["sum"], b["sumsq"], b["weighted"]] for b in man["buckets"]],
                              dtype=torch.float64, device=self.device)  # (buckets, 4)
        self._bcast(torch.tensor([header.shape[0]], dtype=torch.int64, device=self.device))
        self._bcast(header)
        for b in man["buckets"]:
            self._bcast(torch.cat([named[n].reshape(-1).to(self.device) for n in b["names"]]))
        return man

    def receive(self, model: torch.nn.Module, bucket_bytes: int, wire_dtype: torch.dtype = torch.float32) -> dict:
        """Ranks 1..N: receive every bucket straight into the model's parameters, then verify
        them against the broadcast manifest (buckets are formed from the same names on both sides)."""
        t0 = time.perf_counter()
        params = dict(model.named_parameters())
        names = bucket_names([(n, p.numel()) for n, p in params.items()], bucket_bytes, wire_dtype.itemsize)
        count = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._bcast(count)
        if int(count) != len(names):
            raise WeightSyncError(f"weight sync: the learner sends {int(count)} buckets, this model makes {len(names)}"
                                  " (different parameters or sync_bucket_mb)")
        header = torch.zeros(len(names), 4, dtype=torch.float64, device=self.device)
        self._bcast(header)
        with torch.no_grad():
            for bucket in names:
                flat = torch.empty(sum(params[n].numel() for n in bucket), dtype=wire_dtype, device=self.device)
                self._bcast(flat)
                off = 0
                for n in bucket:
                    p = params[n]
                    p.copy_(flat[off:off + p.numel()].view_as(p))
                    off += p.numel()
        h = header.cpu().tolist()
        expected = {"params": len(params), "numel": sum(p.numel() for p in params.values()),
                    "buckets": [{"names": b, "numel": int(r[0]), "sum": r[1], "sumsq": r[2], "weighted": r[3]}
                                for b, r in zip(names, h)]}
        return {**verify(expected, params), "seconds": time.perf_counter() - t0}
