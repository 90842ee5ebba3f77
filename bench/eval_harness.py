"""Figures of the evaluation harness: throughput, probe generation, resume overhead.

1. Eval throughput: ``run_eval`` (dataset loading, option shuffling, the agent loop, scoring, appending results)
   at concurrency 128 against ``glimpse serve`` simulating 2 s ± 50 % per request; each question takes four
   requests (three nested zooms and an answer). Steady-state questions per second and the share of the
   zero-overhead ideal (computed as in ``harness_overhead.py``).
2. Probe generation: images per second, written to disk as JPEG, for the easy level (scenes of about 4K) and
   the others, with one worker process and with all cores.
3. Resume overhead: the time a resumed 10,000-question run spends before running anything (loading the
   dataset, reading and compacting a results file with 5,000 finished trajectories, finding what is left).

    python bench/eval_harness.py [--skip throughput,probes,resume]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from glimpse.config import EvalConfig
from glimpse.eval.harness import RESULTS, ResultStore, Unit, run_eval
from glimpse.eval.options import present
from glimpse.probes.synth import write_probes
from harness_overhead import SCRIPT, TURNS, free_port, ideal_rate, make_images, steady_rate


def questions_file(folder: Path, images: list[Path], n: int) -> Path:
    rows = [
        {
            "images": [str(images[i % len(images)].relative_to(folder))],
            "problem": f"<image>\nQuestion {i}?\n(A) w\n(B) x\n(C) y\n(D) z",
            "solution": "ABCD"[i % 4],
            "data_source": "bench",
            "doc_id": i,
        }
        for i in range(n)
    ]
    path = folder / "val.json"
    path.write_text(json.dumps(rows))
    return path


def throughput(concurrency: int, latency: float, jitter: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = make_images(folder, 32, 1920, 1080)
        count = 6 * concurrency
        data = questions_file(folder, images, count)
        script = folder / "script.json"
        script.write_text(json.dumps(SCRIPT))
        port = free_port()
        low, spread = latency * (1 - jitter), 2 * latency * jitter
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "glimpse",
                "serve",
                "--model",
                f"scripted:{script}",
                "--port",
                str(port),
                "--latency",
                str(low),
                "--jitter",
                str(spread),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            cfg = EvalConfig(
                data=f"minio3:{data}",
                model="openai:bench",
                base_url=f"http://127.0.0.1:{port}/v1",
                out=str(folder / "run"),
                concurrency=concurrency,
                max_turns=str(TURNS),
                timeout=120,
            )
            done: list[float] = []
            started = time.perf_counter()
            run = asyncio.run(run_eval(cfg, on_progress=lambda *_: done.append(time.perf_counter() - started)))
        finally:
            server.terminate()
            server.wait(timeout=10)
    rate, ideal = steady_rate(sorted(done), concurrency), ideal_rate(concurrency, count, latency, jitter)
    errors = run.summaries[TURNS]["backend_errors"]
    print(
        f"eval throughput, concurrency {concurrency}, {count} questions, {TURNS} requests each, latency "
        f"{latency} s ± {jitter:.0%}: {rate:.2f} questions/s, ideal {ideal:.2f}: {rate / ideal:.1%} of ideal"
        + (f" ({errors} backend errors!)" if errors else "")
    )


def probes(n: int) -> None:
    for level in ("easy", "medium", "hard"):
        for workers in (1, os.cpu_count() or 1):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                write_probes(tmp, level, n, seed=1, workers=workers)
                seconds = time.perf_counter() - started
            print(
                f"probe generation, {level}, {workers} worker(s): {n / seconds:.2f} images/s "
                f"({n} images in {seconds:.1f} s, written as JPEG)"
            )


def resume(total: int) -> None:
    from glimpse.eval.datasets import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = make_images(folder, 4, 640, 480)
        data = questions_file(folder, images, total)
        out = folder / "run"
        cfg = EvalConfig(data=f"minio3:{data}", model="oracle", out=str(out), max_turns="4", limit=4)
        asyncio.run(run_eval(cfg))  # a real trajectory to copy
        template = json.loads((out / RESULTS).read_text().splitlines()[0])
        lines = []
        for i in range(total // 2):
            record = dict(template, id=f"{data.parent.name}/{i}#0")
            record["sample"] = dict(template["sample"], id=f"{data.parent.name}/{i}")
            lines.append(json.dumps(record))
        (out / RESULTS).write_text("\n".join(lines) + "\n")
        size = (out / RESULTS).stat().st_size
        started = time.perf_counter()
        dataset = load_dataset(f"minio3:{data}")
        store = ResultStore(out / RESULTS)
        store.open(drop=lambda r: False)
        units = [Unit(present(s, 0), 0, 4) for s in dataset.samples]
        pending = [u for u in units if u.key not in store.done]
        seconds = time.perf_counter() - started
    print(
        f"resume overhead: {seconds:.2f} s to load {total:,} questions, read {len(store.done):,} finished "
        f"trajectories ({size / 1e6:.0f} MB) and find the {len(pending):,} left"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: throughput, probes, resume")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--jitter", type=float, default=0.5)
    parser.add_argument("--probes", type=int, default=12, help="probes generated per level and setting")
    parser.add_argument("--resume-total", type=int, default=10_000)
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    if "probes" not in skip:
        probes(args.probes)
    if "resume" not in skip:
        resume(args.resume_total)
    if "throughput" not in skip:
        throughput(args.concurrency, args.latency, args.jitter)


if __name__ == "__main__":
    main()
