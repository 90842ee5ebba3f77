"""Make the README's screenshot of ``glimpse ui`` (needs Debian's chromium and the dev extras).

The expert answers the demo's probe with two samples in the live page; the finished run is photographed into
``docs/ui-live.jpg``.

    python docs/ui_screenshot.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from playwright.sync_api import sync_playwright

    from conftest import app_server
    from glimpse.config import AskConfig
    from glimpse.demo import make_probe_demo
    from glimpse.ui import build_app

    with tempfile.TemporaryDirectory() as tmp:
        demo = make_probe_demo(Path(tmp) / "demo")
        app = build_app(AskConfig(model="expert", max_turns=8), runs=Path(tmp) / "runs", allow=[tmp])
        with app_server(app) as base, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(base.removesuffix("/v1") + "/")
            page.wait_for_function("document.getElementById('model').value !== ''")
            page.set_input_files("#file", str(demo.image))
            page.wait_for_selector("#drop-label img")
            page.fill("#question", demo.question)
            page.fill("#samples", "2")
            page.click("#run")
            page.wait_for_selector("#vote .vote", timeout=300_000)
            page.wait_for_timeout(500)
            shot = Path(tmp) / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        image = Image.open(shot).convert("RGB")
        image = image.crop((0, 0, image.width, min(image.height, 1900)))
        image.thumbnail((1100, 1400))
        image.save(HERE / "ui-live.jpg", quality=72, optimize=True)
    print(f"wrote {HERE / 'ui-live.jpg'}")


if __name__ == "__main__":
    main()
