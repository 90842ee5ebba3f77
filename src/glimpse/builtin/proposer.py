"""The built-in model's perception without learning: where in an image the objects are, as region boxes.

It runs on whatever image the model is shown (the first view, a zoom observation, a photo) and looks only at
those pixels. An object is a spot whose edges are denser than in the ring around it (centre-surround edge
density, from one summed-area table), found at several scales: local maxima, suppressed where they overlap,
and a quota per scale, so a 20-pixel sign in a wide view and the same sign filling a zoom both come out.
Nothing here knows the probes' colours, fonts or wording; on photos it finds text, edges and small objects.

Each image also gets ``TILES`` fixed boxes (the whole image cut into a coarse grid): the model's low-resolution
view of everything, and a place to point when no proposal fits.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from PIL import Image

# (box height in pixels, proposals kept) per scale; width is ASPECT × height. Heights grow by about 1.6; the
# quotas favour small scales, where a wide view's many small objects are (a hard probe's first view holds
# 8–12 candidate signs about 19 × 11 pixels, 40 other signs and 200 clutter shapes).
SCALES: tuple[tuple[int, int], ...] = ((8, 8), (13, 40), (21, 20), (34, 8), (55, 6), (89, 4), (144, 2))
ASPECT = 1.75  # a sign of four characters is about 1.7 times wider than tall
OVERLAP = 0.3  # proposals of one scale overlapping more than this (intersection over union) are one object
TILES = (2, 4)  # rows, columns of the coarse grid


class Region(NamedTuple):
    """A proposed box in pixels of the image it was found in (x1, y1 exclusive) and its contrast score."""

    box: tuple[int, int, int, int]
    score: float


def edge_map(image: Image.Image) -> np.ndarray:
    """Summed absolute differences to the right and lower neighbour over the three channels (H, W), 0–1530."""
    a = np.asarray(image.convert("RGB"), np.int16)
    e = np.zeros(a.shape[:2], np.int32)
    e[:, :-1] += np.abs(a[:, 1:] - a[:, :-1]).sum(-1, dtype=np.int32)
    e[:-1, :] += np.abs(a[1:] - a[:-1]).sum(-1, dtype=np.int32)
    return e


def _integral(e: np.ndarray) -> np.ndarray:
    out = np.zeros((e.shape[0] + 1, e.shape[1] + 1), np.int64)
    out[1:, 1:] = e.cumsum(0, dtype=np.int64).cumsum(1)
    return out


def _sums(ii: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]


def _nms(boxes: np.ndarray, scores: np.ndarray, keep: int) -> list[int]:
    order = np.argsort(-scores)
    chosen: list[int] = []
    for i in order:
        if len(chosen) >= keep:
            break
        if chosen:
            b, c = boxes[i], boxes[chosen]
            iw = np.clip(np.minimum(b[2], c[:, 2]) - np.maximum(b[0], c[:, 0]), 0, None)
            ih = np.clip(np.minimum(b[3], c[:, 3]) - np.maximum(b[1], c[:, 1]), 0, None)
            inter = iw * ih
            union = (b[2] - b[0]) * (b[3] - b[1]) + (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) - inter
            if (inter / union).max() > OVERLAP:
                continue
        chosen.append(int(i))
    return chosen


def propose(image: Image.Image, scales: tuple[tuple[int, int], ...] = SCALES) -> list[Region]:
    """Object proposals of one image, scale by scale (each scale's best first)."""
    e = edge_map(image)
    height, width = e.shape
    ii = _integral(e)
    out: list[Region] = []
    for h, quota in scales:
        w = round(ASPECT * h)
        if 2 * w > width or 2 * h > height:
            continue
        stride = max(2, h // 3)
        cy = np.arange(h, height - h + 1, stride)
        cx = np.arange(w, width - w + 1, stride)
        if len(cx) == 0 or len(cy) == 0:
            continue
        gx, gy = np.meshgrid(cx, cy)
        x0, y0, x1, y1 = gx - w // 2, gy - h // 2, gx - w // 2 + w, gy - h // 2 + h
        inner = _sums(ii, x0, y0, x1, y1)
        outer = _sums(ii, gx - w, gy - h, gx + w, gy + h)
        score = (inner / (w * h) - (outer - inner) / (3 * w * h)) / 1530.0
        # local maxima of the score grid (ties kept), positive contrast only
        padded = np.pad(score, 1, constant_values=-np.inf)
        peak = score > 0
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy != 1 or dx != 1:
                    peak &= score >= padded[dy : dy + score.shape[0], dx : dx + score.shape[1]]
        where = np.nonzero(peak)
        if not len(where[0]):
            continue
        boxes = np.stack([x0[where], y0[where], x1[where], y1[where]], 1)
        scores = score[where]
        for i in _nms(boxes.astype(np.float64), scores, quota):
            out.append(Region(tuple(int(v) for v in boxes[i]), float(scores[i])))  # type: ignore[arg-type]
    return out


def tiles(width: int, height: int, grid: tuple[int, int] = TILES) -> list[tuple[int, int, int, int]]:
    """The coarse grid's boxes, row by row."""
    rows, cols = grid
    return [
        (c * width // cols, r * height // rows, (c + 1) * width // cols, (r + 1) * height // rows)
        for r in range(rows)
        for c in range(cols)
    ]


_RECENT: OrderedDict[str, list[tuple[int, int, int, int]]] = OrderedDict()


def regions(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Every box the model gets a token for: the tiles, then the proposals.

    The last few images' boxes are remembered by a digest of their pixels: a trainer's teacher and the
    processor ask about the same view."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + f"{image.size}{image.mode}"
    if digest not in _RECENT:
        _RECENT[digest] = [*tiles(image.width, image.height), *(r.box for r in propose(image))]
        while len(_RECENT) > 8:
            _RECENT.popitem(last=False)
    return list(_RECENT[digest])
