"""The training-free expert policy: its image analysis on drawn signs, its question parser, and whole searches
on probes through the real agent loop. Tesseract reads codes; without it (and without GLIMPSE_REQUIRE_OCR=1,
which CI sets) the tests that need it are skipped."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from glimpse.agent import AgentLoop
from glimpse.eval.datasets import load_dataset
from glimpse.eval.scoring import score
from glimpse.images import PixelLimits, components, smart_resize
from glimpse.models import load_backend
from glimpse.probes.expert import _hue_name, _shape_of, parse_question, read_sign, tesseract_available
from glimpse.probes.synth import MARKER_COLORS, MARKER_SHAPES, draw_shape, make_probe


def need_ocr() -> None:
    if not tesseract_available():
        if os.environ.get("GLIMPSE_REQUIRE_OCR") == "1":
            pytest.fail("GLIMPSE_REQUIRE_OCR=1 but tesseract is missing (apt-get install tesseract-ocr)")
        pytest.skip("tesseract is not installed")


def test_components_finds_separate_regions():
    mask = np.zeros((10, 12), bool)
    mask[1:3, 1:4] = True
    mask[6:9, 8:11] = True
    mask[6, 5] = True
    found = sorted(components(mask, 2))
    assert found == [(1, 1, 4, 3, 6), (8, 6, 11, 9, 9)]


@pytest.mark.parametrize("radius", [7, 10, 20])
def test_marker_shapes_and_colours(radius):
    for shape in MARKER_SHAPES:
        for name, rgb in MARKER_COLORS.items():
            if name == "black":
                continue
            image = Image.new("RGB", (4 * radius, 4 * radius), (248, 248, 244))
            draw_shape(ImageDraw.Draw(image), shape, 2 * radius, 2 * radius, radius, rgb, max(1, radius // 8))
            image = image.resize((6 * radius, 6 * radius), Image.Resampling.BICUBIC)
            a = np.asarray(image, np.int16)
            sat = a.max(-1) - a.min(-1)
            ys, xs = np.nonzero(sat > 30)
            assert _shape_of((sat > 30)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]) == shape
            assert _hue_name(a[ys, xs][sat[ys, xs] >= 0.7 * sat[ys, xs].max()]) == name


def test_question_parser():
    q = parse_question(
        "Among the signs with a teal border, one reads K7XW and one reads 3HNA. Is the sign reading K7XW to the "
        "left or to the right of the sign reading 3HNA? Answer left or right."
    )
    assert (q.kind, q.border, q.codes, q.starred) == ("relative_position", "teal", ["K7XW", "3HNA"], False)
    q = parse_question("How many small black dots are on the sign with a red border and a small star in its top-left")
    assert (q.kind, q.border, q.starred) == ("count", "red", True)
    q = parse_question("Among the signs with a red border, exactly one has a code that starts with F7. What is it?")
    assert (q.kind, q.border, q.codes, q.starred) == ("find_code", "red", ["F7"], False)  # "starts" is no star
    q = parse_question(
        "Among the signs with a red border, exactly one has a code that starts with F7. What colour is the small "
        "outlined marker on that sign? Answer with one of: red, green, blue."
    )
    assert (q.kind, q.border, q.codes, q.starred) == ("find_marker", "red", ["F7"], False)
    q = parse_question("What is the number on the bus that starts with A or B?")  # not a probe's wording
    assert (q.kind, q.codes) == ("read", [])


def test_the_expert_answers_find_code_from_the_sign_whose_code_starts_as_asked_only():
    """Look-alikes that share one of the two characters given are passed over (a generated look-alike shares both
    with the target never, one often)."""
    from glimpse.probes.expert import ExpertPolicy, SignReading

    q = parse_question("Among the signs with a red border, exactly one has a code that starts with FR. What is it?")
    near, right = SignReading(text="F6XJ", border="red"), SignReading(text="FRCL", border="red")
    assert ExpertPolicy()._decide(q, [(None, near)], 1000)[0] is None
    assert ExpertPolicy()._decide(q, [(None, near), (None, right)], 1000)[0] == "FRCL"
    assert ExpertPolicy()._decide(q, [(None, SignReading(text="FRCL", border="blue"))], 1000)[0] is None


def test_the_expert_answers_find_marker_with_the_marker_of_the_sign_whose_code_starts_as_asked():
    from glimpse.probes.expert import ExpertPolicy, SignReading

    q = parse_question(
        "Among the signs with a red border, exactly one has a code that starts with FR. What colour is the small "
        "outlined marker on that sign? Answer with one of: red, green, blue, orange, purple, black."
    )
    near = SignReading(text="F6XJ", border="red", marker_color="blue", marker_shape="cross")
    right = SignReading(text="FRCL", border="red", marker_color="orange", marker_shape="square")
    assert ExpertPolicy()._decide(q, [(None, near)], 1000)[0] is None
    assert ExpertPolicy()._decide(q, [(None, near), (None, right)], 1000)[0] == "orange"
    assert ExpertPolicy()._guess(q, [(None, near)]) == "blue"  # out of looks: a marker it saw


def test_reading_a_code_and_the_marker_right_of_it():
    """``find_marker``'s signs carry both: the expert reads the code left of the marker and the marker's colour
    (a coloured marker's, or a black one's, which is ink like the code but taller than its characters)."""
    need_ocr()
    codes = colours = n = 0
    for index in range(8):
        probe = make_probe("easy", index, seed=5, kind="find_marker")
        for target in probe.record["candidates"]:
            x0, y0, x1, y1 = target["box"]
            w, h = x1 - x0, y1 - y0
            crop = probe.image.crop((x0 - w // 2, y0 - h // 2, x1 + w // 2, y1 + h // 2))
            crop = crop.resize(smart_resize(crop.width, crop.height, PixelLimits()))
            reading, _ = read_sign(crop, "ACEFHJKLMNPRTUVWXY0123456789")
            n += 1
            codes += reading.text == target["code"]
            colours += reading.marker_color == target["marker"][0]
    assert n == 16 and colours >= 14 and codes >= 8, (colours, codes)  # 14 and 10 measured (seeded)


def test_reading_a_zoomed_sign():
    need_ocr()
    right = 0
    for index in range(12):
        probe = make_probe("easy", index, seed=5)
        target = probe.record["candidates"][0]
        x0, y0, x1, y1 = target["box"]
        w, h = x1 - x0, y1 - y0
        crop = probe.image.crop((x0 - w // 2, y0 - h // 2, x1 + w // 2, y1 + h // 2))
        crop = crop.resize(smart_resize(crop.width, crop.height, PixelLimits()))
        reading, box = read_sign(crop, "ACEFHJKLMNPRTUVWXY0123456789")
        assert box is not None and reading.border == target["border"]
        truth = {"read_code": target["code"], "which_marked": target["code"], "relative_position": target["code"]}
        kind = probe.record["kind"]
        if kind in truth:
            right += reading.text == truth[kind]
        elif kind == "count":
            right += reading.dots == target["dots"]
        else:
            right += (reading.marker_color, reading.marker_shape) == tuple(target["marker"])
    assert right >= 7, f"{right} of 12 signs read right"  # 8 measured; the probes are seeded


def test_the_expert_searches_easy_probes_through_the_loop():
    need_ocr()
    samples = load_dataset("probes:easy:12:3").samples
    backend = load_backend("expert")
    loop = AgentLoop(backend, max_turns=6)
    trajectories = [asyncio.run(loop.run(s))[0] for s in samples]
    correct = 0
    for traj in trajectories:
        assert traj.error is None and traj.turns[0].kind == "zoom"  # it always looks before answering
        correct += asyncio.run(score(traj.answer, traj.sample)).correct
    assert correct >= 6, f"{correct} of 12"


@pytest.mark.parametrize("size", [(1, 1), (3, 200), (224, 224)])
def test_the_expert_on_a_blank_or_tiny_image_zooms_inside_it_and_never_repeats_a_refused_zoom(tmp_path, size):
    from glimpse.trajectory import Sample

    path = tmp_path / "blank.png"
    Image.new("RGB", size, "white").save(path)
    loop = AgentLoop(load_backend("expert"), max_turns=6)
    traj = asyncio.run(loop.run(Sample(id="blank", question="What is the code on the sign?", images=[str(path)])))[0]
    assert traj.error is None and traj.stop_reason == "answer"  # it answers, never running out of turns
    assert all(t.error_kind != "out_of_range" for t in traj.turns)  # its boxes lie inside the image
    assert sum(t.kind == "error" for t in traj.turns) <= 1  # a zoom turned down is not asked for again
    if size == (3, 200):  # the same on a question about two images
        two = load_dataset("probes:easy:1:9:split_code").samples[0]
        two = two.model_copy(update={"images": [str(path), str(path)]})
        traj = asyncio.run(loop.run(two))[0]
        assert traj.stop_reason == "answer" and sum(t.kind == "error" for t in traj.turns) <= 1


def test_the_expert_refuses_a_box_convention_it_does_not_write():
    from glimpse.agent import AgentLoop
    from glimpse.errors import ConfigError
    from glimpse.models import load_backend

    with pytest.raises(ConfigError, match="relative"):
        AgentLoop(load_backend("expert"), coords="pixels")
    assert AgentLoop(load_backend("expert")).settings.coords == "relative"


def test_the_expert_searches_two_image_probes_image_by_image():
    """which_image needs no OCR: the starred sign is found by its corner mark, in whichever image it is."""
    backend = load_backend("expert")
    loop = AgentLoop(backend, max_turns=12)
    samples = load_dataset("probes:medium:6:0:which_image").samples
    right = 0
    for sample in samples:
        (traj,) = asyncio.run(loop.run(sample))
        sources = {t.call.source for t in traj.turns if t.call}
        assert sources <= {"image_1", "image_2"} and traj.turns[0].kind == "zoom"
        right += asyncio.run(score(traj.answer, traj.sample)).correct
        if traj.answer == "image_2":  # it looked there
            assert any(t.original_index == 1 for t in traj.turns if t.crop_box_px)
    assert right >= 4, f"{right} of 6"  # 5 measured; the probes are seeded


def test_the_expert_joins_a_code_split_across_two_images():
    need_ocr()
    loop = AgentLoop(load_backend("expert"), max_turns=12)
    samples = load_dataset("probes:easy:4:0:split_code").samples
    trajectories = [asyncio.run(loop.run(s))[0] for s in samples]
    right = sum(asyncio.run(score(t.answer, t.sample)).correct for t in trajectories)
    assert right >= 2, f"{right} of 4"  # 2 measured
    solved = next(t for t in trajectories if t.answer == t.sample.answer)
    assert [t.original_index for t in solved.turns if t.crop_box_px][-2:] == [0, 1]
