"""glimpse ui: how soon a turn shows in the page after the model's last token, alone and with 8 runs at once.

A scripted model behind ``glimpse serve`` (in this process, with a simulated latency spread over the streamed
chunks) answers two zooms and an answer per run; the UI app runs beside it; Debian's chromium drives the page.
The server stamps the wall-clock time at which it sends each reply's last text chunk; the page stamps the time at
which that reply's last text shows (``text``) and at which its finished turn card is drawn (``turn``, which
includes the zoom tool cutting the crop; ``turn - tool`` subtracts the tool time the record gives). One machine,
one clock. The same measures with 1 run and with ``--runs`` runs started together, in one process.

    python bench/ui_latency.py [--runs 8] [--latency 0.6] [--max-side 1920]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

# Page-side stamps: when the last piece of each turn's text appeared, and when its finished card was drawn.
_OBSERVER = """
(() => {
  window.__stamps = { text: {}, turn: {} };
  const now = () => performance.timeOrigin + performance.now();
  new MutationObserver((records) => {
    const t = now();
    for (const r of records) {
      const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
      const live = el && el.closest && el.closest('.turn.live');
      if (live) {
        const col = live.closest('.column');
        window.__stamps.text[col.dataset.sample + '/' + live.dataset.turn] = t;
      }
      for (const node of r.addedNodes) {
        if (node.nodeType !== 1) continue;
        const cards = node.matches('.turn:not(.live)') ? [node] : [...node.querySelectorAll('.turn:not(.live)')];
        for (const card of cards) {
          const key = card.closest('.column').dataset.sample + '/' + card.dataset.turn;
          if (!(key in window.__stamps.turn)) window.__stamps.turn[key] = t;
        }
      }
    }
  }).observe(document.getElementById('live'), { childList: true, subtree: true, characterData: true });
})();
"""


# A stream chunk carrying text (not the empty role chunk).
_TEXT = re.compile(rb'"content": ?"[^"]')


# Each run has its own tab, as if on its own screen: Chromium must not slow the tabs that are not in front.
BROWSER_FLAGS = [
    "--no-sandbox",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
# text: the turn's last text shown; turn: its card drawn, split into the loop's part (the reply read, the tool
# run, the event published) and the page's part (the event received and the card drawn).
MEASURES = ("text", "turn", "turn - tool", "  loop", "  page")


class LastChunkClock:
    """ASGI middleware over glimpse serve: the time each reply's last text chunk was sent, by (question, turn)."""

    def __init__(self, app: Any):
        self.app = app
        self.sent: dict[tuple[str, int], float] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        body = b""

        async def read() -> Any:
            nonlocal body
            message = await receive()
            body += message.get("body", b"")
            return message

        last = 0.0

        async def write(message: Any) -> None:
            nonlocal last
            await send(message)
            if message["type"] == "http.response.body" and _TEXT.search(message.get("body", b"")):
                last = time.time()

        await self.app(scope, read, write)
        request = json.loads(body)
        first = next(m for m in request["messages"] if m["role"] == "user")["content"]
        text = first if isinstance(first, str) else " ".join(p.get("text", "") for p in first)
        turn = sum(m["role"] == "assistant" for m in request["messages"])
        self.sent[(text, turn)] = last

    def at(self, question: str, turn: int) -> float:
        """When the last text chunk of reply ``turn`` to the conversation asking ``question`` was sent."""
        return next(t for (text, k), t in self.sent.items() if k == turn and question in text)


def measure(browser: Any, ui: str, clock: LastChunkClock, probe: Path, runs: int, tag: str) -> dict[str, list[float]]:
    pages = []
    for i in range(runs):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(ui + "/")
        page.wait_for_function("document.getElementById('model').value !== ''")
        page.fill("#path", str(probe))
        page.fill("#question", f"{tag} run {i}: what does the sign say?")
        page.evaluate(_OBSERVER)
        pages.append(page)
    started = time.perf_counter()
    for page in pages:
        page.click("#run")
    for page in pages:
        page.wait_for_function("(document.getElementById('status') || {}).textContent === 'finished'", timeout=300_000)
    wall = time.perf_counter() - started
    out: dict[str, list[float]] = {k: [] for k in MEASURES}
    out["wall"] = [wall]
    for i, page in enumerate(pages):
        stamps = page.evaluate("window.__stamps")
        saved = Path(page.inner_text("#vote").rsplit("saved to ", 1)[1].strip())
        record = json.loads(saved.read_text().splitlines()[0])
        with httpx.stream("GET", f"{ui}/api/runs/{saved.stem}/events", timeout=30) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith('data: {"')]
        published = {len(e["trajectory"]["turns"]) - 1: e["at"] * 1000 for e in events if e["type"] == "turn"}
        question = f"{tag} run {i}: what does the sign say?"
        for turn in record["turns"]:
            sent = clock.at(question, turn["index"]) * 1000
            key = f"0/{turn['index']}"
            if key in stamps["text"]:
                out["text"].append(stamps["text"][key] - sent)
            if key in stamps["turn"]:
                out["turn"].append(stamps["turn"][key] - sent)
                out["turn - tool"].append(stamps["turn"][key] - sent - 1000 * turn["tool_s"])
                out["  loop"].append(published[turn["index"]] - sent)
                out["  page"].append(stamps["turn"][key] - published[turn["index"]])
        page.close()
    return out


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered):7.1f} ms   p95 {p95:7.1f} ms   (n={len(ordered)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="runs started together in the second measurement")
    parser.add_argument("--latency", type=float, default=0.6, help="simulated seconds per reply")
    parser.add_argument("--max-side", type=int, default=0, help="shrink the probe to this longest side (0: as made)")
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from playwright.sync_api import sync_playwright

    from conftest import app_server
    from glimpse.config import AskConfig
    from glimpse.models.scripted import ScriptedBackend
    from glimpse.probes.synth import make_probe
    from glimpse.serve import build_app as serve_app
    from glimpse.ui import build_app as ui_app

    def zoom(box: list[float], source: str) -> str:
        thought = " ".join(f"word{i}" for i in range(40))
        return f"<think>{thought}</think><grounding>{json.dumps({'bbox_2d': box, 'source': source})}</grounding>"

    script = [
        zoom([0.1, 0.1, 0.6, 0.6], "original_image"),
        zoom([0.2, 0.2, 0.8, 0.8], "observation_1"),
        "<think>found it</think><answer>A7</answer>",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.jpg"
        image = make_probe("medium", 0, seed=11).image
        if args.max_side:
            image.thumbnail((args.max_side, args.max_side))
        image.save(probe, quality=90)
        size = image.size
        clock = LastChunkClock(serve_app(ScriptedBackend([script]), latency=args.latency))
        with app_server(clock) as model_url:
            ask = AskConfig(model="openai:scripted", base_url=model_url)
            with app_server(ui_app(ask, runs=Path(tmp) / "runs", allow=[tmp])) as ui_url:
                ui = ui_url.removesuffix("/v1")
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_FLAGS)
                    measure(browser, ui, clock, probe, 1, "warm-up")
                    alone = measure(browser, ui, clock, probe, 1, "alone")
                    for _ in range(2):  # three single runs for more samples of the baseline
                        more = measure(browser, ui, clock, probe, 1, f"alone{_}")
                        for k in MEASURES:
                            alone[k] += more[k]
                    together = measure(browser, ui, clock, probe, args.runs, "together")
                    browser.close()
    print(
        f"glimpse ui: last token at the server -> shown in the page ({args.latency:.1f} s simulated per reply, "
        f"{size[0]}x{size[1]} image)"
    )
    for name, got in (("1 run", alone), (f"{args.runs} runs at once", together)):
        print(f"  {name}")
        for k in MEASURES:
            print(f"    {k:12s} {summary(got[k])}")
    ratio = together["wall"][0] / (alone["wall"][0])
    print(f"  wall time of {args.runs} runs at once / of 1 run: {ratio:.2f}x (1.00 would be perfect overlap)")


if __name__ == "__main__":
    main()
