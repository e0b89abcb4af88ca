"""Starting or joining Ray, and placing the actors (one placement group for the whole run).

    start_ray(cfg)                 # join cluster.address / $RAY_ADDRESS, else start a local Ray
    pg, where = place(cfg)         # where["learner"|"rollout"|"critic"] -> bundle indices
    options(pg, index, cpus, gpus) # actor options that pin an actor to its bundle

Bundles, in this order: K learner ranks {CPU: learner_cpus, GPU: learner_gpus}, N rollout
workers {CPU: rollout_cpus, GPU: rollout_gpus}, M critic servers {CPU: critic_cpus}. Strategy
PACK (cluster.placement=pack: as few nodes as possible, NCCL stays on NVLink) or SPREAD. The
replay-store actor is not in the group: it is pinned to the driver's node, which owns
run.output_dir.
"""
from __future__ import annotations

import math
import os
import platform

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
             "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type: for run and benchmark records."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.machine()


def cluster_address(cfg) -> str:
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")


def set_local_env(cfg) -> None:
    """For a local Ray: stay on loopback (DESIGN.md section 7). Call before importing ray."""
    if not cluster_address(cfg):
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)


def cpu_demand(cfg) -> float:
    k = cfg.cluster
    return k.learner_ranks * k.learner_cpus + k.rollout_workers * k.rollout_cpus + k.critic_servers * k.critic_cpus


def start_ray(cfg) -> str:
    """Join the cluster (cluster.address, or $RAY_ADDRESS under `ray job submit`), else start a
    local Ray with as many logical CPUs as the actors ask for (the stages take turns, so they
    may share cores). Returns a line saying which."""
    import ray
    address = cluster_address(cfg)
    if address:
        ray.init(address=address)
        return f"joined Ray at {address}: {ray.cluster_resources()}"
    cpus = max(os.cpu_count() or 1, math.ceil(cpu_demand(cfg)))
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": dict(LOCAL_ENV)})
    return f"started a local Ray ({cpus} logical CPUs on {os.cpu_count()} cores)"


def bundles(cfg) -> tuple[list[dict], dict[str, list[int]]]:
    k = cfg.cluster

    def res(cpus: float, gpus: float) -> dict:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    roles = [("learner", k.learner_ranks, res(k.learner_cpus, k.learner_gpus)),
             ("rollout", k.rollout_workers, res(k.rollout_cpus, k.rollout_gpus)),
             ("critic", k.critic_servers, res(k.critic_cpus, 0))]
    out, where = [], {}
    for role, n, r in roles:
        where[role] = list(range(len(out), len(out) + n))
        out += [dict(r) for _ in range(n)]
    return out, where


def place(cfg, timeout_s: float = 300):
    """Create and wait for the run's placement group; fail naming the keys when it cannot fit."""
    import ray
    from ray.util.placement_group import placement_group
    spec, where = bundles(cfg)
    pg = placement_group(spec, strategy="PACK" if cfg.cluster.placement == "pack" else "SPREAD", name="spiral_rl")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"the placement group {spec} did not fit within {timeout_s:.0f} s; the cluster has "
            f"{ray.cluster_resources()}. Lower cluster.learner_ranks / rollout_workers / critic_servers or their "
            "*_cpus / *_gpus, or add nodes") from None
    return pg, where


def options(pg, index: int, cpus: float, gpus: float = 0.0) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return {"num_cpus": cpus, "num_gpus": gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


def on_this_node() -> dict:
    """Actor options pinning an actor to the caller's node (the replay store next to run.output_dir)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)}
