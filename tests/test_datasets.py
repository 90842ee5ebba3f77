"""Loaders, on small fixture files in each benchmark's published format (made here, not downloaded)."""

from __future__ import annotations

import base64
import csv
import io
import json
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
    (folder / "val.json").write_text(json.dumps(rows))
    data = load_dataset(f"visualprobe:hard:{base}")
    assert data.name == "visualprobe-hard" and len(data) == 4
    s = data.samples[0]
    assert s.id == "visualprobe-hard/visual_probe_hard_0" and s.answer == "White."
    assert s.question == "What colour is item 0?" and Path(s.images[0]).exists()
    assert s.meta["level"] == "hard" and s.options is None
    assert "lacks 'problem'" in data.samples[3].meta["input_error"]
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
    write_tsv(path, header, rows)
    data = load_dataset(f"hrbench:{path}")
    assert data.name == "hrbench4k" and len(data) == 4
    a, b, bad, broken = data.samples
    assert a.answer == "A" and a.options == ["27B", "37B", "27D", "27E"] and a.meta["cycle"] == "0"
    assert b.images == a.images and Image.open(a.images[0]).size == (64, 48)
    assert "not one of the 4 option letters" in bad.meta["input_error"]
    assert "cells" in broken.meta["input_error"]
    again = load_dataset(f"hrbench:{path}")
    assert again.samples[0].images == a.images  # images are written once
    with pytest.raises(ConfigError, match="HR-Bench TSV not found"):
        load_dataset(f"hrbench:{tmp_path / 'hr_bench_8k.tsv'}")


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
    assert s.meta == {"task": "Perception", "subtask": "Monitoring", "category": "vehicle/counting"}
    assert Path(s.images[0]).exists() and "input_error" in data.samples[1].meta
    lite = tmp_path / "lite"
    (lite / "data" / "imgs").mkdir(parents=True)
    (lite / "data" / "imgs" / "n008__CAM_FRONT__1.jpg").write_bytes(jpeg())
    (lite / "data" / "MME-RealWorld-Lite.json").write_text(json.dumps([mme_record(1, "n008__CAM_FRONT__1.jpg")]))
    (s,) = load_dataset(f"mme-realworld-lite:{lite}").samples
    assert Path(s.images[0]).exists() and s.id.startswith("mme-realworld-lite/")
    with pytest.raises(ConfigError, match=r"MME-RealWorld-Lite\.json"):
        load_dataset(f"mme-realworld-lite:{tmp_path / 'nowhere'}")


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
        ("visualprobe:hard", "level and a base folder"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset(spec)
