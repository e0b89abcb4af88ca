"""Ground-truth segments: (context frames, sub-action, frames) for world-model pre-training.

The ActWM-Dataset analogue. Every example is rendered from the exact simulation of a task's
reference plan, so a model trained on it learns the world's physics, and the critic's scores on
its examples are the ceiling a generated segment can reach.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spiral_rl.records import ObjectState, SubAction
from spiral_rl.world.actions import Step, make_sub_action
from spiral_rl.world.corruptions import stopped_short
from spiral_rl.world.dynamics import Physics
from spiral_rl.world.render import render_frames
from spiral_rl.world.tasks import TaskSampler


def render_track(scene, track: np.ndarray, frame_size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames 1..T of a (T + 1, N, 2) track of `scene`'s objects."""
    return render_frames([[o.moved_to(*track[t, k]) for k, o in enumerate(scene)]
                          for t in range(1, track.shape[0])], frame_size)


def ground_truth_segment(scene, sub: SubAction, physics: Physics, frame_size: int):
    """Exact segment for `sub` from `scene`: (frames (T, H, W, 3) uint8, track (T + 1, N, 2), end scene)."""
    _, end, track = make_sub_action(scene, Step(sub.verb, sub.subject, sub.objects, sub.args), physics)
    return render_track(scene, track, frame_size), track, end


@dataclass
class SegmentExample:
    """context: (K, H, W, 3) uint8; frames: (T, H, W, 3) uint8; scene: objects before the step."""

    context: np.ndarray
    sub_action: SubAction
    frames: np.ndarray
    scene: tuple[ObjectState, ...]
    task_id: str


class SegmentDataset:
    """Every step of the reference plans of tasks [0, n_tasks) of a split, rendered exactly.

    stop_short_share > 0 makes the demonstrations noisy the way captioned video is: that share of
    the examples (drawn per example from `seed`) shows the step stopping short of its caption
    (corruptions.stopped_short: frozen part of the way, smooth, every object intact). The next
    step's context still comes from the exact history, as if each caption's clip had been cut from
    a longer recording too early. A model pre-trained on it sometimes stops short, a failure only
    a critic in the loop sees (README, *Policy improvement*; checkpoints/tiny_sft_noisy.pt)."""

    def __init__(self, world_cfg, split: str, n_tasks: int, stop_short_share: float = 0.0, seed: int = 0):
        if not 0.0 <= stop_short_share <= 1.0:
            raise ValueError(f"stop_short_share must be in [0, 1], got {stop_short_share}")
        self.sampler = TaskSampler(world_cfg)
        size, k = world_cfg.frame_size, world_cfg.context_frames
        self.examples: list[SegmentExample] = []
        self.stopped_short = 0  # examples whose clip stops short of its caption
        for task in self.sampler.tasks(split, n_tasks):
            history = [task.first_frame] * k
            scene = task.scene
            for sub in task.reference_plan:
                frames, track, end = ground_truth_segment(scene, sub, self.sampler.physics, size)
                shown = frames
                if stop_short_share > 0:
                    rng = np.random.default_rng([seed, len(self.examples)])
                    if rng.random() < stop_short_share:
                        short = stopped_short(scene, sub, track, size, rng)  # None: cannot stop short
                        if short is not None:
                            shown, self.stopped_short = short, self.stopped_short + 1
                self.examples.append(SegmentExample(np.stack(history[-k:]), sub, shown, scene, task.task_id))
                history.extend(frames)
                scene = end

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> SegmentExample:
        return self.examples[i]


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> np.ndarray:
    """Dataset indices of `step`'s global batch: consecutive slices of per-epoch permutations of n
    examples, a pure function of (step, seed), so a resumed run sees the batches an uninterrupted
    one would."""
    pos = np.arange(step * global_batch, (step + 1) * global_batch)
    order = {e: np.random.default_rng([seed, e]).permutation(n) for e in np.unique(pos // n)}
    return np.array([order[p // n][p % n] for p in pos])
