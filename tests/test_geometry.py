"""Nested-crop geometry, coordinate conventions and the resize rule, checked to the pixel."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glimpse.errors import ConfigError
from glimpse.geometry import Box, Coords, from_relative, to_relative
from glimpse.images import PixelLimits, smart_resize


def test_sub_box_composes_relative_boxes_into_original_pixels():
    original = Box.full(1000, 800)
    first = original.sub_box((0.25, 0.25, 0.75, 0.75))
    assert first == Box(250, 200, 750, 600)
    second = first.sub_box((0.5, 0.5, 1.0, 1.0))
    assert second == Box(500, 400, 750, 600)
    third = second.sub_box((0.1, 0.0, 0.3, 0.5))
    assert third == Box(525, 400, 575, 500)


def test_sub_box_rounds_outward_and_ignores_float_noise():
    box = Box.full(1000, 1000)
    # 0.1 * 1000 is 100.00000000000001 in floats: it must not round out to 101.
    assert box.sub_box((0.1, 0.1, 0.3, 0.3)) == Box(100, 100, 300, 300)
    # A fractional edge rounds outward: the crop always contains the requested region.
    assert Box.full(3, 3).sub_box((0.5, 0.5, 0.9, 0.9)) == Box(1, 1, 3, 3)


@given(
    st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4),
    st.integers(28, 9000),
    st.integers(28, 9000),
)
@settings(max_examples=500, deadline=None)
def test_sub_box_stays_inside_and_contains_the_request(rel, w, h):
    x0, y0, x1, y1 = rel
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    parent = Box(10, 20, 10 + w, 20 + h)
    child = parent.sub_box((x0, y0, x1, y1))
    assert parent.x0 <= child.x0 <= child.x1 <= parent.x1
    assert parent.y0 <= child.y0 <= child.y1 <= parent.y1
    assert child.x0 <= parent.x0 + x0 * w + 1e-6 and child.x1 >= parent.x0 + x1 * w - 1e-6


@pytest.mark.parametrize(
    ("coords", "values", "shown", "expected"),
    [
        (Coords.RELATIVE, (0.1, 0.2, 0.5, 1.0), (700, 500), (0.1, 0.2, 0.5, 1.0)),
        (Coords.THOUSAND, (100, 200, 500, 1000), (700, 500), (0.1, 0.2, 0.5, 1.0)),
        (Coords.PIXELS, (70, 100, 350, 500), (700, 500), (0.1, 0.2, 0.5, 1.0)),
    ],
)
def test_coordinate_conventions_agree(coords, values, shown, expected):
    got = to_relative(values, coords, *shown)
    assert got == pytest.approx(expected)
    assert to_relative(tuple(from_relative(got, coords, *shown)), coords, *shown) == pytest.approx(expected, abs=2e-3)


def test_box_overlap_measures():
    a, b = Box(0, 0, 10, 10), Box(5, 5, 15, 15)
    assert a.intersection(b) == 25
    assert a.iou(b) == pytest.approx(25 / 175)
    assert a.coverage_of(Box(0, 0, 5, 5)) == 1.0
    assert b.coverage_of(Box(0, 0, 10, 10)) == 0.25


@given(st.integers(1, 20000), st.integers(1, 20000))
@settings(max_examples=1000, deadline=None)
def test_smart_resize_obeys_the_limits(w, h):
    limits = PixelLimits(40_000, 2_000_000, 28)
    if max(w, h) / min(w, h) >= 200:
        with pytest.raises(ConfigError):
            smart_resize(w, h, limits)
        return
    rw, rh = smart_resize(w, h, limits)
    assert rw % 28 == 0 and rh % 28 == 0
    assert rw >= 28 and rh >= 28
    assert rw * rh <= 2_000_000
    # Scaling up to min_pixels can overshoot by at most one row and column of cells.
    assert rw * rh >= 40_000 or (rw >= w and rh >= h)
    # The aspect ratio survives up to the rounding of each side to a 28-pixel cell.
    if min(rw, rh) > 28:
        assert abs(math.log(rw / rh) - math.log(w / h)) <= 2 * math.log(1 + 28 / (min(rw, rh) - 28)) + 1e-9


def test_smart_resize_known_values():
    limits = PixelLimits(40_000, 2_000_000, 28)
    assert smart_resize(7680, 4320, limits) == (1876, 1036)
    assert smart_resize(1000, 800, limits) == (1008, 812)
    assert smart_resize(100, 100, limits) == (224, 224)
    assert smart_resize(3840, 2160, PixelLimits(3136, 12_845_056, 28)) == (3836, 2156)


def test_pixel_limits_reject_nonsense():
    with pytest.raises(ConfigError, match="max_pixels"):
        PixelLimits(40_000, 30_000)
    with pytest.raises(ConfigError, match="min_pixels"):
        PixelLimits(10, 2_000_000)
