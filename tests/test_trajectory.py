"""The trajectory record: JSONL round trip, no embedded images, crops recomputed from geometry."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from conftest import gradient_image
from glimpse.agent import AgentLoop
from glimpse.errors import GlimpseError
from glimpse.models.scripted import ScriptedBackend
from glimpse.trajectory import Sample, Trajectory, iter_jsonl, load_jsonl, render_image, save_jsonl


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
