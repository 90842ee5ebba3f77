"""What every trainer of Glimpse shares: the token view of a trajectory, batches, the model to train, checkpoints.

SFT (``sft.py``), RL (``rl.py``) and the built-in model's trainer (``glimpse.builtin.train``) read trajectories the
same way and save the same checkpoints; this module is the one place that does each:

* **Data.** ``encode`` rebuilds a trajectory as the exact conversation the model saw (``hf_chat``), with every image
  as it was shown, through the checkpoint's chat template and processor; ``assistant_labels`` keeps the tokens of
  the model's own replies (ChatML: from after ``<|im_start|>assistant\\n`` through ``<|im_end|>``); ``collate``
  right-pads a batch.
* **Model.** ``prepare_model`` freezes the vision tower and projector (Mini-o3's recipe) or wraps LoRA adapters;
  ``resolve_device`` and ``resolve_dtype`` resolve ``auto`` (and refuse full fine-tuning in half precision).
* **Checkpoints.** ``save_checkpoint`` / ``resume`` (trainable weights, optimizer, schedule, random state and a
  loop's own state; a resumed run must share the settings named by its trainer) and ``save_final`` (``OUT/model``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from glimpse.errors import ConfigError, GlimpseError
from glimpse.hf.processor import PROMPT_FILE
from glimpse.images import ImageCache
from glimpse.models.hf import escape_arguments, special_token_escaper
from glimpse.protocol import make_protocol
from glimpse.trajectory import Trajectory, conversation, render_image

IGNORE = -100
# ChatML, the chat format of every Qwen-VL family: an assistant message runs from this header to END.
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>"
TRAINABLE_FILE, STATE_FILE = "trainable.safetensors", "state.pt"
LORA_LINEARS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LINEARS = r"(attn\.qkv|attn\.proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj|mlp\.linear_fc1|mlp\.linear_fc2)"


class ModelSettings(Protocol):
    """The settings ``prepare_model`` and ``save_final`` read; ``SFTConfig`` and ``RLConfig`` both have them."""

    lora: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    freeze_vision: bool
    freeze_projector: bool
    gradient_checkpointing: bool


# ------------------------------------------------------------------------------------------------------ data
class ImageKey(NamedTuple):
    """Which image an image part shows: ``index`` 0 = an original (``original``: 0 = image_1), N = observation_N."""

    index: int
    original: int = 0


def hf_chat(
    trajectory: Trajectory, escape: Callable[[str], str] | None = None
) -> tuple[list[dict[str, Any]], list[ImageKey]]:
    """The trajectory's conversation in transformers' chat format, and which image each image part shows
    (``escape``: applied to every text and tool-call argument, as the ``hf`` backend does at inference)."""
    escape = escape or (lambda text: text)
    messages: list[dict[str, Any]] = []
    order: list[ImageKey] = []
    for m in conversation(trajectory):
        item: dict[str, Any] = {"role": m["role"]}
        content = m.get("content", "")
        if isinstance(content, str):
            item["content"] = escape(content)
        else:
            parts = []
            for p in content:
                if p["type"] == "image":
                    parts.append({"type": "image"})
                    order.append(ImageKey(int(p["index"]), int(p.get("original", 0))))
                else:
                    parts.append({"type": "text", "text": escape(p["text"])})
            item["content"] = parts
        if m.get("tool_calls"):
            item["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": escape_arguments(c["arguments"], escape)},
                }
                for c in m["tool_calls"]
            ]
        if m.get("tool_call_id") is not None:
            item["tool_call_id"] = m["tool_call_id"]
        messages.append(item)
    return messages, order


def render_images(
    trajectory: Trajectory,
    order: list[ImageKey],
    *,
    cache: ImageCache | None = None,
    base_dir: str | None = None,
) -> list[Any]:
    """The images of ``order`` (from ``hf_chat``) as the model was shown them, recomputed from the files."""
    return [render_image(trajectory, k.index, original=k.original, cache=cache, base_dir=base_dir) for k in order]


def tools_of(trajectory: Trajectory) -> list[dict[str, Any]] | None:
    """The function schemas the model was offered (``tools`` protocol), as the backend passed them."""
    s = trajectory.settings
    return make_protocol(s.protocol, s.coords, None, "python" in s.tools).tools


def assistant_labels(ids: list[int], header: list[int], end: int) -> list[int]:
    """Labels that keep the tokens of every assistant message (its end token included) and mask the rest."""
    labels = [IGNORE] * len(ids)
    i, n = 0, len(header)
    while i <= len(ids) - n:
        if ids[i : i + n] != header:
            i += 1
            continue
        j = i + n
        while j < len(ids) and ids[j] != end:
            labels[j] = ids[j]
            j += 1
        if j < len(ids):
            labels[j] = ids[j]
        i = j + 1
    return labels


class ImageRun(NamedTuple):
    """Where one image's tokens sit in a token list."""

    start: int
    length: int


def image_runs(ids: Sequence[int], image_token_id: int) -> list[ImageRun]:
    """Each run of image tokens in ``ids``, in order: one run per image (Qwen-VL templates wrap every image in
    vision start and end tokens, so two images never touch)."""
    runs: list[ImageRun] = []
    start = None
    for i, t in enumerate([*ids, None]):
        if t == image_token_id and start is None:
            start = i
        elif t != image_token_id and start is not None:
            runs.append(ImageRun(start, i - start))
            start = None
    return runs


def grid_tokens(grid_thw: Any, merge_size: int) -> list[int]:
    """How many tokens each processed image takes: ``t·h·w / merge_size²`` of its ``image_grid_thw`` row."""
    if grid_thw is None:
        return []
    return [math.prod(int(x) for x in row) // merge_size**2 for row in grid_thw.tolist()]


def check_image_tokens(ids: Sequence[int], image_tokens: list[int], image_token_id: int, what: str) -> None:
    """Check that images and their tokens are in step: one run of image tokens per image, in order, each as
    long as that image's features (``image_tokens``). Out of step, a Qwen-VL forward pass fails, or worse, puts
    one image's features at another image's tokens.

    Raises:
        GlimpseError: they are not in step (a bug of the caller: ``what`` says whose).
    """
    runs = [r.length for r in image_runs(ids, image_token_id)]
    if runs != list(image_tokens):
        raise GlimpseError(
            f"{what}: image tokens and images are out of step: the ids hold runs of {runs} image tokens, the "
            f"images take {list(image_tokens)}; every image must keep its whole run, in order"
        )


@dataclass
class Example:
    """One trajectory, tokenised: ids, labels, and its processed images."""

    id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: Any = None
    image_grid_thw: Any = None

    @property
    def trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode(
    traj: Trajectory,
    processor: Any,
    header: list[int],
    end: int,
    *,
    cache: ImageCache | None = None,
    base_dir: str | None = None,
) -> Example:
    """A trajectory as the exact conversation the model saw, tokenised, with labels on its replies only."""
    messages, order = hf_chat(traj, escape=special_token_escaper(processor.tokenizer))
    images = render_images(traj, order, cache=cache, base_dir=base_dir)
    text = processor.apply_chat_template(messages, tokenize=False, tools=tools_of(traj))
    if images:
        enc = processor(text=[text], images=images, return_tensors="pt")
    else:
        enc = processor(text=[text], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    labels = assistant_labels(ids, header, end)
    return Example(traj.id, ids, labels, enc.get("pixel_values"), enc.get("image_grid_thw"))


def collate(examples: list[Example], pad_id: int, image_token_id: int) -> dict[str, Any]:
    """A right-padded batch: ids, attention mask, labels, images, and the image-token map."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in examples if e.image_grid_thw is not None])
        batch["mm_token_type_ids"] = (ids == image_token_id).long()
    return batch


# ----------------------------------------------------------------------------------------------------- model
def vision_parameters(model: Any) -> list[str]:
    """The names of the parameters that look at pixels: a vision tower's (``visual.`` in the name, as Qwen-VL and
    the built-in model call it) and those under the prefixes a model declares as ``vision_prefixes`` (the
    built-in model's reader and region heads, which read panels and regions apart from its encoder)."""
    own = tuple(getattr(model, "vision_prefixes", ()))
    return [n for n, _ in model.named_parameters() if ".visual." in f".{n}" or (own and n.startswith(own))]


def prepare_model(model: Any, cfg: ModelSettings) -> Any:
    """Freeze what does not train, or wrap in LoRA adapters; return the model to train."""
    visual = set(vision_parameters(model))
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = rf".*language_model.*\.{LORA_LINEARS}"
        if not cfg.freeze_vision:
            targets = rf"({targets})|(.*visual\.blocks.*\.{VISION_LINEARS})"
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
        )
        model = get_peft_model(model, lora)
        if not cfg.freeze_projector:
            for n, p in model.named_parameters():
                if _is_projector(n):
                    p.requires_grad_(True)
    else:
        for n, p in model.named_parameters():
            if n in visual and (cfg.freeze_projector if _is_projector(n) else cfg.freeze_vision):
                p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            model.enable_input_require_grads()
    return model


def _is_projector(name: str) -> bool:
    return ".merger." in name or "deepstack_merger" in name


def trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} was asked for, but torch sees no CUDA device here")
    return name


def resolve_dtype(name: str, device: str, *, lora: bool) -> str:
    """The dtype a training run holds its weights in; ``auto``: float32, but the frozen base of a LoRA run on
    CUDA in bfloat16 (peft keeps the adapters in float32).

    Raises:
        ConfigError: full fine-tuning in half precision. AdamW moves a weight by about the learning rate per step,
            and at training rates (1e-6 to 1e-4) that is under half a bfloat16 rounding step of most weights: the
            updates round away while the loss and the logs look normal.
    """
    if name == "auto":
        return "bfloat16" if lora and device.startswith("cuda") else "float32"
    if name in ("bfloat16", "float16") and not lora:
        raise ConfigError(
            f"--dtype {name} with full fine-tuning: AdamW's updates at training learning rates are smaller than "
            f"{name}'s rounding and would be lost; use --dtype float32 (auto) or train LoRA adapters (--lora)"
        )
    return name


# ------------------------------------------------------------------------------------------------- saving
def checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for p in (out / "checkpoints").glob("step-*"):
        if p.name[5:].isdigit() and (p / STATE_FILE).exists():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def save_checkpoint(
    out: Path, step: int, model: Any, optimizer: Any, scheduler: Any, keep: int, extra: dict[str, Any] | None = None
) -> None:
    """Save the trainable weights, optimizer, schedule, step, random state and ``extra`` (a loop's own state)."""
    import torch
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{step}"
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in trainable(model).items()}, partial / TRAINABLE_FILE)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "extra": extra or {},
    }
    torch.save(state, partial / STATE_FILE)
    partial.rename(final)  # a checkpoint is either whole or absent
    for _, old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resume(
    out: Path,
    settings: dict[str, Any],
    model: Any,
    optimizer: Any,
    scheduler: Any,
    keys: tuple[str, ...],
) -> tuple[int, dict[str, Any]]:
    """Load the newest checkpoint of an earlier run in ``out``: the step it reached (0: none) and its ``extra``.

    Raises:
        ConfigError: the earlier run's settings differ from ``settings`` in one of ``keys``.
    """
    import torch
    from safetensors.torch import load_file

    found = checkpoints(out)
    if not found:
        return 0, {}
    previous = json.loads((out / "config.json").read_text(encoding="utf-8")) if (out / "config.json").exists() else {}
    changed = [k for k in keys if k in previous and previous[k] != settings.get(k)]
    if changed:
        raise ConfigError(
            f"{out} holds a run with different settings ({', '.join(changed)}); use another --out, or --fresh "
            "to start over"
        )
    _, folder = found[-1]
    weights = load_file(str(folder / TRAINABLE_FILE))
    params = trainable(model)
    if set(weights) != set(params):
        raise GlimpseError(f"{folder} does not hold the trainable weights of this model")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), state.get("extra", {})


def save_final(out: Path, model: Any, processor: Any, cfg: ModelSettings, source: str | None = None) -> None:
    """Write ``OUT/model``: the weights (LoRA merged), processor, generation config, and the prompt file of a
    checkpoint that ships one (``source``), so the trained model is prompted as it was trained."""
    target = out / "model"
    if cfg.lora:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.save_pretrained(target)
    processor.save_pretrained(target)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(target)
    if source is not None and (Path(source) / PROMPT_FILE).exists():
        shutil.copyfile(Path(source) / PROMPT_FILE, target / PROMPT_FILE)
