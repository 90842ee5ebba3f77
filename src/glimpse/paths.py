"""Where Glimpse keeps artifacts: ``$GLIMPSE_HOME`` (read when called), by default ``~/.cache/glimpse``."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``path`` whole or not at all: through a uniquely named file beside it, renamed over it (a crash
    mid-write leaves the old file, never half of the new one; two writers never share the partial file)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")
    try:
        partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def glimpse_home() -> Path:
    """The root folder of generated probes, extracted benchmark images and caches."""
    return Path(os.environ.get("GLIMPSE_HOME") or Path.home() / ".cache" / "glimpse").expanduser()
