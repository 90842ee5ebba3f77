"""Loaders, on small fixture files in each benchmark's published format (made here, not downloaded)."""

from __future__ import annotations

import asyncio
import base64
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from glimpse.errors import ConfigError
from glimpse.eval.datasets import load_dataset


def jpeg(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


def test_visualprobe(tmp_path):
    base = tmp_path / "minio3"
    folder = base / "VisualProbe_Hard"
    (folder / "data").mkdir(parents=True)
    for i in range(3):
        (folder / "data" / f"visual_probe_hard_{i}.jpg").write_bytes(jpeg())
    rows = [
        {
            "images": [f"VisualProbe_Hard/data/visual_probe_hard_{i}.jpg"],
            "problem": f"<image>\nWhat colour is item {i}?",
            "solution": "White.",
            "data_source": "visual_probe_hard",
            "doc_id": f"visual_probe_hard_{i}",
        }
        for i in range(3)
    ]
    rows.append({"images": ["VisualProbe_Hard/data/x.jpg"], "data_source": "visual_probe_hard"})  # corrupt: no problem
    missing = {**rows[0], "images": ["VisualProbe_Hard/data/visual_probe_hard_9.jpg"], "doc_id": "visual_probe_hard_9"}
    rows.append(missing)
    (folder / "val.json").write_text(json.dumps(rows))
    data = load_dataset(f"visualprobe:hard:{base}")
    assert data.name == "visualprobe-hard" and len(data) == 5
    s = data.samples[0]
    assert s.id == "visualprobe-hard/visual_probe_hard_0" and s.answer == "White."
    assert s.question == "What colour is item 0?" and Path(s.images[0]).exists()
    assert s.meta["level"] == "hard" and s.options is None
    assert "lacks 'problem'" in data.samples[3].meta["input_error"]
    # a missing image is expected where it would be, not under a doubled VisualProbe_Hard/VisualProbe_Hard/
    assert data.samples[4].images == [str(folder / "data" / "visual_probe_hard_9.jpg")]
    with pytest.raises(
        ConfigError, match=r"VisualProbe_Easy/val\.json.*huggingface-cli download Mini-o3/VisualProbe_Easy"
    ):
        load_dataset(f"visualprobe:easy:{base}")


def test_minio3_json_with_letter_options_and_unshuffled_warning(tmp_path):
    (tmp_path / "img.jpg").write_bytes(jpeg())
    rows = [
        {
            "images": ["img.jpg"],
            "problem": f"<image>\nWhat is it?\n(A) cat {i}\n(B) dog\nAnswer with the letter.",
            "solution": "A",
            "data_source": "vstar_bench",
            "doc_id": i,
        }
        for i in range(12)
    ]
    (tmp_path / "val.json").write_text(json.dumps(rows))
    data = load_dataset(f"minio3:{tmp_path / 'val.json'}")
    s = data.samples[0]
    assert s.options == ["cat 0", "dog"] and s.answer == "A" and s.question == "What is it?"
    assert any("never shuffled" in n for n in data.notes)


def test_vstar_per_image_json_and_jsonl(tmp_path):
    for cat, n in (("direct_attributes", 2), ("relative_position", 1)):
        (tmp_path / cat).mkdir()
        for i in range(n):
            (tmp_path / cat / f"sa_{i + 10}.jpg").write_bytes(jpeg())
            ann = {
                "target_object": ["glove"],
                "bbox": [[5, 6, 10, 12]],
                "question": "What is the glove made of?",
                "options": ["rubber", "cotton", "kevlar", "leather"],
            }
            (tmp_path / cat / f"sa_{i + 10}.json").write_text(json.dumps(ann))
    (tmp_path / "direct_attributes" / "sa_99.json").write_text("{not json")
    data = load_dataset(f"vstar:{tmp_path}")
    assert len(data) == 4
    s = data.samples[0]
    assert s.id == "vstar/direct_attributes/sa_10" and s.answer == "A" and s.options[0] == "rubber"
    assert s.target_boxes == [[5, 6, 15, 18]] and s.meta["category"] == "direct_attributes"
    assert "unreadable annotation" in next(x for x in data.samples if x.id.endswith("sa_99")).meta["input_error"]
    line = {
        "image": "direct_attributes/sa_10.jpg",
        "text": "What is the glove made of?\n(A) rubber\n(B) cotton\n"
        "(C) kevlar\n(D) leather\nAnswer with the option's letter from the given choices directly.",
        "category": "direct_attributes",
        "question_id": "0",
        "label": "C",
    }
    (tmp_path / "test_questions.jsonl").write_text(json.dumps(line) + "\n")
    data = load_dataset(f"vstar-jsonl:{tmp_path}")
    (s,) = data.samples
    assert s.id == "vstar/0" and s.answer == "C" and s.options == ["rubber", "cotton", "kevlar", "leather"]
    assert s.question == "What is the glove made of?"


def test_hrbench_tsv(tmp_path):
    header = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
    img = b64(jpeg())
    rows = [
        ["0", "What number is above the door?", "A", "single", "27B", "37B", "27D", "27E", "0", img],
        ["1", "What number is above the door?", "B", "single", "27E", "27B", "37B", "27D", "1", "0"],  # refers to row 0
        ["2", "Which way is the arrow?", "Z", "cross", "left", "right", "up", "down", "0", img],  # unknown answer
        ["3", "Broken row", "A"],
    ]
    path = tmp_path / "hr_bench_4k.tsv"
    write_tsv(path, ["\ufeffindex", *header[1:]], rows)  # a byte-order mark before the header
    data = load_dataset(f"hrbench:{path}")
    assert data.name == "hrbench4k" and len(data) == 4
    assert data.options == "fixed"  # the rows already rotate the answer: --options auto shows them as they are
    a, b, bad, broken = data.samples
    assert a.id == "hrbench4k/0" and a.answer == "A" and a.options == ["27B", "37B", "27D", "27E"]
    assert a.meta["cycle"] == "0"
    assert b.images == a.images and Image.open(a.images[0]).size == (64, 48)
    assert "not one of the 4 option letters" in bad.meta["input_error"]
    assert "cells" in broken.meta["input_error"]
    again = load_dataset(f"hrbench:{path}")
    assert again.samples[0].images == a.images  # images are written once
    with pytest.raises(ConfigError, match="HR-Bench file not found"):
        load_dataset(f"hrbench:{tmp_path / 'hr_bench_8k.tsv'}")
    # evaluated with the default --options auto: in file order, recorded so, the cycle breakdown kept
    from glimpse.config import EvalConfig
    from glimpse.eval.harness import run_eval

    run = asyncio.run(run_eval(EvalConfig(data=f"hrbench:{path}", model="oracle", out=str(tmp_path / "run"))))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["options"] == "fixed"
    assert set(run.summaries[max(run.summaries)]["by"]["cycle"]) == {"0", "1"}
    # a run made with another order (before auto existed: shuffle) resumes with it under auto
    shuffled = EvalConfig(data=f"hrbench:{path}", model="oracle", out=str(tmp_path / "old"), options="shuffle")
    asyncio.run(run_eval(dataclasses.replace(shuffled, limit=1)))
    again = asyncio.run(run_eval(dataclasses.replace(shuffled, options="auto")))
    assert again.skipped == 1 and again.ran == 3
    assert json.loads((tmp_path / "old" / "config.json").read_text())["config"]["options"] == "shuffle"


HRBENCH_COLUMNS = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]


def write_hrbench_parquet(path: Path, rows: list[list], *, cycle_type=None) -> None:
    """HR-Bench's parquet table: the TSV's columns, ``index`` int64, ``image`` base64 JPEG text."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = list(zip(*rows, strict=True))
    types = [pa.int64()] + [pa.string()] * 7 + [cycle_type or pa.string(), pa.string()]
    table = pa.table({n: pa.array(list(c), type=t) for n, c, t in zip(HRBENCH_COLUMNS, columns, types, strict=True)})
    pq.write_table(table, path)


def test_hrbench_parquet_loads_like_the_tsv(tmp_path):
    img = b64(jpeg(size=(80, 40)))
    rows = [
        [0, "What number is above the door?", "A", "single", "27B", "37B", "27D", "27E", "0", img],
        [1, "What number is above the door?", "B", "single", "27E", "27B", "37B", "27D", "1", img],
        [2, "Which way is the arrow?", "Z", "cross", "left", "right", "up", "down", "0", img],
        [3, "Broken image", "A", "cross", "a", "b", "c", "d", "2", "%%%not base64%%%" * 10],
    ]
    path = tmp_path / "hr_bench_4k.parquet"
    write_hrbench_parquet(path, rows)
    data = load_dataset(f"hrbench:{path}")
    assert data.name == "hrbench4k" and len(data) == 4
    assert data.options == "fixed"  # the rows already rotate the answer: --options auto shows them as they are
    a, b, bad, broken = data.samples
    assert a.id == "hrbench4k/0" and a.answer == "A" and a.options == ["27B", "37B", "27D", "27E"]
    assert a.meta == {"category": "single", "cycle": "0"} and b.answer == "B"
    assert b.images == a.images and Image.open(a.images[0]).size == (80, 40)  # one file per distinct image
    assert "not one of the 4 option letters" in bad.meta["input_error"]
    assert "not valid base64" in broken.meta["input_error"]
    # cycle_category is an integer in some copies; a parquet file named .tsv is still read as parquet
    pa = pytest.importorskip("pyarrow")
    renamed = tmp_path / "hr_bench_8k.tsv"
    write_hrbench_parquet(renamed, [[r[0], *r[1:8], int(r[8]), r[9]] for r in rows[:2]], cycle_type=pa.int64())
    data = load_dataset(f"hrbench:{renamed}")
    assert data.name == "hrbench8k" and [s.meta["cycle"] for s in data.samples] == ["0", "1"]


def test_hrbench_parquet_errors_name_the_file_and_the_fix(tmp_path, monkeypatch):
    img = b64(jpeg())
    good = tmp_path / "hr_bench_4k.parquet"
    write_hrbench_parquet(good, [[0, "Q?", "A", "single", "a", "b", "c", "d", "0", img]])
    torn = tmp_path / "torn.parquet"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"torn\.parquet is not a readable parquet file.*download it again"):
        load_dataset(f"hrbench:{torn}")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"index": [0], "question": ["Q?"]}), tmp_path / "other.parquet")
    with pytest.raises(ConfigError, match=r"other\.parquet lacks the column\(s\) answer, A, B, image"):
        load_dataset(f"hrbench:{tmp_path / 'other.parquet'}")
    binary = tmp_path / "hr_bench_4k.tsv"
    binary.write_bytes(b"index\tquestion\tanswer\tA\tB\timage\n" + bytes(range(128, 256)) * 50)
    with pytest.raises(ConfigError, match=r"hr_bench_4k\.tsv is not UTF-8 text"):
        load_dataset(f"hrbench:{binary}")
    with pytest.raises(ConfigError, match=r"is a folder: name HR-Bench's file, e\.g\. hrbench:.*hr_bench_4k\.parquet"):
        load_dataset(f"hrbench:{tmp_path}")
    with pytest.raises(ConfigError, match=r"--include 'hr_bench_8k\.parquet'"):
        load_dataset(f"hrbench:{tmp_path / 'hr_bench_8k.parquet'}")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an install without pyarrow
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"needs pyarrow: pip install pyarrow.*glimpse\[hf\].*\.tsv"):
        load_dataset(f"hrbench:{good}")


def test_treebench_tsv(tmp_path):
    header = [
        "index",
        "image",
        "question",
        "multi-choice options",
        "A",
        "B",
        "C",
        "answer",
        "category",
        "target_instances",
    ]
    rows = [
        [
            "0",
            b64(jpeg()),
            "Which is closer?",
            "A. cup\nB. plate\nC. fork",
            "cup",
            "plate",
            "fork",
            "B",
            "Perception/Attributes",
            "[[86.0, 750.0, 919.5, 1249.0], [460.0, 1023.0, 499.0, 1070.0]]",
        ],
        ["1", b64(jpeg()), "Odd one?", "A. x\nB. y", "x", "y", "", "A", "Reasoning/Ordering", "not a list"],
        ["2", "%%%not base64%%%" * 10, "Q", "", "x", "y", "", "A", "Perception/OCR", "[[1, 2, 3, 4]]"],
    ]
    path = tmp_path / "TreeBench.tsv"
    write_tsv(path, header, rows)
    data = load_dataset(f"treebench:{path}")
    good, bad_boxes, bad_image = data.samples
    assert good.options == ["cup", "plate", "fork"] and good.answer == "B"
    assert good.target_boxes == [[86, 750, 920, 1249], [460, 1023, 499, 1070]]
    assert good.meta["category"] == "Perception/Attributes"
    assert "unreadable row" in bad_boxes.meta["input_error"]
    assert "input_error" in bad_image.meta
    with pytest.raises(ConfigError, match=r"cannot read .*: Is a directory"):
        load_dataset(f"treebench:{tmp_path}")


def mme_record(i: int, image: str) -> dict:
    return {
        "Question_id": f"Perception/Monitoring/counting/{i:04d}",
        "Question Type": "Multiple Choice",
        "Image": image,
        "Text": "How many cars are there?",
        "Answer choices": ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) The image does not feature the cars."],
        "Ground truth": "C",
        "Task": "Perception",
        "Subtask": "Monitoring",
        "Category": "Vehicle/Counting",
    }


def test_mme_realworld_full_and_lite(tmp_path):
    full = tmp_path / "full"
    (full / "monitoring_images").mkdir(parents=True)
    (full / "monitoring_images" / "a.jpg").write_bytes(jpeg())
    rows = [mme_record(0, "monitoring_images/a.jpg"), {"Question_id": "broken"}]
    (full / "MME_RealWorld.json").write_text(json.dumps(rows))
    data = load_dataset(f"mme-realworld:{full}")
    s = data.samples[0]
    assert s.options[2] == "3" and s.options[4] == "The image does not feature the cars." and s.answer == "C"
    assert s.meta == {"task": "Perception", "subtask": "Monitoring", "category": "Vehicle/Counting"}  # as written
    assert Path(s.images[0]).exists() and "input_error" in data.samples[1].meta
    lite = tmp_path / "lite"
    (lite / "data" / "imgs").mkdir(parents=True)
    (lite / "data" / "imgs" / "n008__CAM_FRONT__1.jpg").write_bytes(jpeg())
    (lite / "data" / "MME-RealWorld-Lite.json").write_text(json.dumps([mme_record(1, "n008__CAM_FRONT__1.jpg")]))
    (s,) = load_dataset(f"mme-realworld-lite:{lite}").samples
    assert Path(s.images[0]).exists() and s.id.startswith("mme-realworld-lite/")
    with pytest.raises(ConfigError, match=r"MME-RealWorld-Lite\.json"):
        load_dataset(f"mme-realworld-lite:{tmp_path / 'nowhere'}")
    # the Chinese questions, by file name: images beside the file
    (full / "MME_RealWorld_CN.json").write_text(json.dumps([mme_record(2, "monitoring_images/a.jpg")]))
    cn = load_dataset(f"mme-realworld:{full / 'MME_RealWorld_CN.json'}")
    assert cn.name == "mme-realworld-cn" and Path(cn.samples[0].images[0]).exists()
    (s,) = load_dataset(f"mme-realworld-lite:{lite / 'data' / 'MME-RealWorld-Lite.json'}").samples
    assert Path(s.images[0]).exists()


def test_questions_that_share_an_id_are_renamed_with_a_note(tmp_path):
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg())
    rows = [mme_record(0, "a.jpg"), mme_record(0, "a.jpg"), mme_record(0, "a.jpg"), mme_record(1, "a.jpg")]
    (folder / "MME_RealWorld.json").write_text(json.dumps(rows))
    data = load_dataset(f"mme-realworld:{folder}")
    ids = [s.id for s in data.samples]
    assert len(set(ids)) == 4 and ids[1] == ids[0] + "#2" and ids[2] == ids[0] + "#3"
    assert any("2 questions share an id" in note for note in data.notes)


def test_mme_realworld_base64_table(tmp_path):
    """The MME-RealWorld-Base64 copy: one TSV, images inside, category and l2-category as task and subtask."""
    header = ["index", "image", "question", "multi-choice options", "A", "B", "C", "D", "E", "answer", "category"]
    header.append("l2-category")
    options = ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) All the above answers are wrong."]
    listed = "\n".join(options)
    rows = [
        [
            "7",
            b64(jpeg()),
            "How many cars?",
            listed,
            "1",
            "2",
            "3",
            "4",
            options[4][4:],
            "C",
            "Perception",
            "Monitoring",
        ],
        ["8", "not an image", "How many?", "", "1", "2", "3", "4", "5", "A", "Perception", "Monitoring"],
    ]
    path = tmp_path / "mme_realworld_lite.tsv"
    write_tsv(path, header, rows)
    data = load_dataset(f"mme-realworld:{path}")
    good, bad = data.samples
    assert data.name == "mme-realworld-lite" and good.id == "mme-realworld-lite/7"
    assert good.options == ["1", "2", "3", "4", "All the above answers are wrong."] and good.answer == "C"
    assert good.meta == {"task": "Perception", "subtask": "Monitoring"} and Path(good.images[0]).exists()
    assert "input_error" in bad.meta


def o3bench_record(file_name: str, **changes) -> dict:
    """One line of O3-Bench's test/metadata.jsonl, with its fields as published."""
    record = {
        "file_name": file_name,
        "subset": "map",
        "question": "Which station provides long-term and free daily parking?",
        "options": "A. Doraville\nB. North Springs\nC. Arts Center\nD. Lindbergh Center\nE. Airport\n"
        "F. No right choice",
        "answer": "C",
        "explanation": "Step 1. In layout 2, locate the icons for long-term parking ...",
        "target_layouts": [1, 3],
        "layout_infos": {
            "1": {"layout_id": 1, "bbox": [19.5, 50.5, 120.25, 80.0]},
            "2": {"layout_id": 2, "bbox": [10.0, 10.0, 50.0, 50.0]},
            "3": {"layout_id": 3, "bbox": [200.0, 100.0, 320.7, 240.4]},
        },
        "img_width": 320,
        "img_height": 240,
    }
    return {**record, **changes}


def test_o3bench_metadata_jsonl(tmp_path):
    from glimpse.eval.options import present

    test = tmp_path / "O3-Bench" / "test"
    (test / "images" / "map").mkdir(parents=True)
    (test / "images" / "chart").mkdir(parents=True)
    Image.new("RGB", (320, 240), (200, 200, 200)).save(test / "images" / "map" / "subway.png")
    (test / "images" / "chart" / "1-3.png").write_bytes((test / "images" / "map" / "subway.png").read_bytes())
    lines = [
        json.dumps(o3bench_record("images/map/subway.png")),
        json.dumps(o3bench_record("images/chart/1-3.png", subset="chart", answer="A", target_layouts=[2])),
        json.dumps(o3bench_record("images/map/subway.png", target_layouts=[7])),  # no such layout
        json.dumps(
            o3bench_record("images/map/subway.png", layout_infos={"1": {"layout_id": 1, "bbox": [200, 100, 50, 40]}})
        ),  # [x, y, w, h], not [xmin, ymin, xmax, ymax]
        json.dumps(
            o3bench_record("images/map/subway.png", layout_infos={"1": {"layout_id": 1, "bbox": [400, 10, 500, 20]}})
        ),  # outside the 320 x 240 image
        "{not json",
        json.dumps(  # as some pandas-saved copies store them: text
            o3bench_record(
                "images/map/subway.png",
                target_layouts="[3]",
                layout_infos=str({"3": {"layout_id": 3, "bbox": [200.0, 100.0, 300.0, 200.0]}}),
            )
        ),
        "[" * 100_000 + "]" * 100_000,  # hostile nesting
        json.dumps(o3bench_record("images/map/subway.png", options="", answer="Doraville", target_layouts=[])),
        "",
    ]
    (test / "metadata.jsonl").write_text("\ufeff" + "\n".join(lines), encoding="utf-8")  # with a byte-order mark
    data = load_dataset(f"o3bench:{tmp_path / 'O3-Bench'}")
    assert data.name == "o3bench" and len(data) == 9
    first, chart, unknown, xywh, outside, broken, as_text, nested, open_ended = data.samples
    assert first.id == "o3bench/0" and first.images == [str(test / "images" / "map" / "subway.png")]
    assert first.options[0] == "Doraville" and first.options[5] == "No right choice" and first.answer == "C"
    assert first.question.startswith("Which station") and first.meta["category"] == "map"
    assert first.target_boxes == [[19, 50, 121, 80], [200, 100, 320, 240]]  # pixel xyxy, clipped to the image
    assert chart.meta["category"] == "chart" and chart.target_boxes == [[10, 10, 50, 50]] and chart.answer == "A"
    assert "target layout 7 is not in layout_infos" in unknown.meta["input_error"]
    assert "metadata.jsonl line 3" in unknown.meta["input_error"]
    assert "not pixel [xmin, ymin, xmax, ymax]" in xywh.meta["input_error"]
    assert "outside the 320×240 image" in outside.meta["input_error"]
    assert "line 6 is unreadable" in broken.meta["input_error"]
    assert as_text.target_boxes == [[200, 100, 300, 200]] and "nests too deeply" in nested.meta["input_error"]
    assert open_ended.options is None and open_ended.answer == "Doraville" and open_ended.target_boxes is None
    # options are shuffled per repeat like every benchmark's, the gold letter following its option
    shown = [present(first, r, mode="shuffle", seed=0) for r in range(6)]
    assert len({tuple(s.options) for s in shown}) > 1
    assert all(s.options["ABCDEF".index(s.answer)] == "Arts Center" for s in shown)
    # the test folder and the file itself name the same data
    assert len(load_dataset(f"o3bench:{test}")) == len(load_dataset(f"o3bench:{test / 'metadata.jsonl'}")) == 9
    with pytest.raises(ConfigError, match=r"test/metadata\.jsonl.*huggingface-cli download m-Just/O3-Bench"):
        load_dataset(f"o3bench:{tmp_path / 'nowhere'}")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="holds no questions"):
        load_dataset(f"o3bench:{tmp_path / 'empty.jsonl'}")


def test_malformed_files_and_rows_never_raise_a_traceback(tmp_path):
    """A file that is not what it should be is a ConfigError naming it; a bad row is that question's input error."""
    (tmp_path / "MME_RealWorld.json").write_bytes(b'[{"Text": "\xff\xfe"}]')
    with pytest.raises(ConfigError, match=r"MME_RealWorld\.json is not UTF-8 text.*download it again"):
        load_dataset(f"mme-realworld:{tmp_path}")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ConfigError, match=r"cannot read .*folder\.json"):
        load_dataset(f"minio3:{tmp_path / 'folder.json'}")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"deep\.json is not valid JSON"):
        load_dataset(f"minio3:{tmp_path / 'deep.json'}")
    rows = [
        {"images": ["a.jpg"], "problem": "Q?", "solution": "x", "boxes": [["left", 2, 3, 4]]},
        {"images": ["a.jpg"], "problem": "Q?", "solution": "x", "boxes": [[1, 2, 3]]},
        {"images": ["a\x00.jpg"], "problem": "Q?", "solution": "x"},
    ]
    (tmp_path / "val.json").write_text(json.dumps(rows))
    samples = load_dataset(f"minio3:{tmp_path / 'val.json'}").samples
    assert all("unreadable record" in s.meta["input_error"] for s in samples)
    full = tmp_path / "mme"
    full.mkdir()
    records = [{**mme_record(0, "x.jpg"), "Answer choices": "(A) 1"}, mme_record(1, "x\x00.jpg")]
    (full / "MME_RealWorld.json").write_text(json.dumps(records))
    bad, nul = load_dataset(f"mme-realworld:{full}").samples
    assert "Answer choices is str, not a list" in bad.meta["input_error"]
    assert "is not a file name" in nul.meta["input_error"]
    (tmp_path / "direct_attributes").mkdir()
    (tmp_path / "relative_position").mkdir()
    ann = {"target_object": ["cup"], "bbox": [["5", "6", "10", "12"]], "question": "?", "options": ["a", "b"]}
    (tmp_path / "direct_attributes" / "sa_1.json").write_text(json.dumps(ann))
    (tmp_path / "direct_attributes" / "sa_2.json").write_bytes(b"\xff\xfe\x00")
    (text_boxes, binary) = load_dataset(f"vstar:{tmp_path}").samples
    assert "not [x, y, w, h] numbers" in text_boxes.meta["input_error"]
    assert "unreadable annotation sa_2.json" in binary.meta["input_error"]
    (tmp_path / "test_questions.jsonl").write_text('{"image": "a.jpg", "text": 5, "question_id": 1, "label": "A"}\n')
    (row,) = load_dataset(f"vstar-jsonl:{tmp_path}").samples
    assert "unreadable row" in row.meta["input_error"]


def test_probes_spec_generates_once():
    data = load_dataset("probes:easy:3:11")
    assert len(data) == 3 and data.name == "probes-easy"
    s = data.samples[0]
    assert s.target_boxes and s.meta["level"] == "easy" and s.meta["category"] == "read_code"
    assert Path(s.images[0]).exists()
    again = load_dataset("probes:easy:3:11")
    assert [x.id for x in again.samples] == [x.id for x in data.samples]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cifar:/x", "unknown dataset"),
        ("vstar", "needs a path"),
        ("probes", "needs a level"),
        ("probes:hard:lots", "must be integers"),
        ("probes:easy:1:0:count:junk", "at most LEVEL:N:SEED:KIND"),
        ("visualprobe:hard", "level and a base folder"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset(spec)
