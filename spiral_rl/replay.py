"""Replay store: a durable, append-only store of scored segments for GRPO.

On disk, one directory owned by one writer process:
    LOCK                    flock'ed by the writer, so a second writer fails at open, not later
    shard-000000000000.bin  records, append-only; the number is the id of the shard's first record
    shard-000000000000.idx  JSON index of a sealed shard, written once when the next shard starts
A record is framed as
    header  16 B : magic b"SRB1" | payload length (u64 LE) | CRC32 of the payload (u32 LE)
    payload      : head length (u32 LE) | head: UTF-8 JSON (id, scalars, meta, array table)
                   | raw C-order array bytes, each at a 64-byte-aligned offset of the array area
The length + CRC frame tells a whole record from a torn one without trusting any index; raw bytes
plus a JSON table read back without parsing (np.frombuffer, no copy).

Durability: `append` returns only after its bytes are written and fdatasync'ed, so an acknowledged
record survives a process or machine crash; creating or deleting a shard fsyncs the directory. On
open, the last shard (and any shard without a valid .idx) is CRC-checked; a torn tail (a record
cut by a crash mid-write, hence never acknowledged) is truncated and counted in
stats()["torn_bytes"]. A torn record is never returned; acknowledged ids are never reused.

Corruption: a record inside a shard whose CRC fails (bit rot, a stray write) is skipped by the
scan, which resynchronises on the next valid record, and counted in stats()["corrupt"]; `get`
re-checks the CRC on every read and raises CorruptRecordError. A bad byte thus costs one record,
never the store, and is reported, never returned. (A full-length last record with a bad CRC looks
exactly like a torn write, so it is truncated as torn.)

Capacity is enforced by whole shards: while over `capacity` records (or `max_bytes`), the oldest
shard file is deleted. The active shard is never evicted, so keep `shard_bytes` well below the
capacity. A batch from `append_many` lands in one shard: append each GRPO group as one batch and
eviction never splits a group.

Concurrency: one writer process, no internal locks (the Ray actor wrapping it serialises calls).
"""
from __future__ import annotations

import fcntl
import json
import math
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple

import numpy as np

MAGIC = b"SRB1"
HEADER = struct.Struct("<4sQI")  # magic, payload length, CRC32 of payload
HEAD_LEN = struct.Struct("<I")
ALIGN = 64
ARRAYS = ("context", "frames", "latents", "log_probs", "timesteps")
FP32 = ("latents", "log_probs", "timesteps")
_sync = getattr(os, "fdatasync", os.fsync)  # data + size, without an mtime-only metadata write


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


class _Entry(NamedTuple):
    """What the index keeps per record: where it lies and what sampling filters on."""

    id: int
    shard: int  # first id of the shard file
    offset: int  # of the record's header in the shard
    length: int  # of the payload
    policy_version: int
    reward: float
    created_at: float
    group_id: str


@dataclass
class _Shard:
    size: int
    ids: list[int]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _encode(rec: ScoredSegment, rid: int) -> bytearray:
    """One framed record: header + payload (see the module docstring)."""
    arrays, table, off = [], [], 0
    for name in ARRAYS:
        a = np.ascontiguousarray(getattr(rec, name))
        off = _align(off)
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
    base = HEADER.size + _align(HEAD_LEN.size + len(hb))  # array area, as an offset in the frame
    frame = bytearray(base + off)
    HEAD_LEN.pack_into(frame, HEADER.size, len(hb))
    frame[HEADER.size + HEAD_LEN.size:HEADER.size + HEAD_LEN.size + len(hb)] = hb
    for o, a in arrays:  # copy each array once, straight into the frame
        np.frombuffer(frame, np.uint8, a.nbytes, base + o)[:] = a.reshape(-1).view(np.uint8)
    payload = memoryview(frame)[HEADER.size:]
    HEADER.pack_into(frame, 0, MAGIC, len(payload), zlib.crc32(payload))
    return frame


def _head(payload) -> tuple[dict, int]:
    """The JSON head of a payload and where its array area starts."""
    (n,) = HEAD_LEN.unpack_from(payload, 0)
    return json.loads(bytes(payload[HEAD_LEN.size:HEAD_LEN.size + n])), _align(HEAD_LEN.size + n)


def _decode(payload: memoryview) -> ScoredSegment:
    head, base = _head(payload)
    arrays = {}
    for name, dtype, shape, off in head.pop("arrays"):
        count = int(np.prod(shape))  # arrays are views of the read buffer: writable, no copy
        arrays[name] = np.frombuffer(payload, np.dtype(dtype), count, base + off).reshape(shape)
    head.pop("id")
    head["sde_window"] = tuple(head["sde_window"])
    return ScoredSegment(**head, **arrays)


def _parse(buf, pos: int, size: int, shard: int) -> _Entry | None:
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
        h, _ = _head(payload)
        return _Entry(h["id"], shard, pos, length, h["policy_version"], h["reward"], h["created_at"], h["group_id"])
    except (ValueError, KeyError, struct.error):
        return None


def _scan(path: str, shard: int) -> tuple[list[_Entry], int, int]:
    """CRC-check a shard. Returns (entries, end of the last valid record, corrupt records skipped)."""
    size = os.path.getsize(path)
    if size == 0:
        return [], 0, 0
    entries, pos, corrupt = [], 0, 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        while pos < size:
            e = _parse(buf, pos, size, shard)
            if e is not None:
                entries.append(e)
                pos += HEADER.size + e.length
                continue
            nxt = buf.find(MAGIC, pos + 1)  # resynchronise on the next whole record, if any
            while nxt != -1 and _parse(buf, nxt, size, shard) is None:
                nxt = buf.find(MAGIC, nxt + 1)
            if nxt == -1:
                break  # nothing valid follows: a torn tail
            corrupt, pos = corrupt + 1, nxt
    return entries, pos, corrupt


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReplayStore:
    """Durable, bounded store of ScoredSegments; see the module docstring for format and guarantees."""

    def __init__(self, path: str, capacity: int | None = 100_000, max_bytes: int | None = None,
                 shard_bytes: int = 64 << 20, verify: bool = False):
        """capacity: most records kept; max_bytes: most bytes kept (either may be None);
        shard_bytes: roll over to a new shard file past this size; verify: CRC-check every shard on
        open, not only those without a valid index."""
        self.path, self.capacity, self.max_bytes, self.shard_bytes = path, capacity, max_bytes, shard_bytes
        os.makedirs(path, exist_ok=True)
        self._lock = open(os.path.join(path, "LOCK"), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"replay store {path} is open in another writer (single writer only)") from None
        self._index: dict[int, _Entry] = {}  # id -> entry, oldest first
        self._shards: dict[int, _Shard] = {}  # first id -> shard, oldest first; the last is active
        self._readers: dict[int, int] = {}  # first id -> read-only fd
        self.counters = dict(inserts=0, samples=0, evicted=0, evicted_shards=0, torn_bytes=0, corrupt=0,
                             written_bytes=0, append_s=0.0)
        self._next_id = 0
        self._recover(verify)
        self._w = os.open(self._file(self._active), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    # ---- files and recovery -------------------------------------------------------------------
    def _file(self, first: int, ext: str = "bin") -> str:
        return os.path.join(self.path, f"shard-{first:012d}.{ext}")

    @property
    def _active(self) -> int:
        return next(reversed(self._shards))

    def _recover(self, verify: bool) -> None:
        names = os.listdir(self.path)
        firsts = sorted(int(n[6:-4]) for n in names if n.startswith("shard-") and n.endswith(".bin"))
        for n in names:  # leftovers of a crash during seal or eviction
            if n.endswith(".tmp") or (n.endswith(".idx") and int(n[6:-4]) not in firsts):
                os.remove(os.path.join(self.path, n))
        for i, first in enumerate(firsts):
            path, last = self._file(first), i == len(firsts) - 1
            size = os.path.getsize(path)
            entries = None if (verify or last) else self._load_idx(first, size)
            scanned = entries is None
            if scanned:
                entries, end, corrupt = _scan(path, first)
                self.counters["corrupt"] += corrupt
                if end < size:  # torn tail: never acknowledged, so dropping it loses nothing
                    with open(path, "r+b") as f:
                        f.truncate(end)
                        os.fsync(f.fileno())
                    self.counters["torn_bytes"] += size - end
                    size = end
            self._shards[first] = _Shard(size, [e.id for e in entries])
            self._index.update((e.id, e) for e in entries)
            if scanned and not last:  # so the next open need not scan this sealed shard again
                self._write_idx(first)
            self._next_id = max(self._next_id, first, entries[-1].id + 1 if entries else 0)
        if not self._shards:
            self._new_shard(0)

    def _load_idx(self, first: int, size: int) -> list[_Entry] | None:
        """A sealed shard's index, or None when missing or stale (then the shard is scanned)."""
        try:
            with open(self._file(first, "idx")) as f:
                data = json.load(f)
            if data["shard_bytes"] != size:
                return None
            return [_Entry(r[0], first, *r[1:]) for r in data["rows"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_idx(self, first: int) -> None:
        shard, tmp = self._shards[first], self._file(first, "idx.tmp")
        rows = [[e.id, e.offset, e.length, e.policy_version, e.reward, e.created_at, e.group_id]
                for e in (self._index[i] for i in shard.ids)]
        with open(tmp, "w") as f:  # write-then-rename: a reader sees the old index or the whole new one
            json.dump({"shard_bytes": shard.size, "rows": rows}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file(first, "idx"))
        _fsync_dir(self.path)

    def _new_shard(self, first: int) -> None:
        os.close(os.open(self._file(first), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        _fsync_dir(self.path)  # the new file's name must survive a crash, not only its bytes
        self._shards[first] = _Shard(0, [])

    def _reader(self, first: int) -> int:
        if first not in self._readers:
            self._readers[first] = os.open(self._file(first), os.O_RDONLY)
        return self._readers[first]

    # ---- writing ------------------------------------------------------------------------------
    def append(self, record: ScoredSegment) -> int:
        """Store one record durably (written and fsync'ed before returning); returns its id."""
        return self.append_many([record])[0]

    def append_many(self, records: Iterable[ScoredSegment]) -> list[int]:
        """Store a batch with one fsync; the batch lands in one shard (so a group is never split)."""
        t0, records = time.perf_counter(), list(records)
        for r in records:
            r.validate()
        if not records:
            return []
        ids = list(range(self._next_id, self._next_id + len(records)))
        blobs = [_encode(r, i) for r, i in zip(records, ids)]
        total = sum(map(len, blobs))
        if self._shards[self._active].size and self._shards[self._active].size + total > self.shard_bytes:
            self._roll(ids[0])
        shard = self._shards[self._active]
        start = shard.size
        try:
            view = memoryview(blobs[0] if len(blobs) == 1 else b"".join(blobs))
            while view:  # os.write may write less than asked
                view = view[os.write(self._w, view):]
            _sync(self._w)  # the acknowledgement: nothing returns before the bytes are on disk
        except BaseException:
            os.ftruncate(self._w, start)  # leave no torn record behind a failed write
            raise
        offset = start
        for r, i, b in zip(records, ids, blobs):
            self._index[i] = _Entry(i, self._active, offset, len(b) - HEADER.size, int(r.policy_version),
                                    float(r.reward), float(r.created_at), str(r.group_id))
            offset += len(b)
        shard.size, self._next_id = offset, ids[-1] + 1
        shard.ids.extend(ids)
        self.counters["inserts"] += len(ids)
        self.counters["written_bytes"] += total
        self._evict()
        self.counters["append_s"] += time.perf_counter() - t0
        return ids

    def _roll(self, first: int) -> None:
        """Seal the active shard (write its index) and start a new one whose name is `first`."""
        self._write_idx(self._active)
        os.close(self._w)
        self._new_shard(first)
        self._w = os.open(self._file(first), os.O_WRONLY | os.O_APPEND)

    def _evict(self) -> None:
        """Delete the oldest whole shards while over capacity; the active shard always stays."""
        while len(self._shards) > 1 and (
                (self.capacity is not None and len(self._index) > self.capacity)
                or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            first = next(iter(self._shards))
            shard = self._shards.pop(first)
            if first in self._readers:
                os.close(self._readers.pop(first))
            for ext in ("idx", "bin"):  # index first: a shard without one is just rescanned
                if os.path.exists(self._file(first, ext)):
                    os.remove(self._file(first, ext))
            _fsync_dir(self.path)
            for i in shard.ids:
                del self._index[i]
            self.counters["evicted"] += len(shard.ids)
            self.counters["evicted_shards"] += 1

    # ---- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def ids(self) -> list[int]:
        """Ids of the records held, oldest first."""
        return list(self._index)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self._shards.values())

    def get(self, rid: int) -> ScoredSegment:
        """Read one record, CRC-checked; KeyError if absent, CorruptRecordError if its bytes changed."""
        e = self._index.get(rid)
        if e is None:
            raise KeyError(f"record {rid} is not in the replay store (evicted, corrupt or never written)")
        buf = bytearray(HEADER.size + e.length)
        n = os.preadv(self._reader(e.shard), [buf], e.offset)
        magic, length, crc = HEADER.unpack_from(buf)
        payload = memoryview(buf)[HEADER.size:]
        if n != len(buf) or magic != MAGIC or length != e.length or zlib.crc32(payload) != crc:
            raise CorruptRecordError(f"record {rid} in {self._file(e.shard)} at byte {e.offset} fails its "
                                     "length/CRC check; the file changed after it was written")
        return _decode(payload)

    def _eligible(self, policy_window: int | None, recency: int | None,
                  current_version: int | None) -> list[_Entry]:
        entries = list(self._index.values())
        if recency is not None:
            entries = entries[-recency:] if recency > 0 else []
        if policy_window is not None and self._index:
            cur = current_version if current_version is not None else \
                max(e.policy_version for e in self._index.values())
            entries = [e for e in entries if e.policy_version >= cur - policy_window]
        return entries

    def sample(self, n: int, rng: np.random.Generator, policy_window: int | None = None,
               recency: int | None = None, current_version: int | None = None) -> list[ScoredSegment]:
        """n distinct records, uniformly among the eligible ones: the last `recency` records and/or
        those with policy_version >= current_version - policy_window (current_version defaults to
        the newest stored). Raises ValueError when fewer than n are eligible."""
        entries = self._eligible(policy_window, recency, current_version)
        if n > len(entries):
            raise ValueError(f"asked for {n} records but only {len(entries)} of {len(self)} are eligible "
                             f"(policy_window={policy_window}, recency={recency})")
        picks = [self.get(entries[i].id) for i in rng.choice(len(entries), size=n, replace=False)]
        self.counters["samples"] += n
        return picks

    def latest_groups(self, n_groups: int, policy_window: int | None = None,
                      current_version: int | None = None, min_size: int = 1) -> list[list[ScoredSegment]]:
        """The n_groups most recent groups (by their newest member), newest first, each complete: all
        its stored members in id order. Groups smaller than min_size or with a member outside the
        policy window are skipped. Raises ValueError when fewer groups qualify."""
        members: dict[str, list[_Entry]] = {}
        for e in reversed(self._index.values()):  # newest first: dict order ranks groups by recency
            members.setdefault(e.group_id, []).append(e)
        window = {e.id for e in self._eligible(policy_window, None, current_version)}
        groups = [g[::-1] for g in members.values() if len(g) >= min_size and all(e.id in window for e in g)]
        if n_groups > len(groups):
            raise ValueError(f"asked for {n_groups} groups but only {len(groups)} qualify "
                             f"(policy_window={policy_window}, min_size={min_size})")
        out = [[self.get(e.id) for e in g] for g in groups[:n_groups]]
        self.counters["samples"] += sum(map(len, out))
        return out

    # ---- health -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since open (inserts, samples, evicted, ...) plus what the store holds now."""
        versions = [e.policy_version for e in self._index.values()]
        oldest = next(iter(self._index.values()), None)
        c = self.counters
        return dict(records=len(self), bytes=self.nbytes, shards=len(self._shards), next_id=self._next_id,
                    oldest_version=min(versions) if versions else None,
                    newest_version=max(versions) if versions else None,
                    oldest_age_s=time.time() - oldest.created_at if oldest else None,
                    write_mb_s=c["written_bytes"] / 1e6 / c["append_s"] if c["append_s"] else None, **c)

    def log_line(self) -> str:
        s = self.stats()
        age = f"{s['oldest_age_s']:.0f}s" if s["oldest_age_s"] is not None else "-"
        rate = f"{s['write_mb_s']:.0f} MB/s" if s["write_mb_s"] is not None else "-"
        return (f"replay: {s['records']} rec, {s['bytes'] / 2**20:.1f} MiB in {s['shards']} shards | "
                f"+{s['inserts']} inserted ({rate}), {s['samples']} sampled, {s['evicted']} evicted | "
                f"policy v{s['oldest_version']}..v{s['newest_version']}, oldest {age} | "
                f"torn {s['torn_bytes']} B, corrupt {s['corrupt']}")

    def close(self) -> None:
        """Close files and release the writer lock; every appended record is already durable."""
        if self._w is None:
            return
        for fd in [self._w, *self._readers.values()]:
            os.close(fd)
        self._w, self._readers = None, {}
        self._lock.close()

    def __enter__(self) -> "ReplayStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
