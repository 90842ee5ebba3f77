"""Training the built-in model: the streamed probes and cards, the per-skill held-out log, and a short run of
``glimpse train builtin`` (seconds, tiny model)."""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glimpse.builtin.processing import READ_ROWS
from glimpse.builtin.reader import find_panel
from glimpse.builtin.train import (
    FIRST_INDEX,
    STREAM_FILE,
    ExampleMaker,
    _level,
    idle,
    mask_replies,
    reading_loss,
    skills,
    stream_start,
    train_builtin,
)
from glimpse.config import BuiltinConfig
from glimpse.errors import ConfigError
from glimpse.images import PixelLimits, smart_resize
from glimpse.probes.stream import card_sample, probe_sample, sign_labels, sign_vocabulary


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


def test_a_cards_sign_is_sized_for_its_text_as_a_probes_sign_is(tmp_path):
    """A card teaches the reader what a zoom into a probe shows: a sign with a two-digit number is drawn the size
    a probe draws it (half as wide as a four-character code's), a three-character code's likewise."""
    from glimpse.probes.synth import sign_size

    lengths = set()
    for i in range(40):
        s = card_sample(i, 0, tmp_path)
        (c,) = s.meta["candidates"]
        text = c.get("code")
        if not text:
            continue
        x0, y0, x1, y1 = c["box"]
        assert any(sign_size("code", f, len(text)) == (x1 - x0, y1 - y0) for f in range(10, 29)), (text, c["box"])
        lengths.add(len(text))
    assert lengths == {2, 3, 4}


def test_the_reader_finds_the_sign_on_cards_and_any_panel_on_a_photo(tmp_path):
    """The panel finder is training-free and knows nothing of probes: on a card it finds the sign (whose box
    the generator knows), on a photo-like image it returns a box inside the image without error."""
    hits = 0
    for i in range(30):
        s = card_sample(i, 0, tmp_path)
        with Image.open(s.images[0]) as image:
            x0, y0, x1, y1 = find_panel(image)
            w, h = image.size
        b = s.meta["candidates"][0]["box"]
        inter = max(0, min(x1, b[2]) - max(x0, b[0])) * max(0, min(y1, b[3]) - max(y0, b[1]))
        union = (x1 - x0) * (y1 - y0) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        hits += inter / union >= 0.5
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert hits >= 27  # measured: 30 of 30
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8))
    x0, y0, x1, y1 = find_panel(photo)
    assert 0 <= x0 < x1 <= 500 and 0 <= y0 < y1 <= 300


def test_sign_labels_index_the_vocabulary():
    vocab = sign_vocabulary()
    sign = {"box": [0, 0, 9, 9], "border": "teal", "code": "K7X", "marker": None, "dots": 5, "corner": "star"}
    labels = sign_labels({**sign, "red_dot": True})
    assert [vocab[f"char{i}"][labels[f"char{i}"]] for i in (1, 2, 3, 4)] == ["K", "7", "X", ""]
    assert vocab["dots"][labels["dots"]] == "5" and vocab["border"][labels["border"]] == "teal"
    assert vocab["mark"][labels["mark"]] == "star red dot" and vocab["marker_color"][labels["marker_color"]] == ""


def test_reading_loss_counts_only_known_panels_and_scores_codes_exactly():
    names = {"char1": 3, "char2": 3, "dots": 4}  # two characters (the last class: none) and a count
    logits = {n: torch.full((3, k), -5.0) for n, k in names.items()}
    for n, right in (("char1", [0, 1, 2]), ("char2", [1, 1, 2]), ("dots", [2, 3, 0])):
        for j, c in enumerate(right):
            logits[n][j, c] = 5.0
    targets = [{"char1": 0, "char2": 1, "dots": 2}, None, {"char1": 2, "char2": 2, "dots": 1}]
    stats: dict[str, list[int]] = {}
    loss = reading_loss(logits, targets, stats, "card")
    assert stats["read/dots"] == [1, 0] and stats["read/dots/card"] == [1, 0]
    assert stats["read/code"] == [1]  # the third panel shows no text (none): not a code
    assert 0 < float(loss) < 10
    assert float(reading_loss(logits, [None, None, None])) == 0.0


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


def test_a_zooms_drawn_pixels_go_through_the_jpeg_a_probes_file_does():
    """With ``quality`` (what training uses), a zoom's full-resolution pixels are those of the probe's JPEG file
    (up to where the 8 × 8 blocks fall): closer to the file's than the crisp drawing is on the target sign, and
    its marker as pale as the file's (the chroma subsampling), where the crisp drawing's is far more vivid."""
    import io

    from glimpse.probes.stream import PROBE_JPEG_QUALITY, SceneImage
    from glimpse.probes.synth import make_probe

    probe = make_probe("easy", 31, seed=0, kind="marker_color")
    buffer = io.BytesIO()
    probe.image.save(buffer, "JPEG", quality=PROBE_JPEG_QUALITY)
    buffer.seek(0)
    file = Image.open(buffer).convert("RGB")
    box = tuple(probe.record["boxes"][0])  # the sign, blown up as a zoom shows it
    size = smart_resize(box[2] - box[0], box[3] - box[1], PixelLimits(65_536, 2_000_000, 32))
    want = np.asarray(file.resize(size, Image.Resampling.BICUBIC, box=box), dtype=np.int16)
    compressed = np.asarray(SceneImage(probe.scene, PROBE_JPEG_QUALITY).resize(size, box=box), dtype=np.int16)
    crisp = np.asarray(SceneImage(probe.scene).resize(size, box=box), dtype=np.int16)
    assert np.abs(want - compressed).mean() < 0.6 * np.abs(want - crisp).mean()

    def vivid(a: np.ndarray) -> float:  # the saturation of the most saturated 2 % (the marker's outline)
        return float(np.quantile(a.max(-1) - a.min(-1), 0.98))

    assert abs(vivid(compressed) - vivid(want)) < 10 < vivid(crisp) - vivid(want) - 20
    cut = np.asarray(SceneImage(probe.scene, PROBE_JPEG_QUALITY).crop(box), np.int16)
    crisp_cut = np.asarray(SceneImage(probe.scene).crop(box), np.int16)
    file_cut = np.asarray(file.crop(box), np.int16)
    assert np.abs(cut - file_cut).mean() < np.abs(crisp_cut - file_cut).mean()


def test_skills_are_scored_per_zoom_per_answer_and_per_choice_to_stop():
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
    # each reply's first token is the choice to look on or to answer: two looks, then an answer
    assert got["go_on"] == [1, 1] and got["stop"] == [1] and got["stop/hard/read_code"] == [1]
    pred[14] = 9  # looks again where the teacher answers
    got = skills(target, pred, "hard", "read_code", ids)
    assert got["stop"] == [0] and got["go_on"] == [1, 1] and got["answer"] == [1]
    pred[14], pred[7] = 7, 7  # answers where the teacher looks again
    assert skills(target, pred, "hard", "read_code", ids)["go_on"] == [1, 0]


def make_target_candidates(level: str) -> list[dict]:
    from glimpse.probes.synth import make_probe

    return make_probe(level, 1_000_001, seed=0, render=False).record["candidates"]


def test_examples_are_teacher_searches_through_the_loop(tmp_path):
    from glimpse.builtin.model import build_builtin

    model = build_builtin(tmp_path / "model", size="tiny")
    folder = tmp_path / "files"
    folder.mkdir()
    make = ExampleMaker(model, 0, folder)
    tok = make.processor.tokenizer
    for level in ("card", "medium"):
        (example, kind, reading, wrong, regions), why = make(level, 1_000_001)
        assert why is None and kind and wrong == 0
        # what the regions of the first view show, one class per region row of every image (known only on a
        # probe's first view)
        first = int(example.image_grid_thw[0][2]) - READ_ROWS
        region_rows = sum(int(g[2]) - READ_ROWS for g in example.image_grid_thw)
        asked = regions.pop("asked", None)  # what the question asks for: the target's border and corner mark
        assert set(regions) == {"border", "mark"} and all(len(v) == region_rows for v in regions.values())
        assert all(c == -100 for v in regions.values() for c in v[first:])
        assert (asked is None) == (level == "card")
        if asked is not None:
            target = next(c for c in make_target_candidates(level) if c["target"])
            assert asked == {k: sign_labels(target)[k] for k in ("border", "mark")}
        known = [c for c in regions["border"][:first] if c != -100]
        assert (len(known) > 3) == (level != "card")
        trained = tok.convert_ids_to_tokens([x for x in example.labels if x != -100])
        zooms = trained.count('{"bbox_2d": [')
        assert trained.count("<|im_end|>") == zooms + 1 and (zooms == 0) == (level == "card")
        assert len(example.image_grid_thw) == zooms + 1  # the first view and one observation per zoom
        # what each image's panel shows, as the teacher knows it: a card's sign on its only view; a probe's
        # first view is no sign, and its zooms show the signs the teacher went to
        assert len(reading) == zooms + 1
        if level == "card":
            assert reading == [sign_labels(make_card_target(1_000_001))]
        else:
            assert reading[0] is None and all(r is not None for r in reading[1:])
    (rows, kind, (target,)), _ = make("read", 7)
    assert rows.shape[0] == 8 and target == sign_labels(make_card_target(7))


def test_checking_searches_look_at_wrong_signs_first_and_train_only_what_follows(tmp_path):
    from glimpse.builtin.model import build_builtin
    from glimpse.builtin.teacher import teacher_turns
    from glimpse.images import fit

    model = build_builtin(tmp_path / "model", size="tiny")
    folder = tmp_path / "files"
    folder.mkdir()
    make = ExampleMaker(model, 0, folder, check=1.0)
    tok = make.processor.tokenizer
    for level in ("easy", "hard"):
        (example, _, reading, wrong, _), why = make(level, 1_000_002)
        assert why is None and 1 <= wrong <= 3
        trained = tok.convert_ids_to_tokens([x for x in example.labels if x != -100])
        zooms = trained.count('{"bbox_2d": [')
        # every look went through the loop (an image each), only the looks after the wrong ones are trained
        assert len(example.image_grid_thw) == zooms + wrong + 1 and trained.count("<|im_end|>") == zooms + 1
        assert zooms >= 1 and len(reading) == zooms + wrong + 1
        # the wrong looks show a look-alike or no sign, never the target
        sample = probe_sample(level, 1_000_002, 0, folder, scenes=make.scenes)
        target = next(c for c in sample.meta["candidates"] if c["target"])
        assert all(r != sign_labels(target) for r in reading[1 : 1 + wrong])
        assert reading[1 + wrong] == sign_labels(target)
        view = fit(make.scenes.get(sample.images[0]).image, make.limits)
        plain = teacher_turns(sample, view)
        assert plain is not None
        checked = teacher_turns(sample, view, wrong=2, rng=random.Random(3))
        assert checked is not None and checked[-len(plain) :] == plain and len(checked) == len(plain) + 2
        assert len(set(checked)) == len(checked)  # no place is looked at twice
    ids = {"box_open": 9, "answer_open": 7, "answer_close": 8}
    target = [9, 1, 2, 3, 4, 5, -100, 7, 20, 8]
    target = [-100, 9, 1, 2, 3, 4, 5, -100, 7, 20, 8]  # the reply's first token (a zoom's opening) then the zoom
    got = skills(target, list(target), "hard", "read_code", ids, checked=1)
    assert got["recover_zoom"] == [1] and "first_zoom" not in got and got["look_again"] == [1]
    answered = list(target)
    answered[1] = 7  # it answered instead of looking again
    assert skills(target, answered, "hard", "read_code", ids, checked=1)["look_again"] == [0]
    assert "look_again" not in skills(target, list(target), "hard", "read_code", ids)
    assert mask_replies([-100, 1, 2, -100, 3, -100, 4, 5], 2) == [-100] * 6 + [4, 5]


def make_card_target(index: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        return card_sample(index, 0, Path(d)).meta["candidates"][0]


def test_a_first_move_example_is_the_first_view_and_the_teachers_first_zoom_alone(tmp_path):
    from glimpse.builtin.model import build_builtin

    model = build_builtin(tmp_path / "model", size="tiny")
    folder = tmp_path / "files"
    folder.mkdir()
    make = ExampleMaker(model, 0, folder, check=1.0)  # a first move never checks a wrong sign first
    tok = make.processor.tokenizer
    for level in ("easy", "hard"):
        (whole, *_), _ = make(level, 1_000_003)
        (example, kind, reading, wrong, regions), why = make(level, 1_000_003, first=True)
        assert why is None and wrong == 0 and kind
        assert len(example.image_grid_thw) == 1 and reading == [None]  # the first view only, no zoom run
        trained = tok.convert_ids_to_tokens([x for x in example.labels if x != -100])
        assert trained.count('{"bbox_2d": [') == 1 and trained.count("<|im_end|>") == 1 and "<answer>" not in trained
        # the same first view, question and region targets a whole search of the probe has, and the zoom is the
        # teacher's first zoom at the target (a plain search's, not a checking search's wrong look)
        plain = ExampleMaker(model, 0, folder)
        (search, *_, search_regions), _ = plain(level, 1_000_003)
        first_image = int(search.image_grid_thw[0].prod())
        assert torch.equal(example.pixel_values, search.pixel_values[:first_image])
        n = len(example.input_ids)
        assert search.input_ids[:n] == example.input_ids and search.labels[:n] == example.labels
        assert regions["asked"] == search_regions["asked"]
        assert regions["border"] == search_regions["border"][: len(regions["border"])]
        assert len(whole.image_grid_thw) > 1
    (card, *_), _ = make("card", 1_000_003, first=True)  # a card has no search: answered as always
    assert "<answer>" in tok.convert_ids_to_tokens([x for x in card.labels if x != -100])


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
        read_minutes=0.1,
        read_batch=4,
        ask_steps=3,
        ask_batch=5,
    )
    model_dir = train_builtin(cfg, log=lambda entry: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    reading = [e for e in log if e["stage"] == "read"]
    asking = [e for e in log if e["stage"] == "ask"]
    search = [e for e in log if e["stage"] == "search"]
    assert [e["stage"] for e in log] == ["read"] * len(reading) + ["ask"] * 3 + ["search"] * len(search)
    assert reading and all("acc_read/dots" in e and "acc_answer" not in e for e in reading)
    assert all("acc_ask/border" in e and "acc_ask/mark" in e for e in asking)
    assert search and all("acc_answer" in e and "acc_answer/card" in e and "acc_read/dots" in e for e in search)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["examples"] == 4 * len(reading) + 5 * 3 + 2 * len(search) and result["steps"] == len(log)
    fresh = AutoModelForImageTextToText.from_pretrained(build_builtin(tmp_path / "fresh", size="tiny"))
    trained = AutoModelForImageTextToText.from_pretrained(model_dir)
    changed = [
        n
        for (n, a), (_, b) in zip(fresh.state_dict().items(), trained.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    ]
    assert any(n.startswith("visual.") for n in changed) and any(n.startswith("model.layers") for n in changed)
    assert any(n.startswith("reader.heads") for n in changed)
    # the checkpoint records how far its probe stream went; a run continuing it starts after those probes
    stream = json.loads((model_dir / STREAM_FILE).read_text())
    assert stream["seed"] == 0 and stream["next"]["card"] > FIRST_INDEX + 4 * len(reading)  # both stages' cards
    again = stream_start(BuiltinConfig(init=str(model_dir)))
    assert again == stream["next"]
    # the question head's questions came from the probes' streams (a later run never sees them again)
    assert sum(stream["next"][level] - FIRST_INDEX for level in ("easy", "medium", "hard")) == 5 * 3
    assert stream_start(BuiltinConfig(init=str(model_dir), seed=5))["card"] == FIRST_INDEX  # other probes
    assert stream_start(BuiltinConfig(init=str(model_dir), start_index=7))["card"] == 7
    (model_dir / STREAM_FILE).unlink()
    with pytest.raises(ConfigError, match="start-index"):
        stream_start(BuiltinConfig(init=str(model_dir)))


def test_the_grounding_loss_scores_the_regions_the_first_zoom_into_the_first_view_spells():
    """``grounding_loss``: per row, cross-entropy of the grounding match over the first view's regions with the
    regions the first trained zoom spells as the answer; rows whose first trained zoom goes into an observation,
    or that write none, add nothing; no such row at all gives None."""
    from types import SimpleNamespace

    from glimpse.builtin.model import PointerState
    from glimpse.builtin.train import grounding_loss

    box_open = 7
    model = SimpleNamespace(config=SimpleNamespace(box_open_id=box_open))
    spells = torch.tensor([[1, 2, 3, 4, 50], [1, 2, 3, 5, 50], [1, 2, 3, 4, 50], [6, 6, 6, 6, 50]])
    match = torch.tensor([0.5, 2.0, -1.0, 1.0])
    state = PointerState(box_open=box_open)
    state.grow(3)
    for b in range(3):
        state.keys[b].append(torch.cat([torch.zeros(4, 3), match[:, None]], 1))
        state.spells[b].append(spells)
    into_first = [9, box_open, 1, 2, 3, 4, 50, 0]
    into_observation = [9, box_open, 1, 2, 3, 4, 51, 0]
    ids = torch.tensor([into_first, into_observation, [9, 9, 9, 9, 9, 9, 9, 0]])
    labels = ids.clone()
    labels[:, 0] = -100
    loss = grounding_loss(model, ids, labels, state)
    expected = torch.logsumexp(match, 0) - torch.logsumexp(match[[0, 2]], 0)  # regions 0 and 2 spell the zoom
    assert torch.allclose(loss, expected)
    untrained = labels.clone()
    untrained[0, 1] = -100  # the first row's zoom is not trained (a wrong look): no row counts
    assert grounding_loss(model, ids, untrained, state) is None


def test_region_targets_name_every_sign_a_region_shows_with_its_own_border(tmp_path):
    from glimpse.builtin.model import MAX_PIXELS, MIN_PIXELS
    from glimpse.builtin.proposer import TILES, regions
    from glimpse.builtin.teacher import region_targets
    from glimpse.images import PixelLimits, fit
    from glimpse.probes.stream import SceneCache, probe_sample, sign_vocabulary

    scenes = SceneCache()
    sample = probe_sample("easy", 11, 0, tmp_path, scenes=scenes, others=True)
    view = fit(scenes.get(sample.images[0]).image, PixelLimits(MIN_PIXELS, MAX_PIXELS, 32))
    targets = region_targets(sample, view)
    assert targets is not None and all(len(v) == len(regions(view)) for v in targets.values())
    tiles = TILES[0] * TILES[1]
    assert all(c == -100 for v in targets.values() for c in v[:tiles])  # the coarse tiles show no one sign
    borders = sign_vocabulary()["border"]
    named = {borders[c] for c in targets["border"] if c != -100}
    target = next(c for c in sample.meta["candidates"] if c["target"])
    # the target's colour, and the other signs' (on easy probes, every other sign has another colour)
    assert target["border"] in named and len(named) >= 3
    # without the other signs (a sample made for an evaluation), nothing is known
    assert region_targets(probe_sample("easy", 11, 0, tmp_path, scenes=scenes), view) is None


def test_the_region_loss_scores_only_the_regions_whose_sign_is_known():
    from glimpse.builtin.train import region_loss

    logits = {"border": torch.tensor([[4.0, 0.0], [0.0, 4.0], [9.0, -9.0]]), "mark": torch.zeros(3, 3)}
    targets = [{"border": [0, 0], "mark": [-100, 2]}, {"border": [-100], "mark": [-100]}]
    stats: dict[str, list[int]] = {}
    loss = region_loss(logits, targets, stats)
    ce = torch.nn.functional.cross_entropy
    want = (ce(logits["border"][:2], torch.tensor([0, 0])) + ce(logits["mark"][1:2], torch.tensor([2]))) / 2
    assert torch.allclose(loss, want)
    assert stats == {"region/border": [1, 0], "region/mark": [0]}  # the third row is unknown: not counted
    assert region_loss(logits, [{"border": [-100] * 3, "mark": [-100] * 3}]) is None
    with pytest.raises(RuntimeError, match="region rows"):
        region_loss(logits, [{"border": [0], "mark": [0]}])


def test_added_weights_are_the_parts_an_older_checkpoint_lacks(tmp_path):
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import add_region_heads, build_builtin
    from glimpse.builtin.train import added_weights

    folder = build_builtin(tmp_path / "model", size="tiny")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert added_weights(model, folder) == set()
    config = json.loads((folder / "config.json").read_text())
    config.pop("region_classes"), config.pop("region_word_ids"), config.pop("ring_colour")
    (folder / "config.json").write_text(json.dumps(config))
    AutoModelForImageTextToText.from_pretrained(folder).save_pretrained(folder)  # an older checkpoint
    assert add_region_heads(folder)
    upgraded = AutoModelForImageTextToText.from_pretrained(folder)
    assert added_weights(upgraded, folder) == {
        "visual.ring.weight",
        *(
            f"region_heads.{h}.{i}.{p}"
            for h in ("heads", "ring", "asked")
            for i in range(2)
            for p in ("weight", "bias")
        ),
        "region_heads.attend.weight",
        "region_heads.attend.bias",
        "region_heads.agree",
    }
    with pytest.raises(ConfigError, match="safetensors"):
        added_weights(upgraded, tmp_path)


def test_the_question_maker_reads_a_question_as_the_model_does_and_labels_what_it_asks_for(tmp_path):
    """``QuestionMaker``: the words of a probe's question without its image are the words the grounding reads
    from the loop's real first prompt (``ExampleMaker``), and its labels are the target's border and mark."""
    from glimpse.builtin.model import build_builtin, question_words
    from glimpse.builtin.train import QuestionMaker

    folder = build_builtin(tmp_path / "model", size="tiny")
    files = tmp_path / "files"
    files.mkdir()
    make = ExampleMaker(folder, 0, files)
    config = json.loads((folder / "config.json").read_text())
    questions = QuestionMaker(folder, make.processor, config["turn_start_id"], config["image_token_id"])
    tok = make.processor.tokenizer
    for level, index in (("easy", 1_000_001), ("medium", 1_000_002), ("hard", 1_000_003)):
        (example, _, _, _, regions), why = make(level, index)
        assert why is None
        said, at_image = question_words(example.input_ids, config["turn_start_id"], config["image_token_id"], [])
        words, asked = questions(level, index, 0)
        assert at_image and words == said and asked == regions["asked"]
        question = probe_sample(level, index, 0, files, scenes=make.scenes).question
        assert question in tok.decode(words)
    with pytest.raises(RuntimeError, match="no image token"):
        QuestionMaker(folder, make.processor, config["turn_start_id"], -5).words("What is it?")


def test_an_ask_step_trains_the_question_head_alone_and_counts_before_it(tmp_path):
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import build_builtin
    from glimpse.builtin.train import ask_step

    model = AutoModelForImageTextToText.from_pretrained(build_builtin(tmp_path / "model", size="tiny"))
    head = model.region_heads
    params = [*head.attend.parameters(), *head.asked.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    embed = model.model.embed_tokens.weight.detach().clone()
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("region_heads.a")}
    batch = [([5, 6, 7], {"border": 2, "mark": 1}), ([8, 9], {"border": 4, "mark": 0})]
    stats: dict[str, list[int]] = {}
    first = ask_step(model, optimizer, batch, stats)
    assert sorted(stats) == ["ask/border", "ask/mark"] and all(len(v) == 2 for v in stats.values())
    for _ in range(60):
        last = ask_step(model, optimizer, batch, {})
    assert float(last) < 0.2 * float(first)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the words' embeddings are left as they are
    assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)


def test_a_run_from_an_init_checkpoint_leaves_its_manifest_and_readme_behind(tmp_path):
    """The shipped folder's ``glimpse_ship.json`` and README describe that checkpoint's measurement, not the
    model a run continuing it writes."""
    from glimpse.builtin.model import build_builtin

    init = build_builtin(tmp_path / "init", size="tiny")
    (init / "glimpse_ship.json").write_text('{"probe_levels": ["hard"]}')
    (init / "README.md").write_text("# the shipped weights")
    cfg = BuiltinConfig(
        out=str(tmp_path / "run"),
        init=str(init),
        minutes=0.05,
        batch=2,
        workers=1,
        threads=1,
        device="cpu",
        only="card",
        ask_steps=0,
        start_index=FIRST_INDEX,
    )
    model_dir = train_builtin(cfg, log=lambda entry: None)
    assert (model_dir / "config.json").exists() and (model_dir / STREAM_FILE).exists()
    assert not (model_dir / "glimpse_ship.json").exists() and not (model_dir / "README.md").exists()


def test_a_frozen_run_trains_only_the_part_added_to_its_init_on_one_question_kind(tmp_path):
    """``--train-only new --kind relative_position``: a relation added to a checkpoint that had none trains alone
    (every other weight bit for bit as the checkpoint has it) on left-or-right probes only; ``new`` without --init
    or with nothing added, prefixes that name no weight, and an unknown kind are refused."""
    from safetensors.torch import load_file, save_file

    from glimpse.builtin.model import build_builtin

    init = build_builtin(tmp_path / "init", size="tiny")
    config = json.loads((init / "config.json").read_text())
    config.update(relate=False)
    (init / "config.json").write_text(json.dumps(config))
    weights = load_file(init / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("relation")}, init / "model.safetensors")
    before = load_file(init / "model.safetensors")
    cfg = BuiltinConfig(
        out=str(tmp_path / "run"),
        init=str(init),
        minutes=0.1,
        batch=2,
        workers=1,
        threads=1,
        device="cpu",
        mix="0,1,0,0",
        kind="relative_position",
        train_only="new",
        new_lr=0.1,
        warmup=1,
        start_index=FIRST_INDEX,
    )
    model_dir = train_builtin(cfg, log=lambda entry: None)
    after = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float(after["relation.direction"].abs().sum()) > 0  # it trained
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log and all(set(e["levels"]) == {"easy"} and "acc_answer/relative_position" in e for e in log)
    kinds = {k.split("/")[-1] for e in log for k in e if k.startswith("acc_answer/")}
    assert kinds == {"easy", "relative_position"}  # every answer scored was a left-or-right one
    for bad, match in (
        ({"init": ""}, "pass --init"),
        ({"init": str(model_dir)}, "nothing would train"),
        ({"kind": "colour"}, "unknown probe question kind"),
        ({"train_only": "vision."}, "names no weight"),
    ):
        with pytest.raises(ConfigError, match=match):
            train_builtin(dataclasses.replace(cfg, out=str(tmp_path / "bad"), **bad), log=lambda entry: None)


def test_a_scans_looks_are_all_trained_and_kind_share_mixes_kinds(tmp_path):
    """A scanning search (``teacher.scans``) is advice from its first look, so checking (``check``) adds no
    untrained wrong looks before it; ``kind_share`` makes about that share of probes the asked kind."""
    from glimpse.builtin.model import build_builtin

    model = build_builtin(tmp_path / "model", size="tiny")
    folder = tmp_path / "files"
    folder.mkdir()
    make = ExampleMaker(model, 0, folder, check=1.0, kind="relative_position")
    tok = make.processor.tokenizer
    (example, kind, _, wrong, _), why = make("medium", 1_000_003)
    assert why is None and kind == "relative_position" and wrong == 0
    trained = tok.convert_ids_to_tokens([x for x in example.labels if x != -100])
    zooms = trained.count('{"bbox_2d": [')
    assert zooms >= 2 and len(example.image_grid_thw) == zooms + 1  # every look trained
    half = ExampleMaker(model, 0, folder, kind="relative_position", kind_share=0.5)
    kinds = [half("easy", i)[0][1] for i in range(1_000_000, 1_000_016)]
    assert 3 <= kinds.count("relative_position") <= 13 and len(set(kinds)) >= 3


def test_a_first_move_stage_trains_where_to_look_before_whole_searches(tmp_path):
    """``--first-minutes``: after the reader, the makers make first moves alone (probes only, never a card), logged
    as stage ``first`` (zooms scored, no answer); the rest of the run is whole searches."""
    cfg = BuiltinConfig(
        out=str(tmp_path / "run"),
        size="tiny",
        minutes=0.3,
        first_minutes=0.15,
        batch=2,
        workers=1,
        threads=1,
        warmup=1,
        device="cpu",
        mix="0.5,0.5,0,0",
        ask_steps=0,
    )
    train_builtin(cfg, log=lambda entry: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    stages = [e["stage"] for e in log]
    firsts = stages.count("first")
    assert firsts >= 1 and stages == ["first"] * firsts + ["search"] * (len(stages) - firsts)
    for e in log[:firsts]:
        assert set(e["levels"]) == {"easy"} and "acc_first_zoom" in e and "acc_answer" not in e
    for bad in (
        {"first_minutes": 0.31},
        {"first_minutes": 0.2, "read_minutes": 0.15},
        {"first_minutes": -1},
        {"mix": "1,0,0,0"},
        {"only": "card"},
    ):
        with pytest.raises(ConfigError, match="--first-minutes"):
            train_builtin(dataclasses.replace(cfg, out=str(tmp_path / "bad"), **bad), log=lambda entry: None)
    # a window that ends where the run does is allowed, whatever the floats' rounding (0.3 - 0.1 < 0.2): the
    # settings pass, and the run stops at the next check, the missing --init
    edge = dataclasses.replace(cfg, out=str(tmp_path / "edge"), read_minutes=0.1, first_minutes=0.2, init="nowhere")
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        train_builtin(edge, log=lambda entry: None)
    rng = random.Random(0)
    assert {_level(0.5, rng, mix="0.9,0.1,0,0", probes=True) for _ in range(50)} == {"easy"}
    assert {_level(0.0, rng, probes=True) for _ in range(200)} == {"easy", "medium", "hard"}  # the curriculum's
    assert "card" in {_level(0.0, rng) for _ in range(200)}


def _start_maker_then_die(model: str, jobs, results, pids) -> None:
    """A stand-in trainer: start one example maker, then die without stopping it (as a killed trainer does)."""
    import multiprocessing as mp
    import os

    from glimpse.builtin.train import _worker

    maker = mp.get_context("spawn").Process(target=_worker, args=(model, 0, 0, jobs, results), daemon=False)
    maker.start()
    pids.put(maker.pid)
    os._exit(0)


def test_a_maker_whose_trainer_died_stops_though_jobs_are_queued(tmp_path):
    import multiprocessing as mp
    import os
    import time

    from glimpse.builtin.model import build_builtin

    model = build_builtin(tmp_path / "model", size="tiny")
    ctx = mp.get_context("spawn")
    jobs, results, pids = ctx.Queue(), ctx.Queue(maxsize=1), ctx.SimpleQueue()
    for i in range(50):  # far more than it makes before the check: it must not work through them all
        jobs.put(("card", FIRST_INDEX + i, False))
    trainer = ctx.Process(target=_start_maker_then_die, args=(str(model), jobs, results, pids))
    trainer.start()
    trainer.join(60)
    pid = pids.get()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(pid, 9)
        raise AssertionError("the example maker outlived its trainer")


def test_first_moves_alone_leave_the_reader_as_it_was_and_replay_fills_only_idle_time(tmp_path):
    """A first move shows the reader no panel it is taught, so a run of first moves alone (replayed too) trains the
    pointer's side and leaves every reader weight as the fresh model had it."""
    from safetensors.torch import load_file

    from glimpse.builtin.model import build_builtin

    cfg = BuiltinConfig(
        out=str(tmp_path / "run"),
        size="tiny",
        minutes=0.15,
        first_minutes=0.15,
        batch=2,
        replay=2,
        workers=1,
        threads=1,
        warmup=1,
        device="cpu",
        mix="0,1,0,0",
        ask_steps=0,
    )
    trained = load_file(train_builtin(cfg, log=lambda entry: None) / "model.safetensors")
    fresh = load_file(build_builtin(tmp_path / "fresh", size="tiny") / "model.safetensors")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log and {e["stage"] for e in log} == {"first"}
    reader = [k for k in fresh if k.startswith("reader.")]
    assert reader and all(torch.equal(fresh[k], trained[k]) for k in reader)
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh if k.startswith("region_heads."))

    class Waiting:
        def __init__(self, n):
            self.n = n

        def qsize(self):
            if self.n is None:
                raise NotImplementedError  # macOS
            return self.n

    assert idle(Waiting(0), 8) and idle(Waiting(7), 8) and not idle(Waiting(8), 8) and idle(Waiting(None), 8)


def test_the_replay_memory_keeps_the_newest_examples_within_its_count_and_its_bytes():
    """``trim_replay``: whole searches are megabytes of pixel rows each, and 2,048 of them held 12 GB in run S3; the
    memory keeps the newest within both limits, and never fewer than a batch."""
    from types import SimpleNamespace

    from glimpse.builtin.train import trim_replay

    def item(i: int, mb: int) -> tuple:
        return ("hard", (SimpleNamespace(pixel_values=torch.zeros(mb << 18)), "kind"), False, i)  # mb MB of float32

    memory = [item(i, 1) for i in range(100)]
    trim_replay(memory, 8, most=50, limit=1 << 40)
    assert [m[3] for m in memory] == list(range(50, 100))
    trim_replay(memory, 8, most=50, limit=20 << 20)
    assert (
        8 <= len(memory) <= 20 and memory[-1][3] == 99 and [m[3] for m in memory] == list(range(100 - len(memory), 100))
    )
    big = [item(i, 30) for i in range(10)]
    trim_replay(big, 8, limit=20 << 20)
    assert len(big) == 8  # a batch stays, whatever its size
