"""The built-in model's reading perception without learning: where in a shown image the panel to read is.

A zoom the model makes shows one object with some context around it (``processing.ZOOM_CONTEXT``); to read it,
the model looks at that object at a fixed, legible size. ``find_panel`` finds it training-free, on any image:
the largest rectangle that is mostly light inside and mostly not light just outside (a sign, a label, a page),
preferring rectangles near the centre, found with one summed-area table on a downsampled light mask. When none
qualifies (a dark photo), the central half of the image is read. Nothing here knows the probes' palette, fonts or
wording; on a photo it finds bright panels (a label, a window, the sky), which is harmless.

``panel_pixels`` cuts that rectangle (with a small margin) from the image's own pixels and resizes it to
``READ_CROP``: the model's reading tokens come from these pixels only (see ``model.Reader``).

``text_line`` goes one step further inside the model, on those panel pixels: the line of near-black ink that
crosses the panel's middle band (a code, a number), cut left-aligned and scaled to ``LINE_CROP``'s height, so the
k-th character of any line sits at about the same place whatever the line's length and where the panel put it
(read by position, a three-character code centred in a panel had its characters where a four-character code's
are, and the reader wrote them one place late). Where no such ink is found the whole panel is used.

``ink_blobs`` describes the panel's separate dark shapes (dots, a corner mark, a character) as a map: per class
(small, dot-like, other) and cell of a coarse grid, how many blobs are centred there. Counting dots is then
counting the dot-like blobs that are not something else, which a small network learns in minutes
(``model.BlobCounter``); the reader's convolutions alone counted a sign's dots off by one about a third of the
time (docs/builtin-model.md, attempt 11).

``ink_colour`` says what colour the ink drawn on the panel is (a hue histogram of the ink that has light panel on
both sides, so a sign's coloured border is left out), which a linear layer turns into a marker's colour
(``model.InkColour``): blurred by a zoom's enlargement, a dark blue marker looked black to the reader's
convolutions (attempt 12).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from glimpse.images import components

READ_CROP = (64, 256)  # height, width the panel is read at (a four-character code at about 40 pixels each)
LIGHT = 190  # a pixel is light when its darkest channel is at least this
GRID = 160  # the light mask is searched on at most GRID × GRID cells
FILL, RING = 0.6, 0.35  # light share required inside a panel, allowed in the ring just outside it
READ_MARGIN = 0.08  # the cut grows the panel by this share of its size on each side
LINE_CROP = (32, 192)  # height, width a line of text is read at (four characters at about 40 pixels each)
INK = 0.35  # a pixel is ink when its brightest channel is below this (0-1): near black, not a coloured border
BAND = (0.45, 0.65)  # the share of the panel's height a line of text crosses (corner marks stay above it)
LINE_PAD = 0.15, 1.3  # the line's cut starts this many line heights left of the ink; its height: this many
BLOB_GRID = (6, 8)  # rows, columns of the map of where the panel's ink blobs are centred
# A blob's class: small (under BLOB_SMALL of the panel's area), dot-like (round: at least BLOB_ROUND of its box
# filled, and under BLOB_LARGE), or other (a character, a star, a large mark). Measured on card and probe panels:
# dots fill 0.62–1.0 of their box (5th percentile up), a five-pointed star 0.39–0.59 at the same size.
BLOB_SMALL, BLOB_LARGE, BLOB_ROUND = 1e-3, 1e-2, 0.6
BLOB_CLASSES = 3
BLOB_MIN = 4  # pixels (at READ_CROP) a blob needs: fewer is noise
BLOB_VALUES = BLOB_CLASSES * BLOB_GRID[0] * BLOB_GRID[1]
# The colour of a panel's ink (``ink_colour``): a hue histogram of its coloured ink, then the shares of ink that is
# coloured and dark, the panel's share of ink, and the coloured ink's mean colour.
HUE_BINS = 12
COLOUR_VALUES = HUE_BINS + 3 + 3
COLOURED = 0.35  # ink is coloured when its saturation (max - min over max channel) is at least this
ENCLOSED = 4  # pixels (at READ_CROP) from ink to the light panel on both sides, for ink drawn on the panel


def _integral(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.float64)
    out[1:, 1:] = a.cumsum(0).cumsum(1)
    return out


def find_panel(image: Image.Image) -> tuple[int, int, int, int]:
    """The box (pixels, x1/y1 exclusive) of the panel to read in ``image`` (module docstring)."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    step = max(1, math.ceil(max(width, height) / GRID))
    light = rgb.min(-1) >= LIGHT
    gh, gw = height // step, width // step
    if gh < 4 or gw < 4:
        return _central(width, height)
    cells = light[: gh * step, : gw * step].reshape(gh, step, gw, step).mean((1, 3))
    ii = _integral(cells)
    best, best_score = None, 0.0
    heights = sorted({max(2, round(gh * f)) for f in np.geomspace(0.08, 0.95, 10)})
    widths = sorted({max(2, round(gw * f)) for f in np.geomspace(0.08, 0.95, 10)})
    for h in heights:
        ring_y = max(1, h // 6)
        for w in widths:
            ring_x = max(1, w // 6)
            stride_y, stride_x = max(1, h // 6), max(1, w // 6)
            y0 = np.arange(0, gh - h + 1, stride_y)
            x0 = np.arange(0, gw - w + 1, stride_x)
            if not len(y0) or not len(x0):
                continue
            ys, xs = np.meshgrid(y0, x0, indexing="ij")
            inner = ii[ys + h, xs + w] - ii[ys, xs + w] - ii[ys + h, xs] + ii[ys, xs]
            fill = inner / (h * w)
            oy0, ox0 = np.clip(ys - ring_y, 0, gh), np.clip(xs - ring_x, 0, gw)
            oy1, ox1 = np.clip(ys + h + ring_y, 0, gh), np.clip(xs + w + ring_x, 0, gw)
            outer = ii[oy1, ox1] - ii[oy0, ox1] - ii[oy1, ox0] + ii[oy0, ox0]
            # the ring outside the image counts as not light: a panel cut by the edge still qualifies
            ring_area = (h + 2 * ring_y) * (w + 2 * ring_x) - h * w
            ring = (outer - inner) / ring_area
            ok = (fill >= FILL) & (ring <= RING)
            if not ok.any():
                continue
            cx, cy = (xs + w / 2) / gw - 0.5, (ys + h / 2) / gh - 0.5
            score = np.where(ok, h * w * fill * (1.0 - np.hypot(cx, cy)), 0.0)
            i = np.unravel_index(int(score.argmax()), score.shape)
            if score[i] > best_score:
                best_score = float(score[i])
                best = (int(xs[i]), int(ys[i]), int(xs[i]) + w, int(ys[i]) + h)
    if best is None:
        return _central(width, height)
    x0, y0, x1, y1 = best
    return x0 * step, y0 * step, min(width, x1 * step), min(height, y1 * step)


def _central(width: int, height: int) -> tuple[int, int, int, int]:
    return width // 4, height // 4, width - width // 4, height - height // 4


def cut_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The panel's box grown by ``READ_MARGIN`` a side, inside the image: what is cut and read."""
    x0, y0, x1, y1 = box
    gx, gy = (x1 - x0) * READ_MARGIN, (y1 - y0) * READ_MARGIN
    return (
        max(0, math.floor(x0 - gx)),
        max(0, math.floor(y0 - gy)),
        min(width, math.ceil(x1 + gx)),
        min(height, math.ceil(y1 + gy)),
    )


def panel_pixels(image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The panel of ``image`` cut at ``READ_CROP``: (3, H, W) floats in 0–1, and the box cut (pixels)."""
    image = image.convert("RGB")
    box = cut_box(find_panel(image), image.width, image.height)
    crop = image.crop(box).resize((READ_CROP[1], READ_CROP[0]), Image.Resampling.BILINEAR)
    return np.asarray(crop, np.float32).transpose(2, 0, 1) / 255.0, box


def text_line(panels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) panel pixels in 0-1 → (N, 3, *LINE_CROP): each panel's line of text (module docstring), outside
    the panel white."""
    n, _, height, width = panels.shape
    ink = panels.amax(1) < INK  # (N, H, W)
    top, bottom = int(height * BAND[0]), int(height * BAND[1])
    crossing = ink[:, top:bottom].any(1)  # (N, W): columns whose ink crosses the band
    theta = torch.zeros(n, 2, 3, dtype=panels.dtype, device=panels.device)
    for i, cols in enumerate(crossing.tolist()):
        if True not in cols:  # no line: the whole panel, squeezed to the line's shape
            theta[i, 0, 0] = theta[i, 1, 1] = 1.0
            continue
        x0, x1 = cols.index(True), width - 1 - cols[::-1].index(True)
        inked = ink[i, :, x0 : x1 + 1].any(1).tolist()
        y0, y1 = top, bottom - 1  # grow from the band while the rows hold ink
        while y0 > 0 and inked[y0 - 1]:
            y0 -= 1
        while y1 < height - 1 and inked[y1 + 1]:
            y1 += 1
        tall = (y1 - y0 + 1) * LINE_PAD[1]
        wide = LINE_CROP[1] * tall / LINE_CROP[0]
        centre_x, centre_y = x0 - LINE_PAD[0] * tall + wide / 2, (y0 + y1 + 1) / 2
        theta[i, 0, 0], theta[i, 0, 2] = wide / width, 2 * centre_x / width - 1
        theta[i, 1, 1], theta[i, 1, 2] = tall / height, 2 * centre_y / height - 1
    grid = torch.nn.functional.affine_grid(theta, [n, 3, *LINE_CROP], align_corners=False)
    inverse = torch.nn.functional.grid_sample(1 - panels, grid, align_corners=False, padding_mode="zeros")
    return 1 - inverse


def blob_class(pixels: int, box_area: int, panel_area: int) -> int:
    """0 small, 1 dot-like, 2 other (see ``BLOB_SMALL``)."""
    share = pixels / panel_area
    if share < BLOB_SMALL:
        return 0
    return 1 if share < BLOB_LARGE and pixels >= BLOB_ROUND * box_area else 2


def ink_colour(panel: np.ndarray) -> np.ndarray:
    """(3, H, W) panel pixels in 0–1 (``panel_pixels``) → ``COLOUR_VALUES``: what colour the ink drawn on the panel
    is.

    Ink is what differs from the panel's light colour (its 95th percentile per channel) by more than 0.25 in a
    channel; ink drawn *on* the panel has light pixels ``ENCLOSED`` pixels away on both sides, across or down (a
    sign's coloured border has light on one side only, and is left out). Coloured ink has a saturation of at
    least ``COLOURED``; the rest is dark. Per ``HUE_BINS`` bins of hue, the coloured ink's saturation summed, over
    all the ink on the panel; then the shares of that ink that are coloured and dark, the share of the panel it
    covers, and the coloured ink's mean colour. A zoom shows a small outlined marker blurred and blended with the
    light panel around it; its hue survives that, where the reader's convolutions, trained on crisp cards, read a
    blurred dark blue as black (docs/builtin-model.md, attempt 12)."""
    out = np.zeros(COLOUR_VALUES, np.float32)
    a = panel.transpose(1, 2, 0)
    height, width, _ = a.shape
    d = ENCLOSED
    if height <= 2 * d or width <= 2 * d:
        return out
    white = np.quantile(a.reshape(-1, 3), 0.95, axis=0)
    off = np.abs(a - white).max(-1)
    light, ink = off < 0.12, off > 0.25
    across = np.zeros_like(light)
    across[:, d:-d] = light[:, : -2 * d] & light[:, 2 * d :]
    down = np.zeros_like(light)
    down[d:-d] = light[: -2 * d] & light[2 * d :]
    drawn = ink & (across | down)
    if not drawn.any():
        return out
    px = a[drawn]
    top = px.max(1)
    saturation = (top - px.min(1)) / np.maximum(top, 1e-6)
    coloured = saturation >= COLOURED
    if coloured.any():
        rgb = np.round(np.clip(px[coloured], 0, 1) * 255).astype(np.uint8)[None]
        hue = np.asarray(Image.fromarray(rgb).convert("HSV"), np.float32)[0, :, 0] / 256.0
        bins = np.minimum((hue * HUE_BINS).astype(np.int64), HUE_BINS - 1)
        out[:HUE_BINS] = np.bincount(bins, weights=saturation[coloured], minlength=HUE_BINS) / len(px)
        out[HUE_BINS + 3 :] = px[coloured].mean(0)
    out[HUE_BINS : HUE_BINS + 3] = (coloured.mean(), 1.0 - coloured.mean(), drawn.mean())
    return out


def ink_blobs(panel: np.ndarray) -> np.ndarray:
    """(3, H, W) panel pixels in 0–1 (``panel_pixels``) → ``BLOB_VALUES`` counts: for each class (``blob_class``)
    and cell of ``BLOB_GRID`` (row-major), the number of ink blobs (4-neighbour components of near-black pixels,
    at least ``BLOB_MIN`` of them) whose centre lies in that cell. Blobs centred in the cut's margin
    (``READ_MARGIN``: what lies around the panel, not on it) are left out."""
    ink = panel.max(0) < INK
    height, width = ink.shape
    rows, cols = BLOB_GRID
    edge = READ_MARGIN / (1 + 2 * READ_MARGIN)  # the margin's share of the cut, where the image did not clip it
    out = np.zeros((BLOB_CLASSES, rows, cols), np.float32)
    for x0, y0, x1, y1, n in components(ink, BLOB_MIN):
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        if not (edge <= cx <= 1 - edge and edge <= cy <= 1 - edge):
            continue
        kind = blob_class(n, (x1 - x0) * (y1 - y0), height * width)
        out[kind, min(int(cy * rows), rows - 1), min(int(cx * cols), cols - 1)] += 1
    return out.reshape(-1)
