"""CriticServer replicas and the driver's load balancing over them.

    pool = CriticPool([CriticServer actor handles], timeout_s=120, retries=2)
    verdicts = pool.score(samples)        # one Verdict per sample, in order

The pool cuts a batch into one chunk per server, sends each chunk to the least-loaded server,
and waits with a deadline. A chunk whose call raises, or is still running at the deadline, is
resent to a server that has not failed it yet (the slow call is cancelled) up to `retries` times; after that the pool
raises CriticError naming the chunk and every failure. A chunk is never dropped: either every
sample gets its verdict or the iteration fails loudly. Retries are counted in `pool.stats`.
"""
from __future__ import annotations

import time
from collections import Counter

import ray

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.config import validate


class CriticError(RuntimeError):
    """A batch of segments could not be scored after every retry."""


class CriticServer:
    """Batched scoring with the configured CriticAgent (a Ray actor in cluster.mode=ray)."""

    def __init__(self, cfg):
        self.critic = CriticAgent.from_config(validate(cfg))
        self.calls = 0

    def score_batch(self, frames, sub_actions, memories, next_actions) -> list:
        """CriticAgent.score_batch: (T, H, W, 3) uint8 frames -> Verdicts (numpy-only records)."""
        self.calls += 1
        return self.critic.score_batch(frames, sub_actions, memories, next_actions)


class CriticPool:
    def __init__(self, servers: list, timeout_s: float = 120.0, retries: int = 2):
        if not servers:
            raise ValueError("CriticPool needs at least one CriticServer")
        self.servers, self.timeout_s, self.retries = list(servers), timeout_s, retries
        self.stats = Counter()

    def score(self, samples) -> list:
        """Verdicts of every sample of a rollout.Samples, in order."""
        frames, subs, memories, nexts = samples.critic_inputs()
        n, m = len(frames), len(self.servers)
        size = -(-n // m)
        chunks = [(a, min(a + size, n)) for a in range(0, n, size)]
        results: dict[int, list] = {}
        load = Counter({i: 0 for i in range(m)})
        pending: dict = {}  # ObjectRef -> (chunk index, server index, attempt, deadline)
        failures: dict[int, list[str]] = {}

        tried: dict[int, Counter] = {}  # chunk -> servers that failed it

        def submit(c: int, attempt: int) -> None:
            bad = tried.get(c, Counter())
            s = min(range(m), key=lambda i: (bad[i], load[i], i))  # a server that has not failed it, least loaded
            a, b = chunks[c]
            ref = self.servers[s].score_batch.remote(frames[a:b], subs[a:b], memories[a:b], nexts[a:b])
            load[s] += 1
            pending[ref] = (c, s, attempt, time.monotonic() + self.timeout_s)
            self.stats["calls"] += 1

        def retry(c: int, s: int, attempt: int, why: str) -> None:
            failures.setdefault(c, []).append(f"server {s}: {why}")
            tried.setdefault(c, Counter())[s] += 1
            if attempt >= self.retries:
                a, b = chunks[c]
                raise CriticError(f"critic chunk {c} (segments {a}..{b - 1}) failed {attempt + 1} time(s): "
                                  + "; ".join(failures[c]) + " (cluster.critic_retries / cluster.critic_timeout_s)")
            self.stats["retries"] += 1
            submit(c, attempt + 1)

        for c in range(len(chunks)):
            submit(c, 0)
        while pending:
            wait = max(0.0, min(d for *_, d in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            for ref in ready:
                c, s, attempt, _ = pending.pop(ref)
                load[s] -= 1
                try:
                    results[c] = ray.get(ref)
                except Exception as e:  # noqa: BLE001  (a failed call is retried, then reported)
                    self.stats["failed"] += 1
                    cause = getattr(e, "cause", None) or e  # a RayTaskError carries the actor's exception
                    retry(c, s, attempt, f"{type(cause).__name__}: {cause}")
            now = time.monotonic()
            for ref, (c, s, attempt, deadline) in list(pending.items()):
                if deadline <= now and ref not in ready:
                    pending.pop(ref)
                    load[s] -= 1
                    try:
                        ray.cancel(ref)  # a queued call is dropped; a running one is left to finish unread
                    except Exception:  # noqa: BLE001
                        pass
                    self.stats["timeouts"] += 1
                    retry(c, s, attempt, f"no answer within {self.timeout_s:g} s")
        verdicts = [v for c in range(len(chunks)) for v in results[c]]
        if len(verdicts) != n:
            raise CriticError(f"critic servers returned {len(verdicts)} verdicts for {n} segments")
        return verdicts
