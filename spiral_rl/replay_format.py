"""The replay store's record (ScoredSegment) and its on-disk frame, apart from the store's logic.

A record is framed as
    header  16 B : magic b"SRB1" | payload length (u64 LE) | CRC32 of the payload (u32 LE)
    payload      : head length (u32 LE) | head: UTF-8 JSON (id, scalars, meta, array table)
                   | raw C-order array bytes, each at a 64-byte-aligned offset of the array area
The length + CRC frame tells a whole record from a torn one without trusting any index; raw bytes
plus a JSON table read back without parsing (np.frombuffer, no copy).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

MAGIC = b"SRB1"
HEADER = struct.Struct("<4sQI")  # magic, payload length, CRC32 of payload
HEAD_LEN = struct.Struct("<I")
ALIGN = 64
ARRAYS = ("context", "frames", "latents", "log_probs", "timesteps")
FP32 = ("latents", "log_probs", "timesteps")


class CorruptRecordError(IOError):
    """A stored record's bytes no longer match their CRC."""


@dataclass(eq=False)
class ScoredSegment:
    """One SDE sample of a GRPO group with its critic scores. Arrays are numpy, never torch.

    context:    (K, H, W, 3) uint8          frames the sample was conditioned on
    frames:     (T, H, W, 3) uint8          the generated segment
    latents:    (S+1, C, T', H', W') float32  every recorded denoising state of this one sample
    log_probs:  (S,) float32                log-prob of each recorded step under the sampler
    timesteps:  (S+1,) float32              noise level of each latent
    sde_window: (start, end)                steps [start, end) sampled by the SDE (trained by GRPO)
    """

    group_id: str
    prompt: str  # the sub-action text
    context: np.ndarray
    frames: np.ndarray
    latents: np.ndarray
    log_probs: np.ndarray
    timesteps: np.ndarray
    sde_window: tuple[int, int]
    reward: float
    scores: dict[str, float]  # one value per critic dimension
    policy_version: int
    advantage: float = math.nan  # group-normalised reward; NaN until computed
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able

    def validate(self) -> None:
        """Raise on a record that would not round-trip exactly; errors name the field."""
        for name in ARRAYS:
            a = getattr(self, name)
            if not isinstance(a, np.ndarray):
                raise TypeError(f"ScoredSegment.{name} must be a numpy array, got {type(a).__name__}"
                                " (convert tensors with .float().cpu().numpy())")
        for name in FP32:  # peers stored bf16 here, and their first importance ratio drifted from 1
            dtype = getattr(self, name).dtype
            if dtype != np.float32:
                raise TypeError(f"ScoredSegment.{name} must be float32, got {dtype}: GRPO's importance "
                                "ratio needs the exact values the sampler saw; do not store fp16/bf16")
        for name in ("context", "frames"):
            a = getattr(self, name)
            if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
                raise ValueError(f"ScoredSegment.{name} must be (N, H, W, 3) uint8, got {a.shape} {a.dtype}")
        s = self.log_probs.shape[0] if self.log_probs.ndim == 1 else -1
        if s < 0 or self.latents.ndim != 5 or self.latents.shape[0] != s + 1 or self.timesteps.shape != (s + 1,):
            raise ValueError("ScoredSegment needs latents (S+1, C, T', H', W'), log_probs (S,), timesteps "
                             f"(S+1,); got {self.latents.shape}, {self.log_probs.shape}, {self.timesteps.shape}")
        start, end = self.sde_window
        if not 0 <= start <= end <= s:
            raise ValueError(f"ScoredSegment.sde_window {self.sde_window} is not within [0, {s}]")


class Entry(NamedTuple):
    """What the index keeps per record: where it lies and what sampling filters on."""

    id: int
    shard: int  # first id of the shard file
    offset: int  # of the record's header in the shard
    length: int  # of the payload
    policy_version: int
    reward: float
    created_at: float
    group_id: str


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def encode(rec: ScoredSegment, rid: int) -> bytearray:
    """One framed record: header + payload (see the module docstring)."""
    arrays, table, off = [], [], 0
    for name in ARRAYS:
        a = np.ascontiguousarray(getattr(rec, name))
        off = align(off)
        table.append([name, a.dtype.str, list(a.shape), off])
        arrays.append((off, a))
        off += a.nbytes
    head = dict(id=rid, group_id=str(rec.group_id), prompt=str(rec.prompt), reward=float(rec.reward),
                scores={str(k): float(v) for k, v in rec.scores.items()}, advantage=float(rec.advantage),
                policy_version=int(rec.policy_version), created_at=float(rec.created_at),
                sde_window=[int(rec.sde_window[0]), int(rec.sde_window[1])], meta=rec.meta, arrays=table)
    try:
        hb = json.dumps(head).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"ScoredSegment.meta must be JSON-serialisable: {e}") from None
    base = HEADER.size + align(HEAD_LEN.size + len(hb))  # array area, as an offset in the frame
    frame = bytearray(base + off)
    HEAD_LEN.pack_into(frame, HEADER.size, len(hb))
    frame[HEADER.size + HEAD_LEN.size:HEADER.size + HEAD_LEN.size + len(hb)] = hb
    for o, a in arrays:  # copy each array once, straight into the frame
        np.frombuffer(frame, np.uint8, a.nbytes, base + o)[:] = a.reshape(-1).view(np.uint8)
    payload = memoryview(frame)[HEADER.size:]
    HEADER.pack_into(frame, 0, MAGIC, len(payload), zlib.crc32(payload))
    return frame


def read_head(payload) -> tuple[dict, int]:
    """The JSON head of a payload and where its array area starts."""
    (n,) = HEAD_LEN.unpack_from(payload, 0)
    return json.loads(bytes(payload[HEAD_LEN.size:HEAD_LEN.size + n])), align(HEAD_LEN.size + n)


def decode(payload: memoryview) -> ScoredSegment:
    head, base = read_head(payload)
    arrays = {}
    for name, dtype, shape, off in head.pop("arrays"):
        count = int(np.prod(shape))  # arrays are views of the read buffer: writable, no copy
        arrays[name] = np.frombuffer(payload, np.dtype(dtype), count, base + off).reshape(shape)
    head.pop("id")
    head["sde_window"] = tuple(head["sde_window"])
    return ScoredSegment(**head, **arrays)


def parse(buf, pos: int, size: int, shard: int) -> Entry | None:
    """The index entry of a whole, CRC-valid record at `pos`, or None."""
    if pos + HEADER.size > size:
        return None
    magic, length, crc = HEADER.unpack_from(buf, pos)
    start = pos + HEADER.size
    if magic != MAGIC or length < HEAD_LEN.size or start + length > size:
        return None
    payload = buf[start:start + length]
    if zlib.crc32(payload) != crc:
        return None
    try:
        h, _ = read_head(payload)
        return Entry(h["id"], shard, pos, length, h["policy_version"], h["reward"], h["created_at"], h["group_id"])
    except (ValueError, KeyError, struct.error):
        return None


def scan(path: str, shard: int) -> tuple[list[Entry], int, int]:
    """CRC-check a shard. Returns (entries, end of the last valid record, corrupt records skipped)."""
    size = os.path.getsize(path)
    if size == 0:
        return [], 0, 0
    entries, pos, corrupt = [], 0, 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        while pos < size:
            e = parse(buf, pos, size, shard)
            if e is not None:
                entries.append(e)
                pos += HEADER.size + e.length
                continue
            nxt = buf.find(MAGIC, pos + 1)  # resynchronise on the next whole record, if any
            while nxt != -1 and parse(buf, nxt, size, shard) is None:
                nxt = buf.find(MAGIC, nxt + 1)
            if nxt == -1:
                break  # nothing valid follows: a torn tail
            corrupt, pos = corrupt + 1, nxt
    return entries, pos, corrupt
