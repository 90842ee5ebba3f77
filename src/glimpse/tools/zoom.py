"""The zoom tool: check a call, compose its box into original-image pixels, cut and resize the crop.

A call names a source (``original_image`` or ``observation_N``; with several originals also ``image_K``,
``original_image`` being ``image_1``) and a box in the protocol's coordinate convention, relative to that
source. The box is composed with the source's own box, so a zoom into a zoom is still cut from its
original's full-resolution pixels. Every problem with a call is a model mistake and
comes back as a ``ZoomResult`` with an error message and kind; ``run`` never raises on model input.

Checks, in order: the box is a list of four finite numbers (NaN, infinities, booleans and strings are
``not_a_number``; an integer too large for a float is ``out_of_range`` without being converted); each lies
within the convention's range (a whisker of float noise is clamped); ``x0 < x1`` and ``y0 < y1``; the source
exists; in original pixels each side is at least ``min_box_side``; the long side is at most
``max_aspect_ratio`` times the short one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from PIL import Image

from glimpse.errors import ConfigError
from glimpse.geometry import Box, Coords, to_relative
from glimpse.images import MAX_ASPECT_RATIO, PixelLimits, fit
from glimpse.protocol.base import quote

# Smallest side of a zoom, in original pixels: one 28-pixel Qwen image cell (the Mini-o3 recipe's minimum).
MIN_BOX_SIDE = 28
# Most elongated zoom accepted; verl's and DeepEyes' zoom tools use 100, Qwen's resize refuses 200.
ZOOM_MAX_ASPECT_RATIO = 100.0

# Integers beyond 2**53 are not exact as floats, and lie outside every image in every convention.
_LARGEST_COORDINATE = 2**53
# ASCII digits only (``\d`` would accept other scripts' digits), and few enough for ``int`` to read.
_OBSERVATION = re.compile(r"observation[_ ]?([0-9]{1,9})", re.ASCII)
_IMAGE = re.compile(r"image[_ ]?([0-9]{1,9})", re.ASCII)


@dataclass(frozen=True)
class ImageState:
    """An image the model has: its box in original pixels (``None`` for an image made by code), the size it
    was shown at, and which original (0-based) the box is in."""

    box: Box | None
    shown_width: int
    shown_height: int
    original_index: int = 0


@dataclass
class ZoomResult:
    """What a zoom call produced: a crop, or an error for the model.

    Attributes:
        bbox: the four numbers as written (``None`` if they were not four finite numbers).
        source: the source as written.
        source_index: the image zoomed into (0 = an original, N = observation_N).
        original_index: the original (0-based) the box is in.
        box: the zoom in original pixels.
        image: the crop, resized to the pixel limits.
        error: the message for the model; ``None`` on success.
        error_kind: short category for metrics.
    """

    bbox: list[float] | None = None
    source: str = "original_image"
    source_index: int | None = None
    original_index: int = 0
    box: Box | None = None
    image: Image.Image | None = None
    error: str | None = None
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class SourceRef(NamedTuple):
    """A source name resolved: ``index`` 0 = an original (``original`` says which, 0-based), N = observation_N."""

    index: int
    original: int = 0


def source_index(source: str, count: int, originals: int = 1) -> SourceRef | None:
    """A source name among ``count`` images (an original + observations) and ``originals`` originals, or
    ``None`` if there is no such image."""
    name = source.strip().lower()
    if name == "original_image":
        return SourceRef(0)
    match = _IMAGE.fullmatch(name)
    if match:
        k = int(match.group(1))
        return SourceRef(0, k - 1) if 1 <= k <= originals else None
    match = _OBSERVATION.fullmatch(name)
    if match:
        index = int(match.group(1))
        if 1 <= index < count:
            return SourceRef(index)
    return None


def source_names(count: int, originals: int = 1) -> str:
    """The names a zoom may use, for an error message (long lists elided)."""
    firsts = ["original_image"] if originals == 1 else [f"image_{k}" for k in range(1, originals + 1)]
    if len(firsts) > 4:
        firsts = [firsts[0], f"… {firsts[-1]}"]
    if originals > 1:
        firsts[0] += " (also original_image)"
    names = firsts + [f"observation_{i}" for i in range(1, count)]
    if count > 8:
        names = [*firsts, f"observation_1 … observation_{count - 1}"]
    return ", ".join(names)


class ZoomTool:
    """Runs zoom calls against one original image.

    Args:
        coords: how boxes are written.
        limits: pixel limits of the returned crop.
        min_box_side: smallest side of a zoom in original pixels.
        max_aspect_ratio: most elongated zoom accepted.
    """

    name = "zoom_in"

    def __init__(
        self,
        coords: Coords,
        limits: PixelLimits,
        *,
        min_box_side: int = MIN_BOX_SIDE,
        max_aspect_ratio: float = ZOOM_MAX_ASPECT_RATIO,
    ):
        if min_box_side < 1:
            raise ConfigError(f"min_box_side must be at least 1 pixel, got {min_box_side}")
        if not 1 <= max_aspect_ratio < MAX_ASPECT_RATIO:
            raise ConfigError(
                f"max_aspect_ratio must be between 1 and {MAX_ASPECT_RATIO} (exclusive), got {max_aspect_ratio}"
            )
        self.coords = coords
        self.limits = limits
        self.min_box_side = min_box_side
        self.max_aspect_ratio = max_aspect_ratio

    def run(
        self,
        call: dict[str, Any],
        original: Image.Image | Sequence[Image.Image],
        images: list[ImageState],
        originals: Sequence[ImageState] | None = None,
    ) -> ZoomResult:
        """Check ``call`` against the images the model has, and cut the crop from its original.

        Args:
            call: ``{"bbox_2d": …, "source": …}`` as the protocol read it.
            original: full-resolution pixels of the original image, or of each original in order.
            images: the model's images so far (index 0 is ``image_1``, N is observation_N).
            originals: every original as shown, in order (default: ``images[0]`` alone).
        """
        result = self.resolve(call, images, originals)
        if result.ok:
            assert result.box is not None
            pixels = original if isinstance(original, Image.Image) else original[result.original_index]
            result.image = fit(pixels, self.limits, result.box.as_tuple())
        return result

    def resolve(
        self, call: dict[str, Any], images: list[ImageState], originals: Sequence[ImageState] | None = None
    ) -> ZoomResult:
        """Every check of ``run`` and the box in original pixels, without cutting the crop."""
        source = call.get("source", "original_image")
        source = source if isinstance(source, str) else str(source)
        result = ZoomResult(source=source)

        def fail(kind: str, message: str) -> ZoomResult:
            result.error, result.error_kind = message, kind
            return result

        values = call.get("bbox_2d")
        if not isinstance(values, (list, tuple)):
            return fail("bad_box", "bbox_2d must be a list of four numbers [x0, y0, x1, y1]")
        if len(values) != 4:
            return fail("bad_box", f"bbox_2d has {len(values)} values; give exactly four: [x0, y0, x1, y1]")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return fail("not_a_number", f"bbox_2d holds {quote(v)}, which is not a number")
            if isinstance(v, int) and abs(v) > _LARGEST_COORDINATE:  # float(v) could overflow
                return fail(
                    "out_of_range",
                    f"bbox_2d holds {quote(v)}, far outside the image; give the region's corners within it",
                )
            if not math.isfinite(v):
                return fail("not_a_number", f"bbox_2d holds {v}, which is not a finite number")
        result.bbox = [float(v) for v in values]

        originals = list(originals) if originals is not None else images[:1]
        ref = source_index(source, len(images), len(originals))
        if ref is None:
            listed = source_names(len(images), len(originals))
            return fail("unknown_source", f"there is no image called {quote(source)}; you can zoom into: {listed}")
        result.source_index = ref.index
        src = originals[ref.original] if ref.index == 0 else images[ref.index]
        result.original_index = src.original_index
        if src.box is None:
            return fail(
                "made_source",
                f"{source} was made by your code, not cut from the original, so it cannot be zoomed into; zoom into "
                "the original image or a zoom observation, or crop it in code",
            )

        x0, y0, x1, y1 = result.bbox
        hx, hy = self.coords.upper_bounds(src.shown_width, src.shown_height)
        tol_x, tol_y = hx * 1e-6, hy * 1e-6
        outside = [
            v for v, h, t in ((x0, hx, tol_x), (y0, hy, tol_y), (x1, hx, tol_x), (y1, hy, tol_y)) if v < -t or v > h + t
        ]
        if outside:
            hint = ""
            if self.coords is Coords.RELATIVE and max(outside) > 2:
                hint = " These look like pixel or 0-1000 values; give fractions of the image's size instead."
            return fail(
                "out_of_range",
                f"the box {_fmt(result.bbox)} is outside the image: x must lie in [0, {_fmt_num(hx)}] and y in "
                f"[0, {_fmt_num(hy)}], in {self.coords.describe()}.{hint}",
            )
        x0, x1 = (min(max(v, 0.0), hx) for v in (x0, x1))
        y0, y1 = (min(max(v, 0.0), hy) for v in (y0, y1))
        if x0 >= x1 or y0 >= y1:
            return fail(
                "inverted_box",
                f"the box {_fmt(result.bbox)} is empty or inverted: x0 must be less than x1 and y0 less than y1",
            )
        rel = to_relative((x0, y0, x1, y1), self.coords, src.shown_width, src.shown_height)
        box = src.box.sub_box(rel)
        if box.width < self.min_box_side or box.height < self.min_box_side:
            return fail(
                "box_too_small",
                f"the region is only {box.width}×{box.height} pixels of the original image; each side must be "
                f"at least {self.min_box_side} pixels. Choose a larger region.",
            )
        ratio = max(box.width, box.height) / min(box.width, box.height)
        if ratio > self.max_aspect_ratio:
            return fail(
                "aspect_ratio",
                f"the region is {box.width}×{box.height} pixels, {ratio:.0f} times longer than wide; "
                f"keep it below {self.max_aspect_ratio:.0f}:1",
            )
        result.box = box
        return result


def _fmt_num(v: float) -> str:
    return f"{v:g}"


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(_fmt_num(v) for v in values) + "]"
