"""SFT export: real cold-start trajectories written for LLaMA-Factory, TRL and verl, read back and checked.

The trajectories are made here, as a user makes them: easy probes, the programmatic teacher in both protocols,
and a hand-written file (agent loop + scripted backend) with a model mistake, two calls in one reply, a reply
that writes ``<image>`` and a run cut off by the turn cap.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glimpse.agent import AgentLoop
from glimpse.errors import ConfigError, GlimpseError
from glimpse.eval.datasets import load_probes
from glimpse.geometry import Coords
from glimpse.images import PixelLimits
from glimpse.models.scripted import ScriptedBackend
from glimpse.protocol.tools import zoom_tool_schema
from glimpse.train.coldstart import programmatic
from glimpse.train.common import hf_chat, render_images
from glimpse.train.export import (
    FORMATS,
    IMAGE,
    export,
    validate,
    validate_llamafactory,
    validate_trl,
    validate_verl,
)
from glimpse.trajectory import Sample, Trajectory, load_jsonl, save_jsonl

LIMITS = PixelLimits()
# verl's parquet needs pyarrow (the hf extra); without it the other formats are still tested.
try:
    import pyarrow.parquet  # noqa: F401

    HAS_ARROW = True
except ImportError:
    HAS_ARROW = False
FORMATS_HERE = FORMATS if HAS_ARROW else ("llamafactory", "trl")
needs_arrow = pytest.mark.skipif(not HAS_ARROW, reason="pyarrow (glimpse[hf]) writes and reads verl's parquet")


@pytest.fixture(scope="module")
def probes(glimpse_home) -> list[Sample]:
    return load_probes("easy", 3, seed=0).samples


@pytest.fixture(scope="module")
def cold(probes, tmp_path_factory) -> dict[str, Path]:
    """``trajectories.jsonl`` of a programmatic cold start, per protocol."""
    out = {}
    for protocol in ("tags", "tools"):
        folder = tmp_path_factory.mktemp(f"cs-{protocol}")
        stats = asyncio.run(programmatic(probes, folder, seed=0, protocol=protocol))
        assert stats.kept == len(probes)
        out[protocol] = folder / "trajectories.jsonl"
    return out


@pytest.fixture(scope="module")
def exported(cold, tmp_path_factory) -> dict[str, Path]:
    return {p: _export(path, tmp_path_factory.mktemp(f"ex-{p}")) for p, path in cold.items()}


def _export(path: Path, out: Path) -> Path:
    export(path, out, FORMATS_HERE)
    return out


def _zoom(box, source="original_image") -> str:
    return f"<think>closer</think><grounding>{json.dumps({'bbox_2d': box, 'source': source})}</grounding>"


def _call(call_id: str, box) -> dict:
    return {"id": call_id, "name": "zoom_in", "arguments": {"bbox_2d": box, "source": "original_image"}}


def _run(loop: AgentLoop, sample: Sample, suffix: str) -> Trajectory:
    (traj,) = asyncio.run(loop.run(sample.model_copy(update={"id": f"{sample.id}~{suffix}"})))
    return traj


@pytest.fixture(scope="module")
def mixed(probes, tmp_path_factory) -> Path:
    """A file with mistakes, merged messages, a literal placeholder and a capped run."""
    sample = probes[0]
    tags_error = ScriptedBackend(
        [["<think>zooming</think><grounding>{not json</grounding>", _zoom([0.4, 0.3, 0.6, 0.5]), "<answer>A</answer>"]]
    )
    tools_multi = ScriptedBackend(
        [
            [
                {
                    "content": "<think>two at once</think>",
                    "tool_calls": [_call("a", [0, 0, 0.5, 0.5]), _call("b", [0.5, 0.5, 1, 1])],
                },
                {"content": "<think>one</think>", "tool_calls": [_call("c", [0.4, 0.3, 0.6, 0.5])]},
                {"content": "<think>read it</think><answer>A</answer>"},
            ]
        ]
    )
    trajs = [
        _run(AgentLoop(tags_error), sample, "tags-error"),
        _run(AgentLoop(tools_multi, protocol="tools"), sample, "tools-multi"),
        _run(AgentLoop(ScriptedBackend([["<think>an <image> tag?</think><answer>A</answer>"]])), sample, "literal"),
        _run(AgentLoop(ScriptedBackend([[_zoom([0.4, 0.3, 0.6, 0.5])]]), max_turns=1), sample, "capped"),
    ]
    assert [t.stop_reason for t in trajs] == ["answer", "answer", "answer", "max_turns"]
    assert trajs[0].turns[0].kind == "error" and trajs[1].turns[0].error_kind == "multiple_calls"
    path = tmp_path_factory.mktemp("mixed") / "trajectories.jsonl"
    save_jsonl(trajs, path)
    return path


@pytest.fixture(scope="module")
def mixed_export(mixed, tmp_path_factory):
    out = tmp_path_factory.mktemp("ex-mixed")
    return out, export(mixed, out, FORMATS_HERE)


def _rows(out: Path) -> dict[str, dict[str, dict]]:
    """Rows of each format by trajectory id."""
    lf = json.loads((out / "llamafactory/data.json").read_text())
    trl = [json.loads(line) for line in (out / "trl/data.jsonl").read_text().splitlines()]
    rows = {"llamafactory": {r["id"]: r for r in lf}, "trl": {r["id"]: r for r in trl}}
    if (out / "verl/data.parquet").exists():
        import pyarrow.parquet as pq

        rows["verl"] = {r["id"]: r for r in pq.read_table(out / "verl/data.parquet").to_pylist()}
    return rows


def _name(traj_id: str) -> str:
    """The suffix ``_run`` gave a trajectory's sample id."""
    return traj_id.split("#")[0].split("~")[-1]


def _named(rows: dict[str, dict], name: str) -> dict:
    return next(r for i, r in rows.items() if _name(i) == name)


# ------------------------------------------------------------------------------------------------ exports
@pytest.mark.parametrize("protocol", ["tags", "tools"])
def test_cold_start_export_validates_in_every_format(cold, exported, protocol):
    out, source = exported[protocol], cold[protocol]
    trajs = load_jsonl(source)
    shown = sum(len(t.observations()) for t in trajs)
    checked = validate(out)
    assert tuple(checked) == FORMATS_HERE
    for fmt, result in checked.items():
        assert result.rows == len(trajs), fmt
        assert result.images == shown, fmt  # one reference per image shown, in every format

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert manifest["trajectories"] == len(trajs) and manifest["protocols"] == {protocol: len(trajs)}
    assert manifest["pixel_limits"] == {"min_pixels": 40_000, "max_pixels": 2_000_000, "factor": 28}
    assert manifest["images"] == len(list((out / "images").iterdir())) <= shown  # repeated views written once
    args = (out / "llamafactory/train_args.yaml").read_text()
    assert "image_max_pixels: 2000000" in args and "image_min_pixels: 40000" in args
    info = json.loads((out / "llamafactory/dataset_info.json").read_text())
    assert info["glimpse"]["file_name"] == "data.json" and info["glimpse"]["formatting"] == "sharegpt"
    assert ("tools" in info["glimpse"]["columns"]) == (protocol == "tools")


@pytest.mark.parametrize("protocol", ["tags", "tools"])
def test_every_image_is_the_pixels_the_model_was_shown(cold, exported, protocol):
    """In placeholder order, each format's images are exactly ``render_image`` of the conversation's images."""
    out = exported[protocol]
    rows = _rows(out)
    for traj in load_jsonl(cold[protocol]):
        _check_images(out, rows, traj)


def _check_images(out: Path, rows: dict[str, dict[str, dict]], traj: Trajectory) -> None:
    """Each format's images of ``traj``, in placeholder order, are exactly what the model was shown."""
    _, order = hf_chat(traj)
    expected = [np.asarray(image) for image in render_images(traj, order)]
    lf, trl = rows["llamafactory"][traj.id], rows["trl"][traj.id]
    lf_files = [out / "llamafactory" / p for p in lf["images"]]
    trl_files = [out / "trl" / p for p in trl["images"]]
    assert [f.resolve() for f in lf_files] == [f.resolve() for f in trl_files]
    assert len(lf_files) == len(expected)
    for file, want in zip(lf_files, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(file)), want)
    assert sum(t["value"].count(IMAGE) for t in lf["conversations"]) == len(order)
    assert sum(p["type"] == "image" for m in trl["messages"] for p in m["content"]) == len(order)
    if HAS_ARROW:  # verl carries the same files' bytes, with limits that leave them as they are
        verl = rows["verl"][traj.id]
        assert [i["bytes"] for i in verl["images"]] == [f.read_bytes() for f in lf_files]
        assert {(i["min_pixels"], i["max_pixels"]) for i in verl["images"]} == {(40_000, 2_000_000)}
        assert sum(m["content"].count(IMAGE) for m in verl["messages"]) == len(order)


def test_two_image_trajectories_export_every_original_as_shown(probes, tmp_path):
    """A two-image question (zooms into image_2 and into that crop) beside a one-image question on image_2's file:
    each original is its own file, in placeholder order; the file shown alone, at its full budget, and shown
    beside another, at its share, is written twice, since the pixels differ."""
    two = Sample(id="two", images=[probes[0].images[0], probes[1].images[0]], question="Which?", answer="A")
    replies = [
        _zoom([0.1, 0.1, 0.6, 0.6], "image_2"),
        _zoom([0.2, 0.2, 0.8, 0.8], "observation_1"),
        "<answer>A</answer>",
    ]
    trajs = [
        _run(AgentLoop(ScriptedBackend([replies])), two, "tags"),
        _run(AgentLoop(ScriptedBackend([["<answer>A</answer>"]])), probes[1], "alone"),
    ]
    assert [t.turns[0].original_index for t in trajs] == [1, 0] and len(trajs[0].originals()) == 2
    path = tmp_path / "trajectories.jsonl"
    save_jsonl(trajs, path)
    out = tmp_path / "out"
    result = export(path, out, FORMATS_HERE)
    assert result.exported == 2 and all(r.rows == 2 for r in validate(out).values())
    rows = _rows(out)
    for traj in trajs:
        _check_images(out, rows, traj)
    files = rows["llamafactory"][trajs[0].id]["images"]
    assert len(files) == len(set(files)) == 4  # image_1, image_2, two crops
    alone = rows["llamafactory"][trajs[1].id]["images"]
    shown = [o.shown_size for o in trajs[0].originals()] + [trajs[1].shown_size]
    assert shown[1] != shown[2] and alone[0] not in files  # one file, two sizes: two images
    human = rows["llamafactory"][trajs[0].id]["conversations"][1]["value"]
    assert human.count(IMAGE) == 2 and human.index("image_1:") < human.index("image_2:")


def test_llamafactory_alternates_by_merging_consecutive_injected_messages(mixed_export):
    out, _ = mixed_export
    rows = _rows(out)["llamafactory"]
    tags = _named(rows, "tags-error")
    assert [t["from"] for t in tags["conversations"]] == ["system", "human", "gpt", "human", "gpt", "human", "gpt"]
    assert "could not be carried out" in tags["conversations"][3]["value"]

    tools = _named(rows, "tools-multi")
    roles = [t["from"] for t in tools["conversations"]]
    assert roles == ["system", "human", "function_call", "observation", "function_call", "observation", "gpt"]
    both_calls = tools["conversations"][2]["value"]
    calls = json.loads(both_calls.split("<tool_call>")[1].split("</tool_call>")[0])
    assert both_calls.startswith("<think>two at once</think>") and [c["arguments"]["bbox_2d"] for c in calls] == [
        [0, 0, 0.5, 0.5],
        [0.5, 0.5, 1, 1],
    ]
    errors = tools["conversations"][3]["value"].split("\n")
    assert sum("make one zoom call per reply" in line for line in errors) == 2  # two tool messages, one turn
    observation = tools["conversations"][5]["value"]
    assert observation.startswith("Done: observation_1") and IMAGE in observation  # tool note + user image
    assert json.loads(tools["tools"]) == [zoom_tool_schema(Coords.RELATIVE)]
    for row in rows.values():
        assert sum(t["value"].count(IMAGE) for t in row["conversations"]) == len(row["images"])


@needs_arrow
def test_trl_and_verl_keep_the_record_roles(mixed_export):
    out, _ = mixed_export
    rows = _rows(out)
    trl = _named(rows["trl"], "tools-multi")
    expected = ["system", "user", "assistant", "tool", "tool", "assistant", "tool", "user", "assistant"]
    assert [m["role"] for m in trl["messages"]] == expected
    assert [p["type"] for p in trl["messages"][7]["content"]] == ["text", "image", "text"]
    call = trl["messages"][5]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["arguments"]["bbox_2d"] == [0.4, 0.3, 0.6, 0.5]
    assert trl["messages"][6]["tool_call_id"] == "c"

    verl = _named(rows["verl"], "tools-multi")
    assert [m["role"] for m in verl["messages"]] == expected
    arguments = verl["messages"][5]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments)["bbox_2d"] == [0.4, 0.3, 0.6, 0.5]  # kept a JSON string
    assert verl["tools"] == [zoom_tool_schema(Coords.RELATIVE)]  # exact: no keys filled with nulls
    tags = _named(rows["verl"], "tags-error")
    assert tags["tools"] == [] and all(m["tool_calls"] is None for m in tags["messages"])


def test_skipped_trajectories_are_counted_by_reason(mixed_export):
    out, result = mixed_export
    assert result.exported == 2
    assert {r: [_name(i) for i in ids] for r, ids in result.skipped.items()} == {
        "placeholder_in_text": ["literal"],
        "stop_reason:max_turns": ["capped"],
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["placeholder_in_text"]["count"] == 1
    assert sorted(_name(i) for i in _rows(out)["trl"]) == ["tags-error", "tools-multi"]
    validate(out)


def test_export_refuses_what_it_cannot_write_faithfully(mixed, tmp_path, probes):
    record = json.loads(mixed.read_text().splitlines()[0])
    record["prompt"] = []
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps(record) + "\n")
    with pytest.raises(GlimpseError, match="no prompt"):
        export(old, tmp_path / "old", ["trl"])
    assert not (tmp_path / "old/trl/data.jsonl").exists() and not (tmp_path / "old/trl/data.jsonl.tmp").exists()

    other = _run(AgentLoop(ScriptedBackend([["<answer>A</answer>"]]), min_pixels=50_000), probes[1], "other-limits")
    both = tmp_path / "both.jsonl"
    both.write_text(mixed.read_text() + other.model_dump_json() + "\n")
    with pytest.raises(GlimpseError, match="export them apart"):
        export(both, tmp_path / "both", ["trl"])

    with pytest.raises(ConfigError, match="formats must be"):
        export(mixed, tmp_path / "x", ["sharegpt"])
    with pytest.raises(ConfigError, match="image format"):
        export(mixed, tmp_path / "x", image_format="webp")


@needs_arrow
def test_verl_refuses_two_function_schemas(probes, tmp_path):
    loop = AgentLoop(ScriptedBackend([["<answer>A</answer>"]]), protocol="tools", code=True, sandbox="process")
    path = tmp_path / "code.jsonl"
    save_jsonl([_run(loop, probes[0], "code")], path)
    export(path, tmp_path / "ok", ["llamafactory", "trl"])
    with pytest.raises(GlimpseError, match="without the verl format"):
        export(path, tmp_path / "no", ["verl"])


# ------------------------------------------------------------------------------------ validators can fail
def _corrupt_lf(out: Path, change) -> None:
    file = out / "llamafactory/data.json"
    rows = json.loads(file.read_text())
    change(rows[0])
    file.write_text(json.dumps(rows))


def _corrupt_trl(out: Path, change) -> None:
    file = out / "trl/data.jsonl"
    lines = file.read_text().splitlines()
    row = json.loads(lines[0])
    change(row)
    file.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")


def _corrupt_verl(out: Path, change) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = out / "verl/data.parquet"
    table = pq.read_table(file)
    rows = table.to_pylist()
    change(rows[0])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), file)


def _remove_first_image(out: Path) -> None:
    row = json.loads((out / "trl/data.jsonl").read_text().splitlines()[0])
    (out / "trl" / row["images"][0]).unlink()


def _shrink_first_image(out: Path) -> None:
    row = json.loads((out / "trl/data.jsonl").read_text().splitlines()[0])
    file = out / "trl" / row["images"][0]
    with Image.open(file) as img:
        img.resize((img.width - 5, img.height)).save(file)


def _move_first_placeholder(row: dict) -> None:
    first, last = row["conversations"][1], row["conversations"][-1]
    first["value"] = first["value"].replace(IMAGE, "", 1)
    last["value"] += IMAGE


def _odd_size_png(row: dict) -> None:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (301, 200)).save(buf, format="PNG")
    row["images"][0]["bytes"] = buf.getvalue()


CORRUPTIONS = [
    ("llamafactory", lambda out: _remove_first_image(out), "does not exist"),
    ("llamafactory", lambda out: _shrink_first_image(out), "not at a shown size"),
    (
        "llamafactory",
        lambda out: _corrupt_lf(out, lambda r: r["conversations"][-1].update(value=IMAGE + "x")),
        "placeholders",
    ),
    ("llamafactory", lambda out: _corrupt_lf(out, lambda r: r["conversations"].pop(2)), "expects one of"),
    ("llamafactory", lambda out: _corrupt_lf(out, lambda r: r["conversations"][2].update(value=" ")), "empty"),
    ("llamafactory", lambda out: _corrupt_lf(out, _move_first_placeholder), "first human turn"),
    ("trl", lambda out: _remove_first_image(out), "does not exist"),
    (
        "trl",
        lambda out: _corrupt_trl(out, lambda r: r["messages"][-1]["content"].append({"type": "image"})),
        "image parts but",
    ),
    ("trl", lambda out: _corrupt_trl(out, lambda r: r["messages"].pop()), "end with an assistant"),
    ("trl", lambda out: _corrupt_trl(out, lambda r: r["messages"].insert(3, r["messages"][2])), "follow each other"),
    ("verl", lambda out: _corrupt_verl(out, lambda r: r["messages"][-1].update(content=IMAGE)), "placeholders"),
    ("verl", lambda out: _corrupt_verl(out, _odd_size_png), "not at a shown size"),
    ("verl", lambda out: _corrupt_verl(out, lambda r: r["messages"][1].update(role="assistant")), "first message"),
]


@pytest.mark.parametrize(("fmt", "corrupt", "message"), CORRUPTIONS)
def test_validators_fail_on_corrupted_output(exported, tmp_path, fmt, corrupt, message):
    if fmt == "verl" and not HAS_ARROW:
        pytest.skip("pyarrow (glimpse[hf]) reads verl's parquet")
    out = tmp_path / "copy"
    shutil.copytree(exported["tags"], out)
    validators = {
        "llamafactory": lambda: validate_llamafactory(out / "llamafactory"),
        "trl": lambda: validate_trl(out / "trl/data.jsonl"),
        "verl": lambda: validate_verl(out / "verl/data.parquet"),
    }
    validators[fmt]()  # intact
    corrupt(out)
    with pytest.raises(GlimpseError, match=message):
        validators[fmt]()


@needs_arrow
def test_verl_validator_checks_the_schema(exported, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(exported["tags"] / "verl/data.parquet")
    rows = table.to_pylist()
    for row in rows:
        for image in row["images"]:
            del image["min_pixels"]
    (tmp_path / "verl").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "verl/data.parquet")
    with pytest.raises(GlimpseError, match="min_pixels"):
        validate_verl(tmp_path / "verl/data.parquet", limits=LIMITS)


def test_verl_without_pyarrow_names_the_extra(cold, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"glimpse\[hf\]"):
        export(cold["tags"], tmp_path / "out", ["trl", "verl"])
    assert not list((tmp_path / "out").rglob("*.tmp"))
