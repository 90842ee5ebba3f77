"""The ``hf`` backend: a local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint run with transformers.

* Loads any checkpoint folder laid out as on the Hub (``hf:/path/to/Qwen2.5-VL-7B-Instruct``), or a Hub id
  (``hf:Qwen/Qwen2.5-VL-7B-Instruct``) from the local cache or a download, on ``cpu``
  (float32 by default) or ``cuda``; works without torchvision (see ``glimpse.hf.processor``).
* Prompts go through the checkpoint's own chat template and processor. The image processor's pixel limits
  are widened so it never resizes the images the agent loop already fitted to its limits: the model sees
  exactly the size the loop recorded, and pixel coordinates mean the same thing on both sides.
* **Token view.** A reply's text is the exact decoding of the sampled tokens (stop string and all), and the
  backend remembers, per conversation prefix, the token ids it actually used. The next turn's prompt reuses
  those ids and tokenises only what the harness added, so the ids the agent loop records are the ids the model
  sampled, with 1 for sampled and 0 for injected tokens: what RL needs.
* **Batching.** Concurrent requests with the same sampling settings are generated together (left padding), up
  to ``max_batch``; ``n`` samples use ``num_return_sequences``. A request with a ``seed`` runs alone, so it is
  reproducible.
* Each model family's native box convention is the default (``default_coords``): absolute pixels of the
  resized input for Qwen2.5-VL, 0–1000 for Qwen2-VL, relative for Qwen3-VL; and its resize factor (28 or 32).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.errors import BackendError, ConfigError, ContextLengthError
from glimpse.models.base import Completion, GenerateParams, ImagePart, Message, TextPart, ToolCall

_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
# Conversation prefixes whose token ids are remembered.
_PREFIXES = 256
# How large an image the processor may be handed without resizing it (the loop fits images before).
_MAX_IMAGE_PIXELS = 16384 * 28 * 28


@dataclass
class _Prefix:
    """Token ids of a conversation prefix, and the processed images it holds (one tensor per image)."""

    ids: list[int]
    pixels: list[Any] = field(default_factory=list)
    grids: list[Any] = field(default_factory=list)


@dataclass
class _Request:
    text: str
    prefix: _Prefix
    params: GenerateParams
    future: asyncio.Future[list[Completion]]


class HFBackend:
    """A transformers model behind the backend contract.

    Args:
        path: checkpoint folder.
        device: ``cpu``, ``cuda``, ``cuda:1`` … or ``auto`` (CUDA when available).
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bfloat16 on CUDA, float32 on CPU).
        max_batch: most requests generated together.
    """

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", max_batch: int = 8):
        import torch
        from transformers import AutoModelForImageTextToText

        from glimpse.hf.processor import FAMILIES, PROMPT_FILE, load_processor, model_type

        folder = Path(path)
        family, _, factor, coords = FAMILIES[model_type(folder)]
        self.family, self.resize_factor, self.default_coords = family, factor, coords
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16, float16 or auto, got {dtype!r}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        self.name = f"hf:{folder.name}"
        self.device, self.max_batch = device, max_batch
        self.processor = load_processor(folder)
        self.tokenizer = self.processor.tokenizer
        _widen_pixel_limits(self.processor.image_processor, factor)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        native = (getattr(self.model.config, "min_pixels", None), getattr(self.model.config, "max_pixels", None))
        if all(native):  # the built-in model records the limits it was trained at; Qwen leaves them to the user
            self.default_limits = native
        if (folder / PROMPT_FILE).exists():  # a checkpoint trained by Glimpse on its own prompts
            self.default_prompt_file = str(folder / PROMPT_FILE)
        self.image_token_id = self.model.config.image_token_id
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()
        self._prefix_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()  # how many requests each generate call served
        self._queue: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----------------------------------------------------------------------------------------------------
    async def generate(self, messages: list[Message], params: GenerateParams) -> list[Completion]:
        text, prefix = await asyncio.to_thread(self._prompt, messages, params.tools)
        if self.context and len(prefix.ids) + 1 > self.context:
            raise ContextLengthError(f"the prompt has {len(prefix.ids)} tokens; the model's context is {self.context}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Completion]] = loop.create_future()
        self._queue.append(_Request(text, prefix, params, future))
        if self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop = loop
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            first = self._queue.pop(0)
            batch = [first]
            if first.params.seed is None:
                key = _batch_key(first.params)
                for req in list(self._queue):
                    if len(batch) >= self.max_batch:
                        break
                    if req.params.seed is None and _batch_key(req.params) == key:
                        batch.append(req)
                        self._queue.remove(req)
            self.batch_sizes[len(batch)] += 1
            try:
                results = await asyncio.to_thread(self._run, batch)
            except Exception as exc:  # a failure of the model run fails its requests, not the process
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(BackendError(f"{self.name} failed: {exc}"))
                continue
            for req, completions in zip(batch, results, strict=True):
                if not req.future.done():
                    req.future.set_result(completions)

    # ----------------------------------------------------------------------------------------------------
    def _prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None) -> tuple[str, _Prefix]:
        """The prompt text and its ids: a remembered prefix's ids plus the rest, tokenised with its images."""
        hf_messages, images = to_hf(messages)
        text = self.processor.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True, tools=tools)
        with self._prefix_lock:
            known = max((k for k in self._prefixes if text.startswith(k)), key=len, default="")
            base = self._prefixes.get(known, _Prefix(ids=[]))
            if known:
                self._prefixes.move_to_end(known)
        rest, rest_images = text[len(known) :], images[len(base.pixels) :]
        if rest_images:
            enc = self.processor(text=[rest], images=rest_images, return_tensors="pt")
            sizes = (enc["image_grid_thw"].prod(dim=1)).tolist()
            pixels = list(enc["pixel_values"].split(sizes))
            grids = list(enc["image_grid_thw"])
        else:
            enc = self.processor.tokenizer([rest], return_tensors="pt", add_special_tokens=False)
            pixels, grids = [], []
        ids = base.ids + enc["input_ids"][0].tolist()
        return text, _Prefix(ids=ids, pixels=base.pixels + pixels, grids=base.grids + grids)

    def _run(self, batch: list[_Request]) -> list[list[Completion]]:
        import torch

        params = batch[0].params
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r.prefix.ids) for r in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            input_ids[i, width - len(r.prefix.ids) :] = torch.tensor(r.prefix.ids)
            attention[i, width - len(r.prefix.ids) :] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}
        pixels = [p for r in batch for p in r.prefix.pixels]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
            inputs["image_grid_thw"] = torch.stack([g for r in batch for g in r.prefix.grids]).to(self.device)
            inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).long().to(self.device)
        # temperature None: the checkpoint's generation_config decides (as vLLM does); 0: greedy.
        if params.temperature is None:
            sample = bool(self.model.generation_config.do_sample)
            options: dict[str, Any] = {}
        else:
            sample = params.temperature > 0
            options = {"do_sample": sample}
            if sample:
                options.update(temperature=params.temperature, top_k=0)
                options["top_p"] = params.top_p if params.top_p is not None else 1.0
        copies = params.n if sample else 1  # greedy samples are all the same: generate one, repeat it
        options.update(
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=copies,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if params.stop:
            options["stop_strings"] = list(params.stop)
            options["tokenizer"] = self.tokenizer
        with self._model_lock, torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(**inputs, **options)
        results: list[list[Completion]] = []
        for i, r in enumerate(batch):
            completions = []
            for j in range(params.n):
                row = out[i * copies + j % copies, width:].tolist()
                completions.append(self._completion(r, row, params))
            results.append(completions)
        return results

    def _completion(self, req: _Request, row: list[int], params: GenerateParams) -> Completion:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        sampled = row[: row.index(eos) + 1] if eos in row else list(row)
        while eos not in sampled and sampled and sampled[-1] == pad:  # rows that stopped early are padded
            sampled.pop()
        sampled, raw, stopped = trim_at_stop(self.tokenizer, sampled, params.stop)
        text = self.tokenizer.decode(sampled, skip_special_tokens=True)
        finish = "stop" if stopped else "length"
        with self._prefix_lock:
            self._prefixes[req.text + raw] = _Prefix(
                ids=req.prefix.ids + sampled, pixels=req.prefix.pixels, grids=req.prefix.grids
            )
            while len(self._prefixes) > _PREFIXES:
                self._prefixes.popitem(last=False)
        calls: list[ToolCall] = []
        if params.tools:
            text, calls = split_tool_calls(text)
            if calls:
                finish = "tool_calls"
        return Completion(
            text=text,
            tool_calls=calls,
            finish_reason=finish,
            prompt_tokens=len(req.prefix.ids),
            completion_tokens=len(sampled),
            token_ids=sampled,
            prompt_token_ids=list(req.prefix.ids),
            matched_stop="",  # the text keeps any stop string: nothing to put back
        )


def trim_at_stop(tokenizer: Any, sampled: list[int], stop: list[str]) -> tuple[list[int], str, bool]:
    """Cut sampled tokens after the first stop string, keeping the tokens up to its end (a server that cannot
    stop on a string, such as verl's token-in/token-out servers, samples on to the end-of-turn token).

    Returns:
        The kept tokens, their text with special tokens, and whether the reply stopped (at the end-of-turn
        token or a stop string) rather than running out of tokens.
    """
    raw = tokenizer.decode(sampled, skip_special_tokens=False)
    cut = min((raw.find(s) + len(s) for s in stop if s in raw), default=None)
    if cut is None:
        return sampled, raw, tokenizer.eos_token_id in sampled
    if cut == len(raw):  # the server stopped on the string itself
        return sampled, raw, True
    # the shortest prefix whose text reaches the cut (text length grows with the prefix): a binary search, so a
    # reply that ran thousands of tokens past its stop string costs a dozen decodes, not thousands
    low, high = 0, len(sampled)
    while low < high:
        mid = (low + high) // 2
        if len(tokenizer.decode(sampled[:mid], skip_special_tokens=False)) >= cut:
            high = mid
        else:
            low = mid + 1
    kept = sampled[:low]
    return kept, tokenizer.decode(kept, skip_special_tokens=False), True


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The text before the first ``<tool_call>``, and the calls (Qwen's Hermes format); unreadable calls are
    left out, and with none readable the text is returned whole."""
    calls = []
    for k, m in enumerate(_TOOL_CALL.finditer(text)):
        try:
            payload = json.loads(m.group(1))
            calls.append(
                ToolCall(
                    id=f"call_{k}",
                    name=str(payload.get("name", "")),
                    arguments=json.dumps(payload.get("arguments", {})),
                )
            )
        except (ValueError, AttributeError):
            continue
    if calls:
        text = text[: text.find("<tool_call>")]
    return text, calls


def _batch_key(params: GenerateParams) -> tuple[Any, ...]:
    return (
        params.n,
        params.max_new_tokens,
        params.temperature,
        params.top_p,
        tuple(params.stop),
        json.dumps(params.tools, sort_keys=True) if params.tools else None,
    )


def _widen_pixel_limits(image_processor: Any, factor: int) -> None:
    size = getattr(image_processor, "size", None)
    if size is not None and hasattr(size, "shortest_edge"):
        size.shortest_edge = factor * factor
        size.longest_edge = _MAX_IMAGE_PIXELS
    elif isinstance(size, dict):
        size.update(shortest_edge=factor * factor, longest_edge=_MAX_IMAGE_PIXELS)
    for name, value in (("min_pixels", factor * factor), ("max_pixels", _MAX_IMAGE_PIXELS)):
        if getattr(image_processor, name, None) is not None:
            setattr(image_processor, name, value)


def to_hf(messages: list[Message], inline_images: bool = False) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages in transformers' chat format, and the images in order of appearance (``inline_images``: also
    inside their parts, as ``{"type": "image", "image": PIL}``, the form verl's token builders read)."""
    out, images = [], []
    for m in messages:
        item: dict[str, Any] = {"role": m.role}
        if isinstance(m.content, str):
            item["content"] = m.content
        else:
            parts = []
            for p in m.content:
                if isinstance(p, ImagePart):
                    pixels = p.pil()
                    parts.append({"type": "image", "image": pixels} if inline_images else {"type": "image"})
                    images.append(pixels)
                elif isinstance(p, TextPart):
                    parts.append({"type": "text", "text": p.text})
            item["content"] = parts
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out, images


def create(arg: str, *, device: str = "cpu", dtype: str = "auto", max_batch: int = 8, **_options: Any) -> HFBackend:
    """``hf:PATH``: a local checkpoint folder.

    Raises:
        ConfigError: torch or transformers is missing, or the folder is not a supported checkpoint.
    """
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the hf backend needs {exc.name}, which is not installed: pip install 'glimpse[hf]' "
            "(on a CPU-only machine install torch's CPU build first)"
        ) from None
    return HFBackend(resolve_checkpoint(arg), device=device, dtype=dtype, max_batch=max_batch)


def resolve_checkpoint(arg: str) -> str:
    """A checkpoint folder: ``arg`` itself, or for a Hub id (``Qwen/Qwen2.5-VL-7B-Instruct``) its local snapshot
    (downloaded by huggingface_hub if it is not in the cache yet).

    Raises:
        ConfigError: neither a folder nor a Hub id that can be found.
    """
    if Path(arg).exists() or arg.count("/") != 1 or arg.startswith((".", "/")):
        return arg
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(arg, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    except Exception as exc:  # huggingface_hub raises many kinds (offline, missing repo, no access)
        raise ConfigError(f"{arg} is not a folder here, and the Hugging Face Hub could not provide it: {exc}") from None
