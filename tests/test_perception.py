"""Critic perception: objects found from pixels alone, on exact and on degraded frames (CPU)."""
from types import SimpleNamespace

import numpy as np
import pytest

from spiral_rl.agents.perception import BG_LABEL, FAR_LABEL, OFF_FLAG, colour_lut, label_frames, perceive
from spiral_rl.records import ObjectState
from spiral_rl.world.dataset import ground_truth_segment
from spiral_rl.world.render import render_frame, render_frames
from spiral_rl.world.scene import BACKGROUND, COLOUR_ORDER, PALETTE, SHAPES
from spiral_rl.world.tasks import TaskSampler

WORLD = SimpleNamespace(frame_size=32, segment_frames=8, context_frames=2, min_objects=2, max_objects=4,
                        size_min=0.09, size_max=0.12, move_step=0.25, push_distance=0.2, jump_height=0.2,
                        max_chain=4, task_mix=SimpleNamespace(single=0.4, chain=0.4, abstract=0.2),
                        heldout_compositions=["jump:triangle", "push:circle"], seed=0)


def _segments(size: int, n_tasks: int = 30):
    """(frames (T, H, W, 3), exact track (T + 1, N, 2), scene) for every reference-plan step."""
    sampler = TaskSampler(WORLD)
    out = []
    for task in sampler.tasks("val", n_tasks):
        scene = task.scene
        for sub in task.reference_plan:
            frames, track, end = ground_truth_segment(scene, sub, sampler.physics, size)
            out.append((frames, track, scene))
            scene = end
    return out


@pytest.mark.parametrize("size", [32, 64, 128])
def test_ground_truth_objects_are_localised_within_a_pixel_and_every_shape_is_right(size):
    segs = _segments(size)
    assert len(segs) >= 40
    p = perceive(np.stack([f for f, _, _ in segs]), [s for _, _, s in segs])
    worst_px, sizes = 0.0, []
    for b, (_, track, scene) in enumerate(segs):
        n = len(scene)
        assert p.visible[b, :, :n].all() and not p.visible[b, :, n:].any()
        worst_px = max(worst_px, float(np.abs(p.pos[b, :, :n] - track[1:]).max() * size))
        assert (p.shape[b, :, :n] == [SHAPES.index(o.shape) for o in scene]).all()
        sizes.append(p.size[b, :, :n] / [o.size for o in scene])
        assert (p.foreign_area[b] == 0).all() and (p.off_palette[b] == 0).all()
    assert worst_px < 1.0
    sizes = np.concatenate([s.ravel() for s in sizes])
    assert np.abs(sizes - 1.0).max() < (0.2 if size == 32 else 0.08)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_a_changed_shape_is_seen_although_memory_remembers_the_old_one(size):
    rng = np.random.default_rng(size)
    for true in SHAPES:
        for remembered in SHAPES:
            objs = [ObjectState("blue", true, *rng.uniform(0.2, 0.8, 2), rng.uniform(0.09, 0.12)) for _ in range(60)]
            frames = np.stack([render_frame([o], size) for o in objs])[:, None]  # (60, 1, H, W, 3)
            p = perceive(frames, [[ObjectState("blue", remembered, o.x, o.y, o.size)] for o in objs])
            hit = (p.shape[:, 0, 0] == SHAPES.index(true)).mean()
            assert hit >= (1.0 if true == remembered else 0.95), (true, remembered, hit)


def test_labels_split_palette_background_mixes_and_off_palette():
    refs = [PALETTE[c] for c in COLOUR_ORDER] + [BACKGROUND]
    cyan, bg = np.array(PALETTE["cyan"]), np.array(BACKGROUND)
    pixels = np.array([*refs,
                       (0.55 * cyan + 0.45 * bg).round(),  # a blurred cyan edge: nearer green than cyan
                       (0.3 * cyan + 0.7 * bg).round(),  # mostly background
                       (255, 255, 255)], np.uint8)  # white: no palette colour at all
    code = label_frames(pixels[None, :, :], 60.0)[0]
    assert list(code[:7] & 7) == list(range(6)) + [BG_LABEL]
    assert not (code[:7] & OFF_FLAG).any()
    assert code[7] == COLOUR_ORDER.index("cyan") | OFF_FLAG
    assert code[8] == BG_LABEL | OFF_FLAG
    assert code[9] & OFF_FLAG and code[9] & 7 == FAR_LABEL
    assert colour_lut(60.0) is colour_lut(60.0)  # built once per tolerance


def test_foreign_colours_stray_pixels_and_batching():
    scene = (ObjectState("red", "square", 0.3, 0.3, 0.1), ObjectState("green", "circle", 0.7, 0.6, 0.1))
    intruder = ObjectState("blue", "triangle", 0.6, 0.2, 0.1)
    frames = render_frames([scene, (*scene, intruder)], 64)
    frames[0, 60, 3] = PALETTE["red"]  # one stray red pixel far from the red square
    p = perceive(frames, scene)
    assert p.foreign_area[0, 0] == 0 and p.foreign_area[0, 1] > 60  # a size-0.1 triangle is ~82 px at 64 px
    assert COLOUR_ORDER[p.foreign_colour[0, 1]] == "blue"
    assert np.allclose(p.foreign_pos[0, 1], (0.6, 0.2), atol=1 / 64)
    assert np.allclose(p.pos[0, 0, 0], (0.3, 0.3), atol=0.5 / 64)  # the stray pixel is ignored
    assert p.shape[0, 0, 0] == SHAPES.index("square") and p.fill[0, 0, 0] == pytest.approx(1.0)
    single = perceive(frames[1:], scene)
    batch = perceive(np.stack([frames, frames]), [scene, scene], chunk=1)
    assert np.array_equal(batch.shape[1, 1:], single.shape[0]) and np.allclose(batch.pos[1, 1:], single.pos[0])
    with pytest.raises(ValueError, match="uint8"):
        perceive(frames.astype(np.float32), scene)
