"""The built-in model (region tokens, a Qwen2 decoder, a pointer that writes zooms) packaged as a transformers
model: its processor on probes and on photos, pointing, and a memorised search replayed through the real loop."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from glimpse.agent import AgentLoop
from glimpse.builtin.model import MAX_PIXELS, MIN_PIXELS, build_builtin
from glimpse.builtin.processing import (
    BOX_OPEN,
    CROP,
    KIND,
    MEAN,
    PIXELS,
    READ_ROWS,
    READING,
    REL,
    RING,
    RING_BINS,
    STD,
    STEPS,
    WINDOW,
    region_rows,
    ring_colour,
    zoom_text,
)
from glimpse.builtin.proposer import TILES, propose
from glimpse.builtin.reader import LINE_CROP, READ_CROP, cut_box, find_panel, ink_blobs, ink_colour, text_line
from glimpse.builtin.teacher import pointed_region, teacher_turns
from glimpse.hf.processor import load_processor
from glimpse.images import PixelLimits, fit
from glimpse.models.hf import HFBackend
from glimpse.probes.stream import SceneCache, probe_sample

NATIVE = PixelLimits(MIN_PIXELS, MAX_PIXELS, 32)


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    return build_builtin(tmp_path_factory.mktemp("builtin") / "model", size="tiny")


def photo(width: int = 900, height: int = 600, seed: int = 0) -> Image.Image:
    """A natural-looking image that is not a probe: a smooth gradient, noise, a few objects and a line of text."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([120 + 80 * x, 140 + 60 * y, 170 - 50 * x * y], -1) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 60))
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.ellipse((x0, y0, x0 + int(rng.integers(15, 80)), y0 + int(rng.integers(15, 60))), fill=fill)
    draw.text((40, 40), "OPEN 9-5", fill=(10, 10, 10))
    return image


def probe_view(level: str, index: int) -> tuple[object, Image.Image]:
    scenes = SceneCache()
    sample = probe_sample(level, index, 0, Path("."), scenes=scenes)
    return sample, fit(scenes.get(sample.images[0]).image, NATIVE)  # type: ignore[arg-type]


def test_auto_classes_load_it_and_it_round_trips(builtin, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(builtin)
    processor = AutoProcessor.from_pretrained(builtin)
    assert type(model).__name__ == "GlimpseVLForConditionalGeneration"
    assert type(processor).__name__ == "GlimpseVLProcessor"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["probe", "photo"])
def test_the_processor_makes_region_tokens_from_the_pixels_it_is_given(builtin, kind):
    image = probe_view("medium", 1_000_003)[1] if kind == "probe" else photo()
    processor = load_processor(builtin)
    enc = processor(text=["q <|image_pad|> end"], images=[image], return_tensors="pt")
    rows, boxes = region_rows(image)
    (grid,) = enc["image_grid_thw"].tolist()
    assert grid == [1, 1, len(boxes)] and len(boxes) > TILES[0] * TILES[1] + 10  # tiles and proposals
    assert int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == len(boxes)
    assert torch.equal(enc["pixel_values"], torch.from_numpy(rows))
    for row, (x0, y0, x1, y1) in zip(rows, boxes, strict=True):
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
        rel, window = row[REL], row[WINDOW]
        assert np.allclose(rel, (x0 / image.width, y0 / image.height, x1 / image.width, y1 / image.height))
        assert 0 <= window[0] < window[2] <= STEPS and 0 <= window[1] < window[3] <= STEPS
        # the zoom window shows the whole region
        assert window[0] / STEPS <= rel[0] + 1e-6 and window[2] / STEPS >= rel[2] - 1e-6
    # each token's pixels are a crop of this image, nothing finer: the crop of the first tile, recomputed
    x0, y0, x1, y1 = boxes[0]
    gx, gy = (x1 - x0) * 0.125, (y1 - y0) * 0.125
    cut = (max(0, int(np.floor(x0 - gx))), max(0, int(np.floor(y0 - gy))), x1, y1)
    cut = (cut[0], cut[1], min(image.width, int(np.ceil(x1 + gx))), min(image.height, int(np.ceil(y1 + gy))))
    want = image.crop(cut).resize((CROP[1], CROP[0]), Image.Resampling.BILINEAR)
    want_rows = ((np.asarray(want, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1).reshape(-1)
    assert np.allclose(rows[0, :PIXELS], want_rows, atol=1e-5)
    # the last READ_ROWS rows are the panel to read, cut from this image's pixels and spread over them in order
    assert (rows[:-READ_ROWS, KIND] != READING).all() and (rows[-READ_ROWS:, KIND] == READING).all()
    cut = cut_box(find_panel(image), image.width, image.height)
    assert boxes[-1] == cut
    panel = image.crop(cut).resize((READ_CROP[1], READ_CROP[0]), Image.Resampling.BILINEAR)
    want_panel = ((np.asarray(panel, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1).reshape(-1)
    assert np.allclose(rows[-READ_ROWS:, :PIXELS].reshape(-1), want_panel, atol=1e-5)
    # the ring colour of each proposal's crop, at this image's own resolution; none on tiles; the reading rows
    # hold the panel's ink blob map there instead
    tiles = TILES[0] * TILES[1]
    assert not rows[:tiles, RING].any()
    blobs = ink_blobs(np.asarray(panel, np.float32).transpose(2, 0, 1) / 255)
    assert np.allclose(rows[-READ_ROWS:, RING].reshape(-1)[: len(blobs)], blobs)
    colour = ink_colour(np.asarray(panel, np.float32).transpose(2, 0, 1) / 255)
    held = rows[-READ_ROWS:, RING].reshape(-1)
    assert np.allclose(held[len(blobs) : len(blobs) + len(colour)], colour)  # then the ink's colour
    assert not held[len(blobs) + len(colour) :].any()
    x0, y0, x1, y1 = boxes[tiles]
    gx, gy = (x1 - x0) * 0.125, (y1 - y0) * 0.125
    cut = (max(0, int(np.floor(x0 - gx))), max(0, int(np.floor(y0 - gy))))
    cut = (*cut, min(image.width, int(np.ceil(x1 + gx))), min(image.height, int(np.ceil(y1 + gy))))
    assert np.allclose(rows[tiles, RING], ring_colour(np.asarray(image.crop(cut))), atol=1e-6)


def test_the_proposer_covers_probe_targets_and_finds_objects_in_a_photo():
    covered = 0
    for level in ("easy", "medium", "hard"):
        for index in (1_000_001, 1_000_002):
            sample, view = probe_view(level, index)
            covered += teacher_turns(sample, view) is not None  # type: ignore[arg-type]
    assert covered >= 5  # the proposer's recall on first views is about 94–100 % (bench/builtin_skills.py)
    boxes = [r.box for r in propose(photo())]
    assert len(boxes) >= 10
    # the text line at (40, 40) is proposed
    assert any(b[0] <= 60 and b[1] <= 50 and b[2] >= 45 and b[3] >= 45 for b in boxes)


def test_a_zoom_is_written_by_pointing_at_a_region(builtin):
    """After the box opening, a random model can only write a region's window and its image's source, and
    generating with a cache points exactly as the full forward pass does."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(builtin)
    model = AutoModelForImageTextToText.from_pretrained(builtin).eval()
    image = photo(640, 400, seed=3)
    text = (
        "<|im_start|>user\nwhere?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        f"<|im_start|>assistant\n<grounding>{BOX_OPEN}"
    )
    enc = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    written = BOX_OPEN + processor.tokenizer.decode(new)
    windows = [list(map(int, row[WINDOW])) for row in region_rows(image)[0] if row[KIND] != READING]
    assert written in {zoom_text(w, 0) for w in windows}
    box = json.loads(written)
    assert box["source"] == "original_image" and box["bbox_2d"][0] < box["bbox_2d"][2]
    with torch.no_grad():  # the same tokens from one full forward pass over prompt and reply
        images = {k: enc[k] for k in ("pixel_values", "image_grid_thw")}
        full = model(input_ids=out, attention_mask=torch.ones_like(out), **images)
    start = enc["input_ids"].shape[1]
    assert full.logits[0, start - 1 : start + 4].argmax(-1).tolist() == new


def test_the_pointer_closes_each_zoom_and_never_points_at_a_window_it_already_zoomed_into(builtin, tmp_path):
    """After a zoom's source only ``</grounding>`` may follow; in the next zoom every path the pointer offers
    leads to a region not zoomed into yet, and the cache's state replays the zooms written (``after``). A
    checkpoint made before both gains them from ``close_zooms``, its weights untouched."""
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import NEG, PointerState, close_zooms

    processor = load_processor(builtin)
    tok = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(builtin).eval()
    close = model.config.box_close_id
    assert close == tok.convert_tokens_to_ids("</grounding>") and model.config.no_repeat_zooms
    text = (
        "<|im_start|>user\nwhere?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        f"<|im_start|>assistant\n<grounding>{BOX_OPEN}"
    )
    enc = processor(text=[text], images=[photo(640, 400, seed=3)], return_tensors="pt")
    images = {k: enc[k] for k in ("pixel_values", "image_grid_thw")}
    first = enc["input_ids"][0].tolist()
    with torch.no_grad():
        spells = model(**enc, use_cache=True).cache.glimpse_pointer.spells[0][0]
    done = spells[0].tolist()  # the first zoom: the first region's window
    again = tok("<|im_end|>\n<|im_start|>assistant\n<grounding>", add_special_tokens=False)["input_ids"]
    ids = [*first, *done, close, *again, model.config.box_open_id]

    def forward(config_model, prefix: list[int]):
        with torch.no_grad():
            out = config_model(input_ids=torch.tensor([prefix]), use_cache=True, **images)
        return out.logits[0, -1], out.cache.glimpse_pointer

    logits, _ = forward(model, ids[: len(first) + 5])  # the source just written
    assert logits.argmax().item() == close and (logits == NEG).sum().item() == logits.numel() - 1
    _, state = forward(model, ids)
    assert state.zoomed == [[tuple(done)]]
    assert state.row(0).after(ids, images=1).zoomed == [[tuple(done)]]
    assert PointerState.stack([state.row(0), None]).zoomed == [[tuple(done)], []]
    fresh = spells[~(spells == torch.tensor(done)).all(1)]
    j = max(k for k in range(5) if (fresh[:, :k] == torch.tensor(done[:k])).all(1).any())
    logits, _ = forward(model, ids + done[:j])  # as deep into the repeated window as a fresh region goes
    assert logits[done[j]].item() == NEG  # the repeat's next token is not offered
    assert (logits > NEG).any()
    model.config.no_repeat_zooms = False
    logits, _ = forward(model, ids + done[:j])
    assert logits[done[j]].item() > NEG  # without the rule it is

    older = tmp_path / "older"
    older.mkdir()
    for f in builtin.iterdir():
        (older / f.name).write_bytes(f.read_bytes())
    config = json.loads((older / "config.json").read_text())
    config.update(box_close_id=None, no_repeat_zooms=False)
    (older / "config.json").write_text(json.dumps(config))
    weights = (older / "model.safetensors").read_bytes()
    assert close_zooms(older) and not close_zooms(older)
    upgraded = json.loads((older / "config.json").read_text())
    assert upgraded["box_close_id"] == close and upgraded["no_repeat_zooms"] is True
    assert (older / "model.safetensors").read_bytes() == weights


def test_a_memorised_search_replays_through_the_real_loop_and_the_model_sees_only_what_was_shown(builtin, tmp_path):
    """A tiny model trained on one teacher search replays it greedily through the hf backend and the agent loop
    (pointing decodes to the same protocol JSON); the processor is handed only the images the loop showed."""
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.train import ExampleMaker
    from glimpse.train.common import collate

    folder = tmp_path / "files"
    folder.mkdir()
    make = ExampleMaker(builtin, 0, folder)
    (example, *_), why = make("easy", 7)
    assert why is None
    model = AutoModelForImageTextToText.from_pretrained(builtin)
    tok = make.processor.tokenizer
    batch = collate([example], tok.pad_token_id, model.config.image_token_id)
    batch.pop("mm_token_type_ids", None)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = tmp_path / "trained"
    model.save_pretrained(trained)
    make.processor.save_pretrained(trained)
    (trained / "glimpse_prompts.yaml").write_text((builtin / "glimpse_prompts.yaml").read_text())

    backend = HFBackend(str(trained))
    seen: list[tuple[int, int]] = []
    preprocess = backend.processor.image_processor.preprocess

    def spy(images, *args, **kwargs):
        seen.extend(im.size for im in (images if isinstance(images, list) else [images]))
        return preprocess(images, *args, **kwargs)

    backend.processor.image_processor.preprocess = spy
    sample = probe_sample("easy", 7, 0, folder)
    script = teacher_turns(sample, fit(Image.open(sample.images[0]).convert("RGB"), NATIVE))
    loop = AgentLoop(backend, max_turns=4)  # the checkpoint's native coords, limits and prompts
    assert (loop.limits.min_pixels, loop.limits.max_pixels, loop.limits.factor) == (MIN_PIXELS, MAX_PIXELS, 32)
    (traj,) = asyncio.run(loop.run(sample))
    assert [t.text for t in traj.turns] == script
    assert traj.answer == sample.answer and traj.metrics["tool_errors"] == 0
    shown = {tuple(traj.shown_size)} | {tuple(t.observation_size) for t in traj.turns if t.observation_size}
    assert seen and set(seen) <= shown  # the original itself (larger than any view) is never handed over
    assert max(w * h for w, h in seen) <= MAX_PIXELS


def test_the_teacher_points_where_the_proposals_are():
    sample, view = probe_view("hard", 1_000_004)
    turns = teacher_turns(sample, view)  # type: ignore[arg-type]
    assert turns is not None and turns[-1] == f"<answer>{sample.answer}</answer>"  # type: ignore[attr-defined]
    targets = [c for c in sample.meta["candidates"] if c["target"]]  # type: ignore[attr-defined]
    assert len(turns) == len(targets) + 1
    width, height = sample.meta["size"]  # type: ignore[attr-defined]
    for turn, c in zip(turns, sorted(targets, key=lambda c: c["box"][0]), strict=False):
        box = json.loads(re.search(r"\{.*\}", turn).group(0))["bbox_2d"]  # type: ignore[union-attr]
        x0, y0, x1, y1 = c["box"]
        assert box[0] <= x0 / width and box[2] >= x1 / width and box[1] <= y0 / height and box[3] >= y1 / height
    assert pointed_region(view, (0.0, 0.0, float(view.width), float(view.height))) is None  # nothing covers it all


def test_the_pointer_state_taken_out_of_a_cache_and_put_back_is_the_state_of_that_prefix(builtin):
    """What the hf backend keeps between turns (``PointerState.row``) and puts back on a rebuilt cache
    (``after``, ``stack``): at every cut of a prompt that writes a zoom, the state a forward pass over that prefix
    alone leaves; rows stacked for ``n`` samples are copies that grow apart."""
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import PointerState

    processor = load_processor(builtin)
    model = AutoModelForImageTextToText.from_pretrained(builtin).eval()
    text = (
        "<|im_start|>user\nwhere?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        f"<|im_start|>assistant\n<grounding>{BOX_OPEN}0.25, 0.5, 0.75, 1]"
    )
    enc = processor(text=[text], images=[photo(320, 200, seed=5)], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()

    def state_after(k: int) -> PointerState:
        with torch.no_grad():
            out = model(
                input_ids=enc["input_ids"][:, :k],
                pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"],
                use_cache=True,
            )
        return out.cache.glimpse_pointer

    whole = state_after(len(ids)).row(0)
    assert whole.images == [1] and whole.open_box == [None] and whole.box_open == model.config.box_open_id
    opened = ids.index(model.config.box_open_id)
    for k in range(opened - 1, len(ids) + 1):  # before the box, at its opening, inside it, after it
        alone, put_back = state_after(k), whole.after(ids[:k], images=1)
        assert put_back.open_box == alone.open_box and put_back.images == alone.images, k
        assert torch.allclose(torch.cat(put_back.keys[0]), torch.cat(alone.keys[0]), atol=1e-5)
    assert whole.after(ids[:3], images=0).keys == [[]]  # a prefix before the image holds none of its regions

    both = PointerState.stack([whole.after(ids, 1), whole.after(ids[: opened + 2], 1), None])
    assert both.images == [1, 1, 0] and both.open_box == [ids[opened + 1 :], [ids[opened + 1]], None]
    assert both.nbytes == 2 * whole.nbytes
    both.keys[0].append(torch.zeros(1))
    assert len(both.keys[1]) == 1 and len(whole.keys[0]) == 1  # each row its own list


def test_a_reader_added_to_an_older_checkpoint_starts_finite(tmp_path):
    """A checkpoint made before the reader existed gains one (add_reader): its bare parameters are initialised
    (they were left as uninitialised memory once, and the first training step's loss was NaN)."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import add_reader, build_builtin

    folder = build_builtin(tmp_path / "old", size="tiny")
    config = json.loads((folder / "config.json").read_text())
    for key in ("reader_classes", "reader_ids", "reader_channels"):
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("reader.")}, folder / "model.safetensors")
    assert AutoModelForImageTextToText.from_pretrained(folder).reader is None
    assert add_reader(folder) and not add_reader(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.reader is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(model.reader.attribute.abs().max()) == 0.0


def _panel(text: str, left: int, size: int, corner: bool = False) -> torch.Tensor:
    """A light panel with a purple border and a line of black text starting at ``left``: (3, *READ_CROP) in 0-1."""
    from PIL import ImageFont

    image = Image.new("RGB", (READ_CROP[1], READ_CROP[0]), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((2, 2, READ_CROP[1] - 3, READ_CROP[0] - 3), outline=(128, 0, 128), width=4)
    if corner:
        draw.ellipse((8, 6, 24, 20), fill=(0, 0, 0))  # a corner mark above the line
    font = ImageFont.load_default(size=size)
    draw.text((left, READ_CROP[0] // 2), text, fill=(10, 10, 10), font=font, anchor="lm")
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)


def _first_ink(line: torch.Tensor) -> int:
    return int((line.amax(0) < 0.35).any(0).nonzero()[0])


def test_the_text_line_is_cut_left_aligned_at_one_height_wherever_the_panel_puts_it():
    """``text_line``: a line of text centred or not, three or four characters, small or large, with a corner mark
    above it, comes out starting at the same place and at the same height; a panel without ink comes out whole."""
    panels = torch.stack(
        [
            _panel("7K3", 90, 26),
            _panel("7K3W", 30, 26),
            _panel("7K3", 60, 34, corner=True),
            _panel("7K", 140, 20),
        ]
    )
    lines = text_line(panels)
    assert lines.shape == (4, 3, *LINE_CROP)
    starts = [_first_ink(line) for line in lines]
    assert max(starts) - min(starts) <= 2 and 0 < starts[0] < LINE_CROP[1] // 8
    heights = [int((line.amax(0) < 0.35).any(1).sum()) for line in lines]
    assert max(heights) - min(heights) <= 3 and heights[0] > LINE_CROP[0] // 2
    blank = torch.full((1, 3, *READ_CROP), 0.9)
    assert torch.allclose(text_line(blank), torch.full((1, 3, *LINE_CROP), 0.9), atol=1e-4)


def test_a_line_reader_replaces_an_older_readers_character_classifiers_and_keeps_every_other_weight(builtin, tmp_path):
    """``add_line_reader``: a checkpoint whose reader read codes off the whole panel gains the line's conv stages
    and new character classifiers; every weight it had that still fits is kept bit for bit; it loads and reads."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import add_line_reader

    old = tmp_path / "old"
    shutil.copytree(builtin, old)
    config = json.loads((old / "config.json").read_text())
    config["reader_line"] = False
    (old / "config.json").write_text(json.dumps(config))
    AutoModelForImageTextToText.from_pretrained(old, ignore_mismatched_sizes=True).save_pretrained(old)
    before = load_file(old / "model.safetensors")
    assert not any(k.startswith("reader.line_") for k in before)
    assert add_line_reader(old) and not add_line_reader(old)
    model = AutoModelForImageTextToText.from_pretrained(old).eval()
    after = model.state_dict()
    kept = [k for k, v in before.items() if after[k].shape == v.shape]
    assert all(torch.equal(before[k], after[k]) for k in kept)
    assert {k for k in before if k not in kept} == {f"reader.heads.{j}.weight" for j in range(4)}
    processor = load_processor(old)
    prompt = "<|im_start|>user\nread<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    with torch.no_grad():
        out = model(**processor(text=[prompt], images=[photo(400, 300)], return_tensors="pt"))
    assert all(torch.isfinite(v).all() for v in out.reader_logits.values())


def copying_only(builtin: Path, attribute: str) -> tuple[object, object]:
    """The built-in model (and its processor) with the copy gate set to copy reading attribute ``attribute`` at
    every answer step, and a one-image prompt asking about it."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(builtin).eval()
    j = [name for name, _ in model.config.reader_classes].index(attribute)
    with torch.no_grad():
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(-30.0)
        model.copy_gate.bias[j] = 30.0
        model.copy_step.weight.zero_()
    return model, load_processor(builtin)


ONE_IMAGE = "<|im_start|>user\n{}<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"


def test_an_answer_can_spell_what_the_reader_read(builtin):
    """Inside an answer the next token mixes the LM head with the words the reader read in the last image: with
    the gate set to copy the marker colour, the first answer token is the first token of the colour the reader
    read, in a full forward pass and when generating; outside an answer the LM head's logits stand."""
    model, processor = copying_only(builtin, "marker_color")
    colour = [name for name, _ in model.config.reader_classes].index("marker_color")
    prompt = ONE_IMAGE.format("what colour?")
    image = photo(400, 300, seed=5)
    with torch.no_grad():
        answer = processor(text=[prompt + "<answer>"], images=[image], return_tensors="pt")
        out = model(**answer)
        read = int(out.reader_logits["marker_color"][0].argmax())
        want = model.config.reader_ids[colour][read]
        assert int(out.logits[0, -1].argmax()) == want
        generated = model.generate(**answer, max_new_tokens=1, do_sample=False)
        assert int(generated[0, -1]) == want
        plain = processor(text=[prompt + "The"], images=[image], return_tensors="pt")
        copied = model(**plain).logits[0, -1]
        model.copy_gate = None  # the same model without copying
        assert torch.equal(model(**plain).logits[0, -1], copied)
        assert int(model(**answer).logits[0, -1].argmax()) != want or want == processor.tokenizer.eos_token_id


def test_a_fresh_tokenizer_writes_every_probe_kinds_question_words_whole(builtin):
    """The tokenizer's merges are learned from every kind's questions, the search kinds' too: a from-scratch model
    hears "starts", "whole" and "outlined" as one token each, not split into pieces it must learn to put together."""
    from glimpse.probes.synth import KINDS, SEARCH_KINDS, make_probe

    tok = load_processor(builtin).tokenizer
    for kind in KINDS + SEARCH_KINDS:
        question = make_probe("hard", 3, seed=9, kind=kind, render=False).record["problem"]
        words = re.findall(r" ([a-z]{4,})\b", question)
        assert words
        for word in words:
            assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, (kind, word)


def test_an_answer_spells_a_word_of_several_tokens_and_a_code_one_character_a_token(builtin):
    """``spell``: a word the reader read is copied token by token (the classes whose first tokens were written, in
    proportion, then ``</answer>`` once the word is complete), and a code's k-th character at answer token k; the
    built-in tokenizer writes a code one character per token, so the two line up."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(builtin).eval()
    tok = load_processor(builtin).tokenizer
    names = [name for name, _ in model.config.reader_classes]
    end = model.config.answer_ids[1]
    rng = np.random.default_rng(0)
    alphabet = model.config.reader_classes[names.index("char1")][1][:-1]
    for _ in range(50):  # a code, in a question or an answer: one token per character
        code = "".join(rng.choice(alphabet, int(rng.integers(2, 7))))
        assert [tok.decode([t]) for t in tok.encode(code, add_special_tokens=False)] == list(code)
        assert tok.convert_ids_to_tokens(tok.encode(f"reads {code}.", add_special_tokens=False))[-2] == code[-1]

    shape = names.index("marker_shape")
    words = model.config.reader_classes[shape][1]
    probs = torch.zeros(READ_ROWS, 32)
    first, second = words.index("circle"), words.index("cross")
    probs[shape, first], probs[shape, second] = 0.6, 0.4
    lm = torch.full((model.lm_head.out_features,), 1.0 / model.lm_head.out_features)
    circle, cross = (tok.encode(w, add_special_tokens=False) for w in ("circle", "cross"))
    written: tuple[int, ...] = ()
    for step in range(len(circle) + 1):
        row = model.spell(probs, written, lm)[shape]
        assert float(row.sum()) == pytest.approx(1.0)
        want = circle[step] if step < len(circle) else end
        assert int(row.argmax()) == want
        if step < len(circle) and step < len(cross) and circle[: step + 1] != cross[: step + 1]:
            assert float(row[cross[step]]) == pytest.approx(0.4 if circle[:step] == cross[:step] else 0.0)
        written = (*written, want)

    code = "7K3"
    for j, ch in enumerate([*code, ""]):
        probs[j] = 0.0
        probs[j, model.config.reader_classes[j][1].index(ch)] = 1.0
    written = ()
    for k, ch in enumerate(code):
        spelled = model.spell(probs, written, lm)
        assert int(spelled[k].argmax()) == tok.convert_tokens_to_ids(ch)
        assert torch.equal(spelled[k + 1], lm)  # the next character's word has not started
        written = (*written, tok.convert_tokens_to_ids(ch))
    assert int(model.spell(probs, written, lm)[len(code)].argmax()) == end  # the fourth character: none


def test_a_whole_word_is_spelled_while_generating_and_an_older_checkpoint_gains_its_spellings(builtin, tmp_path):
    """With the gate set to copy the marker shape at every answer step, ``generate`` writes one of the shape
    words whole, then ``</answer>`` (the answer's tokens so far travel on the cache); ``spell_codes`` gives a
    checkpoint made before spellings the same ones (and its tokenizer's code merges dropped)."""
    import shutil

    from glimpse.builtin.model import spell_codes
    from glimpse.hf.tiny import drop_merges

    model, processor = copying_only(builtin, "marker_shape")
    shape = [name for name, _ in model.config.reader_classes].index("marker_shape")
    inputs = processor(
        text=[ONE_IMAGE.format("what shape?") + "<answer>"], images=[photo(400, 300, seed=5)], return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert text.split("</answer>")[0] in model.config.reader_classes[shape][1]
    assert "</answer>" in text

    old = tmp_path / "old"
    shutil.copytree(builtin, old)
    config = json.loads((old / "config.json").read_text())
    spellings, starts = config.pop("reader_spellings"), config.pop("reader_starts")
    (old / "config.json").write_text(json.dumps(config))
    assert spell_codes(old) and not spell_codes(old)
    config = json.loads((old / "config.json").read_text())
    assert (config["reader_spellings"], config["reader_starts"]) == (spellings, starts)
    data = {"model": {"merges": [["K", "F"], ["Ġ", "K"], ["t", "h"], ["1", "0"], ["x", "0"]]}}
    assert drop_merges(data, r"Ġ?[A-Z0-9]{2,}")["model"]["merges"] == [["Ġ", "K"], ["t", "h"], ["x", "0"]]


def test_the_pointer_grounds_the_question_words_in_the_regions_even_when_the_prompt_is_split(builtin):
    """``Grounding``: a region's key ends with how well the question's words (the tokens of the turn holding the
    first image) describe its token; the question changes which region the pointer prefers; a prompt computed
    in two passes (a cache cut before the image, as the hf backend cuts them) points exactly as one pass does,
    and a state put back from a prefix (``after``) knows the question's words."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(builtin)
    model = AutoModelForImageTextToText.from_pretrained(builtin).eval()
    assert model.grounding is not None and float(model.grounding.region.abs().max()) == 0.0  # starts switched off
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (model.grounding.region, model.grounding.word, model.grounding.gate, model.grounding.seen):
            p.normal_(0, 0.5)
        model.region_heads.agree.fill_(0.05)  # the agreement with what the question asks for, switched on
    image = photo(320, 200, seed=5)

    def encode(question: str):
        text = (
            f"<|im_start|>system\nlook<|im_end|>\n<|im_start|>user\n{question}<|vision_start|><|image_pad|>"
            f"<|vision_end|><|im_end|>\n<|im_start|>assistant\n<grounding>{BOX_OPEN}"
        )
        return processor(text=[text], images=[image], return_tensors="pt")

    def run(enc, **extra):
        with torch.no_grad():
            return model(**enc, use_cache=True, **extra)

    enc = encode("which sign has a red border?")
    whole = run(enc)
    state = whole.cache.glimpse_pointer
    ids = enc["input_ids"][0].tolist()
    image_at = ids.index(model.config.image_token_id)
    turn = max(i for i, t in enumerate(ids[:image_at]) if t == model.config.turn_start_id)
    assert state.words[0] == ids[turn + 1 : image_at]
    keys = state.keys[0][0]
    assert keys.shape[1] == model.config.pointer_dim + 1
    with torch.no_grad():
        feats, _ = model.image_features(enc["pixel_values"])
        regions = feats[enc["pixel_values"][:, KIND] != READING]
        said = model.model.embed_tokens(torch.tensor(state.words[0]))
        rows = enc["pixel_values"][enc["pixel_values"][:, KIND] != READING]
        heads = model.region_heads(regions, rows)
        seen = model.region_heads.words(heads, model.model.embed_tokens)
        agree = model.region_heads.agreement(model.region_heads.ask(said), heads)
        assert torch.allclose(keys[:, -1], model.grounding.match(said, regions, seen) + agree, atol=1e-5)
        assert not torch.allclose(keys[:, -1], model.grounding.match(said, regions), atol=1e-3)
    other = run(encode("how many dots are on the sign with a teal border?"))
    assert not torch.allclose(other.cache.glimpse_pointer.keys[0][0][:, -1], keys[:, -1])

    # the same prompt in two passes, cut just before the image (the question's turn is in the first pass only)
    cut = ids.index(model.config.image_token_id) - 1
    with torch.no_grad():
        first = model(input_ids=enc["input_ids"][:, :cut], use_cache=True)
        second = model(
            input_ids=enc["input_ids"][:, cut:],
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            cache=first.cache,
            use_cache=True,
        )
    assert torch.allclose(second.cache.glimpse_pointer.keys[0][0], keys, atol=1e-4)
    assert torch.allclose(second.logits[0, -1], whole.logits[0, -1], atol=1e-4)
    put_back = state.row(0).after(ids[:cut], images=0)
    assert put_back.words == [None] and put_back.turn == [ids[turn + 1 : cut]]
    assert state.row(0).after(ids, images=1).words == state.words


def test_region_heads_added_to_an_older_checkpoint_change_nothing_until_trained(builtin, tmp_path):
    """``add_region_heads``: a checkpoint without ``RegionHeads`` gains them; it points and writes as before (the
    grounding's ``seen`` projection starts at zero), and its output now tells each region's border and mark."""
    import json
    import shutil

    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import add_region_heads

    old = tmp_path / "old"
    shutil.copytree(builtin, old)
    config = json.loads((old / "config.json").read_text())
    config.pop("region_classes"), config.pop("region_word_ids"), config.pop("ring_colour")
    (old / "config.json").write_text(json.dumps(config))
    before = AutoModelForImageTextToText.from_pretrained(old).eval()
    assert before.region_heads is None
    torch.manual_seed(1)
    with torch.no_grad():  # a trained grounding, as an older checkpoint's would be
        for p in (before.grounding.region, before.grounding.word, before.grounding.gate):
            p.normal_(0, 0.5)
    before.save_pretrained(old)
    assert add_region_heads(old) and not add_region_heads(old)
    after = AutoModelForImageTextToText.from_pretrained(old).eval()
    assert after.region_heads is not None
    processor = load_processor(old)
    text = (
        "<|im_start|>user\nthe sign with a red border?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        f"<|im_start|>assistant\n<grounding>{BOX_OPEN}"
    )
    enc = processor(text=[text], images=[photo(320, 200, seed=2)], return_tensors="pt")
    with torch.no_grad():
        a, b = before(**enc, use_cache=True), after(**enc, use_cache=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    regions = int((enc["pixel_values"][:, KIND] != READING).sum())
    assert a.region_logits is None
    assert {k: tuple(v.shape) for k, v in b.region_logits.items()} == {
        name: (regions, len(classes)) for name, classes in after.config.region_classes
    }


@pytest.mark.parametrize("border", [(205, 35, 35), (35, 85, 215), (35, 150, 65)])
def test_the_ring_colour_points_the_way_of_a_thin_outline_around_a_light_shape_shown_small(border):
    """``ring_colour``: a light label with a one-pixel outline on a grey, textured background, shown at a third of
    its size (the outline blended into a tint): the ring's mean direction from the light colour is closest to
    the outline colour's direction, whatever the colour; without an outline it has no colour."""
    rng = np.random.default_rng(0)

    def label(outline: tuple[int, int, int] | None) -> np.ndarray:
        a = rng.integers(90, 140, (90, 150, 3)).astype(np.uint8)
        im = Image.fromarray(a)
        ImageDraw.Draw(im).rectangle((30, 25, 120, 65), fill=(246, 246, 242), outline=outline, width=3)
        return np.asarray(im.resize((50, 30), Image.Resampling.BICUBIC))

    values = ring_colour(label(border))
    want = np.array(border, np.float32) / 255 - np.array([246, 246, 242]) / 255
    others = [(205, 35, 35), (35, 85, 215), (35, 150, 65), (240, 135, 15), (135, 55, 175)]
    cos = {
        c: float(values[:3] @ (np.array(c) / 255 - 246 / 255) / np.linalg.norm(np.array(c) / 255 - 246 / 255))
        for c in others
    }
    assert max(cos, key=cos.get) == border and float(values[:3] @ want) > 0
    plain = ring_colour(label(None))
    hue = slice(3, 3 + RING_BINS)  # the hue histogram, weighted by saturation: a grey ring has next to none
    assert plain[hue].sum() < 0.3 * values[hue].sum() and np.ptp(plain[:3]) < 0.1
    assert ring_colour(np.zeros((0, 0, 3), np.uint8)).shape == values.shape  # an empty crop: zeros, no error


def test_the_agreement_prefers_the_region_showing_what_the_question_asks_for(builtin):
    """``RegionHeads.agreement``: the log-probability that a region's heads and the question's (``ask``) name the
    same class, summed over attributes; zero weight (as added to an older checkpoint) changes nothing."""
    from transformers import AutoModelForImageTextToText

    heads = AutoModelForImageTextToText.from_pretrained(builtin).region_heads
    sizes = {name: head.out_features for name, head in zip(heads.names, heads.heads, strict=True)}
    asked = {name: torch.full((n,), -9.0) for name, n in sizes.items()}
    seen = {name: torch.full((2, n), -9.0) for name, n in sizes.items()}
    for name in sizes:
        asked[name][1] = 9.0
        seen[name][0, 1], seen[name][1, 0] = 9.0, 9.0  # region 0 shows what is asked, region 1 does not
    with torch.no_grad():
        assert torch.equal(heads.agreement(asked, seen), torch.zeros(2))  # starts switched off
        heads.agree.fill_(0.1)
        agree = heads.agreement(asked, seen)
    assert agree[0] > agree[1] + 1.0
    words = torch.randn(7, heads.attend.in_features // 2)
    assert {k: tuple(v.shape) for k, v in heads.ask(words).items()} == {k: (n,) for k, n in sizes.items()}


def test_the_ink_blob_map_counts_dark_shapes_by_size_and_place_and_leaves_out_the_cuts_margin():
    """``ink_blobs`` on a panel (any image): each separate dark shape counted once, in the cell of its centre and
    its class (a round dot-sized blob is dot-like; a star of that size, or a large shape, is other); grey shapes
    (not ink) and a blob centred in the margin the cut adds around the panel are not counted; the map travels in
    the reading rows (the colour values the region rows use for the ring)."""
    from glimpse.builtin.reader import BLOB_CLASSES, BLOB_GRID, BLOB_VALUES, ink_blobs, panel_pixels

    height, width = READ_CROP
    canvas = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(canvas)
    dots = [(40, 20), (90, 20), (140, 32), (190, 44), (110, 44)]
    draw.rectangle((60, 28, 200, 40), fill=(130, 130, 130))  # grey, not ink
    for x, y in dots:
        draw.ellipse((x - 6, y - 3, x + 6, y + 3), fill=(20, 20, 20))
    draw.ellipse((2, 30, 8, 34), fill=(20, 20, 20))  # in the margin: left out
    draw.rectangle((20, 50, 120, 58), fill=(20, 20, 20))  # one large shape
    star = [
        (225 + r * 10 * np.cos(np.pi / 5 * k - np.pi / 2), 14 + r * 7 * np.sin(np.pi / 5 * k - np.pi / 2))
        for k in range(10)
        for r in [1.0 if k % 2 == 0 else 0.4]
    ]
    draw.polygon(star, fill=(20, 20, 20))  # the size of a dot, not round: "other"
    pixels = np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255.0
    blobs = ink_blobs(pixels)
    assert blobs.shape == (BLOB_VALUES,)
    per_size = blobs.reshape(BLOB_CLASSES, -1).sum(-1)
    assert per_size.tolist() == [0.0, 5.0, 2.0]
    grid = blobs.reshape(BLOB_CLASSES, *BLOB_GRID)[1]
    for x, y in dots:
        assert grid[y * BLOB_GRID[0] // height, x * BLOB_GRID[1] // width] >= 1
    # on an image the loop shows, the reading rows carry the panel's map; region rows keep their ring values
    sign = Image.new("RGB", (300, 200), (90, 110, 70))
    ImageDraw.Draw(sign).rectangle((60, 50, 240, 150), fill=(248, 248, 244), outline=(200, 30, 30), width=3)
    for x in (100, 150, 200):
        ImageDraw.Draw(sign).ellipse((x - 6, 94, x + 6, 106), fill=(20, 20, 20))
    rows, _ = region_rows(sign)
    reading = rows[rows[:, KIND] == READING][:, RING].reshape(-1)[:BLOB_VALUES]
    assert np.array_equal(reading, ink_blobs(panel_pixels(sign)[0])) and reading.sum() == 3


def older(builtin: Path, folder: Path, **config: object) -> Path:
    """A copy of ``builtin`` as a checkpoint made before a part existed: its config changed (the part switched off)
    and its weights saved without that part's."""
    import shutil

    from transformers import AutoModelForImageTextToText

    shutil.copytree(builtin, folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    AutoModelForImageTextToText.from_pretrained(folder).save_pretrained(folder)
    return folder


def test_a_blob_counter_added_to_a_trained_reader_changes_nothing_until_trained_and_then_learns_to_count(
    builtin, tmp_path
):
    """``add_blob_counter``: every weight kept bit for bit, the reader's outputs unchanged (its last layer starts at
    zero). The counter itself learns a count that a linear layer over the map does not have: the blobs that are
    not in one corner cell (a sign's corner mark), from a few thousand maps."""

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import BlobCounter, add_blob_counter
    from glimpse.builtin.reader import BLOB_CLASSES, BLOB_GRID, BLOB_VALUES

    old = older(builtin, tmp_path / "old", reader_blobs=False)
    before = load_file(old / "model.safetensors")
    assert not any(k.startswith("reader.counter") for k in before)
    processor = load_processor(old)
    inputs = processor(text=[ONE_IMAGE.format("count")], images=[photo(400, 300)], return_tensors="pt")
    with torch.no_grad():
        was = AutoModelForImageTextToText.from_pretrained(old).eval()(**inputs).reader_logits
    assert add_blob_counter(old) and not add_blob_counter(old)
    assert json.loads((old / "generation_config.json").read_text())["do_sample"] is False  # still greedy
    model = AutoModelForImageTextToText.from_pretrained(old).eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        now = model(**inputs).reader_logits
    assert {k for k in was if not torch.allclose(was[k], now[k], atol=1e-5)} == set()  # float noise only

    torch.manual_seed(0)
    sizes, cells = BLOB_CLASSES, BLOB_GRID[0] * BLOB_GRID[1]

    def maps(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.randint(2, 10, (n,))
        blobs = torch.zeros(n, sizes, cells)
        for i, c in enumerate(counts.tolist()):
            for cell in torch.randperm(cells - 1)[:c] + 1:  # never the corner cell 0
                blobs[i, 1, cell] += 1
        corner = torch.rand(n) < 0.5
        blobs[corner, 1, 0] = 1  # a corner mark, the same size as a dot
        return blobs.reshape(n, BLOB_VALUES), counts

    counter = BlobCounter(13)
    optimizer = torch.optim.Adam(counter.parameters(), 3e-3)
    train_x, train_y = maps(2000)
    for _ in range(400):
        pick = torch.randint(0, len(train_x), (64,))
        loss = torch.nn.functional.cross_entropy(counter(train_x[pick]), train_y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_x, test_y = maps(500)
    with torch.no_grad():
        assert (counter(test_x).argmax(-1) == test_y).float().mean() > 0.95


def _one_hot_reading(code: str, classes: list[str], rows: int = READ_ROWS, sure: float = 1.0) -> torch.Tensor:
    """A reading (``GlimpseVLForConditionalGeneration.words``' rows) of ``code``: each character's class with
    probability ``sure`` (the rest spread evenly), the empty class past the code's end."""
    read = torch.zeros(rows, len(classes))
    for j in range(4):
        c = classes.index(code[j] if j < len(code) else "")
        read[j] = (1 - sure) / (len(classes) - 1)
        read[j, c] = sure
    return read


def test_the_relation_finds_the_codes_a_question_names_and_where_their_readings_were_seen(builtin):
    """``question_codes`` takes the question's runs of code characters (a code's first character is written
    after a space), distinct, in order; ``relation`` is where the first was seen relative to the second, from the
    observations whose readings match each, scaled by how sure those readings are; None without two codes or
    without a placed observation."""
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import code_match, question_codes, relation

    model = AutoModelForImageTextToText.from_pretrained(builtin)
    tok = load_processor(builtin).tokenizer
    classes = list(dict(model.config.reader_classes)["char1"])
    chars, rows, empty = model._chars, model._char_rows, model._empty
    assert rows == [0, 1, 2, 3] and classes[empty] == ""
    question = (
        "Among the signs, one reads E7K4 and one reads 9AC. Is the sign reading E7K4 left of the sign reading 9AC?"
    )
    codes = question_codes(tok.encode(question), chars, len(rows))
    assert [[classes[c] for c in code] for code in codes] == [list("E7K4"), list("9AC")]
    assert question_codes(tok.encode("Answer with one of: 2, 3, 4. A red sign."), chars, 4) == []

    first, second = _one_hot_reading("E7K4", classes), _one_hot_reading("9AC", classes)
    assert float(code_match(first, codes[0], rows, empty)) == 1.0
    assert float(code_match(first, codes[1], rows, empty)) == 0.0
    assert float(code_match(_one_hot_reading("9AC4", classes), codes[1], rows, empty)) == 0.0  # too long
    view = _one_hot_reading("", classes)
    # observation 1 read the first code at 0.2 across the first view, observation 2 the second at 0.7
    d = relation(codes, [view, first, second], [0.5, 0.2, 0.7], rows, empty)
    assert float(d) == -1.0  # left
    assert float(relation(codes, [view, second, first], [0.5, 0.2, 0.7], rows, empty)) == 1.0  # right
    unsure = _one_hot_reading("E7K4", classes, sure=0.8)
    assert 0.3 < -float(relation(codes, [view, unsure, second], [0.5, 0.2, 0.7], rows, empty)) < 0.5  # 0.8 ** 4
    # the first view's own reading never counts; an observation nothing placed neither
    assert float(relation(codes, [first, second], [0.2, 0.7], rows, empty)) == 0.0  # the first read in the view
    assert relation(codes, [view, first], [0.5, None], rows, empty) is None
    assert float(relation(codes, [view, first, second], [0.5, None, 0.7], rows, empty)) == 0.0
    assert relation(codes[:1], [view, first, second], [0.5, 0.2, 0.7], rows, empty) is None


def test_found_hears_one_named_code_as_the_start_of_a_code_only_when_the_checkpoint_says_so(builtin):
    """``named_seen`` with ``prefix`` (``found_prefix``): a question naming one code asks for the sign whose code
    starts with it, so a reading that starts with it matches whatever follows; without ``prefix`` one code is
    nothing; two codes are matched whole either way."""
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import named_seen, question_codes

    model = AutoModelForImageTextToText.from_pretrained(builtin)
    tok = load_processor(builtin).tokenizer
    classes = list(dict(model.config.reader_classes)["char1"])
    rows, empty = model._char_rows, model._empty
    codes = question_codes(tok.encode("exactly one has a code that starts with E7. What is it?"), model._chars, 4)
    assert [[classes[c] for c in code] for code in codes] == [list("E7")]
    view, hit, miss = (_one_hot_reading(t, classes) for t in ("", "E7K4", "9AC"))
    assert named_seen(codes, [view, miss, hit], [0.5, 0.2, 0.7], rows, empty) is None
    assert float(named_seen(codes, [view, miss, hit], [0.5, 0.2, 0.7], rows, empty, prefix=True)) == 1.0
    assert float(named_seen(codes, [view, miss], [0.5, 0.2], rows, empty, prefix=True)) == 0.0
    assert float(named_seen(codes, [hit], [0.5], rows, empty, prefix=True) or 0.0) == 0.0  # the first view: never
    whole = question_codes(tok.encode("one reads E7K4 and one reads 9AC"), model._chars, 4)
    for prefix in (False, True):
        assert float(named_seen(whole, [view, miss, hit], [0.5, 0.2, 0.7], rows, empty, prefix)) == 1.0
        assert float(named_seen(whole, [view, hit], [0.5, 0.7], rows, empty, prefix)) == 0.0
    assert model.config.found_prefix  # a model built today hears both


def test_find_prefixes_turns_found_prefix_on_for_a_checkpoint_with_found_and_keeps_every_weight(builtin, tmp_path):
    """``find_prefixes`` (run by ``glimpse train builtin --init``): a checkpoint with ``Found`` made before
    ``found_prefix`` gains it, every weight kept bit for bit; once only; one without ``Found`` is left alone."""
    from safetensors.torch import load_file

    from glimpse.builtin.model import find_prefixes

    old = older(builtin, tmp_path / "old", found_prefix=False)
    before = load_file(old / "model.safetensors")
    assert find_prefixes(old) and not find_prefixes(old)
    assert json.loads((old / "config.json").read_text())["found_prefix"] is True
    after = load_file(old / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    none = older(builtin, tmp_path / "none", found=False, found_prefix=False)
    assert not find_prefixes(none)


def test_each_image_is_placed_in_the_first_view_through_nested_zooms_however_the_passes_split(builtin):
    """``PointerState.windows``: the first view whole, an observation the window of the zoom it follows composed
    with its source's, computed the same in one pass over a conversation, in passes split at its turns (as
    generating does) and when the hf backend puts a prefix's state back (``after``)."""
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import PointerState

    processor = load_processor(builtin)
    model = AutoModelForImageTextToText.from_pretrained(builtin).eval()
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    turns = [
        f"<|im_start|>user\nwhere?{vision}<|im_end|>\n<|im_start|>assistant\n",
        f"<grounding>{zoom_text([64, 128, 192, 256], 0)}</grounding><|im_end|>\n<|im_start|>user\n{vision}<|im_end|>\n",
        f"<|im_start|>assistant\n<grounding>{zoom_text([128, 0, 256, 128], 1)}</grounding><|im_end|>\n",
        f"<|im_start|>user\n{vision}<|im_end|>\n<|im_start|>assistant\n",
    ]
    images = [photo(640, 480, seed=1), photo(320, 240, seed=2), photo(300, 260, seed=3)]
    want = [(0.0, 0.0, 1.0, 1.0), (0.25, 0.5, 0.75, 1.0), (0.5, 0.5, 0.75, 0.75)]

    enc = processor(text=["".join(turns)], images=images, return_tensors="pt")
    with torch.no_grad():
        whole = model(**enc, use_cache=True).cache.glimpse_pointer
    assert [tuple(round(v, 6) for v in w) for w in whole.windows[0]] == want
    assert whole.pending == [None] and len(whole.places[0]) == 3
    assert all(w[0] <= p <= w[2] for w, p in zip(want, whole.places[0], strict=True))  # each panel inside its window

    cache, seen, shown = None, "", 0
    for k, turn in enumerate(turns):  # pass by pass, each with the images its text holds
        n = turn.count("<|image_pad|>")
        part = processor(text=[seen + turn], images=images[: shown + n] if shown + n else None, return_tensors="pt")
        ids = part["input_ids"][
            :, -len(processor(text=[turn], images=images[shown : shown + n] or None)["input_ids"][0]) :
        ]
        inputs = {"input_ids": ids, "use_cache": True}
        if n:
            rows = part["image_grid_thw"][shown:, 2].sum()
            inputs.update(
                pixel_values=part["pixel_values"][-int(rows) :], image_grid_thw=part["image_grid_thw"][shown:]
            )
        if cache is not None:
            inputs["cache"] = cache
            inputs["position_ids"] = torch.arange(cache.get_seq_length(), cache.get_seq_length() + ids.shape[1])[None]
        with torch.no_grad():
            cache = model(**inputs).cache
        seen, shown = seen + turn, shown + n
        if k == 1:  # the zoom is answered by the observation in the same pass
            assert cache.glimpse_pointer.pending == [None]
        if k == 2:  # the second zoom waits for its observation
            assert cache.glimpse_pointer.pending[0] is not None
    split = cache.glimpse_pointer
    assert split.windows == whole.windows and split.places == whole.places

    ids = enc["input_ids"][0].tolist()
    zoom = ids.index(model.config.box_open_id, ids.index(model.config.box_open_id) + 1)  # the second zoom
    end = zoom + 6  # the box's five tokens follow its opening
    put_back = whole.row(0).after(ids[:end], images=2)
    assert put_back.windows == [whole.windows[0][:2]] and put_back.pending[0] == tuple(ids[zoom + 1 : end])
    assert PointerState.stack([put_back]).pending == put_back.pending


# a zoom and its observation, after ``ONE_IMAGE``'s question and first view
ZOOMED = (
    f"<grounding>{zoom_text([0, 0, 128, 128], 0)}</grounding><|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
)


def test_a_relation_added_changes_nothing_until_trained_and_shifts_only_an_answers_first_token(
    builtin, tmp_path, monkeypatch
):
    """``add_relation``: every weight kept, every logit unchanged (its direction starts at zero). Set, it moves the
    logits of an answer's first token, and only those, by the relation times the direction through the LM head,
    the other way for the other side."""

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    import glimpse.builtin.model as module
    from glimpse.builtin.model import RELATION_GAIN, add_relation

    old = older(builtin, tmp_path / "old", relate=False, code_tokens=[])
    before = load_file(old / "model.safetensors")
    assert not any(k.startswith("relation") for k in before)
    processor = load_processor(old)
    prompt = ONE_IMAGE.format("one reads E7K4 and one reads 9AC: left or right?") + ZOOMED + "<answer>"
    inputs = processor(text=[prompt], images=[photo(400, 300), photo(256, 256, seed=3)], return_tensors="pt")
    with torch.no_grad():
        was = AutoModelForImageTextToText.from_pretrained(old).eval()(**inputs).logits
    assert add_relation(old) and not add_relation(old)
    model = AutoModelForImageTextToText.from_pretrained(old).eval()
    assert model.config.code_tokens == json.loads((builtin / "config.json").read_text())["code_tokens"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, was, atol=1e-5)

    asked = []

    def fixed(codes, reads, places, rows, empty):
        asked.append([len(c) for c in codes])
        return torch.tensor(side)

    monkeypatch.setattr(module, "relation", fixed)
    model.copy_gate = None  # the LM head's logits alone (copying mixes them into log-probabilities)
    side = 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        was = model(**inputs).logits
        model.relation.direction.normal_()
        shift = model.lm_head(model.relation.direction * RELATION_GAIN)
        for side in (1.0, -1.0):
            now = model(**inputs).logits
            assert torch.allclose(now[0, :-1], was[0, :-1], atol=1e-5)  # the prompt's positions: unchanged
            assert torch.allclose(now[0, -1], was[0, -1] + side * shift, atol=1e-3)
    assert asked == [[4, 3]] * 3  # the question's two codes, once a pass


def test_asked_copy_added_changes_nothing_until_trained_and_then_chooses_what_an_answer_starts_by_copying(
    builtin, tmp_path
):
    """``add_asked_copy``: every weight kept, every logit unchanged (its votes start at zero). Set, a question
    word's vote for a reading attribute makes an answer's first token that attribute's word as the reader read it,
    and changes nothing before the answer, nor for a question without that word."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import add_asked_copy

    old = older(builtin, tmp_path / "old", asked_copy=False)
    before = load_file(old / "model.safetensors")
    assert not any(k.startswith("asked_copy") for k in before)
    processor = load_processor(old)
    images = [photo(400, 300), photo(256, 256, seed=3)]
    asks = {
        q: processor(text=[ONE_IMAGE.format(q) + ZOOMED + "<answer>"], images=images, return_tensors="pt")
        for q in ("What colour is the small outlined marker on the sign?", "How many small black dots are on it?")
    }
    with torch.no_grad():
        model = AutoModelForImageTextToText.from_pretrained(old).eval()
        was = {q: model(**inputs).logits for q, inputs in asks.items()}
    assert model.asked_copy is None
    assert add_asked_copy(old) and not add_asked_copy(old)
    model = AutoModelForImageTextToText.from_pretrained(old).eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        for q, inputs in asks.items():
            assert torch.allclose(model(**inputs).logits, was[q], atol=1e-5)

    tok = processor.tokenizer
    (colour,) = tok.encode(" colour", add_special_tokens=False)
    names = [name for name, _ in model.config.reader_classes]
    attribute = names.index("marker_color")
    with torch.no_grad():
        model.asked_copy.votes[colour, attribute] = 100.0
        colour_q, dots_q = asks
        out = model(**asks[colour_q])
        now = out.logits
        read = model.config.reader_classes[attribute][1][int(out.reader_logits["marker_color"][-1].argmax())]
        assert int(now[0, -1].argmax()) == tok.encode(read, add_special_tokens=False)[0]
        assert not torch.allclose(now[0, -1], was[colour_q][0, -1], atol=1e-3)
        assert torch.allclose(now[0, :-1], was[colour_q][0, :-1], atol=1e-5)  # before the answer: unchanged
        assert torch.allclose(model(**asks[dots_q]).logits, was[dots_q], atol=1e-5)  # no "colour" in it


@pytest.mark.parametrize(("marker", "hue_bin"), [((40, 60, 210), 7), ((200, 40, 40), 0), ((30, 30, 30), None)])
def test_the_ink_colour_is_the_hue_of_what_is_drawn_on_the_panel_not_of_its_border(marker, hue_bin):
    """``ink_colour`` on a sign with a pink border and an outlined marker, shown small and blown up as a zoom shows
    it (blurred): the hue histogram holds the marker's hue (blue at 232° in the 210–240° bin, red in the first,
    black as dark ink, no hue) and nothing of the border's, which has light on one side only; the reading rows
    carry it after the blob map."""
    from glimpse.builtin.processing import INK
    from glimpse.builtin.reader import COLOUR_VALUES, HUE_BINS, ink_colour, panel_pixels

    sign = Image.new("RGB", (600, 400), (110, 130, 100))
    draw = ImageDraw.Draw(sign)
    draw.rectangle((120, 100, 480, 300), fill=(248, 248, 244), outline=(230, 80, 160), width=14)
    draw.rectangle((250, 150, 350, 250), outline=marker, width=10)
    shown = sign.resize((120, 80), Image.Resampling.BILINEAR).resize((360, 240), Image.Resampling.BICUBIC)
    colour = ink_colour(panel_pixels(shown)[0])
    assert colour.shape == (COLOUR_VALUES,)
    hues = colour[:HUE_BINS]
    coloured, dark, covered = colour[HUE_BINS : HUE_BINS + 3]
    assert 0.005 < covered < 0.2  # the marker's outline, not the panel, not the border
    if hue_bin is None:
        assert hues.sum() < 0.05 and dark > 0.9
    else:
        assert hues.argmax() == hue_bin and hues[hue_bin] > 0.8 * hues.sum() and coloured > 0.8
        assert hues[(hue_bin + HUE_BINS // 2) % HUE_BINS] == 0  # nothing of the opposite hue
    rows, _ = region_rows(shown)
    reading = rows[rows[:, KIND] == READING][:, RING].reshape(-1)
    assert np.allclose(reading[INK], ink_colour(panel_pixels(shown)[0]))


def test_an_ink_colour_added_to_a_trained_reader_changes_nothing_until_trained_and_then_reads_markers(
    builtin, tmp_path
):
    """``add_ink_colour``: every weight kept bit for bit and the reader's outputs unchanged (it starts at zero);
    trained alone on the ink colours of drawn markers, it tells their colours apart."""

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from glimpse.builtin.model import add_ink_colour
    from glimpse.builtin.processing import INK, reading_rows

    old = older(builtin, tmp_path / "old", reader_colours=False)
    before = load_file(old / "model.safetensors")
    assert not any(k.startswith("reader.colour") for k in before)
    processor = load_processor(old)
    inputs = processor(text=[ONE_IMAGE.format("colour?")], images=[photo(400, 300)], return_tensors="pt")
    with torch.no_grad():
        was = AutoModelForImageTextToText.from_pretrained(old).eval()(**inputs).reader_logits
    assert add_ink_colour(old) and not add_ink_colour(old)
    model = AutoModelForImageTextToText.from_pretrained(old).eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        now = model(**inputs).reader_logits
    assert {k for k in was if not torch.allclose(was[k], now[k], atol=1e-5)} == set()

    colours = dict(model.config.reader_classes)["marker_color"]
    rgb = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 60, 210), "black": (25, 25, 25)}
    rng = np.random.default_rng(0)

    def panels(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for _ in range(n):
            name = list(rgb)[int(rng.integers(len(rgb)))]
            sign = Image.new("RGB", (300, 200), (110, 130, 100))
            draw = ImageDraw.Draw(sign)
            draw.rectangle((60, 50, 240, 150), fill=(248, 248, 244), outline=(230, 80, 160), width=6)
            x, y = int(rng.integers(110, 170)), int(rng.integers(80, 100))
            draw.ellipse((x, y, x + 30, y + 24), outline=rgb[name], width=int(rng.integers(3, 6)))
            rows.append(reading_rows(sign)[0])
            labels.append(colours.index(name))
        return torch.from_numpy(np.concatenate(rows)), torch.tensor(labels)

    train_x, train_y = panels(48)
    head = model.reader.colour
    optimizer = torch.optim.Adam(head.parameters(), 5e-2)
    for _ in range(60):
        ink = train_x[:, RING].reshape(len(train_y), -1)[:, INK]
        loss = torch.nn.functional.cross_entropy(head(ink), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_x, test_y = panels(24)
    with torch.no_grad():
        _, logits = model.reader(test_x, model.model.embed_tokens)
    assert (logits["marker_color"].argmax(-1) == test_y).float().mean() > 0.9


def test_found_shifts_only_the_turns_after_an_observation_outside_zooms_and_answers(builtin, monkeypatch):
    """``Found``: with a question naming two codes, each position after the first observation that is not inside a
    zoom's box or an answer moves by ``named_seen`` (from the images before it) times the direction through the LM
    head; positions before the observation, and the pointer's, keep their logits."""
    from transformers import AutoModelForImageTextToText

    import glimpse.builtin.model as module
    from glimpse.builtin.model import RELATION_GAIN

    model = AutoModelForImageTextToText.from_pretrained(builtin).eval()
    processor = load_processor(builtin)
    question = ONE_IMAGE.format("one reads E7K4 and one reads 9AC: left or right?")
    second = f"<grounding>{zoom_text([128, 0, 256, 128], 0)}</grounding>"
    text = question + ZOOMED + second
    images = [photo(400, 300), photo(256, 256, seed=3)]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    counted = []

    def fixed(codes, reads, places, rows, empty, prefix=False):
        counted.append(len(reads))
        return torch.tensor(0.5)

    monkeypatch.setattr(module, "named_seen", fixed)
    with torch.no_grad():
        was = model(**inputs).logits
        torch.manual_seed(0)
        model.found.direction.normal_()
        now = model(**inputs).logits
        shift = 0.5 * model.lm_head(model.found.direction * RELATION_GAIN)
    assert counted == [2, 2]  # the first view and the observation, each pass
    ids = inputs["input_ids"][0].tolist()
    image = model.config.image_token_id
    after = max(i for i, t in enumerate(ids) if t == image) + 1  # the first position after the observation
    box = ids.index(model.config.box_open_id, after)
    moved = [t for t in range(len(ids)) if not torch.allclose(now[0, t], was[0, t], atol=1e-4)]
    assert moved and min(moved) == after
    assert set(range(box, box + 6)).isdisjoint(moved)  # the box being written and its closing: the pointer's
    assert torch.allclose(now[0, after], was[0, after] + shift, atol=1e-3)


@pytest.mark.parametrize("kind", ["relative_position", "find_code", "find_marker"])
@pytest.mark.parametrize("level", ["medium", "hard"])
def test_the_teacher_scans_look_alikes_from_left_to_right_until_it_has_seen_the_named_signs(level, kind):
    """``scans``: a left-or-right question (two named signs), or a question naming a sign by the start of its code
    (one), among more than two signs of the named border; the teacher zooms into them in order of their centres,
    left first, and answers once every named sign was zoomed into (and, with ``scan_looks``, after that many looks
    at most, but a ``find_code`` scan runs to its sign: its answer is what that look reads); an easy probe's two
    signs are scanned for ``find_code`` only (they differ only in their codes)."""
    from glimpse.builtin.teacher import scans

    scenes = SceneCache()
    whole, cut = 0, 0
    named = 2 if kind == "relative_position" else 1
    find = kind != "relative_position"
    for index in range(1_000_000, 1_000_008):
        sample = probe_sample(level, index, 0, Path("."), scenes=scenes, kind=kind)
        view = fit(scenes.get(sample.images[0]).image, NATIVE)  # type: ignore[arg-type]
        assert scans(sample)
        turns = teacher_turns(sample, view)
        if turns is None:
            continue
        assert turns[-1] == f"<answer>{sample.answer}</answer>"
        width, height = sample.meta["size"]
        order = sorted(sample.meta["candidates"], key=lambda c: c["box"][0] + c["box"][2])
        seen, looked = set(), []
        for turn in turns[:-1]:
            box = json.loads(re.search(r"\{.*\}", turn).group(0))["bbox_2d"]  # type: ignore[union-attr]
            shown = [
                i
                for i, c in enumerate(order)
                if box[0] <= (c["box"][0] + c["box"][2]) / 2 / width <= box[2]
                and box[1] <= (c["box"][1] + c["box"][3]) / 2 / height <= box[3]
            ]
            assert shown  # every look is at a look-alike
            assert min(shown) >= max(looked, default=-1)  # left to right
            looked.extend(shown)
            seen.update(i for i in shown if order[i]["target"])
        assert len(seen) == named  # the whole scan: every named sign
        last = max(i for i, c in enumerate(order) if c["target"])
        assert len(turns) - 1 <= last + 1  # it stopped at the last named sign
        whole += 1
        short = teacher_turns(sample, view, scan_looks=4)
        looks = len(turns) - 1 if find else min(4, len(turns) - 1)
        assert short is not None and short[:-1] == turns[: len(short) - 1] and len(short) - 1 == looks
        cut += len(turns) - 1 > 4
    assert whole >= 6
    assert cut >= 2 or level == "medium"  # among 8-12 look-alikes a whole scan is often longer than four looks
    easy = probe_sample("easy", 1_000_000, 0, Path("."), scenes=scenes, kind=kind)
    assert scans(easy) == find
