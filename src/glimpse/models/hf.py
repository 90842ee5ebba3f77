"""The ``hf`` backend: a local Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint run with transformers.

* Loads any checkpoint folder laid out as on the Hub (``hf:/path/to/Qwen2.5-VL-7B-Instruct``), or a Hub id
  (``hf:Qwen/Qwen2.5-VL-7B-Instruct``) from the local cache or a download, on ``cpu``
  (float32 by default) or ``cuda``; works without torchvision (see ``glimpse.hf.processor``).
* Prompts go through the checkpoint's own chat template and processor. The image processor's pixel limits
  are widened so it never resizes the images the agent loop already fitted to its limits: the model sees
  exactly the size the loop recorded, and pixel coordinates mean the same thing on both sides. The images of a
  conversation (every original of a multi-image question is in its first user turn) are processed in order,
  each its own run of image tokens; kept prefixes and key/values are told apart by the images' digests too.
* **Token view.** A reply's text is the exact decoding of the sampled tokens (stop string and all), and the
  backend remembers, per conversation prefix, the token ids it actually used. The next turn's prompt reuses
  those ids and tokenises only what the harness added, so the ids the agent loop records are the ids the model
  sampled, with 1 for sampled and 0 for injected tokens: what RL needs.
* **KV cache across turns** (``glimpse.models.kv_cache``). The past keys and values of each conversation are
  kept between its turns, so a turn runs only the tokens the harness added (and their new images) and the tokens
  it samples; the ``n`` samples of a request share one pass over the prompt. Each request's new tokens are run
  on their own against its cached prefix (no padding between prefix and new tokens); the decoding is batched,
  every row left-padded to the longest cached length. Positions are the ones a from-scratch pass computes (the
  model's own ``_prepare_position_ids_for_generation`` over the whole sequence: Qwen's mrope with its image
  offsets), so outputs are those of a from-scratch run up to float rounding. A model that keeps per-row state
  of its own on the generation cache (the built-in model's pointer: region keys, images seen) has each row's
  state kept with its key/values and put back on the rebuilt cache (``_ROW_STATE``). Cleared when the weights
  change (RL updates them in place). A model whose cache is not a plain ``DynamicCache`` (sliding windows, linear
  attention) or whose forward takes no ``position_ids`` runs as before, without reuse.
* **Batching.** Concurrent requests with the same sampling settings are generated together (left padding), up
  to ``max_batch``; ``n`` samples use ``num_return_sequences``. A request sampled with a ``seed`` runs alone, so
  it is reproducible (a greedy one batches: its seed changes nothing).
* Each model family's native box convention is the default (``default_coords``): absolute pixels of the
  resized input for Qwen2.5-VL, 0–1000 for Qwen2-VL, relative for Qwen3-VL; and its resize factor (28 or 32).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glimpse.errors import BackendError, ConfigError, ContextLengthError
from glimpse.models.base import Completion, GenerateParams, ImagePart, Message, TextPart, ToolCall
from glimpse.models.kv_cache import ImageDigests, KVCache, image_starts

log = logging.getLogger(__name__)

# Conversation prefixes whose token ids are remembered.
_PREFIXES = 256
# The attribute under which a model keeps per-row state of its own on its generation cache, kept with each row's
# key/values between turns: the built-in model's pointer (``glimpse.builtin.model.PointerState``, whose ``row``,
# ``after`` and ``stack`` take a row out, wind it back to a shorter prefix, and put rows together).
_ROW_STATE = "glimpse_pointer"
# Default memory for kept past key/values: a 7B Qwen2.5-VL in bfloat16 holds 56 KiB per token, so 4 GiB keep
# about 75,000 tokens (eight 9,000-token conversations).
KV_CACHE_GB = 4.0
# Kept key/values per request of a full batch: a conversation holds one entry (its latest turn), the ``n`` samples
# of a first turn one each, and finished conversations' entries, never asked for again, go first beyond this many.
# Without the bound they stayed up to the byte budget: 2.4 MB per finished 6-turn hard probe of the built-in model.
KV_ENTRIES_PER_REQUEST = 8


@dataclass
class _Prefix:
    """Token ids of a conversation prefix, and the processed images it holds (one tensor per image)."""

    ids: list[int]
    pixels: list[Any] = field(default_factory=list)
    grids: list[Any] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)  # of the images, in order: ids alone do not tell them apart


@dataclass
class _Row:
    """One prompt's key/values of all its tokens but the last, and the model's state of that row (if it keeps one)."""

    layers: list[tuple[Any, Any]]
    state: Any = None


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
        kv_cache_gb: memory for past key/values kept between turns; 0 turns the reuse off.
    """

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        max_batch: int = 8,
        kv_cache_gb: float = KV_CACHE_GB,
    ):
        import torch
        from transformers import AutoModelForImageTextToText

        from glimpse.hf.processor import FAMILIES, PROMPT_FILE, keep_shown_sizes, load_processor, model_type

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
        if kv_cache_gb < 0:
            raise ConfigError(f"kv_cache_gb must be 0 (no reuse) or more, got {kv_cache_gb}")
        self.name = f"hf:{folder.name}"
        self.device, self.max_batch = device, max_batch
        self.processor = load_processor(folder)
        self.tokenizer = self.processor.tokenizer
        self._escape = special_token_escaper(self.tokenizer)
        keep_shown_sizes(self.processor.image_processor, factor)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        native = (getattr(self.model.config, "min_pixels", None), getattr(self.model.config, "max_pixels", None))
        if all(native):  # the built-in model records the limits it was trained at; Qwen leaves them to the user
            self.default_limits = native
        if (folder / PROMPT_FILE).exists():  # a checkpoint trained by Glimpse on its own prompts
            self.default_prompt_file = str(folder / PROMPT_FILE)
        self.image_token_id = self.model.config.image_token_id
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self._prefixes: OrderedDict[tuple[str, tuple[bytes, ...]], _Prefix] = OrderedDict()
        self._prefix_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._digest = ImageDigests()
        entries = KV_ENTRIES_PER_REQUEST * max_batch
        self.kv_cache = KVCache(int(kv_cache_gb * 2**30), self.image_token_id, entries) if kv_cache_gb > 0 else None
        self._weights: tuple[int, int] | None = None  # the model and parameter versions the cache was filled with
        self._unsupported: set[int] = set()  # models (by id) that cannot continue from a cache
        self._forward_args: dict[int, set[str]] = {}  # per model (by id): what its forward accepts
        self.batch_sizes: Counter[int] = Counter()  # how many requests each generate call served
        self._queue: list[_Request] = []
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----------------------------------------------------------------------------------------------------
    async def generate(self, messages: list[Message], params: GenerateParams) -> list[Completion]:
        try:
            text, prefix = await asyncio.to_thread(self._prompt, messages, params.tools)
        except (ValueError, TypeError, IndexError, KeyError) as exc:  # the processor on what the loop sent
            raise BackendError(f"{self.name} could not build the prompt: {exc}") from exc
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
            if not _seeded(first.params):
                key = _batch_key(first.params)
                for req in list(self._queue):
                    if len(batch) >= self.max_batch:
                        break
                    if not _seeded(req.params) and _batch_key(req.params) == key:
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
        hf_messages, images = to_hf(messages, escape=self._escape)
        digests = [self._digest(im) for im in images]
        text = self.processor.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True, tools=tools)
        with self._prefix_lock:
            known = max(
                (k for k in self._prefixes if text.startswith(k[0]) and tuple(digests[: len(k[1])]) == k[1]),
                key=lambda k: len(k[0]),
                default=None,
            )
            base = self._prefixes[known] if known else _Prefix(ids=[])
            if known:
                self._prefixes.move_to_end(known)
        rest, rest_images = text[len(known[0]) if known else 0 :], images[len(base.pixels) :]
        if rest_images:
            enc = self.processor(text=[rest], images=rest_images, return_tensors="pt")
            sizes = (enc["image_grid_thw"].prod(dim=1)).tolist()
            pixels = list(enc["pixel_values"].split(sizes))
            grids = list(enc["image_grid_thw"])
        else:
            enc = self.processor.tokenizer([rest], return_tensors="pt", add_special_tokens=False)
            pixels, grids = [], []
        ids = base.ids + enc["input_ids"][0].tolist()
        return text, _Prefix(ids=ids, pixels=base.pixels + pixels, grids=base.grids + grids, digests=digests)

    def _options(self, params: GenerateParams) -> tuple[dict[str, Any], int]:
        """``generate``'s sampling options, and how many rows each prompt becomes."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
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
        return options, copies

    def _left_padded(self, batch: list[_Request], width: int) -> tuple[Any, Any]:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            input_ids[i, width - len(r.prefix.ids) :] = torch.tensor(r.prefix.ids)
            attention[i, width - len(r.prefix.ids) :] = 1
        return input_ids.to(self.device), attention.to(self.device)

    def _run(self, batch: list[_Request]) -> list[list[Completion]]:
        if self.kv_cache is None or id(self.model) in self._unsupported or not self._can_continue(self.model):
            return self._run_from_scratch(batch)
        with self._model_lock:
            weights = (id(self.model), sum(p._version for p in self.model.parameters()))
            if weights != self._weights:  # new or updated weights: every kept key/value is stale
                self.kv_cache.clear()
                self._weights = weights
        try:
            return self._run_cached(batch)
        except _NoReuse as exc:
            log.warning("%s: past key/values are not reused (%s); every turn is computed whole", self.name, exc)
            self._unsupported.add(id(self.model))
            self.kv_cache.clear()
            return self._run_from_scratch(batch)

    def _run_from_scratch(self, batch: list[_Request]) -> list[list[Completion]]:
        """Every prompt computed whole (left padding), as a model without cache reuse runs."""
        import torch

        params = batch[0].params
        options, copies = self._options(params)
        # each of the n samples its own row: generate's own expansion repeats every tensor row by row, which
        # interleaves a prompt's image rows for a model whose pixel rows are not one per sample (the built-in one)
        rows = [r for r in batch for _ in range(copies)]
        options["num_return_sequences"] = 1
        width = max(len(r.prefix.ids) for r in batch)
        input_ids, attention = self._left_padded(rows, width)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
        pixels = [p for r in rows for p in r.prefix.pixels]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
            inputs["image_grid_thw"] = torch.stack([g for r in rows for g in r.prefix.grids]).to(self.device)
            inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        with self._model_lock, torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(**inputs, **options)
        return self._completions(batch, out, width, copies, params)

    def _completions(
        self, batch: list[_Request], out: Any, width: int, copies: int, params: GenerateParams
    ) -> list[list[Completion]]:
        results: list[list[Completion]] = []
        for i, r in enumerate(batch):
            completions = []
            for j in range(params.n):
                row = out[i * copies + j % copies, width:].tolist()
                completions.append(self._completion(r, row, params))
            results.append(completions)
        return results

    # ----------------------------------------------------------------------------------------------------
    def _can_continue(self, model: Any) -> bool:
        """Whether the model takes explicit positions and generate can compute them (else: no reuse)."""
        if id(model) not in self._forward_args:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
            accepted = set(inspect.signature(base.forward).parameters)
            if not hasattr(base, "_prepare_position_ids_for_generation"):
                accepted.discard("position_ids")
            self._forward_args[id(model)] = accepted
        return "position_ids" in self._forward_args[id(model)]

    def _run_cached(self, batch: list[_Request]) -> list[list[Completion]]:
        """1. Positions of every prompt token, as a from-scratch pass computes them. 2. Each prompt's tokens
        past its cached prefix, but the last, run against that prefix (its new images encoded here). 3. The
        rows left-padded into one cache (copied for ``n`` samples) and ``generate`` from the last prompt token.
        4. Each row's key/values kept for its next turn."""
        import torch
        from transformers import DynamicCache

        params = batch[0].params
        options, copies = self._options(params)
        width = max(len(r.prefix.ids) for r in batch)
        if width < 2:
            raise _NoReuse("a one-token prompt")
        input_ids, attention = self._left_padded(batch, width)
        kwargs: dict[str, Any] = {"attention_mask": attention}
        grids = [g for r in batch for g in r.prefix.grids]
        if grids:
            kwargs["image_grid_thw"] = torch.stack(grids).to(self.device)
            kwargs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        with self._model_lock, torch.no_grad():
            positions = base._prepare_position_ids_for_generation(input_ids, dict(kwargs))
            rows = []
            for i, r in enumerate(batch):
                start = width - len(r.prefix.ids)
                rows.append(self._prefill(r, positions[..., i : i + 1, start : width - 1]))
            layers = []
            for k in range(len(rows[0].layers)):
                pair = []
                for kv in (0, 1):
                    padded = [_left_pad(row.layers[k][kv], width - 1) for row in rows]
                    # one row: its tensor as it is, not a copy (a cache never writes into a tensor it is given)
                    t = torch.cat(padded) if len(padded) > 1 else padded[0]
                    pair.append(t.repeat_interleave(copies, 0) if copies > 1 else t)
                layers.append((pair[0], pair[1]))
            cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
            states = [row.state for row in rows for _ in range(copies)]
            known = next((s for s in states if s is not None), None)
            if known is not None:
                setattr(cache, _ROW_STATE, type(known).stack(states))
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                cache=cache,
                return_dict_in_generate=True,
                **options,
            )
        results = self._completions(batch, out.sequences, width, copies, params)
        self._keep(batch, results, out, width, copies)
        return results

    def _prefill(self, req: _Request, positions: Any) -> _Row:
        """Keys and values of all prompt tokens but the last (a cached prefix plus the rest run now), and the model's
        state of the row after them."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        assert self.kv_cache is not None
        ids = req.prefix.ids
        entry, cached = self.kv_cache.match(ids, req.prefix.digests, limit=len(ids) - 1)
        self.kv_cache.stats["requests"] += 1
        self.kv_cache.stats["hits"] += int(cached > 0)
        self.kv_cache.stats["reused_tokens"] += cached
        self.kv_cache.stats["computed_tokens"] += len(ids) - 1 - cached
        past = [(k[:, :, :cached], v[:, :, :cached]) for k, v in entry.layers] if entry and cached else None
        cache = DynamicCache(ddp_cache_data=past, config=self.model.config)
        done = len(image_starts(np.asarray(ids[:cached]), self.image_token_id))  # images inside the prefix
        if past and entry.state is not None:
            setattr(cache, _ROW_STATE, entry.state.after(ids[:cached], done))
        new = torch.tensor([ids[cached:-1]], device=self.device)
        if new.shape[1]:
            inputs: dict[str, Any] = {
                "input_ids": new,
                "attention_mask": torch.ones((1, len(ids) - 1), dtype=torch.long, device=self.device),
                "position_ids": positions[..., cached:],
                "cache": cache,
                "use_cache": True,
            }
            if len(req.prefix.pixels) > done:
                inputs["pixel_values"] = torch.cat(req.prefix.pixels[done:]).to(self.device, self.model.dtype)
                inputs["image_grid_thw"] = torch.stack(req.prefix.grids[done:]).to(self.device)
                inputs["mm_token_type_ids"] = (new == self.image_token_id).long()
            if "logits_to_keep" in self._forward_args[id(self.model)]:
                inputs["logits_to_keep"] = 1
            self.model(**inputs)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise _NoReuse(f"the model's cache has {type(cache.layers[0]).__name__} layers, not plain DynamicLayer")
        if cache.get_seq_length() != len(ids) - 1:
            raise _NoReuse("the model does not fill the cache it is given")
        return _Row([(layer.keys, layer.values) for layer in cache.layers], getattr(cache, _ROW_STATE, None))

    def _keep(self, batch: list[_Request], results: list[list[Completion]], out: Any, width: int, copies: int) -> None:
        """Keep each row's key/values (its prompt and the sampled tokens that went through the model)."""
        assert self.kv_cache is not None
        cache = out.cache if getattr(out, "cache", None) is not None else None
        if cache is None:
            raise _NoReuse("generate returned no cache")
        fed = cache.get_seq_length() - width  # sampled tokens that went through the model (all but the last)
        state = getattr(cache, _ROW_STATE, None)
        for i, r in enumerate(batch):
            start = width - len(r.prefix.ids)
            for j in range(copies):
                sampled = results[i][j].token_ids or []
                keep = min(len(sampled), fed)
                row = i * copies + j
                layers = [
                    (_own(layer.keys, row, start, width + keep), _own(layer.values, row, start, width + keep))
                    for layer in cache.layers
                ]
                kept = state.row(row) if state is not None else None
                self.kv_cache.put(r.prefix.ids + sampled[:keep], r.prefix.digests, layers, kept)

    def _completion(self, req: _Request, row: list[int], params: GenerateParams) -> Completion:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        sampled = row[: row.index(eos) + 1] if eos in row else list(row)
        while eos not in sampled and sampled and sampled[-1] == pad:  # rows that stopped early are padded
            sampled.pop()
        sampled, raw, stopped = trim_at_stop(self.tokenizer, sampled, params.stop)
        text = self.tokenizer.decode(sampled, skip_special_tokens=True)
        finish = "stop" if stopped else "length"
        with self._prefix_lock:
            self._prefixes[(req.text + raw, tuple(req.prefix.digests))] = _Prefix(
                req.prefix.ids + sampled, req.prefix.pixels, req.prefix.grids, req.prefix.digests
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


class _NoReuse(Exception):
    """The model cannot continue from kept key/values; the backend computes every turn whole."""


def _own(tensor: Any, row: int, start: int, end: int) -> Any:
    """``tensor[row, :, start:end]`` (batch dimension kept) in memory of its own: a view of a batch would keep the
    whole batch alive; the whole tensor (one row, nothing cut) is kept as it is, saving a copy of it."""
    piece = tensor[row : row + 1, :, start:end]
    return piece if piece.shape == tensor.shape else piece.clone()


def _left_pad(tensor: Any, length: int) -> Any:
    """``(1, heads, n, dim)`` → ``(1, heads, length, dim)`` with zeros before (masked out by the attention mask)."""
    import torch

    missing = length - tensor.shape[2]
    if not missing:
        return tensor
    zeros = torch.zeros((*tensor.shape[:2], missing, tensor.shape[3]), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([zeros, tensor], dim=2)


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
    left out, and with none readable the text is returned whole. Found by plain string search (linear in the
    reply, however many unclosed tags it holds); a payload nested too deeply to parse is unreadable, not an error.
    """
    calls: list[ToolCall] = []
    start, k = text.find("<tool_call>"), 0
    while start != -1:
        end = text.find("</tool_call>", start)
        if end == -1:
            break
        body = text[start + len("<tool_call>") : end].strip()
        try:
            payload = json.loads(body)
            calls.append(
                ToolCall(
                    id=f"call_{k}",
                    name=str(payload.get("name", "")),
                    arguments=json.dumps(payload.get("arguments", {})),
                )
            )
        except (ValueError, AttributeError, TypeError, RecursionError):
            pass
        start, k = text.find("<tool_call>", end), k + 1
    if calls:
        text = text[: text.find("<tool_call>")]
    return text, calls


def _seeded(params: GenerateParams) -> bool:
    """Whether the request samples with a seed (and so runs alone); greedy decoding ignores its seed."""
    return params.seed is not None and params.temperature != 0


def _batch_key(params: GenerateParams) -> tuple[Any, ...]:
    return (
        params.n,
        params.max_new_tokens,
        params.temperature,
        params.top_p,
        tuple(params.stop),
        json.dumps(params.tools, sort_keys=True) if params.tools else None,
    )


@functools.lru_cache(maxsize=8)  # one per tokenizer (hashed by identity): SFT asks once per example
def special_token_escaper(tokenizer: Any) -> Callable[[str], str]:
    """A function that breaks the tokenizer's special tokens written as text (``<|image_pad|>``, ``<|im_end|>``),
    so that text a model or its code wrote is tokenised as text: otherwise it becomes the token itself (an image
    placeholder with no image, an end of turn). A zero-width space goes after the first character."""
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    specials = {t for t in specials if len(t) > 1}
    if not specials:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda m: m.group()[0] + "\u200b" + m.group()[1:], text) if text else text


def to_hf(
    messages: list[Message], inline_images: bool = False, escape: Callable[[str], str] | None = None
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages in transformers' chat format, and the images in order of appearance (``inline_images``: also
    inside their parts, as ``{"type": "image", "image": PIL}``, the form verl's token builders read; ``escape``:
    applied to every text and tool-call argument, e.g. ``special_token_escaper``)."""
    escape = escape or (lambda text: text)
    out, images = [], []
    for m in messages:
        item: dict[str, Any] = {"role": m.role}
        if isinstance(m.content, str):
            item["content"] = escape(m.content)
        else:
            parts = []
            for p in m.content:
                if isinstance(p, ImagePart):
                    pixels = p.pil()
                    parts.append({"type": "image", "image": pixels} if inline_images else {"type": "image"})
                    images.append(pixels)
                elif isinstance(p, TextPart):
                    parts.append({"type": "text", "text": escape(p.text)})
            item["content"] = parts
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": escape_arguments(c.arguments, escape)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out, images


def escape_arguments(arguments: Any, escape: Callable[[str], str]) -> Any:
    if isinstance(arguments, str):
        return escape(arguments)
    if isinstance(arguments, dict):
        return {k: escape_arguments(v, escape) for k, v in arguments.items()}
    if isinstance(arguments, list):
        return [escape_arguments(v, escape) for v in arguments]
    return arguments


def create(
    arg: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    max_batch: int = 8,
    kv_cache_gb: float = KV_CACHE_GB,
    **_options: Any,
) -> HFBackend:
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
    return HFBackend(resolve_checkpoint(arg), device=device, dtype=dtype, max_batch=max_batch, kv_cache_gb=kv_cache_gb)


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
