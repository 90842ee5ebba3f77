"""``GlimpseAgentLoop``: Glimpse's agent loop as a verl agent loop, with over-turn masking.

verl runs one agent-loop coroutine per sampled trajectory and trains on what it returns: the prompt ids, the
response ids (sampled tokens and injected observation tokens), a response mask (1 = sampled, trained on) and
the images. This class gets there by running ``glimpse.agent.AgentLoop``, the loop of ``glimpse ask``, with a
one-trajectory backend (``VerlBackend``) that speaks token ids to verl's server manager:

* the first prompt and every injected message are tokenized by verl's Continuous Token builder (the helpers
  of ``AgentLoopBase``), so the ids are exactly what verl's own tool loop would produce for that template;
  sampled ids are never decoded and re-encoded;
* a reply cut at a stop string (``</grounding>``) has the template's end-of-turn tokens added after it, as
  injected tokens (mask 0), before the observation follows;
* the trajectory stops where ``glimpse ask`` would stop it (answer, nothing, turn cap, image cap, context);
  a reply or observation that would not fit ``rollout.response_length`` stops it as ``context_full``, the
  observation left out;
* an over-turn trajectory (a cap stopped it while the model was still calling the tool) keeps its reward in
  the group statistics but gets a response mask of zeros, so it adds no loss (Mini-o3's masking), and is
  flagged ``extra_fields["over_turn"]``;
* a sample with several images shows them all in the first prompt, in order; the images handed to verl are in
  the order of their runs of image tokens, a response is cut only at an image boundary (``fit_response``), and
  every output's image tokens are checked against its images (``check_image_tokens``) before verl sees them.

Register it with ``actor_rollout_ref.rollout.agent.agent_loop_config_path`` (see ``agent_loop.yaml``, in this
package); the keys there besides ``name`` and ``_target_`` are the constructor arguments below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput
from verl.utils.tokenizer import get_processor_token_id

from glimpse.agent import CONTEXT_RESERVE, AgentLoop, LoopOptions
from glimpse.errors import ConfigError, ContextLengthError
from glimpse.hf.processor import FAMILIES, PROMPT_FILE
from glimpse.images import (
    MAX_PIXELS,
    MIN_PIXELS,
    ImageCache,
    Original,
    image_from_bytes,
    image_tokens,
    read_image,
    to_rgb,
)
from glimpse.models.base import Completion, GenerateParams, Message
from glimpse.models.hf import special_token_escaper, split_tool_calls, to_hf, trim_at_stop
from glimpse.train.common import check_image_tokens, image_runs
from glimpse.train.grpo import keeps_loss
from glimpse.trajectory import Sample, Trajectory

# Text that stands for an assistant reply when finding what the chat template writes after one.
_MARKER = "\u2063glimpse-marker\u2063"
# The token Qwen-VL templates write before an image's run of image tokens (looked up by string).
VISION_START = "<|vision_start|>"


class GlimpseAgentLoop(AgentLoopBase):
    """Glimpse's zoom loop inside verl's rollout.

    Args (besides verl's own, which the worker passes):
        protocol: ``tags`` (Mini-o3's tags) or ``tools`` (native function calling).
        coords: box convention; ``None``: the model family's native one (``pixels`` for Qwen2.5-VL).
        prompt_file: prompts to use instead of the defaults; ``None``: the checkpoint's
            ``glimpse_prompts.yaml`` when it has one.
        max_turns: the turn cap (Mini-o3 trains with 6).
        max_images: most images in the conversation, the original included (``None``: no cap but turns).
        max_new_tokens: most tokens per reply (``None``: whatever is left of ``rollout.response_length``).
        min_pixels, max_pixels: image area limits; ``None``: ``data.mm_processor_kwargs`` if it sets them, else
            Mini-o3's 40,000 and 2,000,000.
        mask_over_turn: zero the response mask of over-turn trajectories (turn off for the ablation).
        code: offer the Python code tool.
        record: put the Glimpse trajectory record (JSON) in ``extra_fields["glimpse_trajectory"]``.
    """

    def __init__(
        self,
        *args: Any,
        protocol: str = "tags",
        coords: str | None = None,
        prompt_file: str | None = None,
        max_turns: int = 6,
        max_images: int | None = None,
        max_new_tokens: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        mask_over_turn: bool = True,
        code: bool = False,
        record: bool = True,
        **kwargs: Any,
    ):
        kwargs.pop("tools", None)  # verl's tool list: this loop brings its own tools
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ConfigError("GlimpseAgentLoop needs a vision-language model: verl gave it no processor")
        self.prompt_length = int(self.rollout_config.prompt_length)
        self.response_length = int(self.rollout_config.response_length)
        _, _, factor, native_coords = FAMILIES.get(str(kwargs.get("hf_model_type")), ("", "", 28, "relative"))
        merge = getattr(self.processor.image_processor, "merge_size", None)
        patch = getattr(self.processor.image_processor, "patch_size", None)
        if merge and patch:
            factor = int(merge) * int(patch)
        mm = dict(self.mm_processor_kwargs or {})
        self.limits = (
            int(min_pixels or mm.get("min_pixels") or MIN_PIXELS),
            int(max_pixels or mm.get("max_pixels") or MAX_PIXELS),
        )
        self.factor = factor
        if prompt_file is None:
            path = self.config.actor_rollout_ref.model.get("path")
            if path and (Path(str(path)) / PROMPT_FILE).is_file():
                prompt_file = str(Path(str(path)) / PROMPT_FILE)
        self.options = LoopOptions(
            protocol=protocol,
            coords=coords or native_coords,
            prompt_file=prompt_file,
            max_turns=int(max_turns),
            max_images=max_images,
            max_new_tokens=int(max_new_tokens or self.response_length),
            max_context_tokens=self.prompt_length + self.response_length + CONTEXT_RESERVE,
            code=bool(code),
            min_pixels=self.limits[0],
            max_pixels=self.limits[1],
            resize_factor=self.factor,
            return_token_ids=True,
        )
        self.mask_over_turn = bool(mask_over_turn)
        self.record = bool(record)
        self.image_token_id = get_processor_token_id(self.processor, "image")
        self.vision_start_id = _token_id(self.tokenizer, VISION_START)
        self.turn_close = self._turn_close()
        self.escape = special_token_escaper(self.tokenizer)  # special tokens written as text stay text

    def _turn_close(self) -> list[int]:
        """The token ids the chat template writes after an assistant reply (``<|im_end|>\\n`` for Qwen)."""
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
        text = self.processor.apply_chat_template(chat, tokenize=False, **self.apply_chat_template_kwargs)
        tail = text[text.rindex(_MARKER) + len(_MARKER) :]
        return list(self.tokenizer.encode(tail, add_special_tokens=False))

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        # decoding a large original takes a while: off the event loop, which the other trajectories share
        sample, originals = await asyncio.to_thread(_sample, kwargs)
        backend = VerlBackend(self, sampling_params)
        options = dataclasses.replace(
            self.options, temperature=sampling_params.get("temperature"), top_p=sampling_params.get("top_p")
        )
        loop = AgentLoop(backend, options, image_cache=ImageCache(max_bytes=0))
        for original in originals:
            loop.cache.hold(original)
        traj = (await loop.run(sample))[0]
        if not backend.ids:
            raise ValueError(f"sample {sample.id!r} stopped before its first turn: {traj.error}")
        return self.output(traj, backend)

    def output(self, traj: Trajectory, backend: VerlBackend) -> AgentLoopOutput:
        """What verl trains on: ids, mask (zeros when over-turn), sampled logprobs, images, flags."""
        cut = backend.prompt_len
        prompt_images = len(image_runs(backend.ids[:cut], self.image_token_id))
        kept = fit_response(
            backend.ids[cut:],
            backend.mask,
            backend.logprobs,
            backend.images,
            prompt_images,
            self.response_length,
            self.image_token_id,
            self.vision_start_id,
        )
        response, mask, logprobs = kept.ids, kept.mask, kept.logprobs
        if not keeps_loss(traj.over_turn, self.mask_over_turn):  # Mini-o3's over-turn masking, defined once
            mask = [0] * len(mask)
        check_image_tokens(
            backend.ids[:cut] + response,
            [image_tokens(*im.size, self.factor) for im in kept.images],
            self.image_token_id,
            f"GlimpseAgentLoop's output for {traj.id}",
        )
        injected = sum(1 for t in traj.turns if t.injected)
        extra: dict[str, Any] = {
            **backend.server_fields,  # e.g. min/max_global_steps, which verl's trainer reads per trajectory
            "over_turn": bool(traj.over_turn),
            "stop_reason": str(traj.stop_reason),
            "glimpse_answer": traj.answer or "",
            "answered": traj.answer is not None,
            "turns": len(traj.turns),
            "zooms": sum(1 for t in traj.turns if t.observation_index is not None),
            "tool_errors": sum(1 for t in traj.turns if t.kind == "error"),
        }
        if self.record:
            extra["glimpse_trajectory"] = traj.model_dump_json(exclude={"token_view"})  # verl holds the ids
        return AgentLoopOutput(
            prompt_ids=backend.ids[:cut],
            response_ids=response,
            response_mask=mask,
            response_logprobs=logprobs,
            multi_modal_data={"images": kept.images},
            mm_processor_kwargs=backend.mm_processor_kwargs,
            num_turns=1 + len(traj.turns) + injected,
            metrics={
                "generate_sequences": backend.generate_s,
                "tool_calls": sum(t.tool_s or 0.0 for t in traj.turns),
                "num_preempted": backend.preempted,
            },
            extra_fields=extra,
        )


class VerlBackend:
    """One trajectory's backend: messages in, token ids to verl's server manager, completions out.

    It keeps the trajectory's running token ids, response mask and sampled logprobs. Each call after the
    first tokenizes only the messages the loop added since (the end-of-turn tokens after a cut reply, then
    the observation), so the ids of earlier turns, sampled ones included, never change.
    """

    def __init__(self, owner: GlimpseAgentLoop, sampling_params: dict[str, Any]):
        self.owner = owner
        self.name = f"verl:{owner.config.actor_rollout_ref.model.get('path', 'model')}"
        self.default_coords = owner.options.coords
        self.resize_factor = owner.factor
        self.default_limits = owner.limits
        self.sampling_params = dict(sampling_params)
        self.request_id = hashlib.sha1(f"{id(self)}/{time.time_ns()}".encode()).hexdigest()
        self.mm_processor_kwargs = owner._get_mm_processor_kwargs()
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.logprobs: list[float] | None = [] if sampling_params.get("logprobs") else None
        self.prompt_len = 0
        self.messages: list[dict[str, Any]] = []
        self.images: list[Image.Image] = []
        self.generate_s = 0.0
        self.server_fields: dict[str, Any] = {}
        self.preempted = -1
        # vLLM (verl starts it with its tokenizer) stops on strings; SGLang there runs token-in/token-out only
        self.stop_strings = str(owner.rollout_config.get("name", "")) == "vllm"

    async def generate(self, messages: list[Message], params: GenerateParams) -> list[Completion]:
        if params.n != 1:
            raise ValueError(f"VerlBackend samples one trajectory; asked for n={params.n}")
        chat, images = to_hf(messages, inline_images=True, escape=self.owner.escape)
        if not self.ids:
            await self._start(chat, images, params.tools)
        else:
            await self._extend(chat, images, params.tools)
        room = self.owner.response_length - len(self.mask)
        if room <= 0:
            raise ContextLengthError(f"the response holds {len(self.mask)} of {self.owner.response_length} tokens")
        sampling = dict(self.sampling_params, max_tokens=min(params.max_new_tokens, room))
        stop_ids = self._stop_token_ids(params.stop)
        if stop_ids:
            sampling["stop_token_ids"] = sorted(set(sampling.get("stop_token_ids") or []) | set(stop_ids))
        if self.stop_strings and params.stop:
            sampling.update(stop=list(params.stop), include_stop_str_in_output=True)
        started = time.perf_counter()
        out = await self.owner.server_manager.generate(
            request_id=self.request_id,
            prompt_ids=self.ids,
            sampling_params=sampling,
            image_data=list(self.images) or None,
            mm_processor_kwargs=self.mm_processor_kwargs or None,
        )
        self.generate_s += time.perf_counter() - started
        self._note_server_fields(out)
        tokenizer = self.owner.tokenizer
        sampled, _, stopped = trim_at_stop(tokenizer, list(out.token_ids), params.stop)
        logprobs = None
        if self.logprobs is not None:
            if out.log_probs is None:
                raise RuntimeError("verl's server returned no logprobs although the sampling parameters asked for them")
            logprobs = list(out.log_probs)[: len(sampled)]
        prompt = self.ids  # never changed in place: merges build new lists
        merged, self.mask, kept = await self.owner.ct_merge_assistant_token(
            self.ids, sampled, self.mask, self.logprobs, assistant_logprobs=logprobs
        )
        self.ids = merged.token_ids
        if self.logprobs is not None:
            self.logprobs = kept
        text = tokenizer.decode(sampled, skip_special_tokens=True)
        calls = []
        if params.tools:
            text, calls = split_tool_calls(text)
        return [
            Completion(
                text=text,
                tool_calls=calls,
                finish_reason="tool_calls" if calls else ("stop" if stopped else "length"),
                prompt_tokens=len(prompt),
                completion_tokens=len(sampled),
                token_ids=sampled,
                prompt_token_ids=prompt,
                matched_stop="",  # the text keeps any stop string
            )
        ]

    def _note_server_fields(self, out: Any) -> None:
        """Carry what the server reports as verl's own loops do: the first call's fields, the latest
        ``max_global_steps``, and preemptions summed."""
        fields = dict(getattr(out, "extra_fields", None) or {})
        if not self.server_fields:
            self.server_fields = fields
        elif fields.get("max_global_steps") is not None:
            self.server_fields["max_global_steps"] = fields["max_global_steps"]
        if out.num_preempted is not None:
            self.preempted = max(self.preempted, 0) + int(out.num_preempted)

    async def _start(self, chat: list[dict[str, Any]], images: list[Image.Image], tools: Any) -> None:
        ids = await self.owner.ct_build_initial_tokens(chat, tools=tools, images=images)
        self._check_images(ids, images)
        self.ids, self.prompt_len = list(ids), len(ids)
        self.messages, self.images = chat, list(images)

    async def _extend(self, chat: list[dict[str, Any]], images: list[Image.Image], tools: Any) -> None:
        """Close the last reply and add the messages after it (as injected tokens)."""
        reply, added = chat[len(self.messages)], chat[len(self.messages) + 1 :]
        if reply.get("role") != "assistant" or not added:
            raise ValueError("the agent loop must add its reply and then at least one message before asking again")
        close = self.owner.turn_close
        tail = close[1:] if close and self.ids and self.ids[-1] == close[0] else close
        ids = self.ids + tail
        mask = self.mask + [0] * len(tail)
        logprobs = self.logprobs + [0.0] * len(tail) if self.logprobs is not None else None
        previous = [*self.messages, reply]
        merged, mask, logprobs = await self.owner.ct_merge_context_msg(
            previous, previous + added, ids, mask, logprobs, tools=tools
        )
        new_images = images[len(self.images) :]
        self._check_images(merged.token_ids[len(ids) :], new_images)
        if len(mask) >= self.owner.response_length:
            raise ContextLengthError(
                f"the observation would bring the response to {len(mask)} tokens, over rollout.response_length "
                f"{self.owner.response_length}"
            )
        self.ids, self.mask, self.logprobs = merged.token_ids, mask, logprobs
        self.messages = previous + added
        self.images.extend(new_images)

    def _check_images(self, ids: list[int], images: list[Image.Image]) -> None:
        """Each image must take the tokens its shown size implies; else the processor resized it again, and
        the boxes the model writes would not be in the pixels it saw."""
        got = sum(1 for t in ids if t == self.owner.image_token_id)
        want = sum(image_tokens(*im.size, self.owner.factor) for im in images)
        if got != want:
            raise ConfigError(
                f"the processor turned {len(images)} image(s) into {got} image tokens where {want} were expected: "
                f"its pixel limits differ from the loop's ({self.owner.limits[0]:,}–{self.owner.limits[1]:,}); "
                "set the same min_pixels/max_pixels in data.mm_processor_kwargs and the agent loop"
            )

    def _stop_token_ids(self, stop: list[str]) -> list[int]:
        """Stop strings that are single tokens (the server can stop on those; the rest are cut afterwards)."""
        out = []
        for s in stop:
            ids = self.owner.tokenizer.encode(s, add_special_tokens=False)
            if len(ids) == 1:
                out.append(int(ids[0]))
        return out


class Response(NamedTuple):
    """A trajectory's response as verl trains on it, and the images whose tokens it and the prompt hold."""

    ids: list[int]
    mask: list[int]
    logprobs: list[float] | None
    images: list[Image.Image]


def fit_response(
    ids: list[int],
    mask: list[int],
    logprobs: list[float] | None,
    images: list[Image.Image],
    prompt_images: int,
    limit: int,
    image_token_id: int,
    vision_start_id: int | None,
) -> Response:
    """The response cut to ``limit`` tokens without splitting an image.

    A cut inside an image's run of tokens (or just before it) moves to before the run and its vision-start
    token, and every image whose run is cut off leaves the image list: the images verl turns into
    ``pixel_values`` and ``image_grid_thw`` rows stay in step with the image tokens left. (The backend keeps
    responses within ``limit``, so this cuts only what a future change lets through.)

    Args:
        ids, mask, logprobs: the response's tokens, its mask and log-probabilities.
        images: every image of the trajectory, the prompt's first.
        prompt_images: how many of ``images`` the prompt holds.
        limit: ``rollout.response_length``.
        image_token_id, vision_start_id: the tokens of an image's run and of what opens it.
    """
    cut = min(len(ids), limit)
    runs = image_runs(ids, image_token_id)
    first_cut_off = next((r for r in runs if r.start + r.length > cut), None)
    if first_cut_off is not None and first_cut_off.start <= cut:
        cut = first_cut_off.start
        if cut and ids[cut - 1] == vision_start_id:
            cut -= 1
    kept = sum(1 for r in runs if r.start + r.length <= cut)
    return Response(
        ids[:cut], mask[:cut], logprobs[:cut] if logprobs is not None else None, images[: prompt_images + kept]
    )


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a token written as text, or ``None`` when the tokenizer has no single token for it."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def _sample(kwargs: dict[str, Any]) -> tuple[Sample, list[Original]]:
    """The Glimpse sample of a verl row, and its original images, in order.

    Rows written by ``glimpse train verl-data`` carry the sample in ``extra_info["glimpse_sample"]`` and the
    images' bytes in ``extra_info["glimpse_images"]`` (rows of earlier versions: one image in
    ``glimpse_image``), or, written with ``--image-paths``, their paths in the sample. Other verl datasets work
    too: the images are the prompt's images, the question the text of the last user message, the gold answer
    ``reward_model.ground_truth``.
    """
    raw_prompt = list(kwargs.get("raw_prompt") or [])
    extra = kwargs.get("extra_info") or {}
    index = kwargs.get("index", extra.get("index", 0))
    stored = extra.get("glimpse_sample")
    fields = json.loads(stored) if isinstance(stored, str) else dict(stored or {})
    inline = list(extra.get("glimpse_images") or ([extra["glimpse_image"]] if extra.get("glimpse_image") else []))
    paths = list(fields.get("images") or [])
    if inline:
        names = paths or [f"verl-row-{index}-{k}" for k in range(1, len(inline) + 1)]
        if len(names) != len(inline):
            raise ValueError(f"row {index}: its sample names {len(names)} images but it carries {len(inline)}")
        originals = [image_from_bytes(bytes(data), name) for data, name in zip(inline, names, strict=True)]
    elif paths:
        originals = [read_image(path) for path in paths]
    else:
        originals = _prompt_images(raw_prompt, index)
    if not fields:
        user = next((m for m in reversed(raw_prompt) if m.get("role") == "user"), {})
        content = user.get("content")
        question = (
            content
            if isinstance(content, str)
            else "".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")
        )
        truth = (kwargs.get("reward_model") or {}).get("ground_truth")
        fields = {"id": f"row-{index}", "question": question.strip(), "answer": None if truth is None else str(truth)}
    fields["images"] = [original.path for original in originals]
    return Sample.model_validate(fields), originals


def _prompt_images(raw_prompt: list[dict[str, Any]], index: Any) -> list[Original]:
    """The images of a verl prompt, in order (as ``RLHFDataset`` builds them: bytes, pixels or a path)."""
    blocks = [
        b
        for m in raw_prompt
        if isinstance(m.get("content"), list)
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "image"
    ]
    if not blocks:
        raise ValueError(f"row {index} has no image (no glimpse_images, no image path, none in its prompt)")
    originals = []
    for k, block in enumerate(blocks, 1):
        name = f"verl-row-{index}-{k}"
        if block.get("bytes"):
            originals.append(image_from_bytes(bytes(block["bytes"]), name))
        elif isinstance(block.get("image"), Image.Image):  # pixels with no file behind them: hash the pixels
            pixels = to_rgb(block["image"])
            originals.append(Original(name, hashlib.sha256(pixels.tobytes()).hexdigest(), pixels))
        elif isinstance(block.get("image"), str):
            originals.append(read_image(block["image"]))
        else:
            raise ValueError(f"row {index}: cannot read its image block {k} (keys {sorted(block)})")
    return originals
