"""The counterfactual evaluation (``glimpse eval --counterfactual``): crops replaced by black or noise, paired
question by question with the normal run; a policy that reads the crops collapses, one that does not is unmoved."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from glimpse.agent import AgentLoop
from glimpse.config import EvalConfig, resolve
from glimpse.eval.counterfactual import compare, run_counterfactual
from glimpse.images import counterfactual_view
from glimpse.models.scripted import ScriptedBackend
from glimpse.probes.expert import tesseract_available
from glimpse.trajectory import Sample, Score, render_image

READING = ("read_code", "which_marked", "relative_position")  # questions answered by reading a sign's text


def _cfg(tmp_path, model: str, n: int = 12) -> EvalConfig:
    flags = {"data": f"probes:easy:{n}:3", "model": model, "max_turns": "6", "counterfactual": "black"}
    return resolve(EvalConfig, flags={**flags, "out": str(tmp_path / model)})


def test_the_oracle_does_not_move_its_answers_come_from_the_gold(tmp_path):
    run = asyncio.run(run_counterfactual(_cfg(tmp_path, "oracle", n=6)))
    s = run.pairs[6]
    assert s["n"] == 6 and s["normal"] == s["counterfactual"] == 1.0 and s["drop"] == 0.0
    assert (run.normal.out / "counterfactual-black.md").exists()
    folder = run.normal.out / "counterfactual-black"
    record = json.loads((folder / "trajectories.jsonl").read_text().splitlines()[0])
    assert record["settings"]["counterfactual"] == "black"  # recorded with each trajectory
    assert json.loads((folder / "config.json").read_text())["config"]["counterfactual"] == "black"


def test_the_expert_reads_the_crops_so_without_them_it_falls_to_chance(tmp_path):
    if not tesseract_available():
        if os.environ.get("GLIMPSE_REQUIRE_OCR") == "1":
            pytest.fail("GLIMPSE_REQUIRE_OCR=1 but tesseract is missing (apt-get install tesseract-ocr)")
        pytest.skip("tesseract is not installed")
    run = asyncio.run(run_counterfactual(_cfg(tmp_path, "expert")))
    s = run.pairs[6]
    assert s["n"] == 12 and s["normal"] >= 0.4  # it does find and read signs normally
    reading = [g for v, g in s["by"]["category"].items() if v in READING]
    assert sum(g["n"] for g in reading) >= 4
    for g in reading:  # open answers: chance is 0, and with black crops nothing can be read
        assert g["counterfactual"] <= 0.05
    assert s["drop"] >= 0.3 and s["needed_content"] >= 0.3
    again = asyncio.run(run_counterfactual(_cfg(tmp_path, "expert")))  # resumable: nothing runs twice
    assert again.normal.ran == again.counterfactual.ran == 0 and again.pairs == run.pairs


def test_the_model_and_the_record_see_the_same_counterfactual_crop(make_image):
    shown = []

    def policy(messages, params):
        shown.append([p for m in messages for p in m.images()][-1].pil())
        return '<grounding>{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"}</grounding>'

    sample = Sample(id="cf", images=[str(make_image(800, 600))], question="?")
    for kind in ("black", "noise"):
        shown.clear()
        (traj,) = asyncio.run(AgentLoop(ScriptedBackend(policy), max_turns=3, counterfactual=kind).run(sample))
        assert traj.settings.counterfactual == kind and traj.metrics["zooms"] == 2
        seen = shown[1]  # the first observation, as the model got it on the next turn
        again = render_image(traj, 1)
        assert again.size == seen.size and again.tobytes() == seen.tobytes()
        if kind == "black":
            assert again.getextrema() == ((0, 0), (0, 0), (0, 0))
        else:
            assert len(again.getcolors(1 << 24)) > 100
        assert render_image(traj, 0).getextrema() != ((0, 0), (0, 0), (0, 0))  # the original is never replaced
    assert counterfactual_view(seen, "noise", "k").tobytes() == counterfactual_view(seen, "noise", "k").tobytes()


def test_pairs_leave_out_units_that_did_not_run_in_both():
    def traj(tid: str, correct):
        from glimpse.trajectory import RunSettings, Trajectory

        settings = RunSettings(
            model="m", protocol="tags", coords="relative", max_turns=6, max_images=None, max_new_tokens=8,
            max_context_tokens=100, min_pixels=1, max_pixels=2, resize_factor=28, min_box_side=28,
            max_aspect_ratio=100, keep_images=None, temperature=None, top_p=None, seed=None, prompt="default",
        )  # fmt: skip
        t = Trajectory(id=tid, sample=Sample(id=tid, images=["x"], question="?", meta={"category": "a"}),
                       settings=settings, started_at="now")  # fmt: skip
        t.score = None if correct is None else Score(correct=correct, method="exact")
        return t

    normal = [traj("1", True), traj("2", True), traj("3", False), traj("4", True)]
    other = [traj("1", True), traj("2", False), traj("3", True), traj("4", None)]
    s = compare(normal, other)
    assert s["n"] == 3 and s["unpaired"] == 1
    assert s["normal"] == pytest.approx(2 / 3) and s["counterfactual"] == pytest.approx(2 / 3)
    assert s["right_only_without"] == pytest.approx(1 / 3) and s["needed_content"] == pytest.approx(1 / 3)
    assert s["by"]["category"]["a"]["n"] == 3
