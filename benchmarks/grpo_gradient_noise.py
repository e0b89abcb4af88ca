"""How much of one GRPO update is signal: the gradient noise scale at the start weights.

    python benchmarks/grpo_gradient_noise.py                  # configs/grpo_improve.yaml, 6 batches
    python benchmarks/grpo_gradient_noise.py --batches=8 grpo.train_steps=2 grpo.group_size=16 --out=PATH

Draws K independent iterations' batches exactly as launch/grpo.py does (closed-loop episodes ->
prompts -> SDE groups -> critic -> advantages; iterations 1..K, all at the start weights, no step
taken) and computes each batch's policy gradient g_k, plus a null gradient: the same batch with
its advantages shuffled, which has the same size but no direction. From them (McCandlish et al.
2018, "An Empirical Model of Large-Batch Training", appendix A; B = segments per batch):

    |G|^2 = (K |mean g|^2 - mean |g_k|^2) / (K - 1)            the true gradient, unbiased
    tr(S) = B K (mean |g_k|^2 - |mean g|^2) / (K - 1)           the per-segment noise
    noise scale B_noise = tr(S) / |G|^2                          segments per update at which signal = noise
    signal share = |G|^2 / mean |g_k|^2                          of one update's squared size

A batch much smaller than B_noise makes every update mostly noise; with AdamW every parameter
still moves ~lr per step, which is how a run can lose fidelity by chance. With K = 6 the
estimates are rough (|G|^2 is a small difference of two noisy terms): read the order of magnitude.
CPU, one process; ~50 s per batch on 2 cores at the config's 4 prompts x G=8.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkpoint_id, cpu_name, split_options, write_record  # noqa: E402

CONFIG = ROOT / "configs" / "grpo_improve.yaml"
# Parameter groups (by name) for the breakdown: where in the model the signal lies, against its noise.
GROUPS = {"cross_attn": ("cross_attn",), "self_attn": ("self_attn",), "ffn": ("ffn",),
          "time_and_modulation": ("modulation", "time_embedding", "time_projection"),
          "text": ("text.", "text_embedding"), "patch_io_norm": ("patch_embedding", "head", "norm")}
USAGE = "usage: python benchmarks/grpo_gradient_noise.py [--batches=K] [--out=PATH] [config overrides]"


def driver():
    """launch/grpo.py as a module: its produce() is the one data path a run takes."""
    spec = importlib.util.spec_from_file_location("grpo_driver", ROOT / "launch" / "grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def noise_scale(grads: list[torch.Tensor], batch: int) -> dict:
    """The estimates above from K >= 2 gradients of batches of `batch` segments each."""
    k = len(grads)
    sq = float(np.mean([float(g @ g) for g in grads]))
    mean = torch.stack(grads).mean(0)
    big = float(mean @ mean)
    true_sq = (k * big - sq) / (k - 1)
    trace = batch * k * (sq - big) / (k - 1)
    cos = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.combinations(grads, 2)]
    return {"true_grad_sq": true_sq, "noise_trace": trace,
            "noise_scale_segments": trace / true_sq if true_sq > 0 else None,  # None: no signal resolved
            "signal_share": true_sq / sq, "pairwise_cosine_mean": float(np.mean(cos)),
            "pairwise_cosine_min": min(cos), "pairwise_cosine_max": max(cos)}


def main(argv: list[str]) -> int:
    opts, overrides = split_options(argv, {"--batches", "--out"}, USAGE)
    try:
        k = int(opts.get("--batches", 6))
    except ValueError:
        k = 0
    if k < 2:
        sys.exit(f"--batches must be an integer >= 2 (two gradients at least); {USAGE}")
    from actors.stages import LocalStages
    from spiral_rl.config import load_config_or_exit
    from spiral_rl.grpo import step_loss
    from spiral_rl.rollout import to_batch

    cfg = load_config_or_exit([str(CONFIG), "cluster.mode=local", *overrides])
    grpo_driver = driver()
    stages = LocalStages(cfg, Path(tempfile.mkdtemp(prefix="spiral_gnoise_")))
    model, learner = stages.model, stages.learner
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    offsets = np.cumsum([0] + [p.numel() for p in params])
    group_of = [next((g for g, keys in GROUPS.items() if any(k in n for k in keys)), "other") for n, _ in named]
    slices = {g: torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i, gi in enumerate(group_of) if gi == g])
              for g in dict.fromkeys(group_of)}

    def gradient(records, steps) -> torch.Tensor:
        batch = to_batch(records, model.device)
        batch.steps = steps
        model.train()
        model.zero_grad(set_to_none=True)
        for i in steps:  # as GRPOLearner.update: the mean over trained steps
            loss, _ = step_loss(model, learner.reference, batch, i, learner.settings)
            (loss / len(steps)).backward()
        return torch.cat([p.grad.flatten() for p in params]).clone()

    g, rng = cfg.grpo, np.random.default_rng([cfg.run.seed, 7])
    real, null, sizes = [], [], []
    t_all = time.perf_counter()
    for it in range(1, k + 1):
        t0 = time.perf_counter()
        data = grpo_driver.produce(cfg, stages, it, g.episodes_per_iter * (it - 1), 0)
        records = [r for grp in data["groups"] for r in grp]
        steps = grpo_driver.draw_steps(data["window"], g.train_steps, np.random.default_rng([cfg.run.seed, it, 1]))
        real.append(gradient(records, steps))
        advantages = [r.advantage for r in records]
        for r, j in zip(records, rng.permutation(len(records))):
            r.advantage = advantages[j]
        null.append(gradient(records, steps))
        sizes.append(len(records))
        print(f"batch {it}/{k}: {len(records)} segments, {len(steps)} steps | |g| {real[-1].norm():.3e} "
              f"| |null| {null[-1].norm():.3e} | {time.perf_counter() - t0:.0f} s", flush=True)
    batch = int(np.mean(sizes))
    m = {"batches": k, "segments_per_batch": batch, "trained_steps": len(steps),
         "grad_norm_mean": float(np.mean([x.norm() for x in real])),
         "null_grad_norm_mean": float(np.mean([x.norm() for x in null])),
         "real": noise_scale(real, batch), "null": noise_scale(null, batch),
         # the same estimates on each parameter group's slice of the gradient
         "by_group": {g: {"params": len(idx), **noise_scale([x[idx] for x in real], batch),
                          "null_signal_share": noise_scale([x[idx] for x in null], batch)["signal_share"]}
                      for g, idx in slices.items()},
         "minutes": round((time.perf_counter() - t_all) / 60, 2)}
    r = m["real"]
    print(f"real: signal share {r['signal_share']:+.3f}, pairwise cosine {r['pairwise_cosine_mean']:+.4f}, "
          f"noise scale {r['noise_scale_segments'] and round(r['noise_scale_segments'])} segments "
          f"(batch {batch}) | null: signal share {m['null']['signal_share']:+.3f}, "
          f"cosine {m['null']['pairwise_cosine_mean']:+.4f}", flush=True)
    for grp, v in m["by_group"].items():
        print(f"  {grp:<20} {v['params']:>7} params: signal share {v['signal_share']:+.3f} "
              f"(null {v['null_signal_share']:+.3f}), cosine {v['pairwise_cosine_mean']:+.4f}", flush=True)
    config = {"config": "configs/grpo_improve.yaml", "overrides": overrides,
              **checkpoint_id(cfg.model.pretrained_path, ROOT)}
    write_record("grpo_gradient_noise", f"{cpu_name()}, {os.cpu_count()} cores (one process)", config, m, False,
                 opts.get("--out"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
