"""World memory: context frames, object records, bounded history (CPU)."""
import numpy as np
import pytest

from spiral_rl.memory import WorldMemory
from spiral_rl.records import Segment, Verdict
from spiral_rl.world.dataset import ground_truth_segment
from spiral_rl.world.tasks import TaskSampler


def test_context_follows_committed_segments_and_memory_stays_bounded(world_cfg):
    sampler = TaskSampler(world_cfg)
    task = next(t for t in sampler.tasks("val", 50) if len(t.reference_plan) >= 3)
    mem = WorldMemory(task.first_frame, task.scene, context_frames=2, max_keyframes=2, max_history=2)
    assert mem.context().shape == (2, 32, 32, 3)
    assert np.array_equal(mem.context()[0], task.first_frame)  # repeated until enough frames exist
    scene = task.scene
    for sub in task.reference_plan:
        frames, _, end = ground_truth_segment(scene, sub, sampler.physics, 32)
        verdict = Verdict({}, 0.0, "accept", "", end_states=end[:-1])  # last object not seen
        mem.commit(Segment(frames, sub), verdict)
        assert np.array_equal(mem.context(), frames[-2:])
        assert mem.objects[:-1] == end[:-1]
        assert mem.objects[-1] == scene[-1]  # an unseen object keeps its last known state
        scene = end[:-1] + (scene[-1],)
    assert len(mem.keyframes) == 2 and len(mem.history) == 2 and mem.steps_done == len(task.reference_plan)
    assert mem.nbytes() == 4 * 32 * 32 * 3
    assert task.reference_plan[-1].text in mem.summary()


def test_bad_first_frames_are_rejected(world_cfg):
    with pytest.raises(ValueError, match=r"first_frames must be \(K, H, W, 3\) uint8"):
        WorldMemory(np.zeros((32, 32), np.uint8), ())
