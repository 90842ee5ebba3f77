"""Shared fixtures: images made on the fly and real HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image


def interruptible() -> None:
    """``preexec_fn`` for a child a test stops with SIGINT: Ctrl-C as a terminal delivers it. A child inherits an
    ignored or blocked SIGINT from whatever started the suite (a background job of a shell without job control
    ignores it), and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.fixture(autouse=True, scope="session")
def glimpse_home(tmp_path_factory) -> Path:
    """Keep generated probes and extracted images out of the user's home, shared by the session's tests."""
    home = tmp_path_factory.mktemp("glimpse-home")
    os.environ["GLIMPSE_HOME"] = str(home)
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradient_image(width: int, height: int) -> Image.Image:
    """An image whose every pixel encodes its own coordinates: R = x mod 256, G = y mod 256, B = (x // 256) * 16 +
    (y // 256), so any crop can be checked to the pixel."""
    xs = np.arange(width, dtype=np.int64)[None, :].repeat(height, 0)
    ys = np.arange(height, dtype=np.int64)[:, None].repeat(width, 1)
    arr = np.stack([xs % 256, ys % 256, ((xs // 256) * 16 + ys // 256) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.fixture
def make_image(tmp_path: Path):
    """Write a coordinate-encoding PNG of the given size and return its path."""

    def make(width: int = 1000, height: int = 800, name: str = "img.png") -> Path:
        path = tmp_path / name
        gradient_image(width, height).save(path)
        return path

    return make


@pytest.fixture
def write_script(tmp_path: Path):
    def write(turns: list, name: str = "script.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(turns), encoding="utf-8")
        return path

    return write


def wait_healthy(base: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out}")
        try:
            if httpx.get(base.removesuffix("/v1") + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {base} did not come up in {timeout} s")


@contextlib.contextmanager
def glimpse_server(*args: str) -> Iterator[str]:
    """Run ``glimpse serve`` in a subprocess on a free loopback port; yield its /v1 base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "glimpse", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def app_server(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on a free loopback port; yield its /v1 base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_healthy(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (the layout of a real one), built once per session."""
    from glimpse.hf.tiny import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen") / "Qwen2.5-VL-tiny")


# ------------------------------------------------------------------- the browser tests (viewer, glimpse ui)
def chromium() -> str | None:
    found = os.environ.get("GLIMPSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("GLIMPSE_REQUIRE_BROWSER") == "1":
        pytest.fail("GLIMPSE_REQUIRE_BROWSER=1 but no chromium was found (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if path is None:
        pytest.skip("no chromium on this machine (apt-get install chromium); CI runs these tests")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()
