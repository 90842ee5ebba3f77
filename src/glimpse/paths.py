"""Where Glimpse keeps artifacts: ``$GLIMPSE_HOME`` (read when called), by default ``~/.cache/glimpse``."""

from __future__ import annotations

import os
from pathlib import Path


def glimpse_home() -> Path:
    """The root folder of generated probes, extracted benchmark images and caches."""
    return Path(os.environ.get("GLIMPSE_HOME") or Path.home() / ".cache" / "glimpse").expanduser()
