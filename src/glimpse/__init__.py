"""Glimpse: thinking with images.

A model looks at a high-resolution image, thinks, zooms into regions of the original or of earlier zooms,
and answers. The public API is imported lazily, so ``import glimpse`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ask": "glimpse.api",
    "ask_async": "glimpse.api",
    "AskResult": "glimpse.api",
    "AskConfig": "glimpse.config",
    "AgentLoop": "glimpse.agent",
    "load_backend": "glimpse.models",
    "Sample": "glimpse.trajectory",
    "Trajectory": "glimpse.trajectory",
    "load_jsonl": "glimpse.trajectory",
    "save_jsonl": "glimpse.trajectory",
    "render_image": "glimpse.trajectory",
    "majority_vote": "glimpse.answers",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'glimpse' has no attribute {name!r}")


__all__ = [*_EXPORTS, "__version__"]
