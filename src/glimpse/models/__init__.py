"""Model backends, chosen by a string such as ``openai:gpt-4.1`` or ``scripted:turns.json``.

This table is the only registry. Each module is imported only when its backend is chosen, so optional heavy
dependencies stay optional; each exposes ``create(arg, **options)`` and ignores options it has no use for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from glimpse.errors import ConfigError
from glimpse.models.base import (
    Backend,
    Completion,
    GenerateParams,
    ImagePart,
    Message,
    TextPart,
    ToolCall,
)

BACKENDS: dict[str, tuple[str, str]] = {
    # name: (module, what the part after the colon is)
    "openai": ("glimpse.models.openai_compat", "the model name the server knows, e.g. openai:gpt-4.1"),
    "scripted": ("glimpse.models.scripted", "a JSON file of assistant turns, e.g. scripted:turns.json"),
    "hf": ("glimpse.models.hf", "a local Qwen-VL checkpoint folder, e.g. hf:/models/Qwen2.5-VL-7B-Instruct"),
    "expert": ("glimpse.probes.expert", ""),  # no argument: the training-free policy (image analysis and OCR)
    # builtin: the learned built-in model where its manifest says it beats the expert (glimpse eval on those probe
    # levels), else the expert; builtin:learned or builtin:expert chooses one (glimpse.builtin.backend)
    "builtin": ("glimpse.builtin.backend", ""),
}
# What ask and eval use when no --model is given: offline, nothing to download.
DEFAULT_MODEL = "builtin"


def load_backend(spec: str, **options: Any) -> Backend:
    """Create the backend named by ``spec`` (``name:argument``).

    Args:
        spec: e.g. ``openai:Qwen/Qwen2.5-VL-7B-Instruct`` or ``scripted:demo.json``.
        **options: backend options (``base_url``, ``api_key``, ``timeout``, …); each backend takes what it uses.

    Raises:
        ConfigError: unknown backend name or a missing argument.
    """
    name, sep, arg = spec.partition(":")
    if name not in BACKENDS:
        known = ", ".join(f"{k}:…" if what else k for k, (_, what) in BACKENDS.items())
        raise ConfigError(f"unknown model backend {name!r} in {spec!r}; choose one of {known}")
    module_name, what = BACKENDS[name]
    if what and (not sep or not arg):
        raise ConfigError(f"model {spec!r} needs an argument after '{name}:': {what}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"the {name} backend needs packages that are not installed ({exc.name}): pip install 'glimpse[hf]'"
        ) from None
    return module.create(arg, **options)


@dataclass(frozen=True)
class NativeProfile:
    """What a backend's model was trained with: the defaults of every loop setting the user leaves unset.

    A backend declares any of ``default_coords``, ``resize_factor``, ``default_limits`` (min, max pixels) and
    ``default_prompt_file``; what it does not declare is Mini-o3's (relative boxes, 28, 40,000–2,000,000 pixels,
    Glimpse's default prompts). This is the one place that reads them.
    """

    coords: str
    resize_factor: int
    min_pixels: int
    max_pixels: int
    prompt_file: str | None


def native_profile(backend: Backend | None) -> NativeProfile:
    """The native profile of ``backend`` (``None``: a backend-less policy, Mini-o3's defaults)."""
    from glimpse.images import MAX_PIXELS, MIN_PIXELS, RESIZE_FACTOR

    low, high = getattr(backend, "default_limits", (MIN_PIXELS, MAX_PIXELS))
    return NativeProfile(
        coords=getattr(backend, "default_coords", "relative"),
        resize_factor=getattr(backend, "resize_factor", RESIZE_FACTOR),
        min_pixels=low,
        max_pixels=high,
        prompt_file=getattr(backend, "default_prompt_file", None),
    )


__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL",
    "Backend",
    "Completion",
    "GenerateParams",
    "ImagePart",
    "Message",
    "NativeProfile",
    "TextPart",
    "ToolCall",
    "load_backend",
    "native_profile",
]
