"""Generated probes: determinism, the legibility rule, level rules, record format, answers that fit the scene."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from glimpse.errors import ConfigError
from glimpse.geometry import Box
from glimpse.images import PixelLimits, smart_resize
from glimpse.probes.synth import KINDS, LEVELS, MIN_CAP_PX, SHOWN_MAX_PX, make_probe, write_probes

CASES = [(level, kind) for level in LEVELS for kind in KINDS]


@pytest.fixture(scope="module")
def probes():
    return {(level, kind): make_probe(level, i, seed=3, kind=kind) for i, (level, kind) in enumerate(CASES)}


@pytest.mark.parametrize(("level", "kind"), CASES)
def test_decisive_detail_is_illegible_in_the_full_view_and_legible_zoomed(probes, level, kind):
    r = probes[(level, kind)].record
    w, h = r["size"]
    scale = smart_resize(w, h, PixelLimits())[0] / w
    assert r["cap_px"] >= MIN_CAP_PX
    assert r["cap_px"] * scale <= SHOWN_MAX_PX + 1e-9 and r["shown_cap_px"] <= SHOWN_MAX_PX
    assert r["zoomed_cap_px"] >= 2.5 * SHOWN_MAX_PX
    lo, hi = LEVELS[level].long_side
    assert lo <= max(w, h) <= hi * 1.25


@pytest.mark.parametrize(("level", "kind"), CASES)
def test_record_format_and_answers(probes, level, kind):
    p = probes[(level, kind)]
    r = p.record
    assert set(r) >= {"images", "problem", "solution", "data_source", "boxes", "kind", "level"}
    assert r["problem"].startswith("<image>\n") and r["data_source"] == f"glimpse_probe_{level}"
    assert r["kind"] == kind and p.image.size == tuple(r["size"])
    for box in r["boxes"] + r["candidate_boxes"]:
        b = Box.from_list(box)
        assert 0 <= b.x0 < b.x1 <= r["size"][0] and 0 <= b.y0 < b.y1 <= r["size"][1]
    if r["choices"]:
        assert r["solution"] in r["choices"]
    lo, hi = LEVELS[level].candidates
    n = len(r["candidate_boxes"])
    assert lo <= n <= hi or (kind in ("which_marked", "relative_position") and n == 2)
    if kind == "relative_position":
        a, b = (Box.from_list(x) for x in r["boxes"])
        assert r["solution"] == ("left" if a.x0 + a.x1 < b.x0 + b.x1 else "right")
    else:
        assert r["boxes"][0] in r["candidate_boxes"]


def test_target_box_holds_the_sign(probes):
    p = probes[("medium", "read_code")]
    x0, y0, x1, y1 = p.record["boxes"][0]
    crop = np.asarray(p.image.crop((x0, y0, x1, y1)), dtype=int)
    # A sign is a light card: most of its inside is near-white.
    inner = crop[3:-3, 3:-3]
    assert (inner.min(axis=-1) > 200).mean() > 0.5


def test_candidates_look_alike_and_only_the_target_has_the_star(probes):
    p = probes[("hard", "read_code")]
    boxes = p.record["candidate_boxes"]
    assert len(boxes) >= 8
    sizes = {(b[2] - b[0], b[3] - b[1]) for b in boxes}
    assert len(sizes) == 1  # same size: nothing but the detail tells them apart
    # In the full view each sign is a few pixels: the corner mark cannot be seen.
    w, _ = p.record["size"]
    scale = smart_resize(*p.record["size"], PixelLimits())[0] / w
    assert p.record["font_px"] * 0.28 * 2 * scale < 3


def test_deterministic_by_seed():
    a, b = make_probe("easy", 5, seed=1), make_probe("easy", 5, seed=1)
    assert a.record == b.record
    assert hashlib.sha256(a.image.tobytes()).digest() == hashlib.sha256(b.image.tobytes()).digest()
    assert (
        make_probe("easy", 5, seed=2).record["solution"] != a.record["solution"]
        or make_probe("easy", 5, seed=2).record["size"] != a.record["size"]
    )


def test_write_probes_is_the_same_whatever_the_workers(tmp_path):
    one = write_probes(tmp_path / "a", "easy", 3, seed=9, workers=1)
    two = write_probes(tmp_path / "b", "easy", 3, seed=9, workers=2)
    assert json.loads(one.read_text()) == json.loads(two.read_text())
    assert len(list((tmp_path / "a" / "data").glob("*.jpg"))) == 3


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown level"):
        make_probe("impossible", 0)
    with pytest.raises(ConfigError, match="unknown probe kind"):
        make_probe("easy", 0, kind="riddle")


def test_every_question_kind_reads_back_as_written():
    """The wording is written and read in one module (``probes.questions``): every kind round-trips."""
    from glimpse.probes.palette import BORDER_COLORS
    from glimpse.probes.questions import parse_question, question

    for kind in KINDS:
        for border in BORDER_COLORS:
            for marked in (False, True):
                text = question(kind, border, marked=marked, choices=["a", "b"], codes=("K3F", "XY7"))
                q = parse_question(text)
                assert q.kind == ("read" if kind == "read_code" else kind)
                assert q.border == border
                assert q.starred == (marked and kind not in ("which_marked", "relative_position"))
                assert q.codes == (["K3F", "XY7"] if kind == "relative_position" else [])


def test_reading_order_goes_by_rows_then_left_to_right():
    from glimpse.probes.questions import reading_order

    boxes = [(500, 10, 520, 20), (10, 12, 30, 22), (10, 900, 30, 910), (300, 400, 320, 410)]
    assert reading_order(boxes, 1000) == [1, 0, 3, 2]
