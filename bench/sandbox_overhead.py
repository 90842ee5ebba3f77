"""Overhead of the code tool's sandbox: start-up and per-call, against a plain subprocess; and a warm pool.

* start-up: a new bubblewrap session until its first call returns, against ``python -c`` in a plain subprocess
  and against a session with ``process`` isolation (the same worker, no namespaces);
* per call: one small call in a started session, bubblewrap against process isolation;
* warm pool: the first call of a session taken from a pool that started it in advance.

    python bench/sandbox_overhead.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from glimpse.tools.sandbox import PythonSession, SandboxLimits, SessionPool, bwrap_available


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def first_call(isolation: str) -> None:
    with PythonSession(SandboxLimits(), isolation, warn=False) as s:  # the process-mode warning, once is enough
        s.run("x = 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if not bwrap_available():
        sys.exit("bubblewrap is not available (apt-get install bubblewrap)")
    plain = timed(lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "x = 1"], check=True), args.runs)
    process = timed(lambda: first_call("process"), args.runs)
    bwrap = timed(lambda: first_call("bwrap"), args.runs)
    calls = {}
    for isolation in ("process", "bwrap"):
        with PythonSession(SandboxLimits(), isolation, warn=False) as s:
            s.run("x = 0")
            calls[isolation] = timed(lambda s=s: s.run("x += 1"), args.runs * 5)
    pool = SessionPool(4, SandboxLimits(), "bwrap")
    time.sleep(3)  # let the pool fill

    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        session = pool.acquire()
        session.run("x = 1")
        times.append(time.perf_counter() - started)
        session.close()
        time.sleep(0.3)  # between trajectories the pool starts a replacement in the background
    warm = statistics.median(times)
    pool.close()
    print(f"code tool sandbox, medians of {args.runs} runs")
    print(
        f"  start-up to first result: plain subprocess {plain * 1000:6.1f} ms, process isolation "
        f"{process * 1000:6.1f} ms, bubblewrap {bwrap * 1000:6.1f} ms ({bwrap / plain:.1f}× plain)"
    )
    print(
        f"  per call in a started session: process {calls['process'] * 1000:6.2f} ms, bubblewrap "
        f"{calls['bwrap'] * 1000:6.2f} ms ({calls['bwrap'] / calls['process']:.2f}×)"
    )
    print(
        f"  first call of a session from a warm pool: {warm * 1000:6.1f} ms ({bwrap / warm:.1f}× faster than "
        "a cold start)"
    )


if __name__ == "__main__":
    main()
