"""Built-in world: scenes, rendering and verb physics are exact and deterministic (CPU)."""
import numpy as np
import pytest

from spiral_rl.agents.critic import CriticAgent
from spiral_rl.evaluate import score_examples
from spiral_rl.records import ObjectState
from spiral_rl.world.actions import Step, make_sub_action
from spiral_rl.world.dataset import SegmentDataset, ground_truth_segment
from spiral_rl.world.dynamics import Infeasible, Physics, in_region, simulate
from spiral_rl.world.render import render_frame
from spiral_rl.world.scene import BACKGROUND, PALETTE, SHAPES, inside_canvas, overlapping, reach, sample_scene

PHYS = Physics()


def test_scenes_are_deterministic_unique_coloured_and_on_canvas():
    for seed in range(200):
        a = sample_scene(np.random.default_rng(seed), 4, 0.09, 0.12)
        b = sample_scene(np.random.default_rng(seed), 4, 0.09, 0.12)
        assert a == b
        assert len({o.colour for o in a}) == 4
        assert all(inside_canvas(o) for o in a)
        assert not any(overlapping(p, q) for i, p in enumerate(a) for q in a[i + 1:])
    shapes = {o.shape for s in range(50) for o in sample_scene(np.random.default_rng(s), 4, 0.09, 0.12)}
    assert shapes == set(SHAPES)


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("shape,fill", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_render_puts_the_pixel_centroid_at_the_object_position(size, shape, fill):
    obj = ObjectState("red", shape, 0.43, 0.57, 0.12)
    frame = render_frame([obj], size)
    mask = np.all(frame == PALETTE["red"], axis=-1)
    assert np.all(frame[~mask] == BACKGROUND)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    assert abs(cx - obj.x) < 0.6 / size and abs(cy - obj.y) < 0.6 / size
    area = mask.sum() / size**2
    bbox = (np.ptp(xs) + 1) * (np.ptp(ys) + 1) / size**2
    assert area / bbox == pytest.approx(fill, abs=0.12)


def two(a=(0.3, 0.5), b=(0.7, 0.5), shapes=("square", "circle")):
    return (ObjectState("red", shapes[0], *a, 0.1), ObjectState("blue", shapes[1], *b, 0.1))


def test_move_and_move_to_reach_their_targets_and_leave_bystanders_still():
    scene = two()
    track, end = simulate(scene, "move", "red square", (), {"direction": "up"}, PHYS)
    assert track.shape == (PHYS.frames + 1, 2, 2)
    assert end[0].y == pytest.approx(0.25) and end[0].x == pytest.approx(0.3)
    assert np.all(track[:, 1] == track[0, 1])  # the bystander never moves
    _, end = simulate(scene, "move_to", "red square", (), {"region": "bottom_left"}, PHYS)
    assert in_region(end[0].x, end[0].y, "bottom_left")
    _, end = simulate(scene, "move_to", "blue circle", (), {"region": "top"}, PHYS)
    assert end[1].x == pytest.approx(0.7) and in_region(end[1].x, end[1].y, "top")


def test_push_moves_the_pushed_object_only_after_contact():
    scene = two()
    track, end = simulate(scene, "push", "red square", ("blue circle",), {}, PHYS)
    contact = reach(scene[0]) + reach(scene[1])
    gaps = np.hypot(*(track[:, 0] - track[:, 1]).T)
    assert gaps[-1] == pytest.approx(contact)
    assert end[1].x == pytest.approx(0.7 + PHYS.push_distance)
    moving = np.abs(np.diff(track[:, 1, 0])) > 1e-12
    assert moving.any() and not moving[0]  # still at the start, pushed later
    first = np.argmax(moving)
    assert gaps[first] == pytest.approx(contact, abs=0.05)
    assert np.all(gaps >= contact - 1e-6)


def test_jump_goes_up_and_back_and_swap_exchanges_without_collision():
    scene = two()
    track, end = simulate(scene, "jump", "red square", (), {}, PHYS)
    assert track[:, 0, 1].min() == pytest.approx(0.5 - PHYS.jump_height)
    assert end[0] == scene[0]
    track, end = simulate(scene, "swap", "red square", ("blue circle",), {}, PHYS)
    assert (end[0].x, end[0].y) == pytest.approx((0.7, 0.5)) and (end[1].x, end[1].y) == pytest.approx((0.3, 0.5))
    assert np.all(np.hypot(*(track[:, 0] - track[:, 1]).T) >= reach(scene[0]) + reach(scene[1]))


def test_infeasible_steps_say_why():
    scene = (ObjectState("red", "square", 0.11, 0.5, 0.1), ObjectState("blue", "circle", 0.5, 0.5, 0.1))
    with pytest.raises(Infeasible, match="too close to the left edge"):
        simulate(scene, "move", "red square", (), {"direction": "left"}, PHYS)
    with pytest.raises(Infeasible, match="already in"):
        simulate(scene, "move_to", "red square", (), {"region": "left"}, PHYS)
    with pytest.raises(Infeasible, match="collide"):
        simulate(scene, "move", "red square", (), {"direction": "right"}, Physics(move_step=0.4))
    with pytest.raises(KeyError, match="no 'green circle' in the scene"):
        simulate(scene, "jump", "green circle", (), {}, PHYS)


def test_objects_never_leave_the_canvas_or_overlap_in_any_reference_segment(world_cfg):
    ds = SegmentDataset(world_cfg, "train", 150)
    phys = Physics.from_config(world_cfg)
    for ex in ds.examples:
        frames, track, end = ground_truth_segment(ex.scene, ex.sub_action, phys, world_cfg.frame_size)
        assert frames.shape == (world_cfg.segment_frames, 32, 32, 3) and frames.dtype == np.uint8
        for t in range(track.shape[0]):
            objs = [o.moved_to(*track[t, k]) for k, o in enumerate(ex.scene)]
            assert all(inside_canvas(o) for o in objs)
            # touching is allowed (a push ends in contact), overlapping is not
            assert not any(overlapping(p, q, 1e-6) for i, p in enumerate(objs) for q in objs[i + 1:])
    # context frames chain: each example's last context frame is the previous segment's last frame
    same_task = [(a, b) for a, b in zip(ds.examples, ds.examples[1:]) if a.task_id == b.task_id]
    assert same_task and all(np.array_equal(b.context[-1], a.frames[-1]) for a, b in same_task)


def test_noisy_demonstrations_stop_short_of_their_caption_and_keep_the_exact_context(cfg):
    exact = SegmentDataset(cfg.world, "train", 40)
    noisy = SegmentDataset(cfg.world, "train", 40, stop_short_share=0.5, seed=3)
    assert exact.stopped_short == 0 and len(noisy) == len(exact)
    short = [i for i, (a, b) in enumerate(zip(exact, noisy)) if not np.array_equal(a.frames, b.frames)]
    assert len(short) == noisy.stopped_short and 0.3 * len(noisy) < len(short) < 0.6 * len(noisy)
    # only the shown clip changes: the caption and the context (the exact history) do not
    assert all(a.sub_action == b.sub_action and np.array_equal(a.context, b.context) for a, b in zip(exact, noisy))
    again = SegmentDataset(cfg.world, "train", 40, stop_short_share=0.5, seed=3)
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(noisy, again))
    other = SegmentDataset(cfg.world, "train", 40, stop_short_share=0.5, seed=4)
    assert any(not np.array_equal(a.frames, b.frames) for a, b in zip(noisy, other))
    # the critic sees what the caption asked for was not done; the exact clips are complete
    critic, k = CriticAgent.from_config(cfg), cfg.world.context_frames
    stopped = score_examples(None, [noisy[i] for i in short], critic, 64, k)
    kept = score_examples(None, [noisy[i] for i in range(len(noisy)) if i not in short], critic, 64, k)
    assert np.mean([r["action_completeness"] for r in stopped]) < 0.6
    assert np.mean([r["action_completeness"] for r in kept]) > 0.95
    with pytest.raises(ValueError, match="stop_short_share must be in"):
        SegmentDataset(cfg.world, "train", 1, stop_short_share=1.5)


@pytest.mark.parametrize("size", [64, 128])
def test_segments_render_at_larger_sizes(world_cfg, size):
    sub, _, _ = make_sub_action(two(), Step("move", "red square", (), (("direction", "down"),)), PHYS)
    frames, _, _ = ground_truth_segment(two(), sub, PHYS, size)
    assert frames.shape == (PHYS.frames, size, size, 3)
