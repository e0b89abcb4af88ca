"""Replay store: a durable, append-only store of scored segments for GRPO.

On disk, one directory owned by one writer process:
    LOCK                    flock'ed by the writer, so a second writer fails at open, not later
    shard-000000000000.bin  records, append-only; the number is the id of the shard's first record
    shard-000000000000.idx  JSON index of a sealed shard, written once when the next shard starts
A record is framed as described in replay_format.py: a length + CRC header, a JSON head, raw
64-byte-aligned arrays.

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
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from spiral_rl.replay_format import (HEADER, MAGIC, CorruptRecordError, Entry, ScoredSegment, decode, encode,
                                     scan)

__all__ = ["ReplayStore", "ScoredSegment", "CorruptRecordError"]

_sync = getattr(os, "fdatasync", os.fsync)  # data + size, without an mtime-only metadata write


@dataclass
class _Shard:
    size: int
    ids: list[int]


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
        self._index: dict[int, Entry] = {}  # id -> entry, oldest first
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
                entries, end, corrupt = scan(path, first)
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

    def _load_idx(self, first: int, size: int) -> list[Entry] | None:
        """A sealed shard's index, or None when missing or stale (then the shard is scanned)."""
        try:
            with open(self._file(first, "idx")) as f:
                data = json.load(f)
            if data["shard_bytes"] != size:
                return None
            return [Entry(r[0], first, *r[1:]) for r in data["rows"]]
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
        blobs = [encode(r, i) for r, i in zip(records, ids)]
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
            self._index[i] = Entry(i, self._active, offset, len(b) - HEADER.size, int(r.policy_version),
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
        return decode(payload)

    def _eligible(self, policy_window: int | None, recency: int | None,
                  current_version: int | None) -> list[Entry]:
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
        members: dict[str, list[Entry]] = {}
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
