"""Pre-train the world model on the built-in world: Ray Train (TorchTrainer) + DeepSpeed ZeRO.

    python launch/sft.py configs/sft_ci.yaml run.output_dir=runs/sft_ci      # smoke run, < 1 min on 2 CPU cores
    python launch/sft.py run.output_dir=runs/sft                             # the default run (CPU, 1 worker)
    python launch/sft.py run.output_dir=runs/sft train.resume=true train.steps=4000   # continue it
    python launch/sft.py run.output_dir=runs/sft train.pause_after=1000     # stop at 1000 of 2000, resume later
    python launch/sft.py run.output_dir=runs/sft_b \
        train.resume_from=runs/sft/ray/sft/checkpoint_step0002000       # a new run from a copied checkpoint
    python launch/sft.py run.output_dir=runs/sft_2w train.num_workers=2 train.zero_stage=3  # 2 ranks, ZeRO-3, gloo
    ray job submit --working-dir . -- python3 launch/sft.py model.preset=small train.use_gpu=true \
        train.num_workers=8 run.output_dir=/shared/runs/sft_small               # a cluster (shared storage)

Single controller: this driver composes the config, starts (or joins) Ray, and runs one
TorchTrainer whose workers each own one DeepSpeed engine (ZeRO stage train.zero_stage; bf16
where the device has it; gloo on CPU, NCCL on GPU). Each step a rank trains on its slice of a
global batch drawn from per-epoch permutations of the SegmentDataset, so a resumed run sees the
batches an uninterrupted one would. Ray Train checkpoints hold every rank's DeepSpeed shards
(tag `step<N>`: DeepSpeed's own `latest` file names it, so no tag may be called "latest").

Writes into run.output_dir (on a cluster it must be storage every node sees):
    config.yaml     the resolved config
    ray/sft/        the Ray Train run: checkpoint_step<N>/ (DeepSpeed shards), run state
    world_model.pt  the trained weights in fp32 (WorldModel.load, or model.pretrained_path)
    eval.json       ODE samples of the val split scored by the CriticAgent (mean per dimension,
                    ground-truth ceiling, per verb), validation loss before and after, loss curve,
                    training minutes summed over every launch of the run, the devices it ran on
Run with no Ray address it starts a local Ray on loopback (DESIGN.md section 7 sets the env);
under `ray job submit` (RAY_ADDRESS set) it joins the cluster. train.resume=true continues from
the run's latest checkpoint; without it, a run directory that already has checkpoints is refused.
train.pause_after=N ends a launch after step N as if it were the end (evaluation,
world_model.pt, eval.json) while the learning rate follows the schedule of train.steps, so a run
longer than a job's time limit is split into launches that give the weights of one.
train.resume_from=DIR starts a new run directory from any run's checkpoint_step<N>/ (the same
steps, data order and learning rates as going on in the old one); once the new run has a checkpoint
of its own, train.resume=true continues from that.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from actors.cluster import LOCAL_ENV, cpu_name  # imports no Ray

if not os.environ.get("RAY_ADDRESS"):  # local run: stay on loopback; set before Ray is imported
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)

import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402

from spiral_rl.agents.critic import CriticAgent  # noqa: E402
from spiral_rl.config import config_to_dict, load_config_or_exit, save_config, validate  # noqa: E402
from spiral_rl.records import SCORE_DIMS  # noqa: E402
from spiral_rl.evaluate import VAL_SEED, collate, score_examples, summarise_rows  # noqa: E402
from spiral_rl.world.dataset import SegmentDataset, batch_indices  # noqa: E402
from spiral_rl.world_model import CHECKPOINT_NAME, WorldModel  # noqa: E402

RUN_NAME = "sft"
HISTORY_NAME = "history.json"  # in the final checkpoint: loss curve and every evaluation


# --------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(cfg, world_size: int, bf16: bool) -> dict:
    t = cfg.train
    zero = {"stage": t.zero_stage}
    if t.zero_stage == 3:  # small models: gather whole layers rather than prefetch-tune
        zero |= {"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False}
    return {
        "train_batch_size": t.batch_size * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        # torch_adam: torch's AdamW, no JIT-compiled kernel (GPU boxes here have no nvcc).
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [0.9, 0.99], "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps (a multiplier of train.lr)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights, whole, on every rank (a collective: every rank must call it).
    ZeRO 1-3 and the bf16 optimizer keep fp32 masters apart from the (bf16 / partitioned) module;
    safe_get_full_fp32_param assembles them. Without such a wrapper the module's own fp32
    parameters are the masters."""
    from deepspeed.utils import safe_get_full_fp32_param
    state = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        state[name] = (full if full is not None else p.data).detach().float().cpu().clone()
    return state


# --------------------------------------------------------------------------- evaluation


def validation_loss(model: WorldModel, examples, batch_size: int, t_sampling: str) -> float:
    """Mean flow-matching loss over `examples` with fixed noise: comparable across steps."""
    gen = torch.Generator(model.device).manual_seed(VAL_SEED)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            loss, _ = model.loss(*collate(chunk), generator=gen, t_sampling=t_sampling)
            total += loss.item() * len(chunk)
    return total / max(1, len(examples))


def evaluate(engine, cfg, val, critic, device, with_ground_truth: bool) -> tuple[dict, dict]:
    """Every rank scores its share of the val examples with an fp32 copy of the master weights;
    returns (summary, full state dict). Collective: every rank must call it."""
    import torch.distributed as dist
    state = full_state_dict(engine)
    model = WorldModel(cfg.model, cfg.world.segment_frames, cfg.world.context_frames).to(device)
    model.load_state_dict(state)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = val[rank::world]
    t = cfg.train
    local = {"rows": score_examples(model, mine, critic, t.batch_size, cfg.world.context_frames),
             "loss_sum": validation_loss(model, mine, t.batch_size, t.t_sampling) * len(mine), "n": len(mine)}
    if with_ground_truth:
        local["truth"] = score_examples(None, mine, critic, t.batch_size, cfg.world.context_frames)
    parts = [None] * world
    dist.all_gather_object(parts, local)
    rows = [r for p in parts for r in p["rows"]]
    summary = {"val_loss": round(sum(p["loss_sum"] for p in parts) / sum(p["n"] for p in parts), 5),
               "scores": summarise_rows(rows),
               "by_verb": {v: summarise_rows([r for r in rows if r["verb"] == v]) for v in sorted({r["verb"] for r in rows})}}
    if with_ground_truth:
        summary["ground_truth"] = summarise_rows([r for p in parts for r in p["truth"]])
    return summary, state


# --------------------------------------------------------------------------- the worker


def device_label(device: torch.device, world: int) -> str:
    """Where a launch's steps ran, for the run's record: e.g. '1 x NVIDIA H100 80GB HBM3'."""
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    return f"{world} x {cpu_name()} ({torch.get_num_threads()} threads/rank)"


def _say(line: str) -> None:
    """Rank 0's progress line. Not print(): Ray Train patches print in workers and, with stdout
    wrapped, emits every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker = one rank = one DeepSpeed engine."""
    import deepspeed
    import torch.distributed as dist

    cfg = validate(loop_config["cfg"])
    t = cfg.train
    # DeepSpeed's ZeRO collectives call torch APIs that torch 2.13 marks deprecated, every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    bf16 = t.bf16 if t.bf16 != "auto" else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if bf16 and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        raise ValueError(f"train.bf16=true but {device} has no bf16 support; use train.bf16=auto")
    say = _say if rank == 0 else (lambda line: None)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = WorldModel.from_config(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg, world, bf16),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.steps)),
        dist_init_required=False)  # Ray Train already set up torch.distributed

    train = SegmentDataset(cfg.world, "train", t.num_train_tasks, t.stop_short_share, cfg.run.seed)
    val = SegmentDataset(cfg.world, "val", t.num_val_tasks).examples
    critic = CriticAgent.from_config(cfg)
    step, history = 0, {"train": [], "val": []}
    checkpoint = ray.train.get_checkpoint()  # the run's own latest, which wins over resume_from
    if checkpoint is None and t.resume_from:  # (Ray Train v2 dropped the trainer's resume_from_checkpoint)
        checkpoint = ray.train.Checkpoint.from_directory(t.resume_from)
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d)  # reads DeepSpeed's `latest` -> tag step<N>
        step, history = client["step"], client["history"]
        say(f"resumed from {checkpoint.path} at step {step}")
    devices, here = history.setdefault("devices", []), device_label(device, world)
    if devices[-1:] != [here]:  # a run resumed elsewhere lists every device it used
        devices.append(here)
    say(f"{world} rank(s) on {device}, ZeRO-{t.zero_stage}, bf16={bf16}, {torch.get_num_threads()} threads/rank; "
        f"{len(train)} train ({train.stopped_short} stopped short) / {len(val)} val segments; "
        f"{sum(p.numel() for p in model.parameters()):,} params")

    def save_and_report(metrics: dict, extra_files: dict | None = None) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=f"step{step}", client_state={"step": step, "history": history})
            for name, write in (extra_files or {}).items():
                write(Path(d) / name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_step{step:07d}")

    if not history["val"]:  # the untrained model's validation loss, the baseline for "it learned"
        summary, _ = evaluate(engine, cfg, val, critic, device, with_ground_truth=False)
        history["val"].append({"step": step, **summary})
        say(f"step {step}: val loss {summary['val_loss']:.4f}, critic {summary['scores']}")

    global_batch = t.batch_size * world
    end = t.pause_after or t.steps  # the lr schedule runs to t.steps either way
    window, tic = [], time.time()
    while step < end:
        idx = batch_indices(step, len(train), global_batch, cfg.run.seed)[rank * t.batch_size:(rank + 1) * t.batch_size]
        gen = torch.Generator(device).manual_seed(cfg.run.seed * 1_000_003 + step * 1009 + rank)
        loss, _ = engine(*collate([train[int(i)] for i in idx]), generator=gen, t_sampling=t.t_sampling)
        engine.backward(loss)
        engine.step()
        step += 1
        window.append(loss.detach())
        if step % t.log_every == 0 or step == end:
            mean = torch.stack(window).mean().float().to(device)
            dist.all_reduce(mean)
            elapsed = time.time() - tic
            row = {"step": step, "loss": round(mean.item() / world, 5), "lr": engine.get_lr()[0],
                   "samples_per_s": round(len(window) * global_batch / elapsed, 2), "seconds": round(elapsed, 3)}
            history["train"].append(row)
            left_s = (t.steps - step) * global_batch / max(row["samples_per_s"], 1e-9)  # training only
            say(f"step {step}/{t.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                f"samples/s {row['samples_per_s']:.1f} eta " +
                (f"{left_s / 3600:.1f} h" if left_s >= 3600 else f"{left_s / 60:.1f} min"))
            window, tic = [], time.time()
        if t.eval_every and step % t.eval_every == 0 and step < end:
            summary, _ = evaluate(engine, cfg, val, critic, device, with_ground_truth=False)
            history["val"].append({"step": step, **summary})
            say(f"step {step}: val loss {summary['val_loss']:.4f}, critic {summary['scores']}")
            tic = time.time()  # samples/s counts training only
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < end:
            save_and_report({"step": step})
            say(f"step {step}: checkpoint saved")
            tic = time.time()

    # End: evaluate the fp32 masters; the final checkpoint carries the exported world_model.pt.
    summary, state = evaluate(engine, cfg, val, critic, device, with_ground_truth=True)
    history["val"].append({"step": step, **summary})
    say(f"step {step}: val loss {summary['val_loss']:.4f}, critic {summary['scores']} "
        f"(ground truth {summary['ground_truth']})")

    def export(path: Path) -> None:
        final = WorldModel(cfg.model, cfg.world.segment_frames, cfg.world.context_frames)
        final.load_state_dict(state)
        final.save(path)

    files = {CHECKPOINT_NAME: export, HISTORY_NAME: lambda p: p.write_text(json.dumps(history))}
    save_and_report({"step": step, "val_loss": summary["val_loss"], **summary["scores"]},
                    files if rank == 0 else None)


# --------------------------------------------------------------------------- the driver


def saved_step(ckpt_dir: Path) -> int | None:
    """The step a checkpoint_step<N>/ directory holds, from DeepSpeed's `latest` (tag step<N>);
    None where there is no such file (not a launch/sft.py checkpoint)."""
    latest = Path(ckpt_dir) / "latest"
    return int(latest.read_text().strip().removeprefix("step")) if latest.is_file() else None


def training_seconds(history: dict, global_batch: int) -> float:
    """Time spent in training steps over every launch of a run (evaluations and checkpoints left
    out). Each progress row carries its window's seconds; rows from before that field existed
    give them back from their throughput and the steps since the previous row."""
    total, prev = 0.0, 0
    for row in history["train"]:
        total += row["seconds"] if "seconds" in row else (row["step"] - prev) * global_batch / row["samples_per_s"]
        prev = row["step"]
    return total


def eval_record(cfg, history: dict) -> dict:
    first, last = history["val"][0], history["val"][-1]
    train = history["train"]
    return {
        "steps": last["step"], "split": "val", "segments": last["scores"]["segments"],
        "sample_steps": cfg.model.sample_steps, "guidance": cfg.model.guidance,
        "scores": last["scores"], "ground_truth": last.get("ground_truth"), "by_verb": last["by_verb"],
        "val_loss": {"start": first["val_loss"], "end": last["val_loss"]},
        "train_loss": {"first": train[0]["loss"] if train else None, "last": train[-1]["loss"] if train else None},
        "samples_per_s": round(float(np.median([r["samples_per_s"] for r in train])), 2) if train else None,
        "train_minutes": round(training_seconds(history, cfg.train.batch_size * cfg.train.num_workers) / 60, 2),
        "devices": history.get("devices", []),
        "history": history,
    }


def main(argv: list[str]) -> int:
    cfg = load_config_or_exit(argv)
    t = cfg.train
    out = Path(cfg.run.output_dir).resolve()
    run_dir = out / "ray" / RUN_NAME
    if run_dir.exists() and not t.resume:
        sys.exit(f"{run_dir} holds an earlier run; pass train.resume=true to continue it, "
                 f"or pick another run.output_dir")
    # Steps this run directory already holds (a resumed run's own checkpoints).
    held = [s for p in run_dir.glob("checkpoint_step*") if (s := saved_step(p)) is not None]
    if t.resume_from:
        if saved_step(t.resume_from) is None and not held:
            sys.exit(f"train.resume_from={t.resume_from}: not a launch/sft.py checkpoint directory "
                     f"(no DeepSpeed 'latest' file); pass a run's ray/sft/checkpoint_step<N>/")
        cfg.train.resume_from = str(Path(t.resume_from).resolve())  # the workers' cwd differs
    if t.pause_after:
        at = held if t.resume else []
        if t.resume_from and not at:
            at = [saved_step(t.resume_from)]
        if at and max(at) >= t.pause_after:
            sys.exit(f"train.pause_after={t.pause_after}: the run is already at step {max(at)}; "
                     f"pass a later step, or 0 to run to train.steps={t.steps}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    local = not os.environ.get("RAY_ADDRESS")
    if local:  # keeps the dashboard: Ray Train's PlacementGroupCleaner polls the state API it serves
        ray.init(runtime_env={"env_vars": LOCAL_ENV})
    else:
        ray.init()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_worker = {"CPU": max(1, cpus // t.num_workers)} if not t.use_gpu else None  # torch threads = CPUs
    print(f"pre-training {cfg.model.preset} on {t.num_workers} worker(s) "
          f"({'GPU' if t.use_gpu else 'CPU'}), {t.steps} steps x {t.batch_size}/rank -> {out}")
    start = time.time()
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": config_to_dict(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=RUN_NAME, storage_path=str(out / "ray"),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    if t.pause_after:
        print(f"paused after step {t.pause_after} of {t.steps}: train.resume=true (without pause_after, "
              f"or with a later one) goes on")

    with result.checkpoint.as_directory() as d:  # the final checkpoint carries the exports
        shutil.copy(Path(d) / CHECKPOINT_NAME, out / CHECKPOINT_NAME)
        history = json.loads((Path(d) / HISTORY_NAME).read_text())
    record = eval_record(cfg, history)
    record["seconds"] = round(time.time() - start, 1)
    (out / "eval.json").write_text(json.dumps(record, indent=1))
    s, gt = record["scores"], record["ground_truth"]
    print(f"done in {record['seconds']:.0f} s: val loss {record['val_loss']['start']:.4f} -> "
          f"{record['val_loss']['end']:.4f}; critic on {s['segments']} val segments (ground truth): "
          + ", ".join(f"{d} {s[d]:.3f} ({gt[d]:.3f})" for d in SCORE_DIMS)
          + f"; accepted {s['accepted']:.2f}")
    print(f"model: {out / CHECKPOINT_NAME}  eval: {out / 'eval.json'}  checkpoint: {result.checkpoint.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
