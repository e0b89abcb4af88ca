"""The GRPO driver's stages, behind one interface, so launch/grpo.py's loop is the same either way.

    LocalStages   every stage in the driver's process (cluster.mode=local): one model, no sync
    RayStages     the same stages over actors (cluster.mode=ray): N RolloutWorkers, M CriticServers
                  behind a CriticPool, one ReplayStoreActor, a LearnerGroup of K DeepSpeed ranks

Each offers episodes / sample / score / store / learn / sync / evaluate / save / load; the driver
only moves numpy records (and, on Ray, object refs) between them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from actors.replay import ReplayStoreActor
from actors.rollout import RolloutWorker, merge_evaluations, model_device
from spiral_rl.agents.critic import CriticAgent
from spiral_rl.config import config_to_dict
from spiral_rl.grpo import GRPOLearner, GRPOSettings, freeze_except
from spiral_rl.rollout import Samples, to_batch
from spiral_rl.world_model import WorldModel


# --------------------------------------------------------------------------- stages: in one process


class LocalStages:
    """Every stage in this process: the rollout worker shares the learner's model (no sync)."""

    def __init__(self, cfg, out: Path):
        torch.manual_seed(cfg.run.seed)
        # One model serves rollout and learner, so either key asking for a GPU puts it there.
        k = cfg.cluster
        device = model_device(max(k.rollout_gpus, k.learner_gpus), "cluster.rollout_gpus / cluster.learner_gpus")
        self.cfg, self.model = cfg, WorldModel.from_config(cfg).to(device)
        self.worker = RolloutWorker(cfg, model=self.model)
        self.critic = CriticAgent.from_config(cfg)
        self.replay = ReplayStoreActor(str(out / "replay"), cfg.grpo.replay_capacity)
        self.trainable = freeze_except(self.model, cfg.grpo.trainable)
        self.learner = GRPOLearner(self.model, GRPOSettings.from_config(cfg), lr=cfg.grpo.lr,
                                   micro_batch=cfg.cluster.micro_batch)

    def describe(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        return ("in-process: rollout, critic, replay and GRPOLearner share this process and one model"
                + (f"; trains {self.trainable:,} of {total:,} parameters (grpo.trainable={self.cfg.grpo.trainable})"
                   if self.trainable < total else ""))

    def episodes(self, start: int, seeds: list[int]):
        return self.worker.episodes("train", start, seeds)

    def sample(self, prompts, window, seed: int):
        return self.worker.sample(prompts, window, seed)

    def score(self, samples):
        return self.critic.score_batch(*samples.critic_inputs())

    def store(self, groups) -> None:
        self.replay.append_groups(groups)

    def learn(self, records, steps, check_ratio: bool) -> dict:
        batch = to_batch(records, self.model.device)
        batch.steps = steps
        return self.learner.update(batch, check_ratio=check_ratio)

    def sync(self, version: int) -> dict:
        return {}  # one model

    def evaluate(self, split: str, count: int, seed: int) -> dict:
        return self.worker.evaluate(split, 0, count, seed)

    def replay_stats(self) -> dict:
        return self.replay.stats()

    def replay_line(self) -> str:
        return self.replay.log_line()

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        (directory / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.learner.optimizer.state_dict(),
                    "client_state": client_state}, directory / tag / "learner.pt")

    def load(self, directory: Path, tag: str) -> None:
        ckpt = torch.load(directory / tag / "learner.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(ckpt["model"])
        self.learner.optimizer.load_state_dict(ckpt["optimizer"])

    def final_model(self):
        return self.model

    def shutdown(self) -> None:
        self.replay.close()


# --------------------------------------------------------------------------- stages: on Ray actors


class RayStages:
    """The same stages over actors (see actors/): the driver only moves numpy records and refs."""

    def __init__(self, cfg, out: Path):
        import ray  # after set_local_env: Ray reads its environment at import
        from actors.cluster import on_this_node, options, place, start_ray
        from actors.critic import CriticPool, CriticServer
        from actors.learner import LearnerGroup
        self.ray, self.cfg, k = ray, cfg, cfg.cluster
        print(start_ray(cfg), flush=True)
        self.pg, where = place(cfg)
        d = config_to_dict(cfg)
        self.workers = [ray.remote(RolloutWorker).options(**options(self.pg, b, k.rollout_cpus, k.rollout_gpus))
                        .remote(d, i) for i, b in enumerate(where["rollout"])]
        self.critics = [ray.remote(CriticServer).options(**options(self.pg, b, k.critic_cpus)).remote(d)
                        for b in where["critic"]]
        self.replay = ray.remote(ReplayStoreActor).options(**on_this_node()).remote(
            str(out / "replay"), cfg.grpo.replay_capacity)
        self.learners = LearnerGroup(cfg, self.pg, where["learner"])
        self.pool = CriticPool(self.critics, k.critic_timeout_s, k.critic_retries)
        # auto: broadcast between whole GPUs (NCCL needs a device per process), else the object store
        self.learners.connect(self.workers, k.weight_sync if k.weight_sync != "auto" else (
            "broadcast" if k.learner_gpus >= 1 and k.rollout_gpus >= 1 else "object_store"))

    def describe(self) -> str:
        k, info = self.cfg.cluster, self.learners.info[0]
        return (f"actors: {len(self.workers)} rollout worker(s), {len(self.critics)} critic server(s), 1 replay store, "
                f"{k.learner_ranks} learner rank(s) on {info['device']} (ZeRO-{k.zero_stage}, "
                f"{'NCCL' if k.learner_gpus else 'gloo'}, bf16={k.bf16}, offload={k.offload_optimizer}, "
                f"{info['params']:,} params, {info['trainable']:,} trained); "
                f"placement {k.placement} over {self.nodes()} node(s); "
                f"weight sync: {self.learners.sync_mode}")

    def nodes(self) -> int:
        """Nodes the placement group's bundles landed on (multi-node runs: did spread spread?)."""
        return len(set(self.ray.util.placement_group_table(self.pg)["bundles_to_node_id"].values()))

    @staticmethod
    def _split(n: int, parts: int) -> list[tuple[int, int]]:
        """Contiguous (start, stop) ranges of n items over `parts`, sizes differing by at most one."""
        bounds = np.linspace(0, n, parts + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def episodes(self, start: int, seeds: list[int]):
        parts = self.ray.get([w.episodes.remote("train", start + a, seeds[a:b])
                              for w, (a, b) in zip(self.workers, self._split(len(seeds), len(self.workers)))])
        return ([p for prompts, _ in parts for p in prompts],
                {k: [x for _, s in parts for x in s[k]] for k in ("success", "attempts")})

    def sample(self, prompts, window, seed: int):
        parts = self._split(len(prompts), len(self.workers))
        return Samples.concat(self.ray.get([w.sample.remote(prompts[a:b], window, seed + i)
                                            for i, (w, (a, b)) in enumerate(zip(self.workers, parts))]))

    def score(self, samples):
        return self.pool.score(samples)

    def store(self, groups) -> None:
        self.ray.get(self.replay.append_groups.remote(groups))  # acknowledged = durable

    def learn(self, records, steps, check_ratio: bool) -> dict:
        return self.learners.update(records, steps, check_ratio)

    def sync(self, version: int) -> dict:
        return self.learners.sync(version)

    def evaluate(self, split: str, count: int, seed: int) -> dict:
        parts = self._split(count, len(self.workers))
        return merge_evaluations(self.ray.get([w.evaluate.remote(split, a, b - a, seed)
                                               for w, (a, b) in zip(self.workers, parts)]))

    def replay_stats(self) -> dict:
        return self.ray.get(self.replay.stats.remote())

    def replay_line(self) -> str:
        return self.ray.get(self.replay.log_line.remote())

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        self.learners.save(str(directory), tag, client_state)

    def load(self, directory: Path, tag: str) -> None:
        self.learners.load(str(directory), tag)

    def final_model(self):
        state, _ = self.learners.gather_state()
        c = self.cfg  # built, not loaded: every weight comes from the learner
        model = WorldModel(c.model, c.world.segment_frames, c.world.context_frames)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.ray.get(state).items()})
        return model

    def shutdown(self) -> None:
        ray = self.ray
        try:
            ray.get(self.replay.close.remote())
        finally:
            for a in [*self.workers, *self.critics, self.replay]:
                ray.kill(a)
            self.learners.shutdown()
            ray.util.remove_placement_group(self.pg)
            ray.shutdown()
