"""Loading a Qwen-VL checkpoint's processor, with or without torchvision.

transformers' stock Qwen-VL processors also build a video processor, which needs torchvision; where torchvision
is missing (or, as on some CPU machines, unusable) ``AutoProcessor`` fails. Glimpse only sends images, so it
falls back to an image-only variant of the same processor class, which transformers' PIL image processor
serves. Saving writes the stock class name, so a later ``AutoProcessor.from_pretrained`` on a machine with
torchvision loads the normal processor.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from glimpse.errors import ConfigError

log = logging.getLogger(__name__)

# The prompts a checkpoint was trained with, saved beside its weights (the built-in model ships one); the hf
# backend uses them by default, and training copies them to the trained model.
PROMPT_FILE = "glimpse_prompts.yaml"

# model_type in config.json → (family, processor class, resize factor, native box coordinates)
FAMILIES: dict[str, tuple[str, str, int, str]] = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLProcessor", 28, "thousand"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLProcessor", 28, "pixels"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLProcessor", 32, "relative"),
    "qwen3_vl_moe": ("qwen3_vl", "Qwen3VLProcessor", 32, "relative"),
    "glimpse_vl": ("glimpse_vl", "GlimpseVLProcessor", 32, "relative"),  # the built-in model (glimpse.builtin)
}


def model_type(path: str | os.PathLike[str]) -> str:
    """``model_type`` of a checkpoint folder.

    Raises:
        ConfigError: no ``config.json``, or a model family Glimpse does not support.
    """
    config = Path(path) / "config.json"
    try:
        kind = json.loads(config.read_text(encoding="utf-8"))["model_type"]
    except FileNotFoundError:
        raise ConfigError(f"{path} is not a checkpoint folder: no config.json") from None
    except (ValueError, KeyError):
        raise ConfigError(f"{config} has no model_type") from None
    if kind not in FAMILIES:
        raise ConfigError(f"{path}: model type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
    return kind


@cache
def image_only_class(name: str) -> type:
    """An image-only subclass of a transformers processor class (no video processor, no torchvision)."""
    import transformers

    base = getattr(transformers, name)

    class ImageOnly(base):  # type: ignore[misc, valid-type]
        attributes = ["image_processor", "tokenizer"]  # noqa: RUF012 (transformers 4.x reads this class attribute)

        @classmethod
        def get_attributes(cls) -> list[str]:  # transformers 5.x
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
            kw.pop("video_processor", None)
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kw)

        def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
            out = super().save_pretrained(save_directory, *args, **kwargs)
            _stamp_processor_class(Path(save_directory), name)
            return out

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{name}"
    return ImageOnly


def _stamp_processor_class(folder: Path, name: str) -> None:
    """Write the stock processor class into the saved configs, as real checkpoints have it."""
    for file in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = folder / file
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            if "processor_class" in data:
                data["processor_class"] = name
                path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# How large an image a processor may be handed without resizing it (the agent loop fits images before).
MAX_IMAGE_PIXELS = 16384 * 28 * 28


def keep_shown_sizes(image_processor: Any, factor: int) -> None:
    """Widen an image processor's pixel limits (in place) so that it never resizes an image the agent loop already
    fitted to its limits: the model sees exactly the size the loop recorded (pixel coordinates mean the same
    thing on both sides), and several images that share one pixel budget keep their shares. ``factor`` is the
    checkpoint's resize factor (28 or 32)."""
    size = getattr(image_processor, "size", None)
    if size is not None and hasattr(size, "shortest_edge"):
        size.shortest_edge = factor * factor
        size.longest_edge = MAX_IMAGE_PIXELS
    elif isinstance(size, dict):
        size.update(shortest_edge=factor * factor, longest_edge=MAX_IMAGE_PIXELS)
    for name, value in (("min_pixels", factor * factor), ("max_pixels", MAX_IMAGE_PIXELS)):
        if getattr(image_processor, name, None) is not None:
            setattr(image_processor, name, value)


def quiet_progress() -> None:
    """Turn off transformers' per-file progress bars (loading and writing shards); Glimpse reports its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_processor(path: str | os.PathLike[str]) -> Any:
    """The checkpoint's processor: ``AutoProcessor`` if it works here, else the image-only variant."""
    quiet_progress()
    kind = model_type(path)
    name = FAMILIES[kind][1]
    if kind == "glimpse_vl":  # the built-in model's own processor (no video processor to leave out)
        import glimpse.builtin.model  # noqa: F401  (registers its classes with the Auto classes)
        from glimpse.builtin.processing import GlimpseVLProcessor

        return GlimpseVLProcessor.from_pretrained(path)

    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        if hasattr(processor, "image_processor"):
            return processor
    except (ImportError, OSError, ValueError, AttributeError, RuntimeError) as exc:
        log.info("AutoProcessor cannot load %s here (%s); using the image-only processor", path, exc)
    return image_only_class(name).from_pretrained(path)
