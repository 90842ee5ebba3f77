"""The trajectory viewer: the data it embeds, and the report driven in a real headless Chromium.

The browser tests use Debian's ``chromium`` through Playwright's Python package. Without a Chromium they are
skipped, unless ``GLIMPSE_REQUIRE_BROWSER=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from glimpse.config import EvalConfig
from glimpse.errors import ConfigError
from glimpse.eval.harness import run_eval
from glimpse.view import build_report
from glimpse.view.server import make_server

pytestmark = pytest.mark.slow


def read_js(path: Path, prefix: str):
    text = path.read_text(encoding="utf-8")
    assert text.startswith(prefix)
    return json.loads(text[len(prefix) :].rstrip().rstrip(";"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An oracle run and a direct run on the same probes (target boxes known), with a sweep."""
    root = tmp_path_factory.mktemp("view-runs")
    common = dict(data="probes:easy:6:21", max_turns="2,6", k=1)
    asyncio.run(run_eval(EvalConfig(model="oracle", out=str(root / "oracle"), **common)))
    asyncio.run(run_eval(EvalConfig(model="direct", out=str(root / "direct"), **common)))
    return root


@pytest.fixture(scope="module")
def report(runs):
    return build_report(runs / "oracle", compare=runs / "direct")


def test_embedded_data(runs, report):
    index = read_js(report / "data" / "index.js", "GLIMPSE.index = ")
    assert len(index) == 6 and [r["i"] for r in index] == list(range(6))
    assert {r["ok"] for r in index} == {True}
    assert all(r["b"] is not None and r["b"] >= 6 for r in index)
    direct = [json.loads(line) for line in (runs / "direct" / "trajectories.jsonl").read_text().splitlines()]
    assert sum(r["b_ok"] is True for r in index) == sum(d["score"]["correct"] is True for d in direct)
    assert all(r["level"] == "easy" and r["cat"] and r["thumb"] for r in index)
    run_data = read_js(report / "data" / "run.js", "window.GLIMPSE = window.GLIMPSE || {};\nGLIMPSE.runs = ")
    assert [r["count"] for r in run_data] == [6, 6] and run_data[0]["sweep"] == "img/sweep-0.png"
    assert run_data[0]["summary"]["caps"]["6"]["accuracy"]["avg"] == 1.0
    first = (report / "data" / "traj" / "0.js").read_text()
    assert first.startswith("GLIMPSE.loaded(0, ") and first.rstrip().endswith(");")
    record = json.loads(first[len("GLIMPSE.loaded(0, ") :].rstrip()[:-2])
    assert record["view"]["src"].startswith("img/orig/") and record["turns"][0]["crop_box_px"]
    assert len(list((report / "data" / "traj").glob("*.js"))) == 12


def test_originals_are_linked_once_and_thumbnails_small(runs, report):
    originals = list((report / "img" / "orig").iterdir())
    assert len(originals) == 6  # six probes, shared by both runs
    record = json.loads((runs / "oracle" / "trajectories.jsonl").read_text().splitlines()[0])
    source = Path(record["image"]["path"])
    linked = report / "img" / "orig" / f"{record['image']['sha256'][:16]}.jpg"
    assert linked.read_bytes() == source.read_bytes()
    for thumb in (report / "img" / "thumb").iterdir():
        assert max(Image.open(thumb).size) <= 256


def test_rotated_and_missing_originals(tmp_path):
    stored = Image.new("RGB", (300, 120), (200, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    stored.save(path, exif=exif.tobytes())
    from glimpse.agent import AgentLoop
    from glimpse.models.scripted import ScriptedBackend
    from glimpse.trajectory import Sample, save_jsonl

    loop = AgentLoop(ScriptedBackend([["<answer>red</answer>"]]))
    (t,) = asyncio.run(loop.run(Sample(id="r", images=[str(path)], question="?")))
    (gone,) = asyncio.run(loop.run(Sample(id="g", images=[str(path)], question="?")))
    gone = gone.model_copy(
        update={"image": gone.image.model_copy(update={"path": str(tmp_path / "moved.jpg"), "sha256": "f" * 64})}
    )
    save_jsonl([t, gone], tmp_path / "ask.jsonl")
    folder = build_report(tmp_path / "ask.jsonl", tmp_path / "report")
    (orig,) = list((folder / "img" / "orig").iterdir())
    assert orig.suffix == ".png" and Image.open(orig).size == (120, 300)  # re-encoded upright
    records = [
        json.loads(p.read_text()[len(f"GLIMPSE.loaded({p.stem}, ") :].rstrip()[:-2])
        for p in sorted((folder / "data" / "traj").glob("*.js"))
    ]
    assert records[0]["view"]["src"] and records[1]["view"]["src"] is None
    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "nothing")


def test_a_hostile_record_reaches_nothing_outside_the_report(tmp_path):
    """A trajectories file may say anything: a hash that is a path, a made image that is /etc/passwd or a folder,
    an original too large to decode. The report is built from what is safe, and nothing lands outside it."""
    from glimpse.agent import AgentLoop
    from glimpse.models.scripted import ScriptedBackend
    from glimpse.trajectory import MadeImage, Sample, save_jsonl

    path = tmp_path / "a.png"
    Image.new("RGB", (60, 40), "red").save(path)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (15_000, 15_000)).save(bomb)  # 225 megapixels: over Pillow's decompression-bomb limit
    loop = AgentLoop(ScriptedBackend([["<answer>x</answer>"]]))
    made = [
        MadeImage(observation_index=1, path="/etc/passwd", sha256="ab" * 32, width=1, height=1, shown_size=[1, 1]),
        MadeImage(observation_index=2, path=str(tmp_path), sha256="cd" * 32, width=1, height=1, shown_size=[1, 1]),
        MadeImage(observation_index=3, path=str(path), sha256="../../../escMADE", width=1, height=1, shown_size=[1, 1]),
    ]
    records = []
    for i, (image, sha) in enumerate(((path, "../../../escORIG"), (path, "/tmp/escABS"), (bomb, "e" * 64))):
        (t,) = asyncio.run(loop.run(Sample(id=f"s{i}", images=[str(path)], question="?", answer="x")))
        t = t.model_copy(update={"image": t.image.model_copy(update={"sha256": sha, "path": str(image)})})
        t.turns[0].made = made
        records.append(t)
    save_jsonl(records, tmp_path / "hostile.jsonl")
    before = set(tmp_path.rglob("*"))
    folder = build_report(tmp_path / "hostile.jsonl", tmp_path / "report")
    outside = {p for p in set(tmp_path.rglob("*")) - before if folder not in p.parents and p != folder}
    assert not outside and not list(Path("/tmp").glob("escABS*"))
    assert not (folder / "img" / "made").exists() or not list((folder / "img" / "made").iterdir())
    assert not (folder / "img" / "orig").exists() or not list((folder / "img" / "orig").iterdir())


# ------------------------------------------------------------------------------------------- in a real browser
def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("#rows tbody tr")
    return page, errors


def rows(page) -> int:
    return page.locator("#rows tbody tr").count()


def test_report_in_chromium_from_disk(browser, report, tmp_path):
    page, errors = open_page(browser, (report / "index.html").resolve().as_uri())
    assert rows(page) == 6
    assert page.locator("table.summary tbody tr").count() == 4  # two runs, caps 2 and 6 each
    assert page.locator("img.plot").count() == 2  # both runs were sweeps
    page.select_option("#filters select >> nth=0", "wrong")  # status: wrong
    assert rows(page) == 0
    page.select_option("#filters select >> nth=0", "all")
    direct_right = page.evaluate("GLIMPSE.index.filter(r => r.b_ok === true).length")
    page.locator("#filters select", has_text="A right, B not").select_option("a_only")
    assert rows(page) == 6 - direct_right
    page.locator("#filters select", has_text="A right, B not").select_option("all")
    first_id = page.locator("#rows tbody tr >> nth=2").get_attribute("data-i")
    sample = page.evaluate(f"GLIMPSE.index[{first_id}].id")
    page.fill("#search", sample)
    assert rows(page) == 1
    page.click("#rows tbody tr")
    page.wait_for_selector(".turn canvas")
    page.wait_for_function(
        "document.querySelectorAll('img.original').length === 2 && "
        "[...document.querySelectorAll('img.original')].every(i => i.complete)"
    )
    assert page.locator(".column").count() == 2  # oracle and direct side by side
    assert page.locator(".original-wrap svg rect.zoom-box").count() >= 1
    assert page.locator(".original-wrap svg rect.gold-box").count() >= 2
    assert page.locator(".turn.zoom figure canvas").count() >= 2  # the source with its box, and the crop
    assert page.locator(".turn.zoom .chain").first.inner_text() == "original → observation 1"
    size = page.evaluate(
        "(() => { const c = document.querySelector('.turn.zoom figure.crop canvas'); return [c.width, c.height]; })()"
    )
    assert min(size) > 50
    page.screenshot(path=str(tmp_path / "trajectory.png"), full_page=True)
    assert (tmp_path / "trajectory.png").stat().st_size > 20_000
    page.go_back()
    page.wait_for_selector("#rows tbody tr")
    assert errors == []


def test_report_served_over_http(browser, report):
    server = make_server(report, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        page, errors = open_page(browser, f"http://{host}:{port}/")
        assert rows(page) == 6
        page.click("#rows tbody tr >> nth=0")
        page.wait_for_selector(".turn canvas")
        assert errors == []
    finally:
        server.shutdown()
        server.server_close()


def test_code_turns_in_the_report(browser, tmp_path):
    from glimpse.agent import AgentLoop
    from glimpse.models.scripted import ScriptedBackend
    from glimpse.trajectory import Sample, save_jsonl

    Image.new("RGB", (640, 480), (30, 120, 200)).save(tmp_path / "img.png")
    code = "img = images['original_image']\nshow(img.rotate(90, expand=True))\nprint('turned', img.size)"
    loop = AgentLoop(
        ScriptedBackend([[f"<python>{code}</python>", "<answer>blue</answer>"]]), code=True, sandbox="process"
    )
    sample = Sample(id="code", images=[str(tmp_path / "img.png")], question="Colour?")
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API keeps an event loop running in this thread
        trajs = pool.submit(asyncio.run, loop.run(sample)).result()
    save_jsonl(trajs, tmp_path / "code.jsonl")
    folder = build_report(tmp_path / "code.jsonl", tmp_path / "report")
    (made,) = list((folder / "img" / "made").iterdir())
    assert Image.open(made).size == (480, 640)
    page, errors = open_page(browser, (folder / "index.html").resolve().as_uri())
    page.click("#rows tbody tr")
    page.wait_for_selector("pre.code")
    assert "show(img.rotate" in page.inner_text("pre.code")
    assert "turned (640, 480)" in page.inner_text("pre.code-output")
    page.wait_for_function("document.querySelector('img.made') && document.querySelector('img.made').complete")
    assert page.evaluate("document.querySelector('img.made').naturalWidth") == 480
    assert errors == []


def test_overview_of_unscored_and_failed_runs(browser, tmp_path):
    """A file with no gold answers (glimpse ask --save) says "not scored", never 0.0 %; a run whose every backend
    call failed shows no accuracy ("–") with the units that ran beside it."""
    from glimpse.agent import AgentLoop
    from glimpse.models.scripted import ScriptedBackend
    from glimpse.trajectory import Sample, Score, save_jsonl

    Image.new("RGB", (320, 240), (30, 120, 200)).save(tmp_path / "img.png")
    loop = AgentLoop(ScriptedBackend([["<answer>blue</answer>"]]))
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API keeps an event loop running in this thread
        sample = Sample(id="a", images=[str(tmp_path / "img.png")], question="?")
        (asked,) = pool.submit(asyncio.run, loop.run(sample)).result()
    save_jsonl([asked], tmp_path / "ask.jsonl")
    failed = asked.model_copy(
        update={
            "sample": asked.sample.model_copy(update={"answer": "blue"}),
            "turns": [],
            "answer": None,
            "stop_reason": "error",
            "error": "BackendError: HTTP 503",
            "score": Score(correct=None, method="backend_error"),
        }
    )
    save_jsonl([failed, failed.model_copy(update={"sample_index": 1})], tmp_path / "down.jsonl")
    for name, cells in (("ask", ["1", "not scored", "not scored", "not scored"]), ("down", ["0 of 2", "–", "–", "–"])):
        folder = build_report(tmp_path / f"{name}.jsonl", tmp_path / f"report-{name}")
        page, errors = open_page(browser, (folder / "index.html").resolve().as_uri())
        row = page.locator("table.summary tbody tr").first.locator("td").all_inner_texts()
        assert row[2:6] == cells, (name, row)
        if name == "down":  # the list names a backend failure as such, not as "not scored"
            page.wait_for_selector("tr.row .badge")
            assert page.locator("tr.row .badge").all_inner_texts()[:2] == ["backend error", "backend error"]
        assert errors == []


def test_two_image_questions_show_each_original_with_its_own_boxes(browser, tmp_path):
    """Each original of a two-image probe gets its own panel, with the zoom cut from it and its gold box;
    turn cards draw each zoom on the image it was cut from."""
    cfg = EvalConfig(model="oracle", out=str(tmp_path / "run"), data="probes:easy:2:3:split_code")
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API keeps an event loop running in this thread
        pool.submit(asyncio.run, run_eval(cfg)).result()
    folder = build_report(tmp_path / "run", tmp_path / "report")
    assert len(list((folder / "img" / "orig").iterdir())) == 4  # two probes, two images each
    record = read_js_record(folder / "data" / "traj" / "0.js")
    assert len(record["view"]["srcs"]) == 2 and record["view"]["srcs"][0] == record["view"]["src"]
    page, errors = open_page(browser, (folder / "index.html").resolve().as_uri())
    page.click("#rows tbody tr >> nth=0")
    page.wait_for_selector(".turn canvas")
    page.wait_for_function(
        "document.querySelectorAll('img.original').length === 2 && "
        "[...document.querySelectorAll('img.original')].every(i => i.complete && i.naturalWidth > 0)"
    )
    panels = page.locator(".original-panel")
    assert panels.count() == 2
    for k in (0, 1):
        panel = page.locator(f".original-panel[data-original='{k}']")
        assert panel.locator("h3").inner_text().startswith(f"image_{k + 1}")
        assert panel.locator("rect.zoom-box").count() == 1 and panel.locator("rect.gold-box").count() == 1
        label = panel.locator("svg text").text_content()
        assert label == str(k + 1)  # observation k + 1 was cut from image k + 1
    chains = page.locator(".turn.zoom .chain").all_inner_texts()
    assert chains == ["image_1 → observation 1", "image_2 → observation 2"]
    captions = page.locator(".turn.zoom figure.crop figcaption").all_inner_texts()
    assert "of image_2" in captions[1]
    assert errors == []


def read_js_record(path: Path) -> dict:
    return json.loads(path.read_text()[len(f"GLIMPSE.loaded({path.stem}, ") :].rstrip()[:-2])
