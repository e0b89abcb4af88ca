"""The learner group: K Ray actors, one DeepSpeed ZeRO engine each, running the GRPO update.

    group = LearnerGroup(cfg, bundles)           # K LearnerRank actors; torch.distributed set up by the group
    stats = group.update(records, steps, check_ratio=True)   # records split evenly over the ranks
    group.connect(rollout_workers, "object_store")   # or "broadcast" (bucketed; NCCL on GPU, gloo on CPU)
    group.sync(version)                          # learner weights -> workers, verified on arrival
    group.save(dir, "iter000010", client_state); group.load(dir, "iter000010")

Each rank takes an equal, contiguous share of the step's segments, cuts it into micro-batches of
cluster.micro_batch, and for every (micro-batch, trained denoising step) runs `grpo.step_loss`, the
same function GRPOLearner uses, then `engine.backward` + `engine.step`. DeepSpeed's gradient
accumulation (micro-batches x steps, scaled by 1 / accumulation) and its data-parallel average
(1 / K) make the gradient the mean over all segments and steps: the single-process update, up to
float reduction order (tests/test_distributed_learner.py states the tolerance). Clipping
(grpo.max_grad_norm) and AdamW (grpo.lr, betas 0.9 / 0.999, eps 1e-8, no weight decay) match
GRPOLearner's. The first-ratio guard is checked on every rank after an all-reduce of the worst
deviation, so all ranks refuse together instead of one rank leaving the others in a collective.

The engine wraps `PolicyStep`, a module whose forward is one step's loss, so ZeRO-3 gathers the
world model's partitioned weights inside a forward, as it expects. The frozen reference is a full
copy on every rank (none when grpo.kl_coef is 0). Checkpoints are DeepSpeed's, with an explicit
tag (never "latest": DeepSpeed writes a file of that name pointing to the newest tag).
"""
from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from contextlib import nullcontext

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch import nn

from actors.weight_sync import BroadcastGroup, manifest
from spiral_rl.config import validate
from spiral_rl.grpo import GRPOSettings, check_batch, check_first_ratio, freeze_except, make_reference, step_loss
from spiral_rl.rollout import grpo_batch_plan, to_batch
from spiral_rl.world_model import WorldModel

# combined over ranks by max (the slowest rank, the worst deviation), the rest by mean
MAX_STATS = ("ratio_max_dev", "first_ratio_max_dev", "seconds", "peak_memory_gib")


class PolicyStep(nn.Module):
    """What the DeepSpeed engine wraps: the world model, with one GRPO step's loss as forward."""

    def __init__(self, model: WorldModel):
        super().__init__()
        self.model = model

    def forward(self, batch, i: int, reference: WorldModel, settings: GRPOSettings):
        return step_loss(self.model, reference, batch, i, settings)


def deepspeed_config(cfg) -> dict:
    """The engine config: batch bookkeeping from grpo_batch_plan, optimizer and clipping as GRPOLearner."""
    g, k, plan = cfg.grpo, cfg.cluster, grpo_batch_plan(cfg)
    zero: dict = {"stage": k.zero_stage}
    if k.zero_stage == 3:  # small models: gather whole layers rather than prefetch-tune
        zero |= {"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False}
    if k.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": k.learner_gpus > 0}
    return {
        "train_micro_batch_size_per_gpu": plan["micro_batch"],
        "gradient_accumulation_steps": plan["grad_accumulation"],
        "train_batch_size": plan["micro_batch"] * plan["grad_accumulation"] * plan["learner_ranks"],
        # torch_adam: torch's AdamW, as GRPOLearner, and no JIT-compiled kernel.
        "optimizer": {"type": "AdamW", "params": {"lr": g.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.0, "torch_adam": True}},
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": g.max_grad_norm,
        "bf16": {"enabled": k.bf16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerRank:
    """One rank of the learner group (a Ray actor, created by LearnerGroup)."""

    def __init__(self, cfg: dict, rank: int, world_size: int):
        self.cfg = validate(cfg)
        self.rank, self.world_size = rank, world_size
        threads = max(1, int(self.cfg.cluster.learner_cpus))
        torch.set_num_threads(threads)
        self.device = torch.device("cuda", 0) if self.cfg.cluster.learner_gpus > 0 else torch.device("cpu")
        self.engine = None
        self.sync_group: BroadcastGroup | None = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 hosts the rendezvous (and the weight-sync store): this node's IP and a free port."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> dict:
        """torch.distributed (gloo on CPU, NCCL on GPU), then the world model, its reference and the engine."""
        import deepspeed
        import deepspeed.comm.torch as ds_comm
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        # DeepSpeed's CPU backend JIT-loads a shared-memory all-reduce op that only its inference
        # path uses; loading it takes a file lock in ~/.cache/torch_extensions that a process killed
        # at the wrong moment leaves behind, and every later init then waits forever. Training
        # needs none of it: skip the op.
        ds_comm.build_shm_op = lambda: None
        # DeepSpeed's ZeRO collectives call torch APIs that torch 2.13 marks deprecated, every step.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        cfg = self.cfg
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=self.rank,
                                world_size=self.world_size, init_method=f"tcp://{master_addr}:{master_port}")
        torch.manual_seed(cfg.run.seed)  # identical weights on every rank when no checkpoint is given
        model = WorldModel.from_config(cfg).to(self.device)
        self.settings = GRPOSettings.from_config(cfg)
        self.reference = make_reference(model, self.settings)
        self.plan = grpo_batch_plan(cfg)
        trainable = freeze_except(model, cfg.grpo.trainable)
        module = PolicyStep(model)
        trained = [p for p in module.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trained,
                                                    config=deepspeed_config(cfg), dist_init_required=False)
        return {"rank": self.rank, "device": str(self.device),
                "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()), "trainable": trainable,
                "zero_stage": cfg.cluster.zero_stage, "threads": torch.get_num_threads()}

    # ------------------------------------------------------------------ the update

    def update(self, records: list, steps: list[int], check_ratio: bool) -> dict:
        """One optimizer step on this rank's share of the segments (every rank calls it together)."""
        t0 = time.perf_counter()
        if len(records) != self.plan["per_rank_batch"]:
            raise ValueError(f"rank {self.rank} got {len(records)} segments; the config's per-rank batch is "
                             f"{self.plan['per_rank_batch']} (see the derived quantities printed at start)")
        batch = to_batch(records, self.device)
        batch.steps = list(steps)
        check_batch(batch)
        micro = batch.micro_batches(self.plan["micro_batch"])
        n = len(micro) * len(steps)
        if n != self.plan["grad_accumulation"]:
            raise ValueError(f"{n} backward passes per update, but the engine accumulates "
                             f"{self.plan['grad_accumulation']}: trained steps {steps} do not match the config")
        amp = torch.autocast(self.device.type, torch.bfloat16) if self.cfg.cluster.bf16 else nullcontext()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.engine.train()
        totals: dict[str, float] = {}
        for mb in micro:
            for t, i in enumerate(steps):
                with amp:
                    loss, stats = self.engine(mb, i, self.reference, self.settings)
                if t == 0:
                    worst = torch.tensor([stats["ratio_max_dev"]], dtype=torch.float64, device=self.device)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                    if check_ratio:
                        check_first_ratio(float(worst), self.settings)  # every rank raises, none is left waiting
                    totals["first_ratio_max_dev"] = max(totals.get("first_ratio_max_dev", 0.0), float(worst))
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v / n
        norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(norm) if norm is not None else float("nan")
        totals["seconds"] = time.perf_counter() - t0
        if self.device.type == "cuda":
            totals["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return totals

    # ------------------------------------------------------------------ weights out

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights, whole (a collective under ZeRO: every rank calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param
        state = {}
        for name, p in self.engine.module.model.named_parameters():
            full = safe_get_full_fp32_param(p)
            state[name] = (full if full is not None else p.data).detach().float()
        return state

    def gather_state(self, bucket_mb: float) -> tuple[dict | None, dict | None]:
        """(numpy state dict, manifest) on rank 0, (None, None) elsewhere. Collective."""
        state = self._full_state()
        if self.rank != 0:
            return None, None
        return ({k: v.cpu().numpy() for k, v in state.items()},
                manifest(state, int(bucket_mb * 2**20)))

    def join_sync_group(self, host: str, port: int, size: int) -> None:
        """(Rank 0) become rank 0, the source, of the weight-broadcast group."""
        self.sync_group = BroadcastGroup(host, port, 0, size, self.device)

    def broadcast_weights(self, bucket_mb: float) -> dict | None:
        """Gather the full weights (collective) and, on rank 0, broadcast them in buckets."""
        state = self._full_state()
        if self.rank != 0:
            return None
        t0 = time.perf_counter()
        man = self.sync_group.send(state, int(bucket_mb * 2**20))
        return {"params": man["params"], "buckets": len(man["buckets"]), "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: str, tag: str, client_state: dict) -> str:
        if tag == "latest":
            raise ValueError("a DeepSpeed checkpoint tag may not be 'latest' (DeepSpeed's own pointer file)")
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)
        return os.path.join(directory, tag)

    def load(self, directory: str, tag: str) -> dict:
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {directory}")
        return client


class LearnerGroup:
    """Driver-side handle of K LearnerRank actors. bundles: K (placement group, bundle index) pairs
    or None (no placement group); the actors' resources come from cluster.learner_cpus / _gpus."""

    def __init__(self, cfg, pg=None, bundles: list[int] | None = None, setup_timeout_s: float = 600):
        from actors.cluster import options
        from spiral_rl.config import config_to_dict
        self.cfg, k = cfg, cfg.cluster
        self.world_size = k.learner_ranks
        cls = ray.remote(LearnerRank)
        self.ranks = []
        for r in range(self.world_size):
            opts = (options(pg, bundles[r], k.learner_cpus, k.learner_gpus) if pg is not None
                    else {"num_cpus": k.learner_cpus, "num_gpus": k.learner_gpus})
            self.ranks.append(cls.options(**opts).remote(config_to_dict(cfg), r, self.world_size))
        host, port = ray.get(self.ranks[0].address.remote(), timeout=setup_timeout_s)
        self.info = ray.get([a.setup.remote(host, port) for a in self.ranks], timeout=setup_timeout_s)

    def update(self, records: list, steps: list[int], check_ratio: bool) -> dict:
        """One GRPO step over all ranks; records are split into K equal contiguous shares."""
        n = len(records) // self.world_size
        if n * self.world_size != len(records):
            raise ValueError(f"{len(records)} segments do not split over {self.world_size} learner ranks")
        parts = ray.get([a.update.remote(records[r * n:(r + 1) * n], steps, check_ratio)
                         for r, a in enumerate(self.ranks)])
        out = {}
        for key in parts[0]:
            vals = [p[key] for p in parts]
            out[key] = max(vals) if key in MAX_STATS else float(np.mean(vals))
        out["grad_norm"] = parts[0]["grad_norm"]  # the global norm, the same on every rank
        return out

    def gather_state(self) -> tuple:
        """ObjectRefs (state, manifest) of rank 0: the whole state dict is ONE object in the store."""
        bucket = self.cfg.cluster.sync_bucket_mb
        refs = [a.gather_state.options(num_returns=2).remote(bucket) for a in self.ranks]
        ray.get([r[1] for r in refs[1:]])  # the other ranks' share of the collective has finished
        return refs[0]

    def connect(self, workers: list, mode: str) -> None:
        """Sync weights to these RolloutWorker actors by `mode` ('object_store' | 'broadcast');
        'broadcast' forms the sync group: rank 0 (source) + the workers, store on rank 0's node."""
        if mode not in ("object_store", "broadcast"):
            raise ValueError(f"weight sync mode {mode!r} must be 'object_store' or 'broadcast'")
        self.workers, self.sync_mode = list(workers), mode
        if mode == "broadcast":
            size = 1 + len(workers)
            host, port = ray.get(self.ranks[0].address.remote())
            ray.get([self.ranks[0].join_sync_group.remote(host, port, size)]
                    + [w.join_sync_group.remote(host, port, size) for w in workers])

    def sync(self, version: int) -> dict:
        """Learner weights -> every connected rollout worker, which verifies what it got against
        the learner's manifest (WeightSyncError otherwise). Returns params, buckets, seconds."""
        t0 = time.perf_counter()
        if self.sync_mode == "broadcast":
            refs = [a.broadcast_weights.remote(self.cfg.cluster.sync_bucket_mb) for a in self.ranks]
            infos = ray.get(refs + [w.receive_weights.remote(version) for w in self.workers])[len(refs):]
        else:
            state, man = self.gather_state()  # one object in the store, read by every worker
            infos = ray.get([w.load_weights.remote(state, man, version) for w in self.workers])
        return {"params": infos[0]["params"], "buckets": infos[0]["buckets"], "mode": self.sync_mode,
                "seconds": time.perf_counter() - t0}

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        ray.get([a.save.remote(directory, tag, client_state) for a in self.ranks])

    def load(self, directory: str, tag: str) -> dict:
        return ray.get([a.load.remote(directory, tag) for a in self.ranks])[0]

    def shutdown(self) -> None:
        for a in self.ranks:
            ray.kill(a)

