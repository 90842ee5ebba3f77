"""What the built-in model is given and what it writes: region tokens in, protocol JSON out.

**In.** Each image the loop shows (the first view, every observation) becomes region tokens: the proposer's
boxes on that image (``glimpse.builtin.proposer``), each cut from the image's own pixels with a margin and
resized to ``CROP`` (height, width), flattened, followed by its box relative to the image and the colour
around the lightest area of its crop (``ring_colour``, from the crop at the image's own resolution); then
``READ_ROWS`` reading rows holding the image's panel to read (``glimpse.builtin.reader``) at ``READ_CROP``,
spread over them in order (a row's last value tells the two kinds apart), and in their colour values the
map of the panel's ink blobs (``reader.ink_blobs``) and the colour of its ink (``reader.ink_colour``), spread the
same way. The processor
returns them as Qwen's processors return cells: ``pixel_values`` with one row per token and an
``image_grid_thw`` of ``(1, 1, tokens)`` per image, and expands each ``<|image_pad|>`` to that many tokens, so
the ``hf`` backend, SFT and RL handle them unchanged. The processor resizes an image only when it lies outside
the pixel limits, and crops only what it is given: the model sees nothing the loop did not show.

**Out.** A zoom is a choice of one region token; its box is written as ordinary protocol JSON,
``{"bbox_2d": [x0, y0, x1, y1], "source": "observation_2"}``, one added token per coordinate (values on a grid
of 1/``STEPS``) and one per source, so a zoom is six tokens and the trajectory, the viewer and the token view
stay as they are. ``zoom_window`` turns a region's box into the box written: grown to show the object with
some context, snapped outward to the grid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from glimpse.builtin.proposer import TILES, regions
from glimpse.builtin.reader import BLOB_VALUES, COLOUR_VALUES, READ_CROP, ink_blobs, ink_colour, panel_pixels
from glimpse.images import PixelLimits, smart_resize

CROP = (32, 64)  # height, width of a region token's crop: a sign's four characters at about 12 pixels each
MARGIN = 1.25  # a crop shows its box grown by this factor, so a sign's border and surroundings are in it
# After the crop's pixels, each row holds the region's box relative to the image (x0, y0, x1, y1), the grid
# window a zoom into it writes (zoom_window): what the model embeds and what its pointer spells, and its kind.
BOX_VALUES = 9
# Then the colour around the lightest area of the region's crop (``ring_colour``): its mean direction from that
# light colour (3), a hue histogram of those directions (RING_BINS), the shares of light, ring and coloured ring
# pixels (3), and the light colour itself (3). Zero on the tiles and the reading rows.
RING_BINS = 12
RING_VALUES = 3 + RING_BINS + 3 + 3
PIXELS = 3 * CROP[0] * CROP[1]
ROW = PIXELS + BOX_VALUES + RING_VALUES
REL, WINDOW, KIND = slice(PIXELS, PIXELS + 4), slice(PIXELS + 4, PIXELS + 8), PIXELS + 8
RING = slice(PIXELS + BOX_VALUES, ROW)
REGION, READING = 0.0, 1.0  # kinds: a region token (one crop), a reading token (a share of the panel's pixels)
# The panel to read (``glimpse.builtin.reader``) at READ_CROP fills this many rows' pixels, one token each.
READ_ROWS = 3 * READ_CROP[0] * READ_CROP[1] // PIXELS
if BLOB_VALUES + COLOUR_VALUES > READ_ROWS * RING_VALUES:
    raise ImportError("the reading rows' colour values cannot hold the ink blob map and the ink's colour")
INK = slice(BLOB_VALUES, BLOB_VALUES + COLOUR_VALUES)  # where the ink's colour follows the blob map
MEAN, STD = 0.5, 0.25

STEPS = 256  # coordinate grid: 1/256 of a side (about 7 view pixels on a 1,900-pixel-wide view)
ZOOM_CONTEXT = 2.6  # a zoom shows the object's box grown 2.6 times (the region-token study's observation)
ZOOM_ASPECT = 2.0  # and at least half as tall as wide
MAX_SOURCES = 40  # observation_1 … observation_40
BOX_OPEN = '{"bbox_2d": ['


# ------------------------------------------------------------------------------------------------- vocabulary
def coordinate_text(k: int, last: bool) -> str:
    """The token writing grid value ``k``/STEPS, before a comma or (the last coordinate) before ']'."""
    return f"{round(k / STEPS, 3):g}" + ("]" if last else ", ")


def source_text(source: int) -> str:
    name = "original_image" if source == 0 else f"observation_{source}"
    return f', "source": "{name}"}}'


def location_tokens() -> list[str]:
    """The added tokens a zoom is written with: the box opening, every coordinate, every source."""
    return [
        BOX_OPEN,
        *(coordinate_text(k, False) for k in range(STEPS + 1)),
        *(coordinate_text(k, True) for k in range(STEPS + 1)),
        *(source_text(i) for i in range(MAX_SOURCES + 1)),
    ]


def zoom_window(box: tuple[float, float, float, float], width: int, height: int, *, grow: bool = True) -> list[int]:
    """The grid window (four values in 0..STEPS) a zoom into ``box`` (pixels of a ``width`` × ``height`` image)
    writes: the box grown ``ZOOM_CONTEXT`` times (at least ``1/ZOOM_ASPECT`` as tall as wide, in pixels), moved
    inside the image, snapped outward to the grid. ``grow=False`` (a tile) snaps the box as it is."""
    x0, y0, x1, y1 = box
    if grow:
        w = (x1 - x0) * ZOOM_CONTEXT
        h = max((y1 - y0) * ZOOM_CONTEXT, w / ZOOM_ASPECT)
        w, h = min(w, width), min(h, height)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0 = min(max(cx - w / 2, 0.0), width - w)
        y0 = min(max(cy - h / 2, 0.0), height - h)
        x1, y1 = x0 + w, y0 + h
    g = [
        math.floor(x0 / width * STEPS + 1e-6),
        math.floor(y0 / height * STEPS + 1e-6),
        math.ceil(x1 / width * STEPS - 1e-6),
        math.ceil(y1 / height * STEPS - 1e-6),
    ]
    g[2], g[3] = max(g[2], g[0] + 1), max(g[3], g[1] + 1)
    return [min(max(v, 0), STEPS) for v in g]


def zoom_text(window: list[int], source: int) -> str:
    """A zoom into a grid window of an image, as the protocol's JSON (what the location tokens spell)."""
    return BOX_OPEN + "".join(coordinate_text(k, i == 3) for i, k in enumerate(window)) + source_text(source)


# ------------------------------------------------------------------------------------------------- the colour
def ring_colour(crop: np.ndarray) -> np.ndarray:
    """The colour around the lightest area of a crop ((h, w, 3) uint8, at the shown image's resolution) →
    ``RING_VALUES`` values.

    The light area is the pixels within 0.06 of the crop's light colour (its 95th percentile per channel); its
    ring is the pixels next to it that are not in it. A thin outline drawn around a light shape (a sign's
    border, a label's frame) shows there as a tint, blended with the light colour when the image is shown small:
    the direction of each ring pixel from the light colour points the way the outline's colour does, whatever
    the blend. Nothing here knows what colours to expect; on a photo it describes the edges of its bright areas.
    The region encoder's CNN did not learn border colours from the resized crop (a head on its tokens stayed at
    14–19 % over 560 probes, attempt 7); these values told a linear classifier the border colour of 97.6 % of
    1,500 held-out sign regions of first views.
    """
    a = crop.astype(np.float32) / 255.0
    out = np.zeros(RING_VALUES, np.float32)
    if a.size == 0:
        return out
    white = np.quantile(a.reshape(-1, 3), 0.95, axis=0)
    light = (np.abs(a - white) < 0.06).all(-1) & (a.mean(-1) > 0.6)
    grown = light.copy()
    grown[1:] |= light[:-1]
    grown[:-1] |= light[1:]
    grown[:, 1:] |= light[:, :-1]
    grown[:, :-1] |= light[:, 1:]
    ring = grown & ~light
    d = a[ring] - white
    norm = np.linalg.norm(d, axis=1)
    coloured = norm > 0.08
    if coloured.any():
        u = d[coloured] / norm[coloured, None]
        out[:3] = u.mean(0)
        tints = np.round(np.clip(white + 0.5 * u, 0.0, 1.0) * 255).astype(np.uint8)[None]
        hsv = np.asarray(Image.fromarray(tints).convert("HSV"), np.float32)[0] / 256.0  # hue, saturation in 0–1
        hue, saturation = hsv[:, 0], hsv[:, 1]
        bins = np.minimum((hue * RING_BINS).astype(np.int64), RING_BINS - 1)
        out[3 : 3 + RING_BINS] = np.bincount(bins, weights=saturation, minlength=RING_BINS) / len(u)
    out[3 + RING_BINS :] = (light.mean(), ring.mean(), coloured.mean() if coloured.size else 0.0, *white)
    return out


# -------------------------------------------------------------------------------------------------- processor
def region_rows(image: Image.Image) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """One image → (tokens, ROW) float32 rows and the boxes (pixels): a region row per box (the coarse tiles
    first, then the proposals: crop pixels normalised, relative box, zoom window, kind ``REGION``), then
    ``READ_ROWS`` reading rows (the panel to read at ``READ_CROP``, its pixels split over the rows in order; the
    panel's box; kind ``READING``); one box per row (the reading rows repeat the panel's)."""
    image = image.convert("RGB")
    boxes = regions(image)
    rows = np.empty((len(boxes) + READ_ROWS, ROW), np.float32)
    ch, cw = CROP
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        gx, gy = (x1 - x0) * (MARGIN - 1) / 2, (y1 - y0) * (MARGIN - 1) / 2
        cut = (
            max(0, math.floor(x0 - gx)),
            max(0, math.floor(y0 - gy)),
            min(image.width, math.ceil(x1 + gx)),
            min(image.height, math.ceil(y1 + gy)),
        )
        tile = i < TILES[0] * TILES[1]
        shown = image.crop(cut)
        crop = shown.resize((cw, ch), Image.Resampling.BILINEAR)
        a = (np.asarray(crop, np.float32) / 255.0 - MEAN) / STD
        rows[i, :PIXELS] = a.transpose(2, 0, 1).reshape(-1)
        rel = (x0 / image.width, y0 / image.height, x1 / image.width, y1 / image.height)
        window = zoom_window((x0, y0, x1, y1), image.width, image.height, grow=not tile)
        rows[i, PIXELS : PIXELS + BOX_VALUES] = (*rel, *window, REGION)
        rows[i, RING] = 0.0 if tile else ring_colour(np.asarray(shown))
    rows[len(boxes) :], panel = reading_rows(image)
    return rows, [*boxes, *[panel] * READ_ROWS]


def reading_rows(image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One image → its ``READ_ROWS`` reading rows (the panel's pixels at ``READ_CROP``, normalised and split over
    the rows in order; the panel's relative box and zoom window; kind ``READING``; in the colour values, the
    panel's ``ink_blobs`` map then its ``ink_colour``, zero-padded and split over the rows in order) and the panel's
    box (pixels)."""
    panel, (x0, y0, x1, y1) = panel_pixels(image)
    rows = np.empty((READ_ROWS, ROW), np.float32)
    rows[:, :PIXELS] = ((panel - MEAN) / STD).reshape(READ_ROWS, PIXELS)
    rel = (x0 / image.width, y0 / image.height, x1 / image.width, y1 / image.height)
    rows[:, PIXELS : PIXELS + BOX_VALUES] = (*rel, *zoom_window((x0, y0, x1, y1), image.width, image.height), READING)
    blobs = np.zeros(READ_ROWS * RING_VALUES, np.float32)
    blobs[:BLOB_VALUES] = ink_blobs(panel)
    blobs[INK] = ink_colour(panel)
    rows[:, RING] = blobs.reshape(READ_ROWS, RING_VALUES)
    return rows, (x0, y0, x1, y1)


class GlimpseVLImageProcessor(BaseImageProcessor):
    """Images → region-token rows (see the module docstring); resizes only images outside the pixel limits."""

    model_input_names = ["pixel_values", "image_grid_thw"]  # noqa: RUF012

    def __init__(self, min_pixels: int = 65_536, max_pixels: int = 2_000_000, factor: int = 32, **kwargs: Any):
        super().__init__(**kwargs)
        self.min_pixels, self.max_pixels, self.factor = min_pixels, max_pixels, factor

    def preprocess(self, images: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        rows, grids = [], []
        for image in images:
            if not self.min_pixels <= image.width * image.height <= self.max_pixels:
                limits = PixelLimits(self.min_pixels, self.max_pixels, self.factor)
                size = smart_resize(image.width, image.height, limits)
                image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            r, _ = region_rows(image)
            rows.append(r)
            grids.append((1, 1, len(r)))
        data = {"pixel_values": np.concatenate(rows), "image_grid_thw": np.asarray(grids, dtype=np.int64)}
        return BatchFeature(data=data, tensor_type=return_tensors)


class GlimpseVLProcessor(ProcessorMixin):
    """The image processor and the tokenizer; ``<|image_pad|>`` is expanded to one token per region."""

    image_token = "<|image_pad|>"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kw: Any):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: Any = None,
        padding: bool | str = False,
        **kwargs: Any,
    ) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict[str, Any] = {}
        if images:
            images = images if isinstance(images, list | tuple) else [images]
            flat = [im for item in images for im in (item if isinstance(item, list | tuple) else [item])]
            image_inputs = self.image_processor(flat, return_tensors="np")
            counts = iter(int(g[2]) for g in image_inputs["image_grid_thw"])
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                expanded.append(parts[0] + "".join(self.image_token * next(counts) + part for part in parts[1:]))
            texts = expanded
            data.update(image_inputs)
        enc = self.tokenizer(texts, padding=padding, add_special_tokens=False)
        data.update(enc)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
