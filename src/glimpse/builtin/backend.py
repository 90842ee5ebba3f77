"""The ``builtin`` backend, the default model: the best policy that runs offline with nothing to download.

That is the learned built-in model when the package ships its weights (``glimpse/builtin/weights``, a
``glimpse_vl`` checkpoint, run by the ``hf`` backend; needs ``glimpse[hf]``), and otherwise the training-free
``expert``. The trajectory record names which one answered (``expert`` or ``hf:builtin_weights``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glimpse.models.base import Backend

WEIGHTS = Path(__file__).with_name("weights")


def learned_available() -> bool:
    """Whether the learned model's weights ship with this install and its dependencies are importable."""
    if not (WEIGHTS / "config.json").exists():
        return False
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def create(arg: str = "", **options: Any) -> Backend:
    """``builtin`` (no argument): the learned built-in model if it ships, else the expert."""
    if learned_available():
        from glimpse.models.hf import HFBackend

        return HFBackend(str(WEIGHTS), device=options.get("device", "cpu"), dtype=options.get("dtype", "auto"))
    from glimpse.probes.expert import create as expert

    return expert()
