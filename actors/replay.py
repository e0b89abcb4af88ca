"""ReplayStoreActor: the durable replay store (spiral_rl.replay) as one actor.

One writer process owns the store's directory (its LOCK enforces that), so every append, sample
and stats call goes through this actor, which serialises them. The driver pins it to its own node
(run.output_dir must be on that node, or on storage every node sees). Appends are acknowledged
only after fsync, exactly as in-process. A plain class: launch/grpo.py also uses it in-process.
"""
from __future__ import annotations

from spiral_rl.replay import ReplayStore, ScoredSegment


class ReplayStoreActor:
    def __init__(self, path: str, capacity: int | None):
        self.store = ReplayStore(path, capacity=capacity)

    def append_groups(self, groups: list[list[ScoredSegment]]) -> list[list[int]]:
        """Each group as one durable batch (one fsync; eviction never splits a group); returns ids."""
        return [self.store.append_many(g) for g in groups]

    def latest_groups(self, n_groups: int, policy_window: int | None = None, min_size: int = 1):
        return self.store.latest_groups(n_groups, policy_window=policy_window, min_size=min_size)

    def stats(self) -> dict:
        return self.store.stats()

    def log_line(self) -> str:
        return self.store.log_line()

    def close(self) -> None:
        self.store.close()
