"""Task sampler: deterministic, split-disjoint, held-out compositions only in 'heldout' (CPU)."""
import numpy as np
import pytest

from spiral_rl.config import load_config
from spiral_rl.world.language import parse_instruction
from spiral_rl.world.tasks import TaskSampler, composition


def test_tasks_are_a_pure_function_of_seed_split_and_index(world_cfg):
    a, b = TaskSampler(world_cfg), TaskSampler(world_cfg)
    for split in ("train", "heldout"):
        for i in (0, 7, 123):
            x, y = a.task(split, i), b.task(split, i)
            assert x.instruction == y.instruction and x.scene == y.scene and x.reference_plan == y.reference_plan
            assert np.array_equal(x.first_frame, y.first_frame)
    other = TaskSampler(load_config(["world.seed=1"]).world)
    assert [t.scene for t in other.tasks("train", 20)] != [t.scene for t in a.tasks("train", 20)]


def test_splits_do_not_share_scenes(world_cfg):
    sampler = TaskSampler(world_cfg)
    scenes = {split: {t.scene for t in sampler.tasks(split, 200)} for split in ("train", "val", "test")}
    assert len(scenes["train"]) == 200
    assert not scenes["train"] & scenes["val"] and not scenes["train"] & scenes["test"]
    assert not scenes["val"] & scenes["test"]


def test_heldout_compositions_appear_only_in_the_heldout_split(world_cfg):
    sampler = TaskSampler(world_cfg)
    held = set(world_cfg.heldout_compositions)
    for split in ("train", "val", "test"):
        for t in sampler.tasks(split, 200):
            assert not {composition(s, t.scene) for s in t.reference_plan} & held, t.instruction
    for t in sampler.tasks("heldout", 100):
        assert {composition(s, t.scene) for s in t.reference_plan} & held, t.instruction


def test_instruction_kinds_and_chain_lengths(world_cfg):
    cfg = load_config(["world.max_chain=6"])
    tasks = TaskSampler(cfg.world).tasks("train", 400)
    by_kind = {k: [t for t in tasks if t.kind == k] for k in ("single", "chain", "abstract")}
    assert all(len(v) >= 20 for v in by_kind.values())
    assert all(len(t.reference_plan) == 1 for t in by_kind["single"])
    lengths = {len(t.reference_plan) for t in by_kind["chain"]}
    assert lengths == {2, 3, 4, 5, 6}
    for t in by_kind["chain"]:
        assert len(parse_instruction(t.instruction)) == len(t.reference_plan)
        assert t.instruction.count(", then ") == len(t.reference_plan) - 1
    for t in by_kind["abstract"]:  # a goal names no step: the plan must come from the scene
        assert ", then " not in t.instruction and len(parse_instruction(t.instruction)) == 1


@pytest.mark.parametrize("size", [32, 64, 128])
def test_first_frame_has_the_configured_size(size):
    task = TaskSampler(load_config([f"world.frame_size={size}"]).world).task("val", 0)
    assert task.first_frame.shape == (size, size, 3) and task.first_frame.dtype == np.uint8
    assert 2 <= len(task.scene) <= 4


def test_unknown_split_is_rejected(world_cfg):
    with pytest.raises(ValueError, match="unknown split 'dev'; choose one of train, val, test, heldout"):
        TaskSampler(world_cfg).task("dev", 0)
