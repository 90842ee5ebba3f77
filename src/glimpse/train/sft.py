"""Supervised fine-tuning on multi-turn trajectories, with the loss on the model's own turns only.

A short loop on transformers and torch rather than TRL's ``SFTTrainer``, so that the labels match the agent
loop's token view exactly with the checkpoint's stock chat template and the pixel limits the model was shown
(TRL's ``assistant_only_loss`` depends on the template marking generations; the ``trl`` export is there for
those who prefer it):

1. **Data.** Each trajectory of a ``trajectories.jsonl`` (the canonical record) is rebuilt as the exact
   conversation the model saw (``conversation``) with every image as it was shown (``render_image``), and run
   through the checkpoint's own chat template and processor (its pixel limits widened so that no image is
   resized: originals shown together share one budget and can be smaller than its own lower limit). Labels are
   the tokens of each assistant message, its end-of-turn token included (ChatML: from after
   ``<|im_start|>assistant\\n`` through ``<|im_end|>``); everything else (system prompt, question,
   observations, error messages, image tokens, padding) is -100. Examples are processed when a batch needs
   them, so memory holds one batch of images at a time. A conversation longer than ``max_length`` is skipped
   and counted, never cut (a cut would split an image).
2. **What trains.** Everything but the vision tower and its projector (frozen by default, as in Mini-o3's
   recipe), or LoRA adapters on the language model's linear layers (peft).
3. **Steps.** AdamW; warm-up then cosine (or constant, or linear) decay; gradient accumulation with the loss
   averaged over the trained tokens of the whole accumulated batch (not per micro-batch); gradient clipping.
4. **Saving.** ``OUT/config.json`` (the resolved settings), ``OUT/log.jsonl`` (one line per logged step),
   checkpoints ``OUT/checkpoints/step-N`` (the trainable weights, optimizer, schedule, step and random state:
   a rerun with the same OUT resumes from the newest), and at the end ``OUT/model``: a complete checkpoint
   folder with the processor (LoRA merged in; the adapter alone in ``OUT/adapter``), loadable as ``hf:OUT/model``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.config import SFTConfig, public_dict
from glimpse.errors import ConfigError
from glimpse.hf.processor import keep_shown_sizes
from glimpse.images import ImageCache
from glimpse.train import common
from glimpse.train.common import ASSISTANT_HEADER, END, IGNORE, Example, collate, encode
from glimpse.trajectory import iter_jsonl


class TrajectoryData:
    """Trajectories of a JSONL file, tokenised on demand for one checkpoint's processor.

    Args:
        path: a ``trajectories.jsonl`` file, or a folder holding one (the output of ``glimpse coldstart``).
        processor: the checkpoint's processor.
        max_length: longer conversations are skipped.
        base_dir: folder that relative image paths are resolved against (default: the working directory).
    """

    def __init__(self, path: str | Path, processor: Any, *, max_length: int, base_dir: str | None = None):
        p = Path(path)
        self.path = p / "trajectories.jsonl" if p.is_dir() else p
        if not self.path.exists():
            raise ConfigError(f"no trajectories at {self.path}; make some with glimpse coldstart")
        self.trajectories = [t for t in iter_jsonl(self.path) if t.stop_reason == "answer" and t.turns]
        if not self.trajectories:
            raise ConfigError(f"{self.path} holds no trajectory that ends with an answer")
        missing = [t.id for t in self.trajectories if not t.prompt]
        if missing:
            raise ConfigError(
                f"{len(missing)} trajectories (e.g. {missing[0]}) were recorded without their prompt messages "
                "by an older Glimpse; record them again"
            )
        # A copy that never resizes: every image goes in at the size the model was shown it (originals shown
        # together share one budget, so they can be smaller than the processor's own lower limit).
        self.processor = copy.copy(processor)
        self.processor.image_processor = copy.deepcopy(processor.image_processor)
        keep_shown_sizes(self.processor.image_processor, min(t.settings.resize_factor for t in self.trajectories))
        self.max_length, self.base_dir = max_length, base_dir
        tok = processor.tokenizer
        self.header = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end = tok.convert_tokens_to_ids(END)
        if self.end is None or self.end == tok.unk_token_id:
            raise ConfigError(f"the tokenizer has no {END} token: only ChatML (Qwen-VL) chat templates are supported")
        self.cache = ImageCache()
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.trajectories)

    def digest(self) -> str:
        """A fingerprint of the data, checked when a run resumes."""
        h = hashlib.sha256()
        with self.path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def example(self, i: int) -> Example | None:
        """Trajectory ``i`` tokenised, or ``None`` if it is longer than ``max_length`` (then counted)."""
        traj = self.trajectories[i]
        ex = encode(traj, self.processor, self.header, self.end, cache=self.cache, base_dir=self.base_dir)
        if len(ex.input_ids) > self.max_length:
            self.skipped[traj.id] = f"{len(ex.input_ids)} tokens > max_length {self.max_length}"
            return None
        return ex


def _schedule(optimizer: Any, cfg: SFTConfig, total: int) -> Any:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = math.ceil(cfg.warmup_ratio * total)
    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total)


# ------------------------------------------------------------------------------------------------- training
@dataclass
class StepLog:
    """One optimizer step, as logged."""

    step: int
    total: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    trained_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class SFTResult:
    """What a run did."""

    out: Path
    steps: int
    examples: int
    skipped: dict[str, str] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    trainable_params: int = 0
    total_params: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "steps": self.steps,
            "examples": self.examples,
            "skipped": self.skipped,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "trained_tokens_per_s": round(self.trained_tokens / self.seconds, 1) if self.seconds else 0.0,
            "resumed_from": self.resumed_from,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
        }


# Settings a resumed run must share with the run it continues.
_RESUME_KEYS = (
    "model",
    "lora",
    "lora_r",
    "lora_alpha",
    "freeze_vision",
    "freeze_projector",
    "lr",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "schedule",
    "warmup_ratio",
    "seed",
    "max_length",
)


def _order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(f"glimpse-sft/{seed}/{epoch}").shuffle(order)
    return order


def _groups(data_len: int, cfg: SFTConfig, epochs: int) -> Iterator[tuple[int, list[list[int]]]]:
    """(epoch, micro-batches of indices) for each optimizer step, in order."""
    per_step = cfg.batch_size * cfg.grad_accum
    for epoch in range(epochs):
        order = _order(data_len, epoch, cfg.seed)
        for start in range(0, len(order), per_step):
            chunk = order[start : start + per_step]
            yield epoch, [chunk[k : k + cfg.batch_size] for k in range(0, len(chunk), cfg.batch_size)]


def train(cfg: SFTConfig, *, on_step: Callable[[StepLog], None] | None = None) -> SFTResult:
    """Fine-tune ``cfg.model`` on ``cfg.data``; see the module docstring.

    Raises:
        ConfigError: bad settings, missing data, or a checkpoint that belongs to a different run.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from glimpse.hf.processor import load_processor
    from glimpse.models.hf import resolve_checkpoint

    _check(cfg)
    out = Path(cfg.out)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = common.resolve_device(cfg.device)
    dtype = getattr(torch, common.resolve_dtype(cfg.dtype, device, lora=cfg.lora))
    source = resolve_checkpoint(cfg.model)
    processor = load_processor(source)
    data = TrajectoryData(cfg.data, processor, max_length=cfg.max_length, base_dir=cfg.image_root)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    model = common.prepare_model(model, cfg).to(device)
    model.train()
    params = common.trainable(model)
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(data) / per_step)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total / steps_per_epoch)
    scheduler = _schedule(optimizer, cfg, total)

    settings = {**public_dict(cfg), "data_sha256": data.digest(), "total_steps": total}
    keys = (*_RESUME_KEYS, "data_sha256")
    done = 0 if cfg.fresh else common.resume(out, settings, model, optimizer, scheduler, keys=keys)[0]
    (out / "config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    result = SFTResult(
        out,
        steps=done,
        examples=len(data),
        resumed_from=done,
        trainable_params=sum(p.numel() for p in params.values()),
        total_params=sum(p.numel() for p in model.parameters()),
    )
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    image_token = model.config.image_token_id
    log = (out / "log.jsonl").open("a", encoding="utf-8")
    try:
        for step, (epoch, micro) in enumerate(_groups(len(data), cfg, epochs), 1):
            if step > total:
                break
            if step <= done:
                continue
            t0 = time.perf_counter()
            batches = [[e for i in ids if (e := data.example(i)) is not None] for ids in micro]
            batches = [b for b in batches if b]
            trained = sum(e.trained for b in batches for e in b)
            tokens = sum(len(e.input_ids) for b in batches for e in b)
            loss_sum = 0.0
            if trained:
                # Sum of token losses over the whole accumulated batch, divided once by its trained tokens.
                shifted = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for b in batches for e in b)
                scale = torch.tensor(float(max(1, shifted)), device=device)
                for b in batches:
                    inputs = {k: v.to(device) for k, v in collate(b, pad, image_token).items()}
                    if "pixel_values" in inputs:
                        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                    loss = model(**inputs, num_items_in_batch=scale).loss
                    loss.backward()
                    loss_sum += float(loss.detach())
                norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
            else:
                norm = 0.0  # every trajectory of this step was skipped: no gradients, the step changes nothing
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            seconds = time.perf_counter() - t0
            entry = StepLog(step, total, epoch, loss_sum, scheduler.get_last_lr()[0], norm, tokens, trained, seconds)
            result.steps = step
            result.tokens += tokens
            result.trained_tokens += trained
            result.seconds += seconds
            result.losses.append(loss_sum)
            log.write(json.dumps({**entry.__dict__, "tokens_per_s": round(entry.tokens_per_s, 1)}) + "\n")
            log.flush()
            if on_step is not None:
                on_step(entry)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                common.save_checkpoint(out, step, model, optimizer, scheduler, cfg.keep_checkpoints)
    finally:
        log.close()
    result.skipped = dict(data.skipped)
    if result.steps > done and result.trained_tokens == 0:
        raise ConfigError(
            f"nothing was trained: all {len(data)} trajectories are longer than max_length {cfg.max_length} "
            "tokens (or hold no assistant reply); raise --max-length or show images smaller"
        )
    common.save_final(out, model, processor, cfg, source)
    (out / "result.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
    return result


def _check(cfg: SFTConfig) -> None:
    if not cfg.model:
        raise ConfigError("choose the checkpoint to train with --model (a folder or a Hub id)")
    if not cfg.data:
        raise ConfigError("choose the training data with --data (trajectories.jsonl or a glimpse coldstart folder)")
    for name in ("batch_size", "grad_accum", "epochs", "max_length", "lora_r"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"max_steps must be at least 1, got {cfg.max_steps}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
