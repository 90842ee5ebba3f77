"""The code tool: the model runs Python in its trajectory's sandboxed session (see ``glimpse.tools.sandbox``).

Before each call the images the model has are written, at full resolution, into the session's read-only
``/images`` folder (the original once per session). The answer for the model is the code's printed output and
any traceback, truncated with a marker, plus notes; images the code passes to ``show()`` come back as new
observations. Code-made images cannot be recomputed from geometry, so they are kept content-addressed under
``$GLIMPSE_HOME/artifacts/`` and the trajectory stores their path and hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from glimpse.errors import ImageInputError
from glimpse.images import MAX_ASPECT_RATIO, decode_image
from glimpse.paths import glimpse_home
from glimpse.protocol.base import clean_text
from glimpse.tools.sandbox import (
    CodeResult,
    PythonSession,
    SandboxLimits,
    SessionPool,
    clean_stale_sessions,
    resolve_isolation,
)


@dataclass
class Made:
    """An image the code made: its pixels and where its PNG is kept."""

    image: Image.Image
    path: str
    sha256: str


@dataclass
class PythonResult:
    """What the model hears back from one code call."""

    text: str
    images: list[Made] = field(default_factory=list)
    error_kind: str | None = None


def artifact_path(data: bytes) -> tuple[Path, str]:
    """Where the PNG ``data`` is kept (content-addressed), written once."""
    sha = hashlib.sha256(data).hexdigest()
    path = glimpse_home() / "artifacts" / sha[:2] / f"{sha}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path, sha


class PythonTool:
    """Runs code in per-trajectory sandboxed sessions.

    Args:
        limits: the sandbox's limits.
        isolation: ``auto``, ``bwrap`` or ``process``.
        warm: sessions kept started in advance (0: start on demand).
    """

    name = "python"

    def __init__(self, limits: SandboxLimits | None = None, isolation: str = "auto", warm: int = 0):
        self.limits = limits or SandboxLimits()
        self.isolation = resolve_isolation(isolation)  # warns here, once per tool, if it is ``process``
        clean_stale_sessions()  # what a killed earlier run left goes now, even if this run never calls code
        self.pool = SessionPool(warm, self.limits, self.isolation, warn=False) if warm else None

    def session(self) -> PythonSession:
        """A fresh session for one trajectory (close it when the trajectory ends)."""
        return self.pool.acquire() if self.pool else PythonSession(self.limits, self.isolation, warn=False)

    def run(self, code: str, session: PythonSession, images: dict[str, Image.Image]) -> PythonResult:
        """Make ``images`` visible to the code, run it, and turn the result into text and observations."""
        for name, image in images.items():
            target = session.image_dir / f"{name}.png"
            if not target.exists():
                _write_png(image, target)
        result = session.run(code)
        made, problems = [], []
        for data in result.images:
            try:
                image = _shown_image(data, self.limits)
            except ImageInputError as exc:
                problems.append(str(exc))
                continue
            path, sha = artifact_path(data)
            made.append(Made(image=image, path=str(path), sha256=sha))
        return PythonResult(text=describe(result, problems), images=made, error_kind=_error_kind(result))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _shown_image(data: bytes, limits: SandboxLimits) -> Image.Image:
    """An image from ``show()``, checked here too (the session's answer may not be the worker's): at most
    ``limits.image_pixels`` pixels, read from the header before decoding, and an aspect ratio the loop can show.

    Raises:
        ImageInputError: not an image, too large, or too thin.
    """
    name = "an image from show()"
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except (OSError, ValueError, Image.DecompressionBombError):
        width = height = 0  # decode_image says what is wrong
    if width * height > limits.image_pixels:
        raise ImageInputError(name, f"{width}×{height} is over the limit of {limits.image_pixels:,} pixels")
    image = decode_image(data, name)
    if max(image.size) / min(image.size) >= MAX_ASPECT_RATIO:
        raise ImageInputError(
            name,
            f"{image.width}×{image.height} is too thin to show (aspect ratio {MAX_ASPECT_RATIO}:1 or more); "
            "pad it or show a taller or wider region",
        )
    return image


def _write_png(image: Image.Image, target: Path) -> None:
    tmp = target.with_suffix(".part")
    image.save(tmp, format="PNG", compress_level=1)
    shutil.move(tmp, target)


def _error_kind(result: CodeResult) -> str | None:
    if result.killed:
        return "code_stopped"
    return "code_error" if result.error else None


def describe(result: CodeResult, problems: list[str]) -> str:
    """The text the model reads after a code call."""
    parts = []
    if result.stdout:
        text = result.stdout.rstrip("\n")
        if result.truncated:
            text += f"\n[… {result.truncated:,} more characters of output were cut]"
        parts.append(f"Output:\n{text}")
    if result.error:
        parts.append(result.error if result.killed else f"Error:\n{result.error}")
    parts += result.notes + problems
    if result.images:
        shown = len(result.images) - len(problems)
        parts.append(f"{shown} image{'s' if shown != 1 else ''} shown below." if shown else "")
    # a lone surrogate (an escaped one in the worker's JSON) could not be written to the trajectory's file
    return clean_text("\n".join(p for p in parts if p) or "The code ran and printed nothing.")
