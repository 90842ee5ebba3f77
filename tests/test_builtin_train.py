"""Training the built-in model: the streamed probes and cards, the per-skill held-out log, and a short run of
``glimpse train builtin`` (seconds, tiny model)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glimpse.builtin.train import ExampleMaker, skills, train_builtin
from glimpse.config import BuiltinConfig
from glimpse.images import PixelLimits, smart_resize
from glimpse.probes.stream import card_sample


def test_cards_are_legible_single_signs():
    with tempfile.TemporaryDirectory() as d:
        kinds = set()
        for i in range(20):
            s = card_sample(i, 0, Path(d))
            kinds.add(s.meta["category"])
            assert s.answer and "border" in s.question
            assert s.id == card_sample(i, 0, Path(d)).id  # deterministic
            (c,) = s.meta["candidates"]
            w, h = s.meta["size"]
            assert c["target"] and 0 <= c["box"][0] < c["box"][2] <= w and 0 <= c["box"][1] < c["box"][3] <= h
        assert kinds >= {"read_code", "count"}


def test_drawn_views_match_the_full_scene_resized():
    """Training draws only the views a trajectory shows: crops are the full-resolution scene's pixels, and the
    downscaled full view is within a few grey levels of it."""
    from glimpse.probes.synth import make_probe

    probe = make_probe("medium", 5, seed=11)
    w, h = probe.image.size
    x0, y0, x1, y1 = probe.record["boxes"][0]
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    limits = PixelLimits(65_536, 147_456, 32)
    for box, tolerance in (
        ((0, 0, w, h), 2.0),
        ((max(0, cx - w // 16), max(0, cy - h // 16), max(0, cx - w // 16) + w // 8, max(0, cy - h // 16) + h // 8), 0),
        ((cx - w // 64, cy - h // 64, cx + w // 64, cy + h // 64), 0),
    ):
        size = smart_resize(box[2] - box[0], box[3] - box[1], limits)
        want = np.asarray(probe.image.resize(size, Image.Resampling.BICUBIC, box=box), dtype=np.int16)
        got = np.asarray(probe.scene.view(box, size), dtype=np.int16)
        assert np.abs(want - got).mean() <= tolerance, box


def test_skills_are_scored_per_zoom_and_per_answer():
    ids = {"box_open": 9, "answer_open": 7, "answer_close": 8}
    # first zoom: box opening then five pointer tokens; a second zoom; an answer of two tokens and its close
    target = [9, 1, 2, 3, 4, 5, -100, 9, 1, 2, 3, 4, 6, -100, 7, 20, 21, 8]
    pred = list(target)
    pred[12] = 5  # the second zoom's source is wrong
    pred[16] = 22  # one answer token is wrong
    got = skills(target, pred, "hard", "read_code", ids)
    assert got["first_zoom"] == [1] and got["later_zoom"] == [0] and got["answer"] == [0]
    assert got["answer/hard/read_code"] == [0] and got["answer/read_code"] == [0] and got["first_zoom/hard"] == [1]
    pred[16] = 21
    assert skills(target, pred, "hard", "read_code", ids)["answer"] == [1]


def test_examples_are_teacher_searches_through_the_loop(tmp_path):
    from glimpse.builtin.model import build_builtin

    model = build_builtin(tmp_path / "model", size="tiny")
    folder = tmp_path / "files"
    folder.mkdir()
    make = ExampleMaker(model, 0, folder)
    tok = make.processor.tokenizer
    for level in ("card", "medium"):
        (example, kind), why = make(level, 1_000_001)
        assert why is None and kind
        trained = tok.convert_ids_to_tokens([x for x in example.labels if x != -100])
        zooms = trained.count('{"bbox_2d": [')
        assert trained.count("<|im_end|>") == zooms + 1 and (zooms == 0) == (level == "card")
        assert len(example.image_grid_thw) == zooms + 1  # the first view and one observation per zoom


def test_train_builtin_runs_learns_and_logs_skills(tmp_path):
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import build_builtin

    cfg = BuiltinConfig(
        out=str(tmp_path / "run"),
        size="tiny",
        minutes=0.25,
        batch=2,
        workers=1,
        threads=1,
        lr=3e-3,
        warmup=1,
        replay=2,
        device="cpu",
        only="card",
    )
    model_dir = train_builtin(cfg, log=lambda entry: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log and all("acc_answer" in e and "acc_answer/card" in e for e in log)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["examples"] == 2 * result["steps"] >= 2
    fresh = AutoModelForImageTextToText.from_pretrained(build_builtin(tmp_path / "fresh", size="tiny"))
    trained = AutoModelForImageTextToText.from_pretrained(model_dir)
    changed = [
        n
        for (n, a), (_, b) in zip(fresh.state_dict().items(), trained.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    ]
    assert any(n.startswith("visual.") for n in changed) and any(n.startswith("model.layers") for n in changed)
