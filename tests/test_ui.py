"""``glimpse ui``: its HTTP API and safety rules on loopback, and the live page in a real headless Chromium.

The model behind the page is the expert, or a scripted model behind ``glimpse serve`` with a simulated latency,
so turns arrive over time and the tests can look at the page while a run is in progress. The browser tests use
Debian's ``chromium`` through Playwright, like the viewer's, and are skipped without it unless
``GLIMPSE_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from conftest import app_server, free_port, glimpse_server, wait_healthy
from glimpse.config import AskConfig
from glimpse.trajectory import load_jsonl
from glimpse.ui import build_app

pytestmark = pytest.mark.slow

HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def zoom(box, thought="I look closer.", source="original_image") -> str:
    return f"<think>{thought}</think><grounding>{json.dumps({'bbox_2d': box, 'source': source})}</grounding>"


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    from glimpse.probes.synth import make_probe

    folder = tmp_path_factory.mktemp("probe")
    made = make_probe("easy", 3, seed=7)
    path = folder / "probe.jpg"
    made.image.save(path, quality=90)
    (folder / "question.txt").write_text(made.record["problem"].replace("<image>", "").strip())
    return path


def _scripted_server(tmp_path_factory, latency: str):
    folder = tmp_path_factory.mktemp("ui-script")
    long = " ".join(f"step{i}" for i in range(30))
    script = [
        zoom([0.1, 0.1, 0.6, 0.6], f"First I scan the left part. {long} {HOSTILE}"),
        zoom([0.2, 0.2, 0.8, 0.8], f"Now closer. {long}", "observation_1"),
        f"<think>{long}</think><answer>{HOSTILE}</answer>",
    ]
    (folder / "script.json").write_text(json.dumps([script]))
    return glimpse_server("--model", f"scripted:{folder / 'script.json'}", "--latency", latency)


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    """glimpse serve with a scripted model: two zooms then an answer, 0.8 s per reply, thoughts streamed."""
    with _scripted_server(tmp_path_factory, "0.8") as base:
        yield base


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """The same at 3 s per reply: a run stays in progress while a test reloads a page or shuts the server down."""
    with _scripted_server(tmp_path_factory, "3") as base:
        yield base


@pytest.fixture
def ui(tmp_path, probe):
    """The UI app on loopback with the probe's folder allowed; yields (base URL, runs folder)."""
    runs = tmp_path / "runs"
    app = build_app(AskConfig(model="expert", max_turns=6), runs=runs, allow=[probe.parent], max_upload_mb=8)
    with app_server(app) as base:
        yield base.removesuffix("/v1"), runs


def follow(base: str, run_id: str, timeout: float = 120) -> list[dict]:
    """Every event of a run, read as the page reads them (server-sent events) until the stream ends."""
    events = []
    with httpx.stream("GET", f"{base}/api/runs/{run_id}/events", timeout=timeout) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: {}":
                events.append(json.loads(line[6:]))
    return events


def start(base: str, **body) -> str:
    r = httpx.post(f"{base}/api/runs", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["id"]


# ------------------------------------------------------------------------------------------------ the HTTP API
def test_expert_run_streams_events_and_is_saved(ui, probe):
    base, runs = ui
    upload = httpx.post(f"{base}/api/images", content=probe.read_bytes(), headers={"content-type": "image/jpeg"})
    from PIL import Image

    width, height = Image.open(probe).size
    assert upload.status_code == 200 and (upload.json()["width"], upload.json()["height"]) == (width, height)
    question = (probe.parent / "question.txt").read_text()
    run_id = start(base, image=upload.json()["id"], question=question, samples=2)
    events = follow(base, run_id)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("turn") >= 2
    assert events[0]["width"] == width and events[0]["samples"] == 2
    turns = [e for e in events if e["type"] == "turn"]
    for sample in (0, 1):  # each sample's turns arrive in order, each with the record so far
        mine = [len(e["trajectory"]["turns"]) for e in turns if e["sample"] == sample]
        assert mine == list(range(1, len(mine) + 1))
    done = events[-1]
    assert done["status"] == "finished" and done["vote"]["total"] == 2
    saved = load_jsonl(done["saved"])
    assert len(saved) == 2 and [t.stop_reason for t in saved] == [t["stop_reason"] for t in done["trajectories"]]
    assert Path(done["saved"]).parent == runs.resolve()
    (row,) = httpx.get(f"{base}/api/history").json()
    assert row["id"] == run_id and row["question"] == question and row["url"].startswith(f"/history/{run_id}/")
    page = httpx.get(f"{base}/history/{run_id}/")
    assert page.status_code == 200 and "app.js" in page.text  # the viewer's report of the run
    assert httpx.get(f"{base}/history/{run_id}/data/traj/1.js").text.startswith("GLIMPSE.loaded(1, ")
    assert httpx.get(f"{base}/history/{run_id}/../../{run_id}.json").status_code == 404


def test_stop_cancels_the_request_and_saves_the_stop(tmp_path, probe, scripted_server):
    app = build_app(
        AskConfig(model="openai:scripted", base_url=scripted_server), runs=tmp_path / "runs", allow=[probe.parent]
    )
    with app_server(app) as base:
        base = base.removesuffix("/v1")
        run_id = start(base, path=str(probe), question="?")
        seen: list[dict] = []
        with httpx.stream("GET", f"{base}/api/runs/{run_id}/events", timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: {}":
                    continue
                seen.append(json.loads(line[6:]))
                if seen[-1]["type"] == "turn":  # the first turn is done, the second is being written
                    assert httpx.post(f"{base}/api/runs/{run_id}/stop").json() == {"stopped": True}
        replay = follow(base, run_id)  # a page opened later: the finished turn's pieces are left out
    done = seen[-1]
    assert done["type"] == "done" and done["status"] == "stopped"
    assert [e for e in replay if e["type"] == "turn"] == [e for e in seen if e["type"] == "turn"]
    assert not [e for e in replay if e["type"] == "text" and e["turn"] == 0]
    assert [e for e in seen if e["type"] == "text" and e["turn"] == 0]
    (traj,) = load_jsonl(done["saved"])
    assert traj.stop_reason == "cancelled" and len(traj.turns) == 1


def test_runs_share_a_backend_and_shutting_down_saves_the_runs_in_progress(tmp_path, probe, slow_server):
    runs = tmp_path / "runs"
    app = build_app(AskConfig(model="openai:scripted", base_url=slow_server), runs=runs, allow=[probe.parent])
    with app_server(app) as base:
        base = base.removesuffix("/v1")
        first = start(base, path=str(probe), question="?")
        second = start(base, path=str(probe), question="?", samples=2)
        assert len(app.state.loops.kept) == 1  # the same settings: one loop, one backend and its connections
        third = start(base, path=str(probe), question="?", effort="low")
        assert len(app.state.loops.kept) == 2
        deadline = time.monotonic() + 30

        def turned(run_id: str) -> set[int]:
            return {e["sample"] for e in app.state.live[run_id].events if e and e["type"] == "turn"}

        while (len(turned(first)), len(turned(second)), len(turned(third))) != (1, 2, 1):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # The server stopped (Ctrl-C) while the runs were going: each was stopped and saved.
    for run_id, samples in ((first, 1), (second, 2), (third, 1)):
        trajs = load_jsonl(runs / f"{run_id}.jsonl")
        assert [t.stop_reason for t in trajs] == ["cancelled"] * samples and all(t.turns for t in trajs)


def test_uploads_are_limited_in_bytes_and_pixels(ui, monkeypatch):
    from PIL import Image

    base, _ = ui
    big = httpx.post(f"{base}/api/images", content=b"\0" * (9 * 1024 * 1024))
    assert big.status_code == 413 and "at most" in big.json()["error"]
    junk = httpx.post(f"{base}/api/images", content=b"not an image")
    assert junk.status_code == 400 and "not an image in a format read here" in junk.json()["error"]
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buffer, "PNG")
    monkeypatch.setenv("GLIMPSE_MAX_IMAGE_PIXELS", "50000")  # the same rule as every image Glimpse reads
    try:
        bomb = httpx.post(f"{base}/api/images", content=buffer.getvalue())
    finally:
        monkeypatch.delenv("GLIMPSE_MAX_IMAGE_PIXELS")
        Image.MAX_IMAGE_PIXELS = 89_478_485
    assert bomb.status_code == 400 and "decompression bomb" in bomb.json()["error"]


def test_no_path_outside_the_allowed_folders_is_read(ui, probe, tmp_path, monkeypatch):
    base, _ = ui
    outside = tmp_path / "secret.png"
    outside.write_bytes(probe.read_bytes())
    link = probe.parent / "link.jpg"
    if not link.exists():
        link.symlink_to(outside)
    for body in (
        {"path": str(outside)},
        {"path": str(link)},  # a link inside pointing outside
        {"path": str(probe.parent / ".." / outside.parent.name / "secret.png")},
        {"path": str(probe), "model": f"scripted:{outside}"},
        {"path": str(probe), "model": f"hf:{tmp_path}"},
    ):
        r = httpx.post(f"{base}/api/runs", json={"question": "?", **body})
        assert r.status_code in (400, 403), (body, r.text)
        if r.status_code == 403:
            assert "outside the folders" in r.json()["error"]
    bad = httpx.post(f"{base}/api/runs", json={"question": "?", "image": "../../etc/passwd"})
    assert bad.status_code == 404
    huge = httpx.post(f"{base}/api/runs", json={"question": "?" * 300_000, "path": str(probe)})
    assert huge.status_code == 413 and "accepts at most 262,144" in huge.json()["error"]
    script = tmp_path / "own.json"  # the server's own settings are trusted wherever they point
    script.write_text(json.dumps(["<answer>mine</answer>"]))
    own = build_app(AskConfig(model=f"scripted:{script}"), runs=tmp_path / "r3", allow=[probe.parent])
    with app_server(own) as other:
        other = other.removesuffix("/v1")
        assert follow(other, start(other, path=str(probe), question="?"))[-1]["vote"]["answer"] == "mine"
    remote = build_app(AskConfig(model="expert"), runs=tmp_path / "r2", allow=[probe.parent], local_paths=False)
    with app_server(remote) as other:
        r = httpx.post(other.removesuffix("/v1") + "/api/runs", json={"question": "?", "path": str(probe)})
        assert r.status_code == 403 and "upload" in r.json()["error"]
        uploaded = httpx.post(other.removesuffix("/v1") + "/api/images", content=probe.read_bytes()).json()["id"]
        body = {"question": "?", "image": uploaded, "model": "openai:m", "base_url": "http://10.0.0.1/v1"}
        r = httpx.post(other.removesuffix("/v1") + "/api/runs", json=body)
        assert r.status_code == 403 and "configured base URL" in r.json()["error"]
        inside_allowed = probe.parent / "notes.json"  # a JSON list in an allowed folder, read back as a "model"
        inside_allowed.write_text(json.dumps(["<answer>private notes</answer>"]))
        for model in (f"scripted:{inside_allowed}", f"hf:{probe.parent}"):
            body = {"question": "?", "image": uploaded, "model": model}
            r = httpx.post(other.removesuffix("/v1") + "/api/runs", json=body)
            assert r.status_code == 403 and "does not load" in r.json()["error"], (model, r.text)
    # on loopback an hf: model named in the page must be a folder here: never a Hub id to download
    monkeypatch.chdir(probe.parent)  # "someorg/huge-model" resolves inside an allowed folder
    r = httpx.post(f"{base}/api/runs", json={"question": "?", "path": str(probe), "model": "hf:someorg/huge-model"})
    assert r.status_code == 404 and "Hub ids only with --model" in r.json()["error"]
    for body in ({"path": "red.png\u0000x"}, {"path": "~no-such-user-here/x.png"}):  # refused, not a 500
        r = httpx.post(f"{base}/api/runs", json={"question": "?", **body})
        assert r.status_code in (400, 403), (body, r.text)


def test_served_images_are_what_their_bytes_say_and_uploads_mend_a_torn_file(ui, probe):
    from PIL import Image

    base, runs = ui
    poly = probe.parent / "poly.html"  # a GIF whose name says HTML, with a script after the image
    Image.new("RGB", (64, 64), "white").save(poly, format="GIF")
    poly.write_bytes(poly.read_bytes() + b"<script>alert(document.domain)</script>")
    run_id = start(base, path=str(poly), question="?", model="scripted:" + str(_answer_script(probe.parent)))
    follow(base, run_id)
    image = httpx.get(f"{base}/api/runs/{run_id}/image")
    assert image.headers["content-type"] == "image/gif" and image.headers["x-content-type-options"] == "nosniff"
    events = httpx.get(f"{base}/api/runs/{run_id}/events", params={"from": "\u00b2"})
    assert events.status_code == 200  # a stray Last-Event-ID replays from the start, not a 500
    data = probe.read_bytes()
    first = httpx.post(f"{base}/api/images", content=data).json()["id"]
    torn = runs / "uploads" / first
    torn.write_bytes(data[: len(data) // 2])  # what a crash mid-write leaves
    assert httpx.post(f"{base}/api/images", content=data).json()["id"] == first
    assert torn.read_bytes() == data


def test_a_run_whose_save_fails_ends_failed_and_the_vote_counts_numbers(tmp_path, probe):
    script = _answer_script(probe.parent)
    taken = tmp_path / "runs-is-a-file"
    taken.write_text("")
    app = build_app(AskConfig(model=f"scripted:{script}"), runs=taken, allow=[probe.parent])
    with app_server(app) as base:
        base = base.removesuffix("/v1")
        events = follow(base, start(base, path=str(probe), question="How many?"), timeout=30)
        assert events[-1]["type"] == "failed" and "runs-is-a-file" in events[-1]["error"]  # not running forever
        assert httpx.get(f"{base}/health").json()["runs"] == 0
    ok = build_app(AskConfig(model=f"scripted:{script}"), runs=tmp_path / "runs", allow=[probe.parent])
    with app_server(ok) as base:
        base = base.removesuffix("/v1")
        done = follow(base, start(base, path=str(probe), question="How many?", samples=3))[-1]
        assert done["vote"]["answer"] == "12" and done["vote"]["agree"] == 3  # the page no longer picks a key


def test_a_run_that_fails_midway_keeps_its_turns_in_the_history(tmp_path, probe, monkeypatch):
    from glimpse.models.scripted import ScriptedBackend

    script = probe.parent / "zoom-then-answer.json"
    script.write_text(json.dumps([[zoom([0.1, 0.1, 0.6, 0.6]), "<answer>x</answer>"]]))
    real, calls = ScriptedBackend.generate, []

    async def breaks_on_the_second_turn(self, messages, params):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("the policy broke")
        return await real(self, messages, params)

    monkeypatch.setattr(ScriptedBackend, "generate", breaks_on_the_second_turn)
    app = build_app(AskConfig(model=f"scripted:{script}"), runs=tmp_path / "runs", allow=[probe.parent])
    with app_server(app) as base:
        base = base.removesuffix("/v1")
        events = follow(base, start(base, path=str(probe), question="?"), timeout=30)
        assert events[-1]["type"] == "failed" and "the policy broke" in events[-1]["error"]
        (row,) = httpx.get(f"{base}/api/history").json()
        assert row["status"] == "failed" and row["stop_reasons"] == ["error"]
    (saved,) = load_jsonl(tmp_path / "runs" / f"{row['id']}.jsonl")
    assert [t.kind for t in saved.turns] == ["zoom"] and "the policy broke" in saved.error


def _answer_script(folder: Path) -> Path:
    script = folder / "answer.json"
    script.write_text(json.dumps(["<answer>12</answer>"]))
    return script


def test_cross_site_requests_are_refused(ui):
    base, _ = ui
    assert httpx.get(f"{base}/api/defaults").status_code == 200
    evil = httpx.post(f"{base}/api/runs", json={"question": "?"}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    rebound = httpx.get(f"{base}/api/defaults", headers={"Host": "evil.example"})
    assert rebound.status_code == 403


def test_the_api_key_stays_on_the_server(tmp_path, probe):
    seen: list[dict] = []

    async def chat(request: Request):
        seen.append(dict(request.headers))
        return JSONResponse(
            {
                "choices": [{"index": 0, "message": {"content": "<answer>x</answer>"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        )

    fake = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/health", lambda _: PlainTextResponse("ok")),
        ]
    )
    with app_server(fake) as configured, app_server(fake) as typed:
        cfg = AskConfig(model="openai:m", base_url=configured, api_key="sk-very-secret")
        with app_server(build_app(cfg, runs=tmp_path / "runs", allow=[probe.parent])) as base:
            base = base.removesuffix("/v1")
            defaults = httpx.get(f"{base}/api/defaults").text
            first = follow(base, start(base, path=str(probe), question="?"))
            second = follow(base, start(base, path=str(probe), question="?", base_url=typed))
            page = httpx.get(base + "/").text + httpx.get(base + "/static/ui.js").text
    assert seen[0]["authorization"] == "Bearer sk-very-secret"
    assert "authorization" not in seen[1]  # a URL typed in the page never gets the server's key
    for text in (defaults, json.dumps(first), json.dumps(second), page):
        assert "sk-very-secret" not in text
    assert first[-1]["vote"]["answer"] == second[-1]["vote"]["answer"] == "x"
    saved = (tmp_path / "runs").glob("*.json")
    assert all("sk-very-secret" not in p.read_text() for p in saved)


def test_glimpse_ui_command_takes_the_ask_config_and_warns_off_loopback(tmp_path):
    config = tmp_path / "ask.yaml"
    config.write_text("model: expert\neffort: high\nsamples: 3\nprotocol: tools\n")
    for host, local in (("127.0.0.1", True), ("0.0.0.0", False)):
        port = free_port()
        args = ["ui", "--config", str(config), "--host", host, "--port", str(port), "--runs", str(tmp_path / "runs")]
        proc = subprocess.Popen(
            [sys.executable, "-m", "glimpse", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc)
            defaults = httpx.get(f"http://127.0.0.1:{port}/api/defaults").json()
        finally:
            proc.terminate()
            output = proc.communicate(timeout=10)[0]
        assert (defaults["model"], defaults["effort"], defaults["samples"], defaults["protocol"]) == (
            "expert",
            "high",
            3,
            "tools",
        )
        assert defaults["local_paths"] is local
        assert f"glimpse ui at http://{host}:{port}/" in output
        assert ("not on loopback" in output) is not local, output


# ------------------------------------------------------------------------------------------- in a real browser
def open_ui(browser, base):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda d: errors.append(f"dialog: {d.message}"))
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('model').value !== ''")
    return page, errors


# The page's state at every change, recorded in the page itself: what the test asserts about intermediate states
# does not depend on how quickly the test process looks.
RECORDER = """
(() => {
  window.__states = [];
  const snap = () => {
    const live = document.querySelector('.column .turn.live');
    window.__states.push({
      cards: document.querySelectorAll('.column .turn:not(.live)').length,
      crops: document.querySelectorAll('.column .turn.zoom figure.crop canvas').length,
      boxes: document.querySelectorAll('.original-wrap svg rect.zoom-box').length,
      liveTurn: live ? Number(live.dataset.turn) : null,
      liveText: live ? live.querySelector('pre.stream').textContent : '',
      status: (document.getElementById('status') || {}).textContent || '',
    });
  };
  new MutationObserver(snap).observe(document.getElementById('live'),
    { childList: true, subtree: true, characterData: true });
})();
"""


def test_live_page_shows_turns_as_they_happen(browser, tmp_path, probe, scripted_server):
    cfg = AskConfig(model="expert")
    with app_server(build_app(cfg, runs=tmp_path / "runs", allow=[probe.parent])) as base:
        page, errors = open_ui(browser, base.removesuffix("/v1"))
        page.set_input_files("#file", str(probe))
        page.wait_for_selector("#drop-label img")
        page.fill("#question", "What does the sign say?")
        page.fill("#model", "openai:scripted")
        page.fill("#base-url", scripted_server)
        page.evaluate(RECORDER)
        page.click("#run")
        page.wait_for_selector("#vote .vote", timeout=60_000)
        states = page.evaluate("window.__states")
        # 1. The first thought streamed in, piece by piece, before its turn was done.
        first = [s for s in states if s["cards"] == 0 and s["liveTurn"] == 0]
        assert len({s["liveText"] for s in first}) > 10
        assert any(s["liveText"].startswith("<think>First I scan") and "step29" not in s["liveText"] for s in first)
        # 2. Turn 1 arrived with its box on the original and its crop while the run went on and turn 2 streamed.
        assert any(
            s["cards"] == 1 and s["crops"] == 1 and s["boxes"] == 1 and s["status"] == "running…" for s in states
        )
        assert any(s["cards"] == 1 and s["liveTurn"] == 1 and s["liveText"] for s in states)
        # 3. Turns only ever arrived in order, one at a time, and the run ended with three.
        cards = [s["cards"] for s in states]
        assert cards == sorted(cards) and set(cards) == {0, 1, 2, 3}
        assert page.inner_text(".turn.zoom[data-turn='0'] .chain") == "original → observation 1"
        assert page.inner_text(".turn.zoom[data-turn='1'] .chain") == "original → observation 1 → observation 2"
        assert page.locator(".original-wrap svg rect.zoom-box").count() == 2
        assert page.inner_text("#status") == "finished"
        assert page.inner_text("#answer") == HOSTILE  # shown as text, never run
        assert page.locator(".turn.live").count() == 0 and page.locator(".column .turn").count() == 3
        assert page.evaluate("window.__pwned === undefined") and page.locator("img[src='x']").count() == 0
        size = page.evaluate(
            "(() => { const c = document.querySelector('.turn.zoom figure.crop canvas');"
            " return [c.width, c.height]; })()"
        )
        assert min(size) > 50
        # 4. The saved run reopens in the viewer's trajectory page.
        page.wait_for_selector("#history li a")
        with page.context.expect_page() as opened:
            page.click("#history li a")
        viewer = opened.value
        viewer.wait_for_selector(".turn.zoom figure.crop canvas")
        assert viewer.locator(".turn").count() == 3
        if os.environ.get("GLIMPSE_UI_SCREENSHOT"):
            page.screenshot(path=os.environ["GLIMPSE_UI_SCREENSHOT"], full_page=True)
        assert errors == []


def test_stop_in_the_page_and_samples_in_columns(browser, tmp_path, probe, slow_server):
    cfg = AskConfig(model="openai:scripted", base_url=slow_server)
    runs = tmp_path / "runs"
    with app_server(build_app(cfg, runs=runs, allow=[probe.parent])) as base:
        page, errors = open_ui(browser, base.removesuffix("/v1"))
        page.fill("#path", str(probe))
        page.fill("#question", "?")
        page.fill("#samples", "2")
        page.click("#run")
        page.wait_for_selector(".column[data-sample='1'] .turn.zoom[data-turn='0']")
        assert page.locator(".columns > .column").count() == 2
        page.reload()  # the page follows the same run again: its events replay
        page.wait_for_selector(".column[data-sample='1'] .turn.zoom[data-turn='0']")
        assert page.inner_text("#status") == "running…"
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        (saved,) = runs.glob("*.jsonl")
        trajs = load_jsonl(saved)
        assert [t.stop_reason for t in trajs] == ["cancelled", "cancelled"] and all(len(t.turns) < 3 for t in trajs)
        page.wait_for_selector("#history li")
        assert "stopped" in page.inner_text("#history li")
        time.sleep(0.2)
        assert errors == []


def test_code_turns_and_the_images_code_made_show_live(browser, tmp_path, probe):
    code = (
        "img = images['original_image']\nshow(img.rotate(90, expand=True).resize((300, 200)))\nprint('made', img.size)"
    )
    script = probe.parent / "code-script.json"
    script.write_text(json.dumps([[f"<python>{code}</python>", "<answer>done</answer>"]]))
    cfg = AskConfig(model=f"scripted:{script}", code=True, sandbox="process")
    with app_server(build_app(cfg, runs=tmp_path / "runs", allow=[probe.parent])) as base:
        page, errors = open_ui(browser, base.removesuffix("/v1"))
        page.fill("#path", str(probe))
        page.fill("#question", "?")
        assert page.is_checked("#code")
        page.click("#run")
        page.wait_for_selector(".turn.code pre.code-output")
        assert "made (" in page.inner_text(".turn.code pre.code-output")
        page.wait_for_function("document.querySelector('img.made') && document.querySelector('img.made').complete")
        assert page.evaluate("document.querySelector('img.made').naturalWidth") == 300
        page.wait_for_selector("#vote .vote")
        assert page.inner_text("#answer") == "done"
        assert errors == []


def test_expert_in_the_page_with_a_dropped_image_and_two_samples(browser, tmp_path, probe):
    with app_server(build_app(AskConfig(model="expert", max_turns=6), runs=tmp_path / "runs", allow=[])) as base:
        page, errors = open_ui(browser, base.removesuffix("/v1"))
        data = base64.b64encode(probe.read_bytes()).decode()
        page.evaluate(  # drag and drop, as a file dragged from the desktop arrives
            """(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], 'probe.jpg', { type: 'image/jpeg' }));
                const drop = new DragEvent('drop', { dataTransfer: dt, bubbles: true });
                document.getElementById('drop').dispatchEvent(drop);
            }""",
            data,
        )
        page.wait_for_selector("#drop-label img")
        page.fill("#question", (probe.parent / "question.txt").read_text())
        page.fill("#samples", "2")
        page.click("#run")
        page.wait_for_selector(".column[data-sample='1'] .turn.zoom figure.crop canvas", timeout=60_000)
        page.wait_for_selector("#vote .vote", timeout=120_000)
        assert page.locator(".columns > .column").count() == 2
        answers = page.locator(".column .kv div:nth-child(2)").all_inner_texts()
        vote = page.inner_text("#vote")
        assert "of 2 agree" in vote or "No answer" in vote
        assert len(answers) == 2 and all(a for a in answers)
        assert errors == []
