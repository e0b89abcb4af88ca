"""RolloutWorker: the planner, a critic for the loop's own verdicts, and an inference copy of the
world model; runs closed-loop episodes, SDE groups and evaluations for the driver.

A plain class: launch/grpo.py runs it in-process (cluster.mode=local, sharing the learner's
model) or as a Ray actor (`ray.remote(RolloutWorker)`, cluster.mode=ray). Everything it returns
is numpy records (Prompt, rollout.Samples, summaries), never torch tensors. The closed loop's
retry / re-plan decisions use the worker's own builtin critic (cheap, and one remote call per
segment would cost more than it); the GRPO groups are scored by the CriticServers.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from actors.weight_sync import BroadcastGroup, load_numpy_state, verify
from spiral_rl.agents.critic import CriticAgent
from spiral_rl.agents.planner import PlanAgent
from spiral_rl.config import validate
from spiral_rl.evaluate import evaluate
from spiral_rl.loop import ClosedLoop, LoopSettings
from spiral_rl.memory import WorldMemory
from spiral_rl.records import SCORE_DIMS, Prompt
from spiral_rl.rollout import GroupSettings, ModelGenerator, Samples, prompts_from_episodes, sample_sde
from spiral_rl.world.tasks import TaskSampler
from spiral_rl.world_model import WorldModel


def loop_settings(cfg) -> LoopSettings:
    return LoopSettings("spiral", cfg.loop.max_retries, cfg.loop.max_replans, cfg.model.guidance)


def group_settings(cfg) -> GroupSettings:
    g = cfg.grpo
    return GroupSettings(g.group_size, g.sample_steps, g.noise_level, g.window, g.train_steps, cfg.model.guidance,
                         g.shared_noise, cfg.cluster.rollout_micro_batch)


def model_device(gpus: float, key: str) -> str:
    """Where a role's model lives: 'cuda' for a GPU share (gpus > 0), else 'cpu'. key: the config
    key(s) that asked, for the error when torch sees no GPU (a CPU build, CUDA_VISIBLE_DEVICES)."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"{key}={gpus:g} asks for a GPU, but torch sees none (torch {torch.__version__}); "
                           "set it to 0 to run on the CPU")
    return "cuda"


class RolloutWorker:
    def __init__(self, cfg, index: int = 0, model: WorldModel | None = None):
        """cfg: a Config or its dict; model: share an existing model (in-process use), else build
        one from cfg (model.pretrained_path) on this actor's device."""
        self.cfg = cfg = validate(cfg)
        self.index, self.version = index, 0
        if model is None:
            torch.set_num_threads(max(1, int(cfg.cluster.rollout_cpus)))
            device = model_device(cfg.cluster.rollout_gpus, "cluster.rollout_gpus")
            torch.manual_seed(cfg.run.seed)
            model = WorldModel.from_config(cfg).to(device)
        self.model = model
        self.planner, self.critic = PlanAgent.from_config(cfg), CriticAgent.from_config(cfg)
        self.sampler = TaskSampler(cfg.world)
        self.generator = ModelGenerator(model)
        self.sync_group: BroadcastGroup | None = None

    def episodes(self, split: str, start: int, seeds: list[int]) -> tuple[list[Prompt], dict]:
        """Closed-loop episodes on tasks start .. start + len(seeds) - 1 of `split`; returns the
        GRPO prompts they yield and per-episode success / attempts per step."""
        self.model.eval()
        loop = ClosedLoop(self.planner, self.critic, self.generator, loop_settings(self.cfg))
        tasks = self.sampler.tasks(split, len(seeds), start=start)
        eps = loop.run_many([(t, WorldMemory.from_task(t, self.cfg), int(s)) for t, s in zip(tasks, seeds)],
                            self.cfg.loop.episode_batch)
        return prompts_from_episodes(eps), {"success": [e.success for e in eps],
                                            "attempts": [len(s.attempts) for e in eps for s in e.steps]}

    def sample(self, prompts: list[Prompt], window: tuple[int, int], seed: int) -> Samples:
        """G SDE samples per prompt, all in the driver's shared window."""
        self.model.eval()
        return sample_sde(self.model, prompts, group_settings(self.cfg), np.random.default_rng(seed), window)

    def evaluate(self, split: str, start: int, count: int, seed: int) -> dict:
        """{mode: summary} over tasks start .. start + count - 1, seeded as spiral_rl.evaluate
        seeds the whole list (task i gets seed + 10_000 i), so splitting over workers changes nothing."""
        self.model.eval()
        tasks = self.sampler.tasks(split, count, start=start)
        return evaluate(self.planner, self.critic, self.generator, tasks, self.cfg, loop_settings(self.cfg),
                        seed=seed + 10_000 * start)

    # ------------------------------------------------------------------ weights in

    def load_weights(self, state: dict[str, np.ndarray], manifest: dict, version: int) -> dict:
        """Object-store sync: copy the learner's state dict in, then verify the model's own
        parameters against the learner's manifest (raises WeightSyncError on any difference)."""
        t0 = time.perf_counter()
        params = load_numpy_state(self.model, state)
        info = verify(manifest, params)
        self.version = version
        return {**info, "worker": self.index, "version": version, "seconds": time.perf_counter() - t0}

    def join_sync_group(self, host: str, port: int, size: int) -> None:
        """Broadcast sync: become rank 1 + index of the learner rank 0's weight-broadcast group."""
        self.sync_group = BroadcastGroup(host, port, 1 + self.index, size, self.model.device)

    def receive_weights(self, version: int) -> dict:
        """Broadcast sync: receive every bucket into the model, verify against the sent manifest."""
        info = self.sync_group.receive(self.model, int(self.cfg.cluster.sync_bucket_mb * 2**20))
        self.version = version
        return {**info, "worker": self.index, "version": version}

    def weights(self) -> dict[str, np.ndarray]:
        """The model's parameters as numpy (tests compare them with the learner's)."""
        return {k: v.detach().cpu().numpy() for k, v in self.model.named_parameters()}


def merge_evaluations(parts: list[dict]) -> dict:
    """Join per-worker {mode: summary} results: success over tasks, the rest over steps."""
    out = {}
    for mode in parts[0]:
        rows = [p[mode] for p in parts]
        tasks, steps = sum(r["tasks"] for r in rows), sum(r["steps"] for r in rows)
        m = {"tasks": tasks, "steps": steps,
             "success_rate": sum(r["success_rate"] * r["tasks"] for r in rows) / max(tasks, 1)}
        for key in ("attempts_per_step", *SCORE_DIMS):
            m[key] = sum(r[key] * r["steps"] for r in rows) / max(steps, 1)
        done = {}  # verb -> [steps, completeness summed over them]
        for r in rows:
            for verb, v in r.get("by_verb", {}).items():
                acc = done.setdefault(verb, [0, 0.0])
                acc[0] += v["steps"]
                acc[1] += v["action_completeness"] * v["steps"]
        m["by_verb"] = {verb: {"steps": n, "action_completeness": total / n}
                        for verb, (n, total) in sorted(done.items())}
        out[mode] = m
    return out
