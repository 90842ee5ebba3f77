"""The evaluation harness: oracle and direct policies, sweeps, metrics, faults, and kill -9 / resume."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port, glimpse_server
from glimpse.config import EvalConfig
from glimpse.errors import BackendError, ConfigError
from glimpse.eval.harness import RESULTS, ResultStore, run_eval
from glimpse.eval.metrics import first_zoom_hit, summarize, truncate
from glimpse.eval.report import markdown_summary, write_sweep
from glimpse.models.scripted import ScriptedBackend
from glimpse.trajectory import (
    ImageRef,
    RunSettings,
    Sample,
    Score,
    ShownImageRef,
    Trajectory,
    Turn,
    load_jsonl,
)

pytestmark = pytest.mark.slow


def evaluate(tmp_path: Path, backend=None, **settings):
    cfg = EvalConfig(out=str(tmp_path / "run"), **settings)
    return asyncio.run(run_eval(cfg, backend=backend))


def mc_dataset(folder: Path, n: int, *, missing: int = 0, corrupt: int = 0) -> str:
    """A Mini-o3-format file of n four-option questions on small images; some images missing, some rows corrupt."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (320, 240), (90, 120, 150)).save(folder / "img.jpg")
    rows = []
    for i in range(n):
        image = "gone.jpg" if i < missing else "img.jpg"
        rows.append(
            {
                "images": [image],
                "problem": f"<image>\nQuestion {i}?\n(A) w\n(B) x\n(C) y\n(D) z",
                "solution": "ABCD"[i % 4],
                "data_source": "fixture",
                "doc_id": i,
            }
        )
    rows += [{"doc_id": f"bad{j}"} for j in range(corrupt)]
    (folder / "val.json").write_text(json.dumps(rows))
    return f"minio3:{folder / 'val.json'}"


def test_oracle_scores_100_with_every_target_found(tmp_path):
    for level in ("easy", "medium", "hard"):
        run = evaluate(tmp_path / level, data=f"probes:{level}:6:5", model="oracle", max_turns="6")
        s = run.summaries[6]
        assert s["accuracy"]["avg"] == 1.0, (level, s)
        assert s["faithfulness"]["checked"] == 6 and s["faithfulness"]["covered_rate"] == 1.0
        assert s["input_errors"] == s["backend_errors"] == 0
        search = s["search"]
        assert search["first_zoom_hit_rate"] == 1.0 and search["zoomed_rate"] == 1.0
        assert search["distinct_first_zooms"] == search["distinct_answers"] == 6  # six different probes
    assert (tmp_path / "hard" / "run" / "summary.md").read_text().count("| 6 | 6 | 100.0 |") == 1


def test_o3bench_target_layouts_make_faithfulness_work(tmp_path):
    """O3-Bench's target layouts are the target boxes: the oracle, zooming into them, is 100 % faithful."""
    test = tmp_path / "O3-Bench" / "test"
    (test / "images" / "chart").mkdir(parents=True)
    Image.new("RGB", (1600, 1200), (240, 240, 240)).save(test / "images" / "chart" / "1-3.png")
    layouts = {
        "1": {"layout_id": 1, "bbox": [100.5, 80.0, 420.0, 300.25]},
        "2": {"layout_id": 2, "bbox": [900.0, 700.0, 1500.0, 1150.0]},
    }
    rows = [
        {
            "file_name": "images/chart/1-3.png",
            "subset": "chart",
            "question": f"Question {i}?",
            "options": "A. 10\nB. 20\nC. 30\nD. No right choice",
            "answer": "ABC"[i],
            "explanation": "Step 1. Read [layout 1] ...",
            "target_layouts": [[1], [2], [1, 2]][i],
            "layout_infos": layouts,
            "img_width": 1600,
            "img_height": 1200,
        }
        for i in range(3)
    ]
    (test / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = evaluate(tmp_path, data=f"o3bench:{tmp_path / 'O3-Bench'}", model="oracle", k=2)
    s = run.summaries[12]
    assert s["accuracy"]["avg"] == 1.0 and s["questions"] == 3 and s["by"]["category"]["chart"]["n"] == 3
    assert s["faithfulness"]["checked"] == 6 and s["faithfulness"]["covered_rate"] == 1.0
    shown = [json.loads(x)["sample"] for x in (tmp_path / "run" / RESULTS).read_text().splitlines()]
    assert len({tuple(x["options"]) for x in shown}) > 1  # shuffled per question and repeat


def test_oracle_with_function_calls_and_pixel_coordinates(tmp_path):
    run = evaluate(tmp_path, data="probes:medium:4:5", model="oracle", protocol="tools", coords="pixels")
    assert run.summaries[12]["accuracy"]["avg"] == 1.0 and run.summaries[12]["faithfulness"]["covered_rate"] == 1.0


def test_direct_is_near_chance_and_never_faithful(tmp_path):
    run = evaluate(tmp_path, data=mc_dataset(tmp_path / "d", 60), model="direct", k=4, options="shuffle")
    s = run.summaries[12]
    assert s["chance"] == 0.25 and 0.12 < s["accuracy"]["avg"] < 0.38
    assert s["accuracy"]["pass"] > s["accuracy"]["avg"] and s["turns_mean"] == 1.0
    assert s["search"]["zoomed_rate"] == 0.0 and s["search"]["first_zoom_hit_rate"] is None


def varied_policy(messages, params):
    """Zooms n times, n from the question (0-5), then answers the letter named in the question text."""
    question = messages[1].text()
    number = int(question.split("Question ")[1].split("?")[0])
    zooms = number % 6
    turn = sum(m.role == "assistant" for m in messages)
    if turn < zooms:
        if turn == 0 and number % 3 == 0:  # a box too small to show: the tool refuses it (a mistake, a turn)
            return '<grounding>{"bbox_2d": [0.1, 0.1, 0.1001, 0.1001]}</grounding>'
        return '<grounding>{"bbox_2d": [0.1, 0.1, 0.6, 0.6]}</grounding>'
    return f"<answer>{'ABCD'[number % 4]}</answer>"


def test_derived_sweep_equals_running_every_cap(tmp_path):
    data = mc_dataset(tmp_path / "d", 24)
    common = dict(data=data, model="scripted:varied", max_turns="2,4,8", options="fixed")
    derived = evaluate(tmp_path / "a", ScriptedBackend(varied_policy), sweep="derive", **common)
    ran = evaluate(tmp_path / "b", ScriptedBackend(varied_policy), sweep="run", **common)
    for cap in (2, 4, 8):
        d, r = derived.summaries[cap], ran.summaries[cap]
        for key in ("accuracy", "turns_histogram", "stop_reasons", "over_turn_rate", "tool_error_rate"):
            assert d[key] == r[key], (cap, key)
        assert d["errors_by_kind"] == r["errors_by_kind"] and d["search"] == r["search"], cap
    assert derived.summaries[8]["errors_by_kind"] == {"box_too_small": 4}  # the tool refused these zooms
    assert derived.summaries[2]["accuracy"]["avg"] < derived.summaries[8]["accuracy"]["avg"] == 1.0
    assert derived.summaries[2]["over_turn_rate"] > 0
    out = tmp_path / "a" / "run"
    assert (out / "sweep.png").stat().st_size > 5000
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("turn_cap,avg_at_k")
    assert derived.ran == 24 and ran.ran == 72


def test_originals_stay_decoded_only_when_a_unit_asks_for_them_again(tmp_path, monkeypatch):
    """An 8K original is about 100 MB: with one unit per file the cache keeps nothing after its trajectory."""
    import glimpse.eval.harness as harness
    from glimpse.images import DEFAULT_CACHE_BYTES, ImageCache

    budgets: list[int] = []
    monkeypatch.setattr(harness, "ImageCache", lambda max_bytes: budgets.append(max_bytes) or ImageCache(max_bytes))
    evaluate(tmp_path / "one", data="probes:easy:2:5", model="oracle", max_turns="6")
    evaluate(tmp_path / "repeats", data="probes:easy:2:5", model="oracle", max_turns="6", k=2)
    shared = mc_dataset(tmp_path / "d", 3)  # three questions on one image
    evaluate(tmp_path / "shared", ScriptedBackend(varied_policy), data=shared, model="scripted:varied", options="fixed")
    assert budgets == [0, DEFAULT_CACHE_BYTES, DEFAULT_CACHE_BYTES]


def test_input_errors_are_recorded_and_counted(tmp_path):
    run = evaluate(tmp_path, data=mc_dataset(tmp_path / "d", 6, missing=2, corrupt=1), model="oracle", k=2)
    s = run.summaries[12]
    assert s["input_errors"] == 3 and s["questions"] == 4 and s["accuracy"]["avg"] == 1.0
    lines = (tmp_path / "run" / RESULTS).read_text().splitlines()
    assert len(lines) == 14
    errors = [json.loads(x) for x in lines if json.loads(x)["stop_reason"] == "error"]
    assert len(errors) == 6 and any("gone.jpg: no such file" in e["error"] for e in errors)
    assert {e["score"]["method"] for e in errors} == {"input_error"}  # an image that did not load too
    assert any("lacks 'problem'" in e["error"] for e in errors)


def test_backend_failures_are_recorded_then_redone_on_resume(tmp_path):
    data = mc_dataset(tmp_path / "d", 5)

    def down(messages, params):
        raise BackendError("HTTP 503: overloaded")

    first = evaluate(tmp_path, ScriptedBackend(down), data=data, model="scripted:x", options="fixed")
    s = first.summaries[12]
    assert s["backend_errors"] == 5 and s["ran"] == 0 and s["questions_failed"] == 5
    assert s["accuracy"] == {"avg": None, "pass": None, "majority": None}  # nothing ran: no accuracy, not 0 %
    table = (tmp_path / "run" / "summary.md").read_text()
    assert "| 12 | 0 | 0 of 5 | – | – | – |" in table
    assert (first.attempted, first.backend_errors, first.backend_error_share) == (5, 5, 1.0)
    assert {json.loads(x)["score"]["method"] for x in (tmp_path / "run" / RESULTS).read_text().splitlines()} == {
        "backend_error"
    }
    second = evaluate(tmp_path, ScriptedBackend(varied_policy), data=data, model="scripted:x", options="fixed")
    assert second.ran == 5 and second.summaries[12]["backend_errors"] == 0
    assert second.summaries[12]["accuracy"]["avg"] == 1.0 and second.backend_errors == 0


def test_eval_exits_4_on_backend_failures_and_0_once_a_resume_completes_them(tmp_path, write_script):
    data = mc_dataset(tmp_path / "d", 4)
    out = tmp_path / "run"

    def run(base: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = ["eval", "--data", data, "--model", "openai:scripted", "--base-url", base, "--out", str(out)]
        return subprocess.run(
            [sys.executable, "-m", "glimpse", *cmd, "--max-retries", "0", "--options", "fixed", *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "200"},
        )

    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    failed = run(dead)
    assert failed.returncode == 4, failed.stdout + failed.stderr
    assert "error: 4 of 4 units (100.0 %) failed in the backend after retries" in failed.stderr
    assert "0 of 4" in failed.stdout and "0.0" not in failed.stdout.split("0 of 4")[1].splitlines()[0]
    tolerated = run(dead, "--max-backend-errors", "100")
    assert tolerated.returncode == 0 and "warning: 4 of 4 units" in tolerated.stderr
    with glimpse_server("--model", f"scripted:{write_script(['<answer>A</answer>'])}") as base:
        done = run(base)
    assert done.returncode == 0 and "error" not in done.stderr, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())["caps"]["12"]
    assert summary["backend_errors"] == 0 and summary["ran"] == 4 and summary["accuracy"]["avg"] == 0.25
    bad = run(dead, "--max-backend-errors", "150")
    assert bad.returncode == 2 and "give 0 to 100" in bad.stderr


def test_resuming_with_other_settings_is_refused(tmp_path):
    data = mc_dataset(tmp_path / "d", 3)
    evaluate(tmp_path, data=data, model="oracle")
    with pytest.raises(ConfigError, match=r"other settings.*model"):
        evaluate(tmp_path, data=data, model="direct")
    assert evaluate(tmp_path, data=data, model="direct", fresh=True).ran == 3
    assert evaluate(tmp_path, data=data, model="direct").ran == 0  # all done: nothing to run


def test_a_judge_failure_is_left_out_of_accuracy_and_asked_again_on_resume(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (320, 240)).save(folder / "img.png")
    rows = [
        {"images": ["img.png"], "problem": f"<image>What is in corner {i}?", "solution": "a red car", "doc_id": i}
        for i in range(3)
    ]
    (folder / "val.json").write_text(json.dumps(rows))
    judge = tmp_path / "judge.json"
    judge.write_text(json.dumps(["MAYBE"]))  # an unreadable verdict
    common = dict(data=f"minio3:{folder / 'val.json'}", model="direct", judge=f"scripted:{judge}", concurrency=1)
    s = evaluate(tmp_path, **common).summaries[12]
    assert s["judge_errors"] == 3 and s["accuracy"]["avg"] is None  # neither right nor wrong: not scored
    judge.write_text(json.dumps(["CORRECT"]))  # the judge works again: the same command asks it again
    again = evaluate(tmp_path, **common)
    s = again.summaries[12]
    assert again.ran == 0 and s["judge_errors"] == 0 and s["accuracy"]["avg"] == 1.0 and s["questions"] == 3
    records = [json.loads(x) for x in (tmp_path / "run" / RESULTS).read_text().splitlines()]
    assert len(records) == 3 and {r["score"]["method"] for r in records} == {"judge"}


def test_result_store_drops_torn_lines_and_duplicates(tmp_path):
    data = mc_dataset(tmp_path / "d", 4)
    evaluate(tmp_path, data=data, model="oracle")
    path = tmp_path / "run" / RESULTS
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1], lines[2][: len(lines[2]) // 2]]))  # a duplicate, a torn line
    store = ResultStore(path)
    assert store.open(drop=lambda r: False) == 2
    assert len(path.read_text().splitlines()) == 4 and len(store.done) == 4
    # a whole last line cut before its newline: mended, so the next append starts a line of its own
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert ResultStore(path).open(drop=lambda r: False) == 0 and path.read_bytes().endswith(b"\n")


def test_a_resume_with_fewer_repeats_or_questions_reports_only_those(tmp_path):
    data = mc_dataset(tmp_path / "d", 4)
    assert evaluate(tmp_path, data=data, model="oracle", k=3).summaries[12]["trajectories"] == 12
    fewer = evaluate(tmp_path, data=data, model="oracle", k=1, limit=2)
    assert fewer.ran == 0 and fewer.summaries[12]["trajectories"] == 2 and fewer.summaries[12]["questions"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["caps"]["12"]["trajectories"] == 2
    assert len((tmp_path / "run" / RESULTS).read_text().splitlines()) == 12  # kept for a later larger run


def test_kill_9_and_resume_loses_nothing_and_repeats_nothing(tmp_path, write_script):
    data = mc_dataset(tmp_path / "d", 16)
    script = write_script(['<grounding>{"bbox_2d": [0.1, 0.1, 0.6, 0.6]}</grounding>', "<answer>A</answer>"])
    out = tmp_path / "run"
    with glimpse_server("--model", f"scripted:{script}", "--latency", "0.25") as base:
        cmd = [
            sys.executable,
            "-m",
            "glimpse",
            "eval",
            "--data",
            data,
            "--model",
            "openai:scripted",
            "--base-url",
            base,
            "--out",
            str(out),
            "--k",
            "2",
            "--concurrency",
            "2",
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"}
        )
        results = out / RESULTS
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if results.exists() and len(results.read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
        assert 5 <= len(before) < 32
        with results.open("a") as fh:  # a write cut short by the kill
            fh.write('{"schema_version": 1, "id": "half')
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming: {len(before)} units already done" in done.stdout
    after = [json.loads(x) for x in results.read_text().splitlines()]
    keys = [(r["sample"]["id"], r["sample_index"]) for r in after]
    assert len(keys) == 32 and len(set(keys)) == 32
    kept = {(r["sample"]["id"], r["sample_index"]): r["started_at"] for r in after}
    assert all(kept[(r["sample"]["id"], r["sample_index"])] == r["started_at"] for r in before)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["caps"]["12"]["trajectories"] == 32


def _traj(sid: str, repeat: int, answer: str | None, correct: bool, turns: int = 1) -> Trajectory:
    settings = RunSettings(
        model="m",
        protocol="tags",
        coords="relative",
        max_turns=8,
        max_images=None,
        max_new_tokens=10,
        max_context_tokens=100,
        min_pixels=40000,
        max_pixels=2000000,
        resize_factor=28,
        min_box_side=28,
        max_aspect_ratio=100,
        keep_images=None,
        temperature=1,
        top_p=1,
        seed=None,
        prompt="default",
    )
    return Trajectory(
        id=f"{sid}#{repeat}",
        sample=Sample(id=sid, images=["x"], question="?", answer="yes", meta={"level": "easy"}),
        sample_index=repeat,
        settings=settings,
        image=ImageRef(path="x", sha256="0", width=10, height=10),
        shown_size=[10, 10],
        answer=answer,
        stop_reason="answer" if answer else "max_turns",
        turns=[
            Turn(index=i, text="", kind="zoom" if i < turns - 1 else "answer", tool_attempt=i < turns - 1)
            for i in range(turns)
        ],
        score=Score(correct=correct, method="exact" if correct else "no_match"),
    )


def test_avg_pass_majority_by_hand():
    trajs = [
        _traj("q1", 0, "yes", True),
        _traj("q1", 1, "no", False),
        _traj("q1", 2, "yes", True),  # 2/3, pass, maj yes
        _traj("q2", 0, "no", False),
        _traj("q2", 1, "no", False),
        _traj("q2", 2, "yes", True),  # 1/3, pass, maj no
        _traj("q3", 0, None, False),
        _traj("q3", 1, "no", False),
        _traj("q3", 2, "maybe", False),  # 0, no, no
    ]
    acc = summarize(trajs)["accuracy"]
    assert acc["avg"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert acc["pass"] == pytest.approx(2 / 3)
    assert acc["majority"] == pytest.approx(1 / 3)


def test_majority_votes_for_what_each_repeat_chose_not_for_its_wording_or_letter():
    from glimpse.eval.options import present
    from glimpse.eval.scoring import score

    def voted(sample: Sample, answers: list[str], mode: str = "shuffle") -> list[Trajectory]:
        out = []
        for r, answer in enumerate(answers):
            shown = present(sample, r, mode=mode, seed=0)
            if answer in (sample.options or []):  # name the option by its letter in this repeat's order
                answer = "ABCD"[shown.options.index(answer)]
            t = _traj(sample.id, r, answer, False).model_copy(update={"sample": shown})
            t.score = asyncio.run(score(answer, shown))
            out.append(t)
        return out

    colour = Sample(id="c", images=["x"], question="Colour?", options=["red", "blue", "green", "white"], answer="A")
    shuffled = voted(colour, ["blue", "red", "red"])  # two of three chose red, each under its own letter
    assert len({t.answer for t in shuffled}) == 3 and [t.score.correct for t in shuffled] == [False, True, True]
    assert summarize(shuffled)["accuracy"]["majority"] == 1.0
    cars = Sample(id="n", images=["x"], question="How many cars?", answer="3")
    assert summarize(voted(cars, ["3", "three", "There are 3 cars.", "4", "4"]))["accuracy"]["majority"] == 1.0
    unreadable = voted(colour, ["red", "I cannot tell from the image.", "I cannot tell from the image."])
    assert summarize(unreadable)["accuracy"]["majority"] == 1.0  # an unreadable reply does not vote
    tie = voted(cars, ["3", "5"])  # a tie goes to the first repeat, whatever order the units finished in
    assert summarize(tie)["accuracy"]["majority"] == summarize(tie[::-1])["accuracy"]["majority"] == 1.0


def _failed(sid: str, repeat: int, level: str = "easy") -> Trajectory:
    """A unit whose backend failed after retries: the image was read, the server never answered."""
    t = _traj(sid, repeat, None, False, turns=0)
    return t.model_copy(
        update={
            "stop_reason": "error",
            "error": "BackendError: HTTP 503",
            "score": Score(correct=None, method="backend_error"),
            "sample": t.sample.model_copy(update={"meta": {"level": level}}),
        }
    )


def test_backend_failures_are_counted_apart_from_accuracy():
    """61 of 80 failing once showed 11.2 %: accuracy is over the units that ran, failures beside it."""
    ran = [_traj(f"q{i}", 0, "yes" if i < 9 else "no", i < 9) for i in range(19)]  # 9 of 19 answered right
    failed = [_failed(f"f{i}", 0, level="hard" if i < 40 else "easy") for i in range(61)]
    s = summarize(ran + failed)
    assert s["accuracy"]["avg"] == pytest.approx(9 / 19) and s["accuracy"]["pass"] == pytest.approx(9 / 19)
    assert s["accuracy"]["majority"] == pytest.approx(9 / 19)
    assert (s["questions"], s["ran"], s["trajectories"], s["backend_errors"]) == (19, 19, 80, 61)
    assert s["backend_error_rate"] == pytest.approx(61 / 80) and s["questions_failed"] == 61
    assert s["stop_reasons"]["error"] == 61 and s["turns_mean"] == 1.0  # failures do not drag turns to 0
    assert s["by"]["level"]["easy"]["avg"] == pytest.approx(9 / 19) and s["by"]["level"]["easy"]["n"] == 19
    assert s["by"]["level"]["easy"]["backend_errors"] == 21
    assert s["by"]["level"]["hard"] == {"avg": None, "pass": None, "majority": None, "n": 0, "backend_errors": 40}
    # a question with one repeat failed is scored over the repeats that ran
    mixed = summarize([_traj("q", 0, "yes", True), _traj("q", 1, "no", False), _failed("q", 2)])
    assert mixed["accuracy"]["avg"] == 0.5 and mixed["questions"] == 1 and mixed["questions_failed"] == 0
    table = markdown_summary("d", "m", 1, {8: s})
    assert "| 8 | 19 | 19 of 80 | 47.4 | 47.4 | 47.4 |" in table and "| hard | 0 | – | – | – | 40 |" in table


def test_units_without_gold_are_not_scored(tmp_path):
    """A glimpse ask file has no gold answers: its overview says "not scored", not 0.0 %."""
    asked = [
        _traj(f"q{i}", 0, "yes", False).model_copy(
            update={"sample": Sample(id=f"q{i}", images=["x"], question="?"), "score": None}
        )
        for i in range(3)
    ]
    s = summarize(asked)
    assert s["ran"] == 3 and s["scored"] == 0 and s["accuracy"]["avg"] is None and s["chance"] is None
    assert "| 8 | 0 | 3 | not scored | not scored | not scored |" in markdown_summary("d", "m", 1, {8: s})
    write_sweep(tmp_path / "s.csv", tmp_path / "s.png", {4: s, 8: s}, title="t")  # no accuracy: empty cells
    assert (tmp_path / "s.csv").read_text().splitlines()[1].startswith("4,,,,")
    write_sweep(tmp_path / "s.csv", tmp_path / "s.png", {4: summarize([]), 8: s}, title="t")  # nothing ran at 4
    assert (tmp_path / "s.csv").read_text().splitlines()[1] == "4,,,,,"


def test_truncate():
    long = _traj("q", 0, "yes", True, turns=5)
    cut = truncate(long, 3)
    assert len(cut.turns) == 3 and cut.stop_reason == "max_turns" and cut.over_turn and cut.answer is None
    assert cut.score.correct is False and cut.settings.max_turns == 3
    same = truncate(long, 5)
    assert same.answer == "yes" and same.stop_reason == "answer"
    with pytest.raises(ValueError):
        truncate(long, 9)
    # a backend that failed asking for turn 4 ran fine under cap 3, and failed under cap 4
    down = _failed("q", 0).model_copy(update={"turns": long.turns[:3]})
    assert truncate(down, 3).stop_reason == "max_turns" and truncate(down, 3).over_turn
    assert truncate(down, 4).stop_reason == "error" and truncate(down, 2).stop_reason == "max_turns"
    # code the cap stops is written, never run: no code recorded, no output, no error (as the loop leaves it)
    ran = Turn(index=1, text="x", kind="code", code="1/0", code_output="ZeroDivisionError", error_kind="code_error")
    coded = long.model_copy(update={"turns": [long.turns[0], ran, *long.turns[2:]]})
    last = truncate(coded, 2).turns[-1]
    assert (last.kind, last.code, last.code_output, last.error_kind) == ("code", None, None, None)


def test_two_image_probes_the_oracle_scores_100_and_is_faithful_in_each_image(tmp_path):
    """Two-image probes end to end: the oracle zooms into the image each target is in, scores 100 %, and
    faithfulness is computed per image."""
    split = evaluate(tmp_path / "split", data="probes:easy:4:1:split_code", model="oracle")
    which = evaluate(
        tmp_path / "which", data="probes:medium:4:1:which_image", model="oracle", protocol="tools", coords="pixels"
    )
    for run, per_image in ((split, {"image_1": 4, "image_2": 4}), (which, None)):
        s = run.summaries[12]
        assert s["accuracy"]["avg"] == 1.0 and s["input_errors"] == s["backend_errors"] == 0
        assert s["faithfulness"]["covered_rate"] == 1.0 and s["faithfulness"]["checked"] == 4
        by_image = s["faithfulness"]["by_image"]
        assert set(by_image) == {"image_1", "image_2"}
        if per_image:
            assert {k: v["checked"] for k, v in by_image.items()} == per_image
        assert all(v["covered_rate"] in (1.0, None) for v in by_image.values())
        assert sum(v["checked"] for v in by_image.values()) >= 4 and s["search"]["first_zoom_hit_rate"] == 1.0
        for t in load_jsonl(run.out / RESULTS):
            zooms = [turn.original_index for turn in t.turns if turn.crop_box_px]
            assert zooms == [k for k, _ in t.sample.targets()] and len(t.originals()) == 2
    assert "targets in image_2: 4 correct answers" in (tmp_path / "split" / "run" / "summary.md").read_text()


def test_faithfulness_counts_only_zooms_into_the_image_a_target_is_in():
    box = [0, 0, 6, 6]
    sample = Sample(
        id="two", images=["a", "b"], question="?", answer="yes", target_boxes=[box, box], meta={"target_images": [0, 1]}
    )
    base = _traj("two", 0, "yes", True, turns=3)
    ref = ImageRef(path="b", sha256="1", width=10, height=10)
    zoom_a, zoom_b = (Turn(index=i, text="", kind="zoom", crop_box_px=box, original_index=0) for i in (0, 1))
    both_in_a = base.model_copy(
        update={"sample": sample, "more_images": [ShownImageRef(**ref.model_dump(), shown_size=[10, 10])]}
    )
    both_in_a.turns = [zoom_a, zoom_b, base.turns[-1]]
    faithful = summarize([both_in_a])["faithfulness"]
    assert faithful["covered_rate"] == 0.0 and faithful["by_image"]["image_1"]["covered_rate"] == 1.0
    assert faithful["by_image"]["image_2"]["covered_rate"] == 0.0
    both_in_a.turns[1] = zoom_b.model_copy(update={"original_index": 1})
    faithful = summarize([both_in_a])["faithfulness"]
    assert faithful["covered_rate"] == 1.0 and faithful["by_image"]["image_2"]["best_iou_mean"] == 1.0
    assert "by_image" not in summarize([base])["faithfulness"]  # single-image summaries are as before


def test_first_zoom_counts_any_named_target_in_its_own_image():
    """A question naming two objects (left or right of each other, a code split across two images) has two right
    first looks: a first zoom on either target counts, on neither or in the other image does not."""
    left, right = [0, 0, 2, 2], [7, 7, 9, 9]
    sample = Sample(id="rel", images=["a"], question="?", answer="left", target_boxes=[left, right])
    base = _traj("rel", 0, "left", True, turns=2)

    def first(box, image=0, targets_in=None):
        meta = {"target_images": targets_in} if targets_in else {}
        more = [ShownImageRef(path="b", sha256="1", width=10, height=10, shown_size=[10, 10])] if targets_in else []
        zoom = Turn(index=0, text="", kind="zoom", crop_box_px=box, original_index=image)
        t = base.model_copy(
            update={"sample": sample.model_copy(update={"meta": meta, "images": ["a", "b"][: 1 + bool(more)]})}
        )
        t.more_images = more
        t.turns = [zoom, base.turns[-1]]
        return first_zoom_hit(t)

    assert first([0, 0, 3, 3]) and first([6, 6, 10, 10])  # the first named object, or the second
    assert first([3, 3, 6, 6]) is False  # between them
    assert first([0, 0, 10, 10]) is False  # a zoom on everything is shrunk to a quarter of the image, around (5, 5)
    assert first([6, 6, 10, 10], image=1, targets_in=[0, 1])  # image_2's target, zoomed in image_2
    assert first([0, 0, 3, 3], image=1, targets_in=[0, 1]) is False  # image_1's target's place, in image_2


def test_replies_holding_unicode_line_separators_are_read_back_and_resumed(tmp_path, write_script):
    """U+2028, U+2029 and U+0085 are written raw into the JSON lines; they do not end a line."""
    script = write_script(["<think>a\u2028b\u0085c</think><answer>x\u2029y</answer>"])
    cfg = EvalConfig(data="probes:easy:2", model=f"scripted:{script}", out=str(tmp_path / "run"))
    first = asyncio.run(run_eval(cfg))
    again = asyncio.run(run_eval(cfg))
    assert (first.ran, again.ran, again.skipped) == (2, 0, 2)
    assert [t.answer for t in ResultStore(tmp_path / "run" / RESULTS).load()] == ["x\u2029y"] * 2
