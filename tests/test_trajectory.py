"""The trajectory record: JSONL round trip, no embedded images, crops recomputed from geometry."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import gradient_image
from glimpse.agent import AgentLoop
from glimpse.errors import GlimpseError
from glimpse.models.scripted import ScriptedBackend
from glimpse.trajectory import (
    Sample,
    Trajectory,
    conversation,
    iter_jsonl,
    load_jsonl,
    render_image,
    save_jsonl,
)


def _zoom(box, source="original_image"):
    return f"<grounding>{json.dumps({'bbox_2d': box, 'source': source})}</grounding>"


@pytest.fixture
def recorded(make_image, tmp_path):
    path = make_image(1200, 900)
    backend = ScriptedBackend(
        [
            [
                _zoom([0.1, 0.2, 0.6, 0.7]),
                _zoom([0.25, 0.25, 0.75, 0.75], "observation_1"),
                "<grounding>{oops</grounding>",
                "<answer>ok</answer>",
            ]
        ]
    )
    sample = Sample(
        id="q1", images=[str(path)], question="?", answer="ok", target_boxes=[[10, 10, 50, 50]], meta={"level": "easy"}
    )
    trajs = asyncio.run(AgentLoop(backend, max_pixels=200_000).run(sample, samples=2))
    out = tmp_path / "runs" / "t.jsonl"
    save_jsonl(trajs, out)
    return trajs, out


def test_jsonl_roundtrip_is_lossless(recorded):
    trajs, out = recorded
    back = load_jsonl(out)
    assert [t.model_dump() for t in back] == [t.model_dump() for t in trajs]
    assert back[0].sample.meta == {"level": "easy"} and back[0].sample.target_boxes == [[10, 10, 50, 50]]
    assert back[0].metrics == trajs[0].metrics and back[0].usage == trajs[0].usage


def test_no_image_bytes_are_stored(recorded):
    _, out = recorded
    text = out.read_text()
    assert "base64" not in text and "data:image" not in text
    assert len(text.splitlines()[0]) < 8000
    record = json.loads(text.splitlines()[0])
    assert set(record["image"]) == {"path", "sha256", "width", "height"}


def test_crops_recomputed_from_geometry_match_what_was_shown(recorded):
    _, out = recorded
    traj = load_jsonl(out)[0]
    observations = traj.observations()
    assert [o.index for o in observations] == [0, 1, 2]
    assert observations[2].source_index == 1 and observations[2].box_px == traj.turns[1].crop_box_px
    for obs in observations:
        img = render_image(traj, obs.index)
        assert list(img.size) == obs.shown_size
    full = render_image(traj, 2, full_resolution=True)
    x0, y0, x1, y1 = traj.turns[1].crop_box_px
    assert np.array_equal(np.asarray(full), np.asarray(gradient_image(1200, 900).crop((x0, y0, x1, y1))))
    with pytest.raises(GlimpseError, match="no image 3"):
        render_image(traj, 3)


def test_a_changed_image_is_detected(recorded):
    trajs, _ = recorded
    gradient_image(1200, 900).transpose(0).save(trajs[0].image.path)
    with pytest.raises(GlimpseError, match="changed since"):
        render_image(trajs[0], 1)


def test_append_and_stream(recorded, tmp_path):
    trajs, out = recorded
    save_jsonl(trajs[:1], out, append=True)
    assert len(list(iter_jsonl(out))) == 3


def test_bad_lines_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(GlimpseError, match=r"bad\.jsonl:1"):
        load_jsonl(bad)


def test_a_last_line_cut_short_is_skipped_and_other_bad_lines_are_not(recorded, tmp_path):
    trajs, out = recorded
    whole = out.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(whole + whole.splitlines()[0][:100])  # a run killed while writing its next line
    assert len(load_jsonl(cut)) == len(trajs)
    middle = tmp_path / "middle.jsonl"
    middle.write_text(whole.splitlines()[0][:100] + "\n" + whole)
    with pytest.raises(GlimpseError, match=r"middle\.jsonl:1: not a valid trajectory"):
        load_jsonl(middle)


def test_metrics_count_error_kinds(recorded):
    traj: Trajectory = recorded[0][0]
    assert traj.metrics == {
        "turns": 4,
        "zooms": 2,
        "tool_calls": 3,
        "tool_errors": 1,
        "code_calls": 0,
        "code_errors": 0,
        "errors_by_kind": {"invalid_json": 1},
    }


# A record written by Glimpse before multi-image samples (one image, two zooms, relative coordinates).
OLD_RECORD = Path(__file__).parent / "data" / "trajectory_single_image_v1.jsonl"
NEW_DEFAULT_KEYS = ("more_images", "original_index")


def _without_new_keys(value):
    if isinstance(value, dict):
        return {k: _without_new_keys(v) for k, v in value.items() if k not in NEW_DEFAULT_KEYS}
    if isinstance(value, list):
        return [_without_new_keys(v) for v in value]
    return value


def _rerun_old_record(folder: Path) -> Trajectory:
    gradient_image(600, 400).save(folder / "old.png")
    backend = ScriptedBackend(
        [[_zoom([0.1, 0.2, 0.6, 0.7]), _zoom([0.25, 0.25, 0.75, 0.75], "observation_1"), "<answer>ok</answer>"]]
    )
    loop = AgentLoop(backend, max_pixels=100_000, coords="relative")
    cwd = os.getcwd()
    os.chdir(folder)  # the old record names its image by a relative path
    try:
        (traj,) = asyncio.run(loop.run(Sample(id="old", images=["old.png"], question="?")))
    finally:
        os.chdir(cwd)
    traj.started_at, traj.wall_s = "2026-12-01T00:00:00+00:00", 0.01
    for turn in traj.turns:
        turn.latency_s = turn.tool_s = 0.0
    return traj


def test_a_single_image_record_of_the_old_format_loads_and_renders(tmp_path):
    (old,) = load_jsonl(OLD_RECORD)
    gradient_image(600, 400).save(tmp_path / "old.png")
    assert old.more_images == [] and [o.name for o in old.observations()] == [
        "original_image",
        "observation_1",
        "observation_2",
    ]
    for obs in old.observations():
        assert list(render_image(old, obs.index, base_dir=tmp_path).size) == obs.shown_size
    crop = render_image(old, 2, base_dir=tmp_path, full_resolution=True)
    assert np.array_equal(np.asarray(crop), np.asarray(gradient_image(600, 400).crop((135, 130, 285, 230))))


def test_a_single_image_run_writes_the_old_record_plus_two_default_fields(tmp_path):
    """Same prompt (no image names), same turns, same sources: only ``more_images: []`` and each turn's
    ``original_index: 0`` are new."""
    new = json.loads(_rerun_old_record(tmp_path).model_dump_json())
    assert new["more_images"] == [] and {t["original_index"] for t in new["turns"]} == {0}
    assert _without_new_keys(new) == json.loads(OLD_RECORD.read_text())


@pytest.fixture
def two_images(tmp_path):
    """A two-image run: a zoom into image_2, a zoom into that observation, a mistake naming image_3, a zoom
    into original_image (image_1), an answer."""
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    gradient_image(2000, 1500).save(first)
    gradient_image(3000, 1000).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
    backend = ScriptedBackend(
        [
            [
                _zoom([0.1, 0.1, 0.5, 0.5], "image_2"),
                _zoom([0, 0, 0.5, 0.5], "observation_1"),
                _zoom([0, 0, 0.5, 0.5], "image_3"),
                _zoom([0, 0, 0.5, 0.5], "original_image"),
                "<answer>ok</answer>",
            ]
        ]
    )
    sample = Sample(id="two", images=[str(first), str(second)], question="Which one?")
    (traj,) = asyncio.run(AgentLoop(backend, coords="relative").run(sample))
    out = tmp_path / "two.jsonl"
    save_jsonl([traj], out)
    return load_jsonl(out)[0], backend, Image.open(first).convert("RGB"), Image.open(second).convert("RGB")


def test_two_images_are_recorded_in_order_with_their_shown_sizes(two_images):
    traj, _, first, second = two_images
    originals = traj.originals()
    assert [Path(o.path).name for o in originals] == ["first.png", "second.png"]
    assert traj.image.path == originals[0].path and traj.shown_size == originals[0].shown_size
    assert [(o.width, o.height) for o in originals] == [first.size, second.size]
    assert len({o.sha256 for o in originals}) == 2
    # The shared budget: alone each would be shown near 2,000,000 pixels; together they stay under it.
    areas = [w * h for w, h in (o.shown_size for o in originals)]
    assert sum(areas) <= traj.settings.max_pixels and min(areas) > 0.4 * traj.settings.max_pixels


def test_the_first_user_message_names_each_image_before_it(two_images):
    traj, backend, _, _ = two_images
    user = traj.prompt[-1]["content"]
    images = [(i, p) for i, p in enumerate(user) if p["type"] == "image"]
    assert [p for _, p in images] == [
        {"type": "image", "index": 0, "original": 0},
        {"type": "image", "index": 0, "original": 1},
    ]
    assert [user[i - 1]["text"].strip() for i, _ in images] == ["image_1:", "image_2:"]
    assert "2 images" in user[0]["text"] and user[-1]["text"].strip() == "Which one?"
    sent = backend.requests[0].messages[-1].parts()
    assert sum(1 for p in sent if not hasattr(p, "text")) == 2


def test_sources_name_the_right_original_and_crops_come_from_it(two_images):
    traj, _, first, second = two_images
    zoom2, nested, bad, zoom1 = traj.turns[:4]
    assert (zoom2.source_index, zoom2.original_index, zoom2.call.source) == (0, 1, "image_2")
    assert (nested.source_index, nested.original_index) == (1, 1)
    assert (zoom1.source_index, zoom1.original_index) == (0, 0)
    assert bad.kind == "error" and bad.error_kind == "unknown_source"
    assert "image_1 (also original_image), image_2, observation_1, observation_2" in bad.error
    assert zoom2.crop_box_px == [300, 100, 1500, 500] and nested.crop_box_px == [300, 100, 900, 300]
    assert "the zoomed region of image_2" in zoom2.injected[0]["content"][0]["text"]
    for turn, source in ((nested, second), (zoom1, first)):
        full = render_image(traj, turn.observation_index, full_resolution=True)
        assert np.array_equal(np.asarray(full), np.asarray(source.crop(tuple(turn.crop_box_px))))


def test_render_image_recomputes_every_original_and_observation_as_shown(two_images):
    traj, backend, _, _ = two_images
    names = [(o.name, o.index, o.original_index) for o in traj.observations()]
    assert names == [
        ("original_image", 0, 0),
        ("image_2", 0, 1),
        ("observation_1", 1, 1),
        ("observation_2", 2, 1),
        ("observation_3", 3, 0),
    ]
    sent = [p for m in backend.requests[-1].messages for p in m.parts() if not hasattr(p, "text")]
    parts = [p for m in conversation(traj) if isinstance(m["content"], list) for p in m["content"]]
    refs = [p for p in parts if p["type"] == "image"]
    assert len(sent) == len(refs) == 5
    for part, ref in zip(sent, refs, strict=True):
        rendered = render_image(traj, ref["index"], original=ref.get("original", 0))
        assert np.array_equal(np.asarray(rendered), np.asarray(part.image))
    with pytest.raises(GlimpseError, match="no image_3"):
        render_image(traj, 0, original=2)
