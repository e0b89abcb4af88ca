"""CriticAgent (reflect): judge a generated segment from its pixels against the sub-action.

The critic perceives every object in every frame (perception.py), builds a track whose frame 0
is memory's last known state, and scores four dimensions in [0, 1]. A dimension is the min of its
sub-checks, so one broken check lowers it clearly instead of being averaged away. A sub-check
below its dimension's threshold names a failure kind, and the feedback says which object failed
how, in one sentence a prompt (or a person) can act on.

Sub-checks, all reported in `Verdict.details`:
  action_completeness  completeness: min over the post-conditions of predicates.degree. They are
                       a conjunction (a push must touch AND move the other object), and a mean
                       would let one satisfied condition hide a failed one.
  physical_fidelity    count (each object seen in each frame), size, shape, colour (no palette
                       colour that is not in the scene), teleport (per-frame jump),
                       interpenetration, bystander (uninvolved objects stay put).
  temporal_consistency continuity (the first frame starts where memory left the objects),
                       appearance (the first frame looks as memory recorded), flicker.
  visual_quality       visual: off-palette pixels per expected object pixel, so the score does
                       not depend on frame size or on how much of the canvas is background.

reward = sum_k weight_k * score_k, not normalised: the weights are the ablation knob.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from spiral_rl.agents.perception import Perception, perceive
from spiral_rl.records import SCORE_DIMS, ObjectState, Predicate, SubAction, Verdict
from spiral_rl.world.dynamics import REGION_BOXES
from spiral_rl.world.predicates import degree
from spiral_rl.world.scene import COLOUR_ORDER, SHAPES, reach

_FOREIGN_SHARE = 0.25  # a foreign colour counts once it covers this share of the smallest object
_SIZE_OK, _SIZE_SPAN = 0.25, 0.25  # |log(size / remembered)|: 1 up to OK, 0 at OK + SPAN
_OVERLAP_OK, _OVERLAP_ZERO = 0.8, 0.5  # centre distance / sum of reaches (touching is 1.0)
_TELEPORT_SPAN = 0.25  # of the per-frame limit: a jump 25% past it scores 0
_SEAM_SHARE = 0.25  # of the per-frame limit: seam error allowed (eased steps move <= 0.05 canvas)
_FLICKER_SHARE = 0.25  # of T: this many missing-then-back frames score 0
_OFF_OK, _OFF_SPAN = 0.05, 0.45  # off-palette pixels per expected object pixel
_AWAY = 0.02  # canvas: ending this much farther from a goal than at the start is the wrong way
_PHYSICAL = ("count", "size", "shape", "colour", "teleport", "interpenetration", "bystander")
_TEMPORAL = ("continuity", "appearance", "flicker")
_PER_OBJECT = ("count", "size", "shape", "teleport", "bystander", "continuity", "appearance", "flicker")


@dataclass(frozen=True)
class CriticSettings:
    """Thresholds and reward weights per SCORE_DIMS entry, and the perception tolerances."""

    thresholds: dict = field(default_factory=lambda: dict(zip(SCORE_DIMS, (0.8, 0.8, 0.8, 0.6))))
    weights: dict = field(default_factory=lambda: dict(zip(SCORE_DIMS, (0.5, 0.25, 0.15, 0.1))))
    colour_tolerance: float = 60.0  # RGB distance (0-255) for a pixel to count as a palette colour
    teleport_canvas_per_segment: float = 2.4  # a per-frame jump > this / segment_frames is a teleport
    bystander_tolerance: float = 0.06  # canvas: drift allowed to objects the step does not involve
    segment_frames: int = 8

    def __post_init__(self):
        for name in ("thresholds", "weights"):
            missing = set(SCORE_DIMS) - set(getattr(self, name))
            if missing:
                raise ValueError(f"CriticSettings.{name} lacks {sorted(missing)}; it needs one value per {SCORE_DIMS}")

    @classmethod
    def from_config(cls, cfg) -> "CriticSettings":
        c = cfg.critic
        return cls({d: float(getattr(c.thresholds, d)) for d in SCORE_DIMS},
                   {d: float(getattr(cfg.reward.weights, d)) for d in SCORE_DIMS},
                   float(c.colour_tolerance), float(c.teleport_canvas_per_segment),
                   float(c.bystander_tolerance), int(cfg.world.segment_frames))


def _ramp(x, ok, span):
    """1 up to `ok`, falling linearly to 0 at ok + span; NaN (no evidence) scores 1."""
    r = np.clip(1.0 - (np.asarray(x, float) - ok) / span, 0.0, 1.0)
    return np.where(np.isnan(r), 1.0, r)


def _mean_where(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, T, N) -> (B, N): mean over the frames where mask holds; 1 (no evidence) where none do."""
    n = mask.sum(1)
    return np.where(n > 0, np.where(mask, values, 0.0).sum(1) / np.maximum(n, 1), 1.0)


def _frames_text(mask: np.ndarray) -> str:
    """'frame 5' / 'frames 4-8' / 'frames 2, 5-6' for a (T,) mask over frames 1..T."""
    idx = np.flatnonzero(mask) + 1
    runs, start = [], None
    for i, t in enumerate(idx):
        start = t if start is None else start
        if i + 1 == len(idx) or idx[i + 1] != t + 1:
            runs.append(f"{start}" if start == t else f"{start}-{t}")
            start = None
    return ("frame " if len(idx) == 1 else "frames ") + ", ".join(runs)


def _goal_distance(pred: Predicate, p: np.ndarray, idx: dict) -> float:
    """How far one frame (N, 2) is from what `pred` asks; NaN for kinds without a distance."""
    if pred.kind == "at":
        name, x, y, _ = pred.args
        return float(np.hypot(*(p[idx[name]] - (x, y))))
    if pred.kind == "in_region":
        x0, x1, y0, y1 = REGION_BOXES[pred.args[1]]
        x, y = p[idx[pred.args[0]]]
        return float(np.hypot(max(x0 - x, 0.0, x - x1), max(y0 - y, 0.0, y - y1)))
    if pred.kind == "touches":
        a, b, contact, _ = pred.args
        return float(np.hypot(*(p[idx[a]] - p[idx[b]])) - contact)
    return float("nan")


def _moved_away(pred: Predicate, track: np.ndarray, idx: dict) -> bool:
    """Did the track end farther from what `pred` asks than it started (the wrong way)?"""
    if pred.kind == "rose":
        y = track[:, idx[pred.args[0]], 1]
        fell, rose = np.nanmax(y[1:] - y[0], initial=0.0), np.nanmax(y[0] - y[1:], initial=0.0)
        return bool(fell > _AWAY and rose < _AWAY)
    return _goal_distance(pred, track[-1], idx) > _goal_distance(pred, track[0], idx) + _AWAY


class CriticAgent:
    def __init__(self, settings: CriticSettings = CriticSettings()):
        self.settings = settings

    @classmethod
    def from_config(cls, cfg) -> "CriticAgent":
        if getattr(cfg.critic, "kind", "builtin") != "builtin":
            raise NotImplementedError(f"critic.kind={cfg.critic.kind!r} is not available yet; use 'builtin'")
        return cls(CriticSettings.from_config(cfg))

    def score(self, segment, sub_action: SubAction, memory, next_action: SubAction | None = None) -> Verdict:
        """Verdict of one segment (a Segment or its (T, H, W, 3) uint8 frames) given memory."""
        return self.score_batch([segment], [sub_action], [memory], [next_action])[0]

    def score_batch(self, segments: Sequence, sub_actions: Sequence[SubAction], memories: Sequence,
                    next_actions: Sequence[SubAction | None] | None = None) -> list[Verdict]:
        """Verdicts of many segments; perception runs batched over the segments of equal shape.

        memories: anything with `.objects` (WorldMemory): the last known ObjectStates, the
        reference for continuity and appearance. next_actions: the plan's next step per segment
        (or None); an accepted segment that breaks its pre-conditions is decided "replan".
        """
        frames = [getattr(s, "frames", s) for s in segments]
        next_actions = list(next_actions) if next_actions is not None else [None] * len(frames)
        if not len(frames) == len(sub_actions) == len(memories) == len(next_actions):
            raise ValueError("segments, sub_actions, memories and next_actions must have equal lengths")
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(frames):
            groups.setdefault(f.shape, []).append(i)
        verdicts: list[Verdict] = [None] * len(frames)  # type: ignore[list-item]
        for members in groups.values():
            objects = [tuple(memories[i].objects) for i in members]
            p = perceive(np.stack([frames[i] for i in members]), objects, self.settings.colour_tolerance)
            ev = self._evidence(p, objects, [sub_actions[i] for i in members])
            for b, i in enumerate(members):
                verdicts[i] = self._verdict(ev, b, objects[b], sub_actions[i], next_actions[i])
        return verdicts

    def _evidence(self, p: Perception, objects, subs) -> dict[str, np.ndarray]:
        """Every sub-check of a batch, vectorised over (B, T, N): (B,) scores and (B, N) per object."""
        st = self.settings
        B, T, N = p.area.shape
        present = p.present
        pos0 = np.full((B, N, 2), np.nan)
        radius, mem_size = np.zeros((B, N)), np.ones((B, N))
        involved, mem_shape = np.zeros((B, N), bool), np.zeros((B, N), int)
        for b, (objs, sub) in enumerate(zip(objects, subs)):
            for k, o in enumerate(objs):
                pos0[b, k] = o.x, o.y
                radius[b, k], mem_size[b, k] = reach(o), o.size
                involved[b, k], mem_shape[b, k] = o.name in sub.involved, SHAPES.index(o.shape)

        # A recoloured object leaves its own colour and shows up as a foreign blob: when exactly
        # one object is missing, the blob is that object, so it is tracked (and blamed) as such.
        smallest = np.where(present, p.expected_area, np.inf).min(1)
        foreign = p.foreign_area >= _FOREIGN_SHARE * smallest[:, None]  # (B, T)
        missing = present[:, None, :] & ~p.visible
        recoloured = missing & ((missing.sum(-1) == 1) & foreign)[..., None]
        seen = p.visible | recoloured
        pos = np.where(recoloured[..., None], p.foreign_pos[:, :, None, :], p.pos)  # (B, T, N, 2)
        ev = dict(pos=pos, pos0=pos0, seen=seen, recoloured=recoloured, foreign=foreign, present=present,
                  perceived_shape=p.shape, perceived_size=p.size, foreign_colour=p.foreign_colour)

        # physical fidelity
        ev["count_k"] = seen.mean(1)
        size_t = _ramp(np.abs(np.log(p.size / mem_size[:, None, :])), _SIZE_OK, _SIZE_SPAN)  # 1 where unseen
        ev["size_k"] = _mean_where(size_t, p.visible)
        ev["shape_k"] = _mean_where(p.shape == mem_shape[:, None], p.visible)
        ev["colour"] = 1.0 - foreign.mean(1)
        limit = st.teleport_canvas_per_segment / st.segment_frames
        step = np.linalg.norm(np.diff(pos, axis=1), axis=-1)  # (B, T - 1, N), NaN across gaps
        ev["jump_k"] = np.fmax.reduce(step, axis=1, initial=0.0)  # fmax skips NaN
        ev["teleport_k"] = _ramp(ev["jump_k"], limit, _TELEPORT_SPAN * limit)
        dist = np.linalg.norm(pos[:, :, :, None] - pos[:, :, None, :], axis=-1)  # (B, T, N, N)
        pair = present[:, :, None] & present[:, None, :] & np.triu(np.ones((N, N), bool), 1)
        q = dist / (radius[:, :, None] + radius[:, None, :] + 1e-9)[:, None]
        ev["overlap_q"] = np.where(pair[:, None] & np.isfinite(q), q, np.inf)
        ev["interpenetration"] = _ramp(-ev["overlap_q"].min((1, 2, 3), initial=np.inf), -_OVERLAP_OK,
                                       _OVERLAP_OK - _OVERLAP_ZERO)
        drift = np.fmax.reduce(np.linalg.norm(pos - pos0[:, None], axis=-1), axis=1, initial=0.0)  # (B, N)
        ev["drift_k"] = np.where(~involved & present, drift, 0.0)
        ev["bystander_k"] = _ramp(ev["drift_k"], st.bystander_tolerance, st.bystander_tolerance)

        # temporal consistency, from the first frame each object is seen in
        first, ever = seen.argmax(1), seen.any(1)  # (B, N)
        take = lambda a: np.take_along_axis(a, first[:, None, :], 1)[:, 0]  # (B, T, N) -> (B, N)
        # Across the seam an object either starts from rest where memory left it (steps are eased)
        # or keeps the velocity of its next frame (a jump's arc); a discontinuity does neither.
        p1 = np.take_along_axis(pos, first[:, None, :, None], 1)[:, 0]  # (B, N, 2)
        p2 = np.take_along_axis(pos, np.minimum(first + 1, T - 1)[:, None, :, None], 1)[:, 0]
        rest = np.linalg.norm(p1 - pos0, axis=-1)
        coast = np.linalg.norm(pos0 - 2.0 * p1 + p2, axis=-1)  # NaN when that next frame is unseen
        ev["seam_k"] = np.where(ever & present, np.fmin(rest, coast), 0.0)
        ev["jump_in_k"] = np.where(ever & present, rest, 0.0)
        seam_tol = _SEAM_SHARE * limit
        ev["continuity_k"] = _ramp(ev["seam_k"] - seam_tol * first, seam_tol, seam_tol)
        looks = np.minimum(take(size_t), take(p.shape) == mem_shape)
        ev["appearance_k"] = np.where(ever & present, np.where(take(recoloured), 0.0, looks), 1.0)
        before = np.logical_or.accumulate(seen, 1)
        after = np.logical_or.accumulate(seen[:, ::-1], 1)[:, ::-1]
        ev["flicker_t"] = ~seen & before & after & present[:, None]
        ev["flicker_k"] = _ramp(ev["flicker_t"].sum(1), 0.0, max(1.0, _FLICKER_SHARE * T))

        # visual quality
        object_px = np.maximum(np.where(present, p.expected_area, 0.0).sum(1), 1.0)
        ev["off_ratio"] = p.off_palette.mean(1) * (p.frame_size[0] * p.frame_size[1]) / object_px
        ev["visual"] = _ramp(ev["off_ratio"], _OFF_OK, _OFF_SPAN)
        for key in _PER_OBJECT:
            ev[key] = np.where(present, ev[f"{key}_k"], 1.0).min(1)
        return ev

    def _verdict(self, ev, b: int, objects: tuple[ObjectState, ...], sub: SubAction,
                 next_action: SubAction | None) -> Verdict:
        st, n = self.settings, len(objects)
        names = [o.name for o in objects]
        track = np.concatenate([ev["pos0"][b, :n][None], ev["pos"][b, :, :n]])  # (T + 1, n, 2)
        post = [(pr, degree(pr, track, names)) for pr in sub.post]
        details = {k: float(ev[k][b]) for k in (*_PHYSICAL, *_TEMPORAL, "visual")}
        details["completeness"] = min((d for _, d in post), default=1.0)
        details["off_palette_ratio"] = float(ev["off_ratio"][b])
        details["max_jump"] = float(ev["jump_k"][b, :n].max(initial=0.0))
        details["max_bystander_drift"] = float(ev["drift_k"][b, :n].max(initial=0.0))
        scores = {"action_completeness": details["completeness"],
                  "physical_fidelity": min(details[k] for k in _PHYSICAL),
                  "temporal_consistency": min(details[k] for k in _TEMPORAL),
                  "visual_quality": details["visual"]}
        reward = float(sum(st.weights[d] * scores[d] for d in SCORE_DIMS))

        failed = self._failures(ev, b, objects, sub, details, post, track)
        failures = tuple(dict.fromkeys(kind for kind, _ in failed))
        seen_end = ev["seen"][b, -1, :n] & ~ev["recoloured"][b, -1, :n]
        end_states = tuple(o.moved_to(*ev["pos"][b, -1, k]) for k, o in enumerate(objects) if seen_end[k])
        if failed:
            decision, feedback = "refine", failed[0][1]
            if len(failures) > 1:
                feedback += f" (also: {', '.join(failures[1:])})"
        else:
            decision, feedback = "accept", f"the step looks right: '{sub.text}' is complete and consistent"
            if next_action is not None:
                end = np.where(seen_end[:, None], ev["pos"][b, -1, :n], np.nan)[None]  # (1, n, 2) track
                broken = [(pr, d) for pr in next_action.pre if (d := degree(pr, end, names)) < 1.0]
                if broken:
                    decision = "replan"
                    feedback = (f"the step looks right, but the next step's condition fails: '{broken[0][0].text}' "
                                f"holds to {broken[0][1]:.2f}; replan from the perceived state")
        return Verdict(scores, reward, decision, feedback, failures, end_states, details)

    def _failures(self, ev, b, objects, sub, details, post, track) -> list[tuple[str, str]]:
        """(kind, sentence) of every sub-check below its dimension's threshold, root causes first:
        noise explains odd shapes, a vanished object explains an unfinished step, and so on."""
        thr = self.settings.thresholds
        names = [o.name for o in objects]
        below = lambda key, dim: details[key] < thr[dim]
        worst = lambda key: int(np.argmin(np.where(ev["present"][b], ev[f"{key}_k"][b], np.inf)))
        out = []
        if below("visual", "visual_quality"):
            out.append(("low_quality", f"frames are noisy or blurred (off-palette pixels at "
                                       f"{details['off_palette_ratio']:.2f}x the object area)"))
        if below("count", "physical_fidelity"):
            k = worst("count")
            out.append(("vanished", f"the {names[k]} vanished in {_frames_text(~ev['seen'][b, :, k])}"))
        if below("flicker", "temporal_consistency"):
            k = worst("flicker")
            out.append(("vanished", f"the {names[k]} flickers: it is missing in "
                                    f"{_frames_text(ev['flicker_t'][b, :, k])} but seen around them"))
        if below("colour", "physical_fidelity"):
            fc = ev["foreign_colour"][b][ev["foreign"][b]]
            colour = COLOUR_ORDER[int(np.bincount(fc).argmax())]
            rec = ev["recoloured"][b]
            if rec.any():
                k = int(rec.sum(0).argmax())
                out.append(("recoloured", f"the {names[k]} turned {colour} in {_frames_text(rec[:, k])}"))
            else:
                out.append(("recoloured", f"a {colour} blob that is not in the scene appears in "
                                          f"{_frames_text(ev['foreign'][b])}"))
        if below("shape", "physical_fidelity"):
            k = worst("shape")
            shapes = ev["perceived_shape"][b, :, k]
            wrong = (shapes >= 0) & (shapes != SHAPES.index(objects[k].shape))
            other = SHAPES[int(np.bincount(shapes[wrong]).argmax())]
            out.append(("reshaped", f"the {names[k]} looks like a {other} in {_frames_text(wrong)}"))
        if below("teleport", "physical_fidelity"):
            k = worst("teleport")
            t = int(np.nan_to_num(np.linalg.norm(np.diff(ev["pos"][b, :, k], axis=0), axis=-1)).argmax())
            out.append(("teleport", f"the {names[k]} jumped {ev['jump_k'][b, k]:.2f} canvas widths between "
                                    f"frames {t + 1} and {t + 2}"))
        if below("continuity", "temporal_consistency"):
            k = worst("continuity")
            out.append(("discontinuity", f"the segment does not continue from the previous frames: the {names[k]} "
                                         f"starts {ev['jump_in_k'][b, k]:.2f} canvas widths from where it was"))
        if below("appearance", "temporal_consistency"):
            k = worst("appearance")
            out.append(("discontinuity", f"the {names[k]} does not look as it did at the end of the previous step"))
        if below("interpenetration", "physical_fidelity"):
            q = ev["overlap_q"][b]  # (T, N, N)
            _, i, j = np.unravel_index(q.argmin(), q.shape)
            out.append(("interpenetration", f"the {names[i]} and the {names[j]} overlap in "
                                            f"{_frames_text(q[:, i, j] < _OVERLAP_OK)}"))
        if below("size", "physical_fidelity"):
            k = worst("size")
            ratio = np.nanmedian(ev["perceived_size"][b, :, k]) / objects[k].size
            out.append(("resized", f"the {names[k]} changed size (x{ratio:.2f})"))
        if below("bystander", "physical_fidelity"):
            k = worst("bystander")
            out.append(("bystander_moved", f"the {names[k]} moved {ev['drift_k'][b, k]:.2f} canvas widths "
                                           f"although the step does not involve it"))
        if below("completeness", "action_completeness"):
            pred, deg = min(post, key=lambda pd: pd[1])
            idx = {nm: k for k, nm in enumerate(names)}
            away = any(_moved_away(pr, track, idx) for pr, d in post if d < thr["action_completeness"])
            how = "moved away from its goal" if away else "stopped short"
            out.append(("wrong_direction" if away else "incomplete",
                        f"the {sub.subject} {how}: '{pred.text}' holds to {deg:.2f}"))
        return out
