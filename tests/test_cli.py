"""The command line: exit codes, output modes, config files, the demo, and a fast --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from glimpse.trajectory import load_jsonl


def glimpse(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glimpse", *args], capture_output=True, text=True, timeout=timeout)


ANSWER = "<think>easy</think><answer>seven</answer>"
ZOOM = '<grounding>{"bbox_2d": [0.1, 0.1, 0.6, 0.6], "source": "original_image"}</grounding>'


def test_help_is_fast_and_never_imports_heavy_modules():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "sys.argv = ['glimpse', '--help']\n"
        "from glimpse.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'PIL', 'httpx', 'pydantic', 'numpy') if m in sys.modules]\n"
        "sys.stderr.write(repr((heavy, time.perf_counter() - t)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    heavy, seconds = eval(proc.stderr.strip().splitlines()[-1])
    assert heavy == [] and "ask" in proc.stdout
    assert seconds < 3.0


def test_ask_scripted_answers_with_exit_0(make_image, write_script, tmp_path):
    script = write_script([ZOOM, ANSWER])
    out = tmp_path / "t.jsonl"
    proc = glimpse("ask", str(make_image()), "How many?", "--model", f"scripted:{script}", "--save", str(out))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "t.config.json").read_text())
    assert saved["model"] == f"scripted:{script}" and saved["max_turns"] == 12  # the settings used, resolved
    assert "turn 1" in proc.stdout and "Answer: seven" in proc.stdout
    proc = glimpse("ask", str(make_image()), "How many?", "--model", f"scripted:{script}", "--save", str(out))
    assert len(load_jsonl(out)) == 2  # --save appends


def test_no_answer_exits_1_and_reports_the_cap(make_image, write_script):
    script = write_script([ZOOM] * 5)
    proc = glimpse("ask", str(make_image()), "?", "--model", f"scripted:{script}", "--max-turns", "2")
    assert proc.returncode == 1
    assert "No answer" in proc.stdout and "max_turns (over-turn)" in proc.stdout


def test_unreadable_image_exits_3_naming_the_file_on_stderr(tmp_path, write_script):
    script = write_script([ANSWER])
    missing = tmp_path / "nope.jpg"
    proc = glimpse("ask", str(missing), "?", "--model", f"scripted:{script}")
    assert proc.returncode == 3 and "nope.jpg: no such file" in proc.stderr
    assert "no such file" not in proc.stdout  # errors never go to stdout
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for quiet in ([], ["--quiet"], ["--json"]):  # --quiet and --json silence progress, not errors
        proc = glimpse("ask", str(empty), "?", "--model", f"scripted:{script}", *quiet)
        assert proc.returncode == 3 and "error:" in proc.stderr and "empty (0 bytes)" in proc.stderr, quiet
        assert quiet == ["--json"] or "empty (0 bytes)" not in proc.stdout  # --json's stdout is the record


def test_backend_failure_exits_4_with_the_error_on_stderr(make_image):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    args = ("--model", "openai:m", "--base-url", url, "--max-retries", "0", "--quiet")
    proc = glimpse("ask", str(make_image()), "?", *args)
    assert proc.returncode == 4 and "error:" in proc.stderr and proc.stdout.strip() == ""


def test_the_live_view_shows_a_code_turn_with_its_output(make_image, write_script):
    code = "img = images['original_image']\nprint('size', img.size)\nprint('second line')"
    script = write_script([f"<python>{code}</python>", ANSWER])
    args = ("--model", f"scripted:{script}", "--code", "--sandbox", "process")
    proc = glimpse("ask", str(make_image(640, 480)), "?", *args)
    assert proc.returncode == 0, proc.stderr
    assert "turn 1 code (3 lines) → size (640, 480)" in proc.stdout
    assert "no zoom and no answer" not in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt:4"], "unknown model backend"),
        (["--model", "scripted:x.json", "--protocol", "xml"], "Invalid value"),
        (["--model", "scripted:/no/such/file.json"], "cannot read script file"),
        (["--model", "scripted:x.json", "--temperature", "hot"], "not a valid float"),
        (["--model", "scripted:x.json", "--max-turns", "0"], "max_turns must be at least 1"),
    ],
)
def test_bad_usage_exits_2_with_a_message(make_image, write_script, args, message):
    write_script([ANSWER], name="x.json")
    proc = glimpse("ask", str(make_image()), "?", *[a.replace("x.json", str(write_script([ANSWER]))) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stdout + proc.stderr


def test_json_and_quiet_outputs(make_image, write_script):
    script = write_script([ANSWER])
    proc = glimpse("ask", str(make_image()), "?", "--model", f"scripted:{script}", "--json")
    assert proc.returncode == 0
    record = json.loads(proc.stdout.strip().splitlines()[0])
    assert record["answer"] == "seven" and record["stop_reason"] == "answer"
    proc = glimpse("ask", str(make_image()), "?", "--model", f"scripted:{script}", "--quiet")
    assert proc.stdout.strip() == "seven"


def test_config_file_and_samples(make_image, write_script, tmp_path):
    script = write_script([[ANSWER], ["<answer>eight</answer>"], [ZOOM, ANSWER]])
    cfg = tmp_path / "ask.toml"
    cfg.write_text(f'model = "scripted:{script}"\nsamples = 3\neffort = "low"\n')
    proc = glimpse("ask", str(make_image()), "?", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["answer"] for r in records] == ["seven", "eight", "seven"]
    assert {r["settings"]["max_turns"] for r in records} == {4}


def test_demo_runs_offline_and_the_expert_searches_live(tmp_path):
    started = time.perf_counter()
    proc = glimpse("demo", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    assert "training-free expert policy" in proc.stdout  # says plainly which policy runs
    (traj,) = load_jsonl(tmp_path / "demo" / "trajectory.jsonl")
    assert f"gold answer: {traj.answer}" in proc.stdout  # found it
    assert traj.settings.model == "expert" and traj.metrics["zooms"] >= 1
    # the saved sample carries the gold answer and box, so the viewer scores it
    assert traj.sample.answer == traj.answer and traj.score.correct is True and traj.sample.target_boxes
    assert time.perf_counter() - started < 60


def test_the_scripted_demo_replays_the_runtime_tour(tmp_path):
    proc = glimpse("demo", "--scripted", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    assert "scripted" in proc.stdout
    (traj,) = load_jsonl(tmp_path / "demo" / "trajectory.jsonl")
    assert f"gold answer: {traj.answer}" in proc.stdout
    assert traj.metrics["zooms"] == 2 and traj.metrics["tool_errors"] == 1
    assert traj.sample.answer == traj.answer and traj.score.correct is True
    from glimpse.view.build import load_run

    (summary,) = load_run(tmp_path / "demo" / "trajectory.jsonl").summary["caps"].values()
    assert summary["accuracy"]["avg"] == 1.0 and summary["scored"] == 1


def test_without_a_model_the_builtin_default_answers(make_image, tmp_path, monkeypatch):
    """No --model: glimpse ask runs the expert on any image (the learned built-in model is the default only on
    the probe levels where it beats the expert, in glimpse eval), and its first line says so and why."""
    from glimpse.builtin.backend import learned_available, read_manifest
    from glimpse.models import load_backend

    proc = glimpse("ask", str(make_image()), "How many dots?", "--max-turns", "1", "--save", str(tmp_path / "t.jsonl"))
    assert proc.returncode in (0, 1), proc.stderr
    record = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    assert record["settings"]["model"] == "expert"
    first = proc.stdout.splitlines()[0]
    if learned_available():
        listed = [level for level in ("easy", "medium", "hard") if level in read_manifest().probe_levels]
        where = " and ".join([", ".join(listed[:-1]), listed[-1]] if len(listed) > 2 else listed)
        assert f"builtin: the expert (the learned built-in model is the default only on {where} probes" in first
        assert "--model builtin:learned runs it here" in first
    else:
        assert "builtin: the expert (" in first
    monkeypatch.setattr("glimpse.builtin.backend.WEIGHTS", tmp_path / "none")  # an install without the weights
    assert load_backend("builtin").name == "expert"


def test_ctrl_c_in_glimpse_ask_saves_what_was_done(make_image, write_script, tmp_path):
    """An interrupted ask exits 130 and, with --save, keeps the turns already taken, stopped as 'cancelled'."""
    import signal

    from conftest import glimpse_server, interruptible

    zoom = '<grounding>{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"}</grounding>'
    script = write_script([[zoom, zoom, zoom, zoom, "<answer>x</answer>"]])
    saved = tmp_path / "out.jsonl"
    with glimpse_server("--model", f"scripted:{script}", "--latency", "1.0") as base:
        args = ["ask", str(make_image()), "?", "--model", "openai:m", "--base-url", base, "--save", str(saved)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "glimpse", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=interruptible,
        )
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(line.startswith("turn 1") for line in lines):
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "saved to" in err
    (traj,) = load_jsonl(saved)
    assert traj.stop_reason == "cancelled" and 1 <= len(traj.turns) < 5 and traj.turns[0].kind == "zoom"


def test_ask_about_two_images_the_last_argument_is_the_question(make_image, write_script, tmp_path):
    first, second = make_image(900, 600, name="first.png"), make_image(600, 900, name="second.png")
    script = write_script([ZOOM.replace("original_image", "image_2"), ANSWER])
    out = tmp_path / "two.jsonl"
    proc = glimpse("ask", str(first), str(second), "Which one?", "--model", f"scripted:{script}", "--save", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "image_1 " in proc.stdout and "image_2 " in proc.stdout and "turn 1 zoom image_2" in proc.stdout
    (traj,) = load_jsonl(out)
    assert traj.sample.question == "Which one?" and traj.sample.images == [str(first), str(second)]
    assert [o.path for o in traj.originals()] == [str(first), str(second)] and traj.turns[0].original_index == 1
    single = glimpse("ask", str(first), "Which one?", "--model", f"scripted:{write_script([ANSWER])}", "--json")
    (record,) = [json.loads(line) for line in single.stdout.splitlines()]
    assert record["more_images"] == [] and record["sample"]["images"] == [str(first)]
    lone = glimpse("ask", str(first), "--model", f"scripted:{script}")
    assert lone.returncode == 2 and "give an image file and a question" in lone.stderr


def test_synth_makes_two_image_probes(tmp_path):
    proc = glimpse("synth", "--level", "easy", "--n", "2", "--kind", "which_image", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "easy" / "val.json").read_text())
    assert [len(r["images"]) for r in rows] == [2, 2] and {r["kind"] for r in rows} == {"which_image"}
    assert all((tmp_path / "easy" / name).is_file() for r in rows for name in r["images"])


def test_eval_summary_printed_to_a_log_keeps_every_figure_whole(tmp_path):
    # not a terminal: rich would squeeze the 12 columns into 80 characters and cut figures to "66…"
    proc = glimpse("eval", "--data", "probes:easy:2", "--model", "oracle", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout[proc.stdout.index("┏") : proc.stdout.rindex("┘") + 1]
    assert "…" not in table
    assert all(name in table for name in ("turn cap", "Avg@k", "over-turn", "backend err"))


def test_eval_warns_when_open_answers_are_scored_without_a_judge(write_script, tmp_path):
    # a reply the rules cannot match to a code is scored wrong; the run says so and how to decide it
    script = write_script(["<answer>The sign is hard to read.</answer>"])
    args = ("eval", "--data", "probes:easy:2:0:read_code", "--model", f"scripted:{script}")
    proc = glimpse(*args, "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "2 open answers matched no rule" in proc.stderr and "--judge" in proc.stderr
    oracle = glimpse("eval", "--data", "probes:easy:2:0:read_code", "--model", "oracle", "--out", str(tmp_path / "o"))
    assert oracle.returncode == 0 and "matched no rule" not in oracle.stderr


def test_user_mistakes_are_one_line_errors_with_exit_2(make_image, tmp_path):
    """What a new user gets wrong: a clear error naming the problem, exit 2, never a traceback."""
    image = str(make_image())
    (tmp_path / "junk.jsonl").write_text('{"not": "a trajectory"}\n')
    (tmp_path / "config.yaml").write_text("max_turns: 2.5\n")
    (tmp_path / "afile").write_text("x")
    cases = [
        (("ask", image, ""), "the question is empty"),
        (("ask", image, image), "is a file: give the question after the image"),
        (("ask", "https://example.com/a.jpg", "What?"), "is a URL"),
        (("ask", image, "Q?", "--model", "openai:m", "--base-url", "notaurl"), "not an http:// or https://"),
        (("ask", image, "Q?", "--config", str(tmp_path / "config.yaml")), "max_turns=2.5 is not a valid int"),
        (("eval", "--data", "probes:easy:2", "--concurrency", "0"), "concurrency=0 must be at least 1"),
        (("eval", "--data", "probes:easy:2", "--limit", "-1"), "limit=-1 must be at least 1"),
        (("eval", "--data", "bogus"), "unknown dataset 'bogus'"),
        (("eval", "--data", "probes/easy/val.json"), "minio3:probes/easy/val.json"),
        (("eval", "--data", "probes:easy:2", "--model", "oracle", "--out", str(tmp_path / "afile")), "afile"),
        (("view", image), "is not a text file of trajectories"),
        (("view", str(tmp_path / "junk.jsonl")), "junk.jsonl:1: not a valid trajectory"),
        (("serve", "--model", "oracle", "--port", "99999"), "port=99999 must be at most 65535"),
    ]
    for args, said in cases:
        proc = glimpse(*args)
        assert proc.returncode == 2 and said in proc.stderr, (args, proc.returncode, proc.stderr[-600:])
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, (args, proc.stderr)


def test_help_shows_each_flags_default():
    proc = subprocess.run(
        [sys.executable, "-m", "glimpse", "eval", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert "[default: 12]" in proc.stdout and "[default: 32]" in proc.stdout  # --max-turns, --concurrency
