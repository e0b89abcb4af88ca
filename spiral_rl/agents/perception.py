"""Perception for the critic: every expected object in every frame, from pixels alone.

Colours are unique within a scene, so a colour *is* an object's identity: perception is a set of
per-colour statistics, never a search. Each pixel is labelled once through a lookup table, then
two `bincount`s build per-frame column and row histograms of every label, from which pixel
count, centroid, bounding box and shape features all follow. Nothing here loops over pixels, and
nothing ever reads a ground-truth state: the objects passed in only say which colours to look
for and what shape and size memory last recorded.

Coordinates are canvas fractions (pixel i has its centre at (i + 0.5) / W), as in render.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from spiral_rl.records import ObjectState
from spiral_rl.world.scene import BACKGROUND, COLOUR_ORDER, PALETTE, SHAPES

N_COLOURS = len(COLOUR_ORDER)  # labels 0..5: palette colours in COLOUR_ORDER
BG_LABEL = N_COLOURS  # 6: background
FAR_LABEL = N_COLOURS + 1  # 7: no reference colour is close enough to count for geometry
OFF_FLAG = 8  # code bit: farther than colour_tolerance from every reference colour
N_CODES = 16

# Pixel area of a shape in units of size**2 (size = half-extent), from render.shape_mask.
SHAPE_AREA = np.array([4.0, math.pi, 2.0])  # square, circle, triangle (SHAPES order)
_SHAPE_FILL = np.array([1.0, math.pi / 4.0, 0.5])  # area / bounding box
# Centroid minus bounding-box centre, over box height: an apex-up triangle's centroid sits a
# sixth of its height below the box centre; symmetric shapes have none.
_SHAPE_VOFF = np.array([0.0, 0.0, 1.0 / 6.0])
# Feature noise per pixel of object size (1 / (size * W)): rasterising a small shape moves its
# fill ratio and area by about a pixel row. Fitted on rendered shapes at 32-128 px so that the
# remembered shape is always kept on exact renders and a real change is found >98% of the time.
_SIGMA_FILL, _SIGMA_VOFF, _SIGMA_LOG_AREA = 0.3, 0.05, 0.4
_SOFT_WIDENING = 8.0  # feature noise grows by this times the off-palette share of the blob
_MEMORY_PRIOR = 2.0  # squared-distance bonus of the remembered shape: ambiguous blobs keep it
# Geometry labels explain a pixel as a mix of one palette colour and the background (a blurred
# or anti-aliased edge) and give it to the colour when it holds at least half of it, i.e. they
# threshold the unblurred shape at its edge. Nearest-colour labels would not: a cyan/background
# mix is nearer to green than to cyan. A pixel farther than this times the quality tolerance
# from every mix line is FAR_LABEL; noise that lands on a line makes isolated pixels, dropped later.
_GEOMETRY_SCALE = 1.5
_QUANT = 2  # bits dropped per channel for the lookup table: <= 2 units of error, 256 KiB table


@lru_cache(maxsize=4)
def colour_lut(colour_tolerance: float) -> np.ndarray:
    """(2**18,) uint8: quantised RGB -> code. code & 7 is the geometry label (palette colour,
    BG_LABEL or FAR_LABEL); code & OFF_FLAG marks a pixel farther than the tolerance from every
    palette and background colour (off-palette: visual quality)."""
    levels = 256 >> _QUANT
    centres = (np.arange(levels, dtype=np.float32) * (1 << _QUANT)) + ((1 << _QUANT) - 1) / 2.0
    r, g, b = np.meshgrid(centres, centres, centres, indexing="ij")
    rgb = np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1)  # (M, 3), M = levels**3
    refs = np.array([PALETTE[c] for c in COLOUR_ORDER] + [BACKGROUND], dtype=np.float32)  # (7, 3)
    off = np.sqrt(((rgb[:, None, :] - refs[None]) ** 2).sum(-1)).min(1) > colour_tolerance  # (M,)
    line = refs[:N_COLOURS] - refs[BG_LABEL]  # (6, 3) background -> colour
    rel = rgb - refs[BG_LABEL]
    share = np.clip((rel @ line.T) / (line**2).sum(1), 0.0, 1.0)  # (M, 6) colour share of the mix
    residual = np.sqrt(((rel[:, None, :] - share[..., None] * line) ** 2).sum(-1))  # (M, 6)
    best = residual.argmin(1)
    label = np.where(np.take_along_axis(share, best[:, None], 1)[:, 0] >= 0.5, best, BG_LABEL)
    code = np.where(residual.min(1) <= _GEOMETRY_SCALE * colour_tolerance, label, FAR_LABEL)
    code = code + np.where(off, OFF_FLAG, 0)
    return code.astype(np.uint8)


def label_frames(frames: np.ndarray, colour_tolerance: float = 60.0) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H, W) uint8 codes (see colour_lut)."""
    q = frames >> _QUANT
    bits = 8 - _QUANT
    idx = (q[..., 0].astype(np.int32) << (2 * bits)) | (q[..., 1].astype(np.int32) << bits) | q[..., 2]
    return colour_lut(float(colour_tolerance))[idx]


@dataclass
class ColourStats:
    """Per-frame geometry of every palette colour. F frames; arrays (F, 6) unless noted.

    count: pixels of the colour; cx, cy: centroid in canvas units (NaN when count == 0);
    width, height: bounding box in pixels around the centroid (0 when absent); voff: (centroid -
    box centre) / box height; soft: share of the colour's pixels that are off-palette (blurred or
    noisy edges); off_palette: (F,) off-palette pixel count.
    """

    count: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    width: np.ndarray
    height: np.ndarray
    voff: np.ndarray
    soft: np.ndarray
    off_palette: np.ndarray


def _extent(hist: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, length) of the run of occupied bins of (..., L) histograms around bin `centre`.

    Noise pixels that survive the isolation filter lie apart from the object: they must not
    stretch its bounding box, which the fill ratio (and so the shape) depends on.
    """
    L = hist.shape[-1]
    bins = np.arange(L)
    c = np.clip(np.nan_to_num(centre, nan=-1.0), -1, L).astype(np.int64)[..., None]
    empty = hist <= 0
    first = np.where(empty & (bins < c), bins, -1).max(-1) + 1
    last = np.where(empty & (bins > c), bins, L).min(-1) - 1
    return first, np.maximum(last - first + 1, 0)


def colour_stats(frames: np.ndarray, colour_tolerance: float = 60.0) -> ColourStats:
    """Statistics of (F, H, W, 3) uint8 frames, two bincounts over the whole batch."""
    F, H, W, _ = frames.shape
    code = label_frames(frames, colour_tolerance)  # (F, H, W)
    # A pixel with no 4-neighbour of its own label is noise, not an object: drop it from the
    # geometry, or a few far-away stray pixels would stretch bounding boxes and pull centroids.
    label = code & 7
    eq_h = label[:, :, 1:] == label[:, :, :-1]
    eq_v = label[:, 1:] == label[:, :-1]
    kept = np.zeros(label.shape, bool)
    kept[:, :, 1:] |= eq_h
    kept[:, :, :-1] |= eq_h
    kept[:, 1:] |= eq_v
    kept[:, :-1] |= eq_v
    code = np.where(kept, code, code | FAR_LABEL).astype(np.int32)
    frame_base = np.arange(F, dtype=np.int32)[:, None, None] * N_CODES
    # Column histogram: bin (frame, code, column); row histogram: bin (frame, code, row).
    idx_col = (code + frame_base) * W + np.arange(W, dtype=np.int32)[None, None, :]
    idx_row = (code + frame_base) * H + np.arange(H, dtype=np.int32)[None, :, None]
    col = np.bincount(idx_col.ravel(), minlength=F * N_CODES * W).reshape(F, N_CODES, W)
    row = np.bincount(idx_row.ravel(), minlength=F * N_CODES * H).reshape(F, N_CODES, H)
    off_palette = col[:, OFF_FLAG:].sum((1, 2))
    soft = col[:, OFF_FLAG:OFF_FLAG + N_COLOURS].sum(-1)
    # Geometry ignores the quality flag: fold codes l and l + 8 back onto label l.
    col = col[:, :N_COLOURS] + col[:, OFF_FLAG:OFF_FLAG + N_COLOURS]  # (F, 6, W)
    row = row[:, :N_COLOURS] + row[:, OFF_FLAG:OFF_FLAG + N_COLOURS]  # (F, 6, H)
    count = col.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xs = (np.arange(W) + 0.5) / W
        ys = (np.arange(H) + 0.5) / H
        cx = (col @ xs) / count
        cy = (row @ ys) / count
        x0, width = _extent(col, cx * W)
        y0, height = _extent(row, cy * H)
        voff = (cy * H - (y0 + height / 2.0)) / height
        soft = soft / count
    return ColourStats(count, cx, cy, width, height, voff, soft, off_palette)


@dataclass
class Perception:
    """What a batch of B segments of T frames shows of its N expected objects (padded: `present`).

    pos: (B, T, N, 2) centroid, NaN where not visible; area: (B, T, N) pixels; visible: (B, T, N);
    shape: (B, T, N) int index into SHAPES (-1 where not visible); size: (B, T, N) half-extent
    estimated from area and perceived shape (NaN where not visible); fill: (B, T, N) area / box;
    soft: (B, T, N) share of the object's pixels that are off-palette (its edges are blurred).
    foreign_area: (B, T) pixels of the largest palette colour that is not in the scene,
    foreign_colour: (B, T) its COLOUR_ORDER index (-1 if none), foreign_pos: (B, T, 2);
    off_palette: (B, T) share of the canvas that is off-palette; expected_area: (B, N) pixels
    memory predicts for each object.
    """

    pos: np.ndarray
    area: np.ndarray
    visible: np.ndarray
    shape: np.ndarray
    size: np.ndarray
    fill: np.ndarray
    soft: np.ndarray
    foreign_area: np.ndarray
    foreign_colour: np.ndarray
    foreign_pos: np.ndarray
    off_palette: np.ndarray
    expected_area: np.ndarray
    present: np.ndarray
    frame_size: tuple[int, int]


def _object_table(objects: Sequence[Sequence[ObjectState]]) -> dict[str, np.ndarray]:
    """Padded (B, N) arrays of the expected objects: colour, shape index, size, present."""
    B, N = len(objects), max(1, max(len(o) for o in objects))
    colour = np.zeros((B, N), np.int64)
    shape = np.zeros((B, N), np.int64)
    size = np.ones((B, N))
    present = np.zeros((B, N), bool)
    for b, objs in enumerate(objects):  # B * N Python steps: cheap next to the pixel work
        for k, o in enumerate(objs):
            colour[b, k] = COLOUR_ORDER.index(o.colour)
            shape[b, k] = SHAPES.index(o.shape)
            size[b, k] = o.size
            present[b, k] = True
    return {"colour": colour, "shape": shape, "size": size, "present": present}


def classify_shape(fill, voff, area_px, size_px, prior, soft=0.0) -> np.ndarray:
    """Nearest shape by fill ratio, vertical centroid offset and area for the remembered size.

    All (...) arrays: area_px pixels, size_px the remembered half-extent in pixels, prior the
    remembered shape index, kept unless the blob clearly looks like another shape; soft the
    off-palette share of the blob. Blur rounds corners (a blurred 6 px square looks like a
    circle), so soft edges widen the feature noise: the evidence is weaker, not different.
    """
    px = (1.0 + _SOFT_WIDENING * soft)[..., None] / size_px[..., None]  # feature noise scale
    with np.errstate(invalid="ignore", divide="ignore"):
        log_area = np.log(area_px / size_px**2)[..., None]
        d = (((fill[..., None] - _SHAPE_FILL) / (_SIGMA_FILL * px)) ** 2
             + ((voff[..., None] - _SHAPE_VOFF) / (_SIGMA_VOFF * px)) ** 2
             + ((log_area - np.log(SHAPE_AREA)) / (_SIGMA_LOG_AREA * px)) ** 2)  # (..., 3)
    d -= _MEMORY_PRIOR * (np.arange(len(SHAPES)) == prior[..., None])
    return np.nan_to_num(d, nan=np.inf).argmin(-1)


def perceive(frames: np.ndarray, objects, colour_tolerance: float = 60.0,
             visible_fraction: float = 0.25, chunk: int = 64) -> Perception:
    """Measure the expected objects in frames (T, H, W, 3) or a batch (B, T, H, W, 3) uint8.

    objects: the expected ObjectStates (memory's records: colour, shape, size), one sequence per
    segment of the batch (a single sequence for unbatched frames). An object is visible in a frame
    when its colour covers at least `visible_fraction` of the area its remembered size predicts.
    The result is batched even for unbatched input; `chunk` segments are labelled at a time to
    keep the histograms in cache.
    """
    if frames.ndim == 4:
        frames, objects = frames[None], [objects]
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) or (B, T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    B, T, H, W, _ = frames.shape
    if len(objects) != B:
        raise ValueError(f"{B} segments but {len(objects)} object lists")
    parts = [colour_stats(frames[i:i + chunk].reshape(-1, H, W, 3), colour_tolerance) for i in range(0, B, chunk)]
    joined = {}
    for name in ColourStats.__dataclass_fields__:  # (F, ...) per chunk -> (B, T, ...)
        a = np.concatenate([getattr(p, name) for p in parts])
        joined[name] = a.reshape(B, T, *a.shape[1:])
    s = ColourStats(**joined)
    tab = _object_table(objects)
    canvas = float(H * W)
    # One gather for all per-colour features: (B, T, 6, 7) -> (B, T, N, 7), per expected object.
    feats = np.stack([s.count, s.cx, s.cy, s.width, s.height, s.voff, s.soft], -1).astype(np.float64)
    area, cx, cy, width, height, voff, soft = np.moveaxis(
        np.take_along_axis(feats, tab["colour"][:, None, :, None], axis=2), -1, 0)
    expected = SHAPE_AREA[tab["shape"]] * tab["size"] ** 2 * canvas  # (B, N) pixels
    visible = (area >= visible_fraction * expected[:, None, :]) & tab["present"][:, None, :]
    pos = np.where(visible[..., None], np.stack([cx, cy], -1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        fill = area / (width * height)
    size_px = np.broadcast_to((tab["size"] * math.sqrt(canvas))[:, None, :], area.shape)
    prior = np.broadcast_to(tab["shape"][:, None, :], area.shape)
    shape = np.where(visible, classify_shape(fill, voff, area, size_px, prior, np.nan_to_num(soft)), -1)
    with np.errstate(invalid="ignore"):
        size = np.where(visible, np.sqrt(area / (SHAPE_AREA[np.maximum(shape, 0)] * canvas)), np.nan)

    # Palette colours that are not in the scene: a recoloured or spawned object shows up here.
    in_scene = np.zeros((B, N_COLOURS), bool)
    rows = np.broadcast_to(np.arange(B)[:, None], tab["colour"].shape)
    in_scene[rows[tab["present"]], tab["colour"][tab["present"]]] = True
    foreign = np.where(in_scene[:, None, :], 0, s.count)  # (B, T, 6)
    fc = foreign.argmax(-1)
    foreign_area = np.take_along_axis(foreign, fc[..., None], -1)[..., 0].astype(np.float64)
    foreign_pos = np.take_along_axis(feats[..., 1:3], fc[..., None, None], axis=2)[:, :, 0]  # (B, T, 2)
    return Perception(pos, area, visible, shape, size, fill, soft, foreign_area, np.where(foreign_area > 0, fc, -1),
                      foreign_pos, s.off_palette / canvas, expected, tab["present"], (H, W))
