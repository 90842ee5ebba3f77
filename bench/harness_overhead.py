"""Harness overhead: trajectories per second against a server that simulates model latency.

Starts ``glimpse serve`` (scripted backend) as a separate process on loopback; every completion request
takes a simulated latency drawn uniformly from ``L·(1 ± jitter)`` (mean ``L``), as a real server's replies
vary in length. Each trajectory makes three nested zooms and answers: four requests, each carrying every
image so far as a data URL. The openai backend runs many trajectories at concurrency 1, 16 and 64.

The figure is the steady-state rate: completions per second between the ``c``-th completion and the ``c``-th
from last. The ideal is the same statistic for a harness that adds no time at all, computed by simulating
the run (``c`` slots served in order, latencies drawn from the server's distribution) 300 times; it is a
little below ``c / (4 · L)`` because the start, when all ``c`` trajectories begin together, still echoes in
the window. Everything else (decoding, cropping, resizing, encoding, HTTP, JSON, and the server's own
parsing, which shares this machine's cores) shows up as the gap. CPU milliseconds per trajectory, client
and server, are printed too, so the figures can be carried over to a machine with more cores.

    python bench/harness_overhead.py [--latency 2.0] [--jitter 0.5] [--concurrency 1,16,64] [--size 1920x1080]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from glimpse.agent import AgentLoop
from glimpse.models.openai_compat import OpenAIBackend
from glimpse.trajectory import Sample

TURNS = 4
SCRIPT = [
    '<think>search</think><grounding>{"bbox_2d": [0.1, 0.1, 0.6, 0.6], "source": "original_image"}</grounding>',
    '<think>closer</think><grounding>{"bbox_2d": [0.2, 0.2, 0.8, 0.8], "source": "observation_1"}</grounding>',
    '<think>closer</think><grounding>{"bbox_2d": [0.25, 0.25, 0.75, 0.75], "source": "observation_2"}</grounding>',
    "<think>found it</think><answer>42</answer>",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """Photo-like JPEGs: smooth gradients and mild noise, each different."""
    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    paths = []
    for i in range(count):
        base = np.stack([x * 200 + 30 * np.sin(y * (20 + i)), y * 180 + 40 * np.cos(x * (15 + i)), (x + y) * 100], -1)
        arr = np.clip(base + rng.normal(0, 6, size=(height, width, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def process_cpu(pid: int) -> float | None:
    """CPU seconds used so far by another process (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_level(base: str, images: list[Path], concurrency: int, count: int) -> tuple[list[float], int]:
    """Run ``count`` trajectories; return their completion times (seconds from start) and how many answered."""
    backend = OpenAIBackend("bench", base_url=base, max_concurrency=concurrency, timeout=120)
    loop = AgentLoop(backend, max_turns=TURNS)
    samples = [Sample(id=str(i), images=[str(images[i % len(images)])], question="?") for i in range(count)]
    done: list[float] = []
    started = time.perf_counter()
    try:
        results = await loop.run_many(
            samples, concurrency=concurrency, on_done=lambda _: done.append(time.perf_counter() - started)
        )
    finally:
        await backend.aclose()
    return sorted(done), sum(1 for (t,) in results if t.answer == "42")


def steady_rate(done: list[float], concurrency: int) -> float:
    """Completions per second between the c-th completion and the c-th from last."""
    lo, hi = min(concurrency, len(done) // 4), max(len(done) - concurrency, 3 * len(done) // 4)
    return (hi - lo) / (done[hi - 1] - done[lo - 1]) if hi > lo else len(done) / done[-1]


def ideal_rate(concurrency: int, count: int, latency: float, jitter: float, runs: int = 300) -> float:
    """Mean ``steady_rate`` of a zero-overhead harness: trajectories of ``TURNS`` simulated latencies each,
    started in order on ``concurrency`` slots."""
    rng = random.Random(0)
    rates = []
    for _ in range(runs):
        slots = [0.0] * concurrency
        done = []
        for _ in range(count):
            start = heapq.heappop(slots)
            end = start + sum(rng.uniform(latency * (1 - jitter), latency * (1 + jitter)) for _ in range(TURNS))
            done.append(end)
            heapq.heappush(slots, end)
        rates.append(steady_rate(sorted(done), concurrency))
    return sum(rates) / len(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=2.0, help="mean simulated seconds per model request")
    parser.add_argument("--jitter", type=float, default=0.5, help="latency spread: uniform in L·(1 ± jitter)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--per-level", type=int, default=6, help="trajectories per level = this × concurrency")
    parser.add_argument("--images", type=int, default=32, help="distinct original images, cycled")
    parser.add_argument("--size", default="1920x1080", help="original image size")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = make_images(folder, args.images, width, height)
        script = folder / "script.json"
        script.write_text(json.dumps(SCRIPT))
        port = free_port()
        low, spread = args.latency * (1 - args.jitter), 2 * args.latency * args.jitter
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
        base = f"http://127.0.0.1:{port}/v1"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            print(
                f"harness overhead: {TURNS} requests per trajectory, simulated latency {args.latency} s "
                f"± {args.jitter:.0%}, {args.images} distinct {width}×{height} JPEG originals, {os.cpu_count()} cores"
            )
            print(
                f"{'concurrency':>11} {'trajectories':>12} {'traj/s':>8} {'ideal':>8} {'of ideal':>9} "
                f"{'client CPU':>11} {'server CPU':>11}"
            )
            for c in (int(v) for v in args.concurrency.split(",")):
                count = max(8, args.per_level * c)
                cpu0, srv0 = own_cpu(), process_cpu(server.pid)
                done, answered = asyncio.run(run_level(base, images, c, count))
                client_ms = (own_cpu() - cpu0) / count * 1000
                srv1 = process_cpu(server.pid)
                server_ms = f"{(srv1 - srv0) / count * 1000:6.0f} ms" if srv0 is not None and srv1 else "   n/a"
                rate, ideal = steady_rate(done, c), ideal_rate(c, count, args.latency, args.jitter)
                note = "" if answered == count else f"  ({count - answered} not answered!)"
                print(
                    f"{c:>11} {count:>12} {rate:>8.2f} {ideal:>8.2f} {rate / ideal:>8.1%} "
                    f"{client_ms:>7.0f} ms {server_ms:>10}{note}"
                )
        finally:
            server.terminate()
            server.wait(timeout=10)
    print("CPU columns: milliseconds per trajectory, this process and the server process.")


if __name__ == "__main__":
    main()
