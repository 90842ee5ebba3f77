"""Hostile replies through the real agent loop: how many per second, and how many escaped as exceptions.

Generates replies with the Hypothesis strategies of ``tests/test_protocol.py`` (huge integers, big exponents,
NaN in many spellings, deep nesting, fields given twice, digits of other scripts, lone surrogates, NUL bytes,
replies of up to a million characters, tags inside code blocks …), sends each as the first turn of its own
trajectory through ``AgentLoop`` (the scripted backend replays it, then answers), saves each trajectory as
JSON, and reads each reply again with the code tool on. The suite runs 400 per protocol; this runs the full
count. An escape is an exception out of any of that; a violation is a trajectory that broke the loop's
contract (see ``run_replies``). Exit status 1 if there was either. With ``--workers W`` the replies are
generated and run in W processes (seeds ``seed`` … ``seed + W - 1``, ``n / W`` each); replies/s is over the
wall clock of all of them.

    nice -n 10 python bench/fuzz_replies.py [--n 100000] [--seed 0] [--workers 1] [--protocol tags tools]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import NonInteractiveExampleWarning

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import gradient_image  # noqa: E402
from test_protocol import HOSTILE_REPLIES, FuzzRun, run_replies  # noqa: E402

# Replies sent through the loop at a time (a batch's replies are held in memory; some are a megabyte).
BATCH = 1000


def fuzz(protocol: str, n: int, seed_value: int, image: Path) -> FuzzRun:
    """Generate ``n`` replies and run them through the loop, a batch at a time."""
    total = FuzzRun()
    pending: list[dict] = []

    def flush() -> None:
        run = run_replies(protocol, pending, image)
        total.replies += run.replies
        total.escapes += run.escapes
        total.violations += run.violations
        total.kinds += run.kinds
        pending.clear()
        print(
            f"  {protocol} (seed {seed_value}): {total.replies:,} replies, {len(total.escapes)} escapes",
            file=sys.stderr,
            flush=True,
        )

    @seed(seed_value)
    @given(HOSTILE_REPLIES[protocol])
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def collect(reply: dict) -> None:
        pending.append(reply)
        if len(pending) >= BATCH:
            flush()

    collect()
    if pending:
        flush()
    return total


def fuzz_in_workers(protocol: str, n: int, seed_value: int, workers: int, image: Path) -> tuple[FuzzRun, float]:
    """``fuzz`` in ``workers`` processes with consecutive seeds; the summed run and the wall-clock seconds."""
    started = time.perf_counter()
    if workers == 1:
        return fuzz(protocol, n, seed_value, image), time.perf_counter() - started
    shares = [n // workers + (w < n % workers) for w in range(workers)]
    total = FuzzRun()
    with ProcessPoolExecutor(workers) as pool:
        jobs = [pool.submit(fuzz, protocol, share, seed_value + w, image) for w, share in enumerate(shares)]
        for job in jobs:
            run = job.result()
            total.replies += run.replies
            total.escapes += run.escapes
            total.violations += run.violations
            total.kinds += run.kinds
    return total, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="replies per protocol")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (of the first worker)")
    parser.add_argument("--workers", type=int, default=1, help="processes generating and running replies")
    parser.add_argument("--protocol", nargs="+", default=["tags", "tools"], choices=sorted(HOSTILE_REPLIES))
    args = parser.parse_args()
    warnings.simplefilter("ignore", NonInteractiveExampleWarning)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.png"
        gradient_image(320, 240).save(image)
        print("| protocol | replies | escapes | violations | replies/s (generation included) | workers |")
        print("|---|---|---|---|---|---|")
        runs = {}
        for protocol in args.protocol:
            run, seconds = fuzz_in_workers(protocol, args.n, args.seed, args.workers, image)
            runs[protocol] = run
            failed |= bool(run.escapes or run.violations)
            print(
                f"| {protocol} | {run.replies:,} | {len(run.escapes)} | {len(run.violations)} | "
                f"{run.replies / seconds:,.0f} | {args.workers} |",
                flush=True,
            )
        for protocol, run in runs.items():
            common = ", ".join(f"{k} {v:,}" for k, v in Counter(run.kinds).most_common())
            print(f"\n{protocol}, first turns by outcome: {common}")
            for reply, what in (run.escapes + run.violations)[:5]:
                print(f"  {what}\n    reply: {reply}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
