"""The viewer on a large run: build a report of 10,000 trajectories and time it in headless Chromium.

Makes a real run of a few probes with the oracle, then copies its trajectories (new ids, the same images) up to
``--n`` trajectories, builds the report, and measures in Debian's chromium: page load until the first rows
show, a text search over all rows, and opening a trajectory page.

    python bench/viewer_scale.py [--n 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

from glimpse.config import EvalConfig
from glimpse.eval.harness import run_eval
from glimpse.view import build_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="trajectories in the report")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        asyncio.run(run_eval(EvalConfig(data="probes:medium:20:4", model="oracle", out=str(run))))
        lines = (run / "trajectories.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
        with (run / "trajectories.jsonl").open("w") as fh:
            for i in range(args.n):
                r = dict(records[i % len(records)])
                r["sample"] = dict(r["sample"], id=f"{r['sample']['id']}/copy{i}")
                r["id"] = f"{r['sample']['id']}#0"
                fh.write(json.dumps(r) + "\n")
        started = time.perf_counter()
        report = build_report(run)
        build_s = time.perf_counter() - started
        size = sum(f.stat().st_size for f in (report / "data").rglob("*") if f.is_file())
        chromium = shutil.which("chromium")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            started = time.perf_counter()
            page.goto((report / "index.html").as_uri())
            page.wait_for_selector("#rows tbody tr")
            open_s = time.perf_counter() - started
            started = time.perf_counter()
            page.fill("#search", "copy999")
            page.wait_for_function("document.getElementById('count').textContent.startsWith('11 of')")
            search_s = time.perf_counter() - started
            started = time.perf_counter()
            page.click("#rows tbody tr >> nth=0")
            page.wait_for_selector(".turn canvas")
            page_s = time.perf_counter() - started
            browser.close()
    print(f"viewer with {args.n:,} trajectories ({size / 1e6:.0f} MB of data, 20 distinct images):")
    print(f"  build the report:            {build_s:6.2f} s")
    print(f"  open it until the rows show: {open_s:6.2f} s")
    print(f"  search all rows:             {search_s:6.2f} s")
    print(f"  open a trajectory page:      {page_s:6.2f} s")


if __name__ == "__main__":
    main()
