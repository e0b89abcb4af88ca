"""Pre-training recipe search: one world model trained for a wall-clock budget, scored by the critic.

    python benchmarks/sft_recipe_search.py NAME BUDGET [config overrides]
    python benchmarks/sft_recipe_search.py base 400 configs/sft_tiny.yaml train.batch_size=64 model.shift=3
    python benchmarks/sft_recipe_search.py cont 420 configs/sft_tiny.yaml train.batch_size=64 model.shift=3 \
        train.lr=1e-3 model.pretrained_path=runs/recipe/base/world_model.pt
    python benchmarks/sft_recipe_search.py b16 6000steps configs/sft_tiny.yaml train.batch_size=16 model.shift=3

launch/sft.py is the production path (Ray Train + DeepSpeed, checkpoints, resume, many ranks).
This script strips that away so recipes can be compared quickly, several runs sharing one GPU:
a plain PyTorch loop on one device, the learning rate's cosine running over BUDGET: SECONDS of
wall clock (runs given the same budget compare at equal cost) or, written `<N>steps`, N steps
like launch/sft.py (runs given the same steps x batch compare at equal data). The data
(SegmentDataset, per-epoch permutations), the loss (WorldModel.loss) and the evaluation
(evaluate.score_examples, the critic on train.num_val_tasks val tasks) are the library's, so
a recipe found here carries over to launch/sft.py; only the step count depends on the hardware.

Prints one JSON line at half time and one at the end (step, mean loss of the last 100 steps,
the critic's mean scores), and writes runs/recipe/NAME/world_model.pt.

`--pause-after=SECONDS` (anywhere after BUDGET) stops a long run after that much wall clock and
writes runs/recipe/NAME/state.pt (weights, AdamW, step, noise generator, loss history); the same
command again resumes from it (a different command under the same NAME is refused), so a run
longer than one job's time limit gives the same steps, data order and learning rates as one
uninterrupted run. The state file is removed when the run finishes.
"""
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.config import load_config_or_exit
from spiral_rl.evaluate import VAL_SEED, collate, score_examples, summarise_rows
from spiral_rl.world.dataset import SegmentDataset, batch_indices
from spiral_rl.world_model import WorldModel


def main(argv: list[str]) -> int:
    usage = ("usage: python benchmarks/sft_recipe_search.py NAME BUDGET [--pause-after=SECONDS] [config overrides]"
             "  (BUDGET: seconds or <N>steps)")
    if len(argv) < 2 or "=" in argv[0]:
        sys.exit(usage)
    by_steps = argv[1].endswith("steps")
    try:
        budget = float(argv[1].removesuffix("steps"))
    except ValueError:
        budget = 0.0
    if budget <= 0 or (by_steps and budget != int(budget)):
        sys.exit(f"BUDGET must be a positive number of seconds or <N>steps, got {argv[1]!r}; {usage}")
    pause_after = [a for a in argv[2:] if a.startswith("--pause-after=")]
    overrides = [a for a in argv[2:] if a not in pause_after]
    try:
        pause_s = float(pause_after[-1].split("=", 1)[1]) if pause_after else math.inf
    except ValueError:
        pause_s = 0.0
    if pause_s <= 0:
        sys.exit(f"--pause-after must be a positive number of seconds, got {pause_after[-1]!r}")
    name, cfg = argv[0], load_config_or_exit(overrides)
    run_dir, command = Path("runs/recipe") / name, [argv[1], *overrides]
    t, seed = cfg.train, cfg.run.seed
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = WorldModel.from_config(cfg).to(device)
    train = SegmentDataset(cfg.world, "train", t.num_train_tasks, t.stop_short_share, cfg.run.seed)
    val = SegmentDataset(cfg.world, "val", t.num_val_tasks).examples
    critic = CriticAgent.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.99), weight_decay=t.weight_decay)
    gen = torch.Generator(device).manual_seed(seed + 1)
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} params on {device}, {len(train)} train "
          f"({train.stopped_short} stopped short) / {len(val)} val segments, budget {argv[1]}", flush=True)

    losses, tic, paused, step, halfway = [], time.time(), 0.0, 0, False
    wall0 = tic
    state_path = run_dir / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["command"] != command:
            sys.exit(f"{state_path} was written by a different command ({' '.join(state['command'])}); "
                     f"use another NAME or delete it")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].to(gen.get_state().device))
        losses, step, halfway, tic = state["losses"], state["step"], state["halfway"], tic - state["train_s"]
        print(f"{name}: resumed from {state_path} at step {step}", flush=True)

    def report() -> None:
        model.eval()
        with torch.no_grad():
            scores = summarise_rows(score_examples(model, val, critic, 64, cfg.world.context_frames))
        model.train()
        print(json.dumps({"run": name, "step": step, "loss": round(float(np.mean(losses[-100:])), 4),
                          "train_s": round(time.time() - tic - paused), "scores": scores}), flush=True)

    def progress() -> float:  # share of the budget spent training
        return step / budget if by_steps else (time.time() - tic - paused) / budget

    while True:
        done = progress()
        if done >= 1:
            break
        for group in opt.param_groups:  # linear warm-up by step, cosine over the budget
            group["lr"] = t.lr * min(1.0, (step + 1) / t.warmup_steps) * 0.5 * (1 + math.cos(math.pi * done))
        context, frames, texts = collate([train[int(i)] for i in batch_indices(step, len(train), t.batch_size, seed)])
        loss, _ = model.loss(context, frames, texts, generator=gen, t_sampling=t.t_sampling)
        opt.zero_grad()
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        losses.append(loss.item())
        step += 1
        if progress() >= 0.5 and not halfway:
            halfway, start = True, time.time()
            report()
            paused += time.time() - start  # evaluation time is not training budget
        if time.time() - wall0 >= pause_s and progress() < 1:
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"command": command, "model": model.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "losses": losses, "step": step, "halfway": halfway,
                        "train_s": time.time() - tic - paused}, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)  # a kill mid-save leaves the previous state
            print(f"{name}: paused at step {step} after {pause_s:.0f} s; run the same command to resume", flush=True)
            return 0
    report()
    out = model.save(run_dir / "world_model.pt")
    state_path.unlink(missing_ok=True)
    print(f"{name}: wrote {out} (val noise seed {VAL_SEED})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
