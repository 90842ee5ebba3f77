"""Make the README's screenshots of the viewer (needs Debian's chromium and the dev extras).

A scripted policy searches each probe the way a model would: a wide zoom around the target, one out-of-range
box answered with an error, a nested zoom into the first observation, then the answer. The run is evaluated,
the report built, and two pages photographed into ``docs/``.

    python docs/screenshots.py
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from glimpse.config import EvalConfig
from glimpse.eval.datasets import load_dataset
from glimpse.eval.harness import run_eval
from glimpse.images import oriented_size
from glimpse.models.scripted import ScriptedBackend
from glimpse.view import build_report

DATA = "probes:medium:8:3"
HERE = Path(__file__).parent


def searching_scripts() -> dict[str, list[str]]:
    scripts = {}
    for sample in load_dataset(DATA).samples:
        w, h = oriented_size(sample.images[0])
        x0, y0, x1, y1 = sample.target_boxes[0]
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        win = [max(0.0, cx - 0.12), max(0.0, cy - 0.12), min(1.0, cx + 0.12), min(1.0, cy + 0.12)]
        ww, wh = (win[2] - win[0]) * w, (win[3] - win[1]) * h
        inner = [
            (x0 - 30 - win[0] * w) / ww,
            (y0 - 20 - win[1] * h) / wh,
            (x1 + 30 - win[0] * w) / ww,
            (y1 + 20 - win[1] * h) / wh,
        ]
        inner = [round(min(max(v, 0.0), 1.0), 3) for v in inner]

        def call(box, source):
            return f"<grounding>{json.dumps({'bbox_2d': [round(v, 3) for v in box], 'source': source})}</grounding>"

        scripts[sample.question] = [
            "<think>The signs are specks at this size. I will look around the one that may carry the star.</think>"
            + call(win, "original_image"),
            "<think>One sign in this view has a star. Zooming closer.</think>"
            + call([inner[0], inner[1], inner[2] + 0.9, inner[3]], "observation_1"),
            "<think>That box ran past the edge. Trying again inside the view.</think>" + call(inner, "observation_1"),
            f"<think>The sign is readable now.</think><answer>{sample.answer}</answer>",
        ]
    return scripts


def main() -> None:
    from playwright.sync_api import sync_playwright

    scripts = searching_scripts()

    def policy(messages, params):
        turns = scripts[messages[1].text().strip()]
        return turns[sum(m.role == "assistant" for m in messages)]

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cfg = EvalConfig(data=DATA, model="scripted:searching", out=str(run), max_turns="2,4,8")
        asyncio.run(run_eval(cfg, backend=ScriptedBackend(policy)))
        report = build_report(run)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            page.goto((report / "index.html").as_uri())
            page.wait_for_selector("#rows tbody tr")
            page.wait_for_timeout(500)
            page.screenshot(path=str(HERE / "viewer-overview.png"), full_page=True)  # converted to JPEG below
            page.click("#rows tbody tr >> nth=1")
            page.wait_for_selector(".turn canvas")
            page.wait_for_timeout(800)
            page.screenshot(path=str(HERE / "viewer-trajectory.png"), full_page=True)
            browser.close()
    for name in ("viewer-overview", "viewer-trajectory"):
        png = HERE / f"{name}.png"
        img = Image.open(png).convert("RGB")
        img = img.crop((0, 0, img.width, min(img.height, 2400)))
        img.thumbnail((1100, 2400))
        img.save(HERE / f"{name}.jpg", quality=82, optimize=True)
        png.unlink()
        print(HERE / f"{name}.jpg", img.size)


if __name__ == "__main__":
    main()
