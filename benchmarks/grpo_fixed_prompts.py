"""GRPO on a fixed set of prompts, in one process: does the reward climb, and does what is learnt
carry over to the ODE sampler and to held-out prompts of the same verb?

    python benchmarks/grpo_fixed_prompts.py --verb swap grpo.lr=1e-4 reward.weights.action_completeness=0 \
        reward.weights.physical_fidelity=1 reward.weights.temporal_consistency=0 reward.weights.visual_quality=0
    python benchmarks/grpo_fixed_prompts.py --quick        # the logic in seconds (1 prompt, 1 update)

The shipped checkpoint (configs/grpo_tiny.yaml, G=8) takes prompts of one verb from closed-loop
episodes of train tasks: the first --prompts are trained on, the next --prompts are held out. Each
update samples fresh SDE groups of the trained prompts and takes one GRPO step on --train-steps of
the window. Every --eval-every updates, both sets are ODE-sampled (--eval-samples seeds each, the
same seeds every time) and scored by the critic. Writes benchmarks/results/grpo_fixed_prompts.json.
A diagnostic of the algorithm (how fast, at what cost to the other dimensions), not a quality bar.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import checkpoint_id, device_name, write_record  # noqa: E402  (benchmarks/ is first on sys.path)
from actors.rollout import RolloutWorker, group_settings  # noqa: E402
from spiral_rl.agents.critic import CriticAgent  # noqa: E402
from spiral_rl.config import load_config_or_exit  # noqa: E402
from spiral_rl.grpo import GRPOLearner, GRPOSettings, reward  # noqa: E402
from spiral_rl.records import SCORE_DIMS  # noqa: E402
from spiral_rl.rollout import RecordedObjects, sample_sde, score_groups, to_batch  # noqa: E402


def ode_scores(model, critic, prompts, samples: int, weights: dict, aggregation: str) -> dict:
    """Mean critic scores (and weighted reward) of `samples` ODE samples per prompt, fixed seeds."""
    ctx = np.concatenate([np.stack([p.context for p in prompts])] * samples)
    with torch.no_grad():
        frames = model.generate(ctx, [p.sub_action.text for p in prompts] * samples,
                                seed=[5000 + i for i in range(len(ctx))])
    verdicts = critic.score_batch(list(frames), [p.sub_action for p in prompts] * samples,
                                  [RecordedObjects(p.objects) for p in prompts] * samples,
                                  [p.next_action for p in prompts] * samples)
    scores = np.array([[v.scores[d] for d in SCORE_DIMS] for v in verdicts])  # (N, D)
    rewards = reward(scores, np.array([weights[d] for d in SCORE_DIMS]), aggregation)
    out = {d: round(float(scores[:, k].mean()), 4) for k, d in enumerate(SCORE_DIMS)}
    out["reward"] = round(float(rewards.mean()), 4)  # the training reward (reward.aggregation), on ODE samples
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verb", default="swap", help="sub-action verb of the prompts (move, move_to, swap, jump, push)")
    ap.add_argument("--prompts", type=int, default=4, help="trained prompts; as many again are held out")
    ap.add_argument("--episodes", type=int, default=24, help="train-task episodes to collect prompts from")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-samples", type=int, default=8, help="ODE samples per prompt per evaluation")
    ap.add_argument("--train-steps", type=int, default=3, help="steps of the SDE window trained per update")
    ap.add_argument("--quick", action="store_true", help="1 move prompt, G=2, 3 steps, 1 update; record to the temp dir")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/grpo_fixed_prompts.json)")
    ap.add_argument("overrides", nargs="*", help="config key=value (on top of configs/grpo_tiny.yaml)")
    args = ap.parse_intermixed_args()  # options may follow the key=value overrides
    quick = ["grpo.group_size=2", "grpo.sample_steps=3", "model.sample_steps=3"] if args.quick else []
    if args.quick:
        vars(args).update(verb="move", prompts=1, episodes=4, updates=1, eval_every=1, eval_samples=1, train_steps=1)
    cfg = load_config_or_exit([str(ROOT / "configs" / "grpo_tiny.yaml"), "cluster.mode=local", "grpo.group_size=8",
                               *args.overrides, *quick])
    worker, critic = RolloutWorker(cfg), CriticAgent.from_config(cfg)
    found, _ = worker.episodes("train", 0, list(range(args.episodes)))
    found = [p for p in found if p.sub_action.verb == args.verb]
    if len(found) < 2 * args.prompts:
        raise SystemExit(f"{len(found)} '{args.verb}' prompts in {args.episodes} episodes; need {2 * args.prompts}: "
                         "raise --episodes")
    trained, held = found[:args.prompts], found[args.prompts:2 * args.prompts]
    print("trained:", [p.sub_action.text for p in trained], "\nheld out:", [p.sub_action.text for p in held])
    weights = {d: float(getattr(cfg.reward.weights, d)) for d in SCORE_DIMS}
    learner = GRPOLearner(worker.model, GRPOSettings.from_config(cfg), lr=cfg.grpo.lr)
    settings, rng = group_settings(cfg), np.random.default_rng(cfg.run.seed)

    def evaluate(update: int) -> dict:
        row = {"update": update, **{name: ode_scores(worker.model, critic, ps, args.eval_samples, weights,
                                                     cfg.reward.aggregation)
                                    for name, ps in (("trained_ode", trained), ("held_out_ode", held))}}
        print(f"after {update:>3} updates: trained {row['trained_ode']}\n                  held out {row['held_out_ode']}",
              flush=True)
        return row

    series, sde, tic = [evaluate(0)], [], time.time()
    for u in range(1, args.updates + 1):
        samples = sample_sde(worker.model, trained, settings, rng)
        groups, stats = score_groups(samples, critic.score_batch(*samples.critic_inputs()), weights,
                                     cfg.reward.aggregation, u)
        loss = learner.update(to_batch([r for g in groups for r in g], worker.model.device,
                                       train_steps=args.train_steps, rng=rng))
        sde.append(round(stats["reward_mean"], 4))
        print(f"[{u}/{args.updates}] SDE reward {stats['reward_mean']:.3f} grad norm {loss['grad_norm']:.4f} "
              f"({time.time() - tic:.0f} s)", flush=True)
        if u % args.eval_every == 0 or u == args.updates:
            series.append(evaluate(u))
    first, last = series[0], series[-1]
    metrics = {"verb": args.verb, "trained": [p.sub_action.text for p in trained],
               "held_out": [p.sub_action.text for p in held], "group_size": settings.group_size, "lr": cfg.grpo.lr,
               "weights": weights, "updates": args.updates, "sde_reward_per_update": sde, "series": series,
               "reward_gain_trained": round(last["trained_ode"]["reward"] - first["trained_ode"]["reward"], 4),
               "reward_gain_held_out": round(last["held_out_ode"]["reward"] - first["held_out_ode"]["reward"], 4),
               "minutes": round((time.time() - tic) / 60, 2)}
    write_record("grpo_fixed_prompts", device_name(worker.model.device),
                 {"overrides": args.overrides, **checkpoint_id(cfg.model.pretrained_path)}, metrics, args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
