"""Boxes in original-image pixels, and the coordinate conventions models write them in.

Every zoom, however deeply nested, is stored as a box of the *original* image's pixels (``crop_box_px``), so a
crop can always be recomputed from the original and the geometry alone. A model writes its box relative to
the image it zooms into (its *source*); ``Box.sub_box`` composes that into original pixels.

Conventions (``Coords``):

* ``relative``: fractions in [0, 1] of the source's width and height (Mini-o3, Qwen3-VL).
* ``pixels``: pixels of the source *as shown to the model*, after resizing (Qwen2.5-VL's native grounding).
* ``thousand``: 0–1000 of the source's width and height (Qwen2-VL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

# Float noise below this (in pixels) is ignored when rounding boxes outward to whole pixels.
_EPS = 1e-6


class Coords(StrEnum):
    """How a model writes box coordinates."""

    RELATIVE = "relative"
    PIXELS = "pixels"
    THOUSAND = "thousand"

    def upper_bounds(self, shown_width: int, shown_height: int) -> tuple[float, float]:
        """Largest allowed x and y value in this convention for a source shown at the given size."""
        if self is Coords.RELATIVE:
            return 1.0, 1.0
        if self is Coords.THOUSAND:
            return 1000.0, 1000.0
        return float(shown_width), float(shown_height)

    def describe(self) -> str:
        """A phrase for prompts and error messages."""
        return {
            Coords.RELATIVE: "fractions of the image's width and height, from 0 to 1",
            Coords.PIXELS: "pixels of the image as it was shown to you",
            Coords.THOUSAND: "a 0 to 1000 scale of the image's width and height",
        }[self]


@dataclass(frozen=True)
class Box:
    """A box of whole pixels, half-open: it covers columns ``x0 … x1-1`` and rows ``y0 … y1-1``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def full(cls, width: int, height: int) -> Box:
        return cls(0, 0, width, height)

    @classmethod
    def from_list(cls, values: list[int] | tuple[int, ...]) -> Box:
        x0, y0, x1, y1 = (int(v) for v in values)
        return cls(x0, y0, x1, y1)

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(0, self.width) * max(0, self.height)

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    def sub_box(self, rel: tuple[float, float, float, float]) -> Box:
        """The part of this box given by relative coordinates ``rel`` (each in [0, 1]), in the same pixels.

        Edges are rounded outward to whole pixels, so the result always contains the requested region.
        """
        rx0, ry0, rx1, ry1 = rel
        x0 = self.x0 + math.floor(rx0 * self.width + _EPS)
        y0 = self.y0 + math.floor(ry0 * self.height + _EPS)
        x1 = self.x0 + math.ceil(rx1 * self.width - _EPS)
        y1 = self.y0 + math.ceil(ry1 * self.height - _EPS)
        return Box(
            max(self.x0, min(x0, self.x1)),
            max(self.y0, min(y0, self.y1)),
            max(self.x0, min(x1, self.x1)),
            max(self.y0, min(y1, self.y1)),
        )

    def intersection(self, other: Box) -> int:
        """Area shared with ``other``."""
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0, w) * max(0, h)

    def iou(self, other: Box) -> float:
        """Intersection over union."""
        inter = self.intersection(other)
        union = self.area + other.area - inter
        return inter / union if union else 0.0

    def coverage_of(self, target: Box) -> float:
        """Share of ``target``'s area inside this box."""
        return self.intersection(target) / target.area if target.area else 0.0


def to_relative(
    values: tuple[float, float, float, float], coords: Coords, shown_width: int, shown_height: int
) -> tuple[float, float, float, float]:
    """Convert a box in ``coords`` to fractions of the source image (no validation)."""
    sx, sy = coords.upper_bounds(shown_width, shown_height)
    x0, y0, x1, y1 = values
    return (x0 / sx, y0 / sy, x1 / sx, y1 / sy)


def from_relative(
    rel: tuple[float, float, float, float], coords: Coords, shown_width: int, shown_height: int
) -> list[float] | list[int]:
    """Write a relative box in ``coords`` (the inverse of ``to_relative``): 3 decimals, or whole numbers."""
    sx, sy = coords.upper_bounds(shown_width, shown_height)
    x0, y0, x1, y1 = rel
    digits = 3 if coords is Coords.RELATIVE else 0
    out = [round(x0 * sx, digits), round(y0 * sy, digits), round(x1 * sx, digits), round(y1 * sy, digits)]
    return out if digits else [int(v) for v in out]
