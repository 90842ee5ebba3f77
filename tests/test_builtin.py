"""The built-in model's architecture (a CNN encoder feeding a Qwen2 decoder) packaged as a transformers model,
its location tokens, and the teacher and example stream it trains on."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from glimpse.agent import AgentLoop
from glimpse.builtin.model import (
    GRID,
    WINDOW_SIDES,
    box_token,
    build_builtin,
    location_tokens,
    source_token,
    window,
)
from glimpse.builtin.train import card_sample, grid_turns, probe_sample
from glimpse.hf.processor import load_processor
from glimpse.images import PixelLimits, smart_resize
from glimpse.models.hf import HFBackend
from glimpse.models.scripted import ScriptedBackend
from glimpse.protocol.base import parse_call_payload
from glimpse.train.common import ASSISTANT_HEADER, END, encode


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Path:
    return build_builtin(tmp_path_factory.mktemp("builtin") / "model", size="tiny")


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


def test_processor_expands_each_image_to_its_cells(builtin):
    processor = load_processor(builtin)
    images = [Image.new("RGB", (640, 360), "red"), Image.new("RGB", (100, 100), "blue")]
    text = "a <|image_pad|> and b <|image_pad|> end"
    enc = processor(text=[text], images=images, return_tensors="pt")
    grids = enc["image_grid_thw"].tolist()
    w0, h0 = smart_resize(640, 360, PixelLimits(65_536, 147_456, 32))
    assert grids[0] == [1, h0 // 32, w0 // 32]
    assert grids[1] == [1, 8, 8]  # 100×100 scaled up to the 65,536-pixel minimum: 256×256
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == pad).sum()) == sum(g[1] * g[2] for g in grids)
    assert enc["pixel_values"].shape == (sum(g[1] * g[2] for g in grids), 3 * 32 * 32)


def test_the_cells_reassemble_to_the_image(builtin):
    """The model puts the processor's rows of cells back into the image they came from."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(builtin)
    model = AutoModelForImageTextToText.from_pretrained(builtin)
    image = Image.effect_noise((256, 320), 60).convert("RGB")
    rows, (gh, gw) = processor.image_processor.cells(image)
    seen = {}

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen["x"] = x
        return torch.zeros(x.shape[0], gh * gw, model.config.text_config.hidden_size)

    model.visual.forward = spy
    model.image_features(torch.from_numpy(rows), torch.tensor([[1, gh, gw]]))
    import numpy as np

    expected = (np.asarray(image, np.float32) / 255 - 0.5) / 0.25
    assert seen["x"].shape[0] == 1  # images of one grid size go through the encoder as one batch
    assert np.allclose(seen["x"][0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_an_elongated_zoom_longer_than_the_position_table_still_encodes(builtin):
    """A zoom of aspect ratio 100 (the zoom tool's limit) shown at the model's minimum area is wider than
    max_grid cells; the encoder must take it (it once raised "index out of range" mid-rollout)."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(builtin)
    model = AutoModelForImageTextToText.from_pretrained(builtin)
    image = Image.effect_noise((3000, 30), 60).convert("RGB")
    rows, (gh, gw) = processor.image_processor.cells(image)
    assert gw > model.config.max_grid
    with torch.no_grad():
        feats = model.image_features(torch.from_numpy(rows), torch.tensor([[1, gh, gw]]))
    assert feats.shape == (gh * gw, model.config.text_config.hidden_size) and torch.isfinite(feats).all()


def test_location_tokens_decode_to_protocol_json_and_are_single_tokens(builtin):
    tok = load_processor(builtin).tokenizer
    for side in WINDOW_SIDES:
        for r, c in ((0, 0), (GRID - 1, GRID - 1), (7, 3)):
            box = window(side, r, c)
            assert box[2] - box[0] == pytest.approx(side, abs=1e-3) and box[0] >= 0 and box[2] <= 1
            text = f"<grounding>{box_token(box)}{source_token(3)}</grounding>"
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) == 8 and tok.decode(ids) == text  # tag, opening, 4 coordinates, source, tag
            payload = parse_call_payload(text.removeprefix("<grounding>").removesuffix("</grounding>"))
            assert payload == {"bbox_2d": box, "source": "observation_3"}
    assert len(location_tokens()) == len(set(location_tokens()))


def test_the_hf_backend_runs_it_with_its_native_settings(builtin):
    backend = HFBackend(str(builtin))
    assert backend.default_coords == "relative" and backend.resize_factor == 32
    assert backend.default_limits == (65_536, 147_456)
    with tempfile.TemporaryDirectory() as d:
        sample = card_sample(0, 0, Path(d))
        loop = AgentLoop(backend, max_turns=2, max_new_tokens=8, return_token_ids=True)
        (traj,) = asyncio.run(loop.run(sample))
    assert traj.error is None and traj.turns
    assert traj.settings.min_pixels == 65_536 and traj.settings.resize_factor == 32
    view = traj.token_view
    assert view is not None and sum(view.mask) == sum(t.usage.completion_tokens for t in traj.turns)


@pytest.mark.parametrize("level", ["easy", "medium", "hard"])
def test_the_grid_teacher_solves_probes_through_the_real_loop(builtin, level):
    processor = load_processor(builtin)
    header = processor.tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
    end = processor.tokenizer.convert_tokens_to_ids(END)
    with tempfile.TemporaryDirectory() as d:
        for index in range(3):
            sample = probe_sample(level, 1_000_000 + index, 0, Path(d))
            turns = grid_turns(sample)
            loop = AgentLoop(
                ScriptedBackend([turns]),
                coords="relative",
                max_turns=64,
                min_pixels=65_536,
                max_pixels=147_456,
                resize_factor=32,
            )
            (traj,) = asyncio.run(loop.run(sample))
            assert traj.stop_reason == "answer" and traj.answer == sample.answer
            assert traj.metrics["tool_errors"] == 0
            # every nested zoom contains a candidate whole, and the last one shows a target
            targets = [t for t in traj.turns if t.kind == "zoom" and t.source_index > 0]
            assert targets
            last = targets[-1].crop_box_px
            assert any(
                last[0] <= b[0] and last[1] <= b[1] and last[2] >= b[2] and last[3] >= b[3] for b in sample.target_boxes
            )
            ex = encode(traj, processor, header, end)
            trained = processor.tokenizer.convert_ids_to_tokens([x for x in ex.labels if x != -100])
            assert trained.count("<|im_end|>") == len(turns)
            assert sum(1 for t in trained if t == '{"bbox_2d": [') == len(turns) - 1


def test_cards_are_legible_single_signs():
    with tempfile.TemporaryDirectory() as d:
        kinds = set()
        for i in range(20):
            s = card_sample(i, 0, Path(d))
            kinds.add(s.meta["category"])
            assert s.answer and "border" in s.question
            assert s.id == card_sample(i, 0, Path(d)).id  # deterministic
        assert kinds >= {"read_code", "count"}


def test_drawn_views_match_the_full_scene_resized():
    """Training draws only the views a trajectory shows: crops are the full-resolution scene's pixels, and the
    downscaled full view is within a few grey levels of it."""
    import numpy as np

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
