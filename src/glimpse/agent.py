"""The agent loop: the model looks at an image, thinks, zooms, looks again, and answers.

One call of ``AgentLoop.run`` turns one sample into ``k`` trajectories. Each goes through these steps until
it stops:

1. Check that the next reply still fits the context window (else stop: ``context_full``).
2. Ask the backend for a reply (the ``k`` first replies come from one request with ``n = k``).
3. Read the reply with the protocol: a zoom call, an answer, a mistake, or nothing.
4. Answer → stop (``answer``); nothing → stop (``no_action``); turn cap reached → stop (``max_turns``).
5. A mistake → tell the model what was wrong and go on.
6. A zoom → if the image cap is reached stop (``max_images``); else run the zoom tool and show the crop
   (or the tool's error) to the model. Code (with the code tool on) → run it in the trajectory's sandboxed
   Python session and show what it printed and any images it made.

A sample with several images shows them all in the first user turn, as ``image_1``, ``image_2`` … sharing one
image's pixel budget; every zoom is cut from the original it names (the contract is in ``glimpse.trajectory``).

A cap that stops the loop while the model was still calling the tool marks the trajectory ``over_turn``,
which RL uses to mask it. Backend failures end that trajectory with ``error``; unreadable images end it
before the first turn. Neither stops the other trajectories of a batch. Every limit is a field of ``LoopOptions``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from PIL import Image

from glimpse.config import LoopSettings, loop_setting_names
from glimpse.errors import BackendError, ConfigError, ContextLengthError, ImageInputError
from glimpse.geometry import Box, Coords
from glimpse.images import (
    ImageCache,
    Original,
    PixelLimits,
    counterfactual_view,
    fit,
    image_tokens,
    shared_limits,
)
from glimpse.models import native_profile
from glimpse.models.base import Backend, Completion, GenerateParams, ImagePart, Message, OnText, TextDelta, TextPart
from glimpse.protocol import Protocol, make_protocol
from glimpse.protocol.base import Action
from glimpse.tools.python import PythonTool
from glimpse.tools.sandbox import PythonSession, SandboxLimits
from glimpse.tools.zoom import MIN_BOX_SIDE, ZOOM_MAX_ASPECT_RATIO, ImageState, ZoomTool
from glimpse.trajectory import (
    ImageRef,
    MadeImage,
    RunSettings,
    Sample,
    ShownImageRef,
    StopReason,
    TokenView,
    Trajectory,
    Turn,
    Usage,
    ZoomCall,
)

# The loop stops with ``context_full`` when fewer tokens than this (or max_new_tokens, if smaller) would be
# left for the next reply. Mini-o3 kept a similar margin (it stopped 2,000 tokens short of 32,768).
CONTEXT_RESERVE = 1024
# Token estimates before the server has reported real counts: about 3 characters per text token (a
# conservative rate for English), a few tokens of chat-template framing per message and per image.
_CHARS_PER_TOKEN = 3
_MESSAGE_OVERHEAD = 4
_IMAGE_OVERHEAD = 2
# Originals resized for display kept per loop (with their encoded data URLs), so the k samples of a question
# and repeated questions about one image share them.
_SHOWN_CACHE = 64

OnTurn = Callable[[Trajectory, Turn], None]
# Called with each piece of a reply as a streaming backend receives it, and the trajectory it belongs to (the
# turn being written is ``len(traj.turns)``).
OnReplyText = Callable[[Trajectory, TextDelta], None]


@dataclass
class _Episode:
    """The working state of one trajectory."""

    traj: Trajectory
    originals: list[Image.Image]  # full-resolution pixels of image_1, image_2 …
    shown: list[ImageState]  # each original as shown
    images: list[ImageState]  # by observation index: image_1's state, then observation_1 …
    parts: list[ImagePart]
    messages: list[Message]
    seed: int | None
    t0: float
    backend: Backend
    calibration: int = 0
    part_index: dict[int, int] = field(default_factory=dict)
    part_original: dict[int, int] = field(default_factory=dict)
    made: dict[int, Image.Image] = field(default_factory=dict)
    session: PythonSession | None = None
    on_text: OnText | None = None

    @property
    def image_count(self) -> int:
        """Images in the conversation (every original and every observation), for ``max_images``."""
        return len(self.shown) + len(self.images) - 1


@dataclass
class LoopOptions(LoopSettings):
    """Every setting of the agent loop: the flags of ``glimpse.config.LoopSettings`` (protocol, coords, prompt
    file, context and image limits, pixel limits, code tool, sampling) and these, which each command sets its own
    way:

    Attributes:
        max_turns: most assistant turns.
        max_new_tokens: most tokens per reply.
        seed: sampling seed; sample ``i`` of a question uses ``seed + i``.
        min_box_side: smallest zoom side, in original pixels.
        max_aspect_ratio: most elongated zoom accepted.
        code_memory_mb: memory (address space) the code tool's processes may use.
        return_token_ids: ask the backend for token ids and record the token view.
        counterfactual: show every zoom's crop as ``black`` or ``noise`` of the same size instead of its content
            (``glimpse eval --counterfactual``: did the answer depend on what the crops showed?); ``None``: the crops.

    Unset (``None``) coords, pixel limits, resize factor and prompt file are the backend's native ones
    (``glimpse.models.native_profile``), filled in by ``native``.
    """

    max_turns: int = 12
    max_new_tokens: int = 4096
    seed: int | None = None
    min_box_side: int = MIN_BOX_SIDE
    max_aspect_ratio: float = ZOOM_MAX_ASPECT_RATIO
    code_memory_mb: int = 2048
    return_token_ids: bool = False
    counterfactual: str | None = None

    @classmethod
    def of(cls, config: Any, **settings: Any) -> LoopOptions:
        """The options of a config that has ``LoopSettings``' fields (``AskConfig``, ``EvalConfig``), with
        ``settings`` (the per-command ones) on top."""
        return cls(**{name: getattr(config, name) for name in loop_setting_names()}, **settings)

    def native(self, backend: Backend | None) -> LoopOptions:
        """These options with every unset setting filled in from ``backend``'s native profile."""
        profile = native_profile(backend)
        return dataclasses.replace(
            self,
            coords=self.coords or profile.coords,
            prompt_file=self.prompt_file or profile.prompt_file,
            resize_factor=self.resize_factor or profile.resize_factor,
            min_pixels=self.min_pixels or profile.min_pixels,
            max_pixels=self.max_pixels or profile.max_pixels,
        )


class AgentLoop:
    """Runs the zoom loop of one model.

    Args:
        backend: the model.
        options: the loop's settings (``LoopOptions``; default: all defaults).
        protocol: a ``Protocol`` object to use instead of the one ``options.protocol`` names (a name here is
            the ``protocol`` setting).
        image_cache: decoded originals shared between runs.
        **settings: fields of ``LoopOptions`` that override ``options`` (``AgentLoop(backend, max_turns=6)``).

    Raises:
        ConfigError: a setting that is not a ``LoopOptions`` field, or a value out of range.
    """

    def __init__(
        self,
        backend: Backend,
        options: LoopOptions | None = None,
        *,
        protocol: str | Protocol | None = None,
        image_cache: ImageCache | None = None,
        **settings: Any,
    ):
        if isinstance(protocol, str):
            settings["protocol"], protocol = protocol, None
        known = {f.name for f in dataclasses.fields(LoopOptions)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"unknown loop settings {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        o = dataclasses.replace(options or LoopOptions(), **settings).native(backend)
        fixed = getattr(backend, "fixed_coords", None)  # a policy that writes one convention only (the expert)
        if fixed and o.coords != fixed:
            raise ConfigError(
                f"{getattr(backend, 'name', 'this backend')} writes {fixed} boxes; drop --coords {o.coords} "
                f"(or set it to {fixed})"
            )
        _check_positive(max_turns=o.max_turns, max_new_tokens=o.max_new_tokens, max_context_tokens=o.max_context_tokens)
        if o.max_images is not None and o.max_images < 1:
            raise ConfigError(f"max_images must be at least 1 (the original), got {o.max_images}")
        if o.keep_images is not None and o.keep_images < 1:
            raise ConfigError(f"keep_images must be at least 1 or unset (keep all), got {o.keep_images}")
        self.backend = backend
        self.options = o
        self.protocol = protocol or make_protocol(o.protocol, o.coords, o.prompt_file, o.code)
        self.python = (
            PythonTool(SandboxLimits(wall_s=o.code_timeout_s, memory_mb=o.code_memory_mb), o.sandbox)
            if self.protocol.code
            else None
        )
        self.limits = PixelLimits(o.min_pixels, o.max_pixels, o.resize_factor)
        self.tool = ZoomTool(
            self.protocol.coords, self.limits, min_box_side=o.min_box_side, max_aspect_ratio=o.max_aspect_ratio
        )
        self.cache = image_cache or ImageCache()
        recorded = {name: getattr(o, name) for name in RunSettings.model_fields if name in known}
        self.settings = RunSettings(
            **{
                **recorded,
                "model": getattr(backend, "name", type(backend).__name__),
                "protocol": self.protocol.name,
                "coords": self.protocol.coords.value,
                "min_pixels": self.limits.min_pixels,
                "max_pixels": self.limits.max_pixels,
                "prompt": self.protocol.prompts.name,
                "tools": ["zoom", "python"] if self.python else ["zoom"],
            }
        )
        self._shown: OrderedDict[tuple[str, PixelLimits], ImagePart] = OrderedDict()
        self._shown_pending: dict[tuple[str, PixelLimits], asyncio.Future[Image.Image]] = {}

    # ----------------------------------------------------------------------------------------------------
    async def run(
        self,
        sample: Sample,
        *,
        samples: int = 1,
        first_index: int = 0,
        backend: Backend | None = None,
        on_turn: OnTurn | None = None,
        on_text: OnReplyText | None = None,
    ) -> list[Trajectory]:
        """Run ``samples`` trajectories of one question, concurrently.

        Args:
            sample: the question.
            samples: how many trajectories (``k``).
            first_index: ``sample_index`` of the first one (the repeat number, when repeats run apart).
            backend: answer with this backend instead of the loop's own (a per-sample policy).
            on_turn: called after every turn.
            on_text: called with each piece of a reply as it is generated, by backends that stream (``openai``).

        Returns:
            The trajectories, in sample order. An unreadable image gives trajectories that stopped with
            ``error`` before the first turn. Cancelling the task ends every unfinished trajectory with
            ``cancelled`` (the caller holding them through ``on_turn`` or ``on_text`` sees it) and closes the
            requests in flight.
        """
        if samples < 1:
            raise ConfigError(f"samples must be at least 1, got {samples}")
        indices = range(first_index, first_index + samples)
        t0 = time.perf_counter()
        try:
            loaded = await self._load(sample)
        except ImageInputError as exc:
            return [self._failed(sample, i, str(exc), t0) for i in indices]
        episodes = [self._start(sample, i, loaded, t0, backend) for i in indices]
        if on_text is not None:
            for ep in episodes:
                ep.on_text = functools.partial(_tell, on_text, ep.traj)
        first: list[Completion | BaseException | None] = [None] * samples
        if samples > 1:
            listener = None if on_text is None else functools.partial(_tell_choice, on_text, episodes)
            try:
                first = await self._first_replies(episodes[0], samples, listener)
            except asyncio.CancelledError:
                for ep in episodes:
                    self._stop(ep, "cancelled")
                raise
            for ep in episodes[1:]:
                ep.calibration = episodes[0].calibration
        return list(
            await asyncio.gather(*(self._run(ep, pre, on_turn) for ep, pre in zip(episodes, first, strict=True)))
        )

    async def run_many(
        self,
        samples: Iterable[Sample],
        *,
        k: int = 1,
        concurrency: int = 16,
        on_turn: OnTurn | None = None,
        on_done: Callable[[list[Trajectory]], None] | None = None,
    ) -> list[list[Trajectory]]:
        """Run many questions, ``concurrency`` at a time, ``k`` trajectories each."""
        gate = asyncio.Semaphore(concurrency)

        async def one(sample: Sample) -> list[Trajectory]:
            async with gate:
                trajs = await self.run(sample, samples=k, on_turn=on_turn)
            if on_done is not None:
                on_done(trajs)
            return trajs

        return list(await asyncio.gather(*(one(s) for s in samples)))

    # ----------------------------------------------------------------------------------------------------
    async def _run(
        self, ep: _Episode, prefetched: Completion | BaseException | None, on_turn: OnTurn | None
    ) -> Trajectory:
        try:
            return await self._steps(ep, prefetched, on_turn)
        except asyncio.CancelledError:
            if ep.traj.stop_reason is None:  # stopped from outside (Ctrl-C, Stop in glimpse ui): said in the record
                self._stop(ep, "cancelled")
            raise
        finally:
            if ep.session is not None:
                await asyncio.to_thread(ep.session.close)

    async def _steps(
        self, ep: _Episode, prefetched: Completion | BaseException | None, on_turn: OnTurn | None
    ) -> Trajectory:
        traj = ep.traj
        while traj.stop_reason is None:
            index = len(traj.turns)

            # 1. Room for another reply?
            budget = self._reply_budget(ep)
            if budget is None:
                self._stop(ep, "context_full", over_turn=bool(traj.turns) and traj.turns[-1].tool_attempt)
                break

            # 2. Ask the model.
            started = time.perf_counter()
            try:
                if index == 0 and prefetched is not None:
                    if isinstance(prefetched, BaseException):
                        raise prefetched
                    completion = prefetched
                else:
                    completion = (await self._generate(ep, n=1, max_new_tokens=budget))[0]
            except ContextLengthError:
                self._stop(ep, "context_full", over_turn=bool(traj.turns) and traj.turns[-1].tool_attempt)
                break
            except BackendError as exc:
                self._stop(ep, "error", error=f"{type(exc).__name__}: {exc}")
                break
            latency = time.perf_counter() - started

            # 3. Read the reply.
            action = self.protocol.parse(completion)
            turn = Turn(
                index=index,
                text=action.text,
                thought=action.thought,
                kind=action.kind,
                answer=action.answer,
                error=action.error,
                error_kind=action.error_kind,
                tool_attempt=action.tool_attempt,
                call=_written_call(action.call),
                tool_call_id=action.call_ids[0] if action.call_ids else None,
                finish_reason=completion.finish_reason,
                usage=Usage(
                    prompt_tokens=completion.prompt_tokens or 0, completion_tokens=completion.completion_tokens or 0
                ),
                latency_s=round(latency, 4),
            )
            traj.turns.append(turn)
            reply = self.protocol.assistant_message(action, completion)
            if reply.tool_calls:
                turn.tool_calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
            ep.messages.append(reply)
            injected_from = len(ep.messages)
            self._record_tokens(ep, completion)

            # 4. Stop on an answer, on nothing, or at the turn cap.
            if action.kind == "answer":
                self._stop(ep, "answer", answer=action.answer)
            elif action.kind == "none":
                self._stop(ep, "no_action")
            elif index + 1 >= self.options.max_turns:
                self._stop(ep, "max_turns", over_turn=action.tool_attempt)
            # 5. A mistake: tell the model.
            elif action.kind == "error":
                ep.messages.extend(self.protocol.error(action, action.error or "", index))
            # 6. A zoom or code: run it, unless the image cap is reached.
            elif self.options.max_images is not None and ep.image_count >= self.options.max_images:
                self._stop(ep, "max_images", over_turn=True)
            elif action.kind == "code":
                await self._code(ep, action, turn)
            else:
                await self._zoom(ep, action, turn)

            turn.injected = _chat_form(ep.messages[injected_from:], ep.part_index, ep.part_original)
            if on_turn is not None:
                on_turn(traj, turn)
        return traj

    async def _zoom(self, ep: _Episode, action: Action, turn: Turn) -> None:
        assert action.call is not None
        started = time.perf_counter()
        result = await asyncio.to_thread(self.tool.run, action.call, ep.originals, ep.images, ep.shown)
        turn.tool_s = round(time.perf_counter() - started, 4)
        turn.source_index = result.source_index
        turn.original_index = result.original_index
        if not result.ok:
            turn.kind, turn.error, turn.error_kind = "error", result.error, result.error_kind
            ep.messages.extend(self.protocol.error(action, result.error or "", turn.index))
            return
        assert result.box is not None and result.image is not None and result.source_index is not None
        index = len(ep.images)
        shown = result.image
        if self.options.counterfactual:  # the content is withheld; size, position and the rest of the loop are not
            shown = counterfactual_view(shown, self.options.counterfactual, f"{ep.traj.id}/{index}")
        part = ImagePart(image=shown)
        ep.images.append(ImageState(result.box, result.image.width, result.image.height, result.original_index))
        ep.parts.append(part)
        ep.part_index[id(part)] = index
        turn.crop_box_px = result.box.as_list()
        turn.observation_index = index
        turn.observation_size = [result.image.width, result.image.height]
        source = ep.traj.image_name(result.source_index, result.original_index)
        ep.messages.extend(self.protocol.observation(action, part, index, turn.index, source))

    async def _code(self, ep: _Episode, action: Action, turn: Turn) -> None:
        assert action.code is not None and self.python is not None
        started = time.perf_counter()
        if ep.session is None:
            ep.session = self.python.session()
        result = await asyncio.to_thread(self.python.run, action.code, ep.session, self._full_images(ep))
        turn.tool_s = round(time.perf_counter() - started, 4)
        turn.code, turn.code_output, turn.error_kind = action.code, result.text, result.error_kind
        shown: list[tuple[int, ImagePart]] = []
        for made in result.images:
            if self.options.max_images is not None and ep.image_count >= self.options.max_images:
                turn.code_output += f"\n(Images beyond the limit of {self.options.max_images} were not shown.)"
                break
            index = len(ep.images)
            view = await asyncio.to_thread(fit, made.image, self.limits)
            part = ImagePart(image=view)
            ep.images.append(ImageState(None, view.width, view.height))
            ep.parts.append(part)
            ep.part_index[id(part)] = index
            ep.made[index] = made.image
            turn.made.append(
                MadeImage(
                    observation_index=index,
                    path=made.path,
                    sha256=made.sha256,
                    width=made.image.width,
                    height=made.image.height,
                    shown_size=[view.width, view.height],
                )
            )
            shown.append((index, part))
        ep.messages.extend(self.protocol.code_result(action, turn.code_output, shown))

    def _full_images(self, ep: _Episode) -> dict[str, Image.Image]:
        """Every image of the trajectory at full resolution, by the name the model uses (for the code tool):
        ``original_image``, with several originals also ``image_1`` …, then ``observation_N``."""
        out: dict[str, Image.Image] = {"original_image": ep.originals[0]}
        if len(ep.originals) > 1:
            out.update({f"image_{k}": pixels for k, pixels in enumerate(ep.originals, 1)})
        for index, state in enumerate(ep.images[1:], 1):
            name = f"observation_{index}"
            if state.box is None:
                out[name] = ep.made[index]
                continue
            crop = ep.originals[state.original_index].crop(state.box.as_tuple())
            if self.options.counterfactual:  # code must not see what the model was not shown
                crop = counterfactual_view(crop, self.options.counterfactual, f"{ep.traj.id}/{index}")
            out[name] = crop
        return out

    # ----------------------------------------------------------------------------------------------------
    async def _load(self, sample: Sample) -> list[tuple[Original, ImagePart]]:
        """Every original of ``sample`` and its view as shown (sharing one pixel budget: ``shared_limits``)."""
        if not sample.images:
            raise ImageInputError(sample.id, f"sample {sample.id!r} has no images")
        originals = [self.cache.peek(path) or await asyncio.to_thread(self.cache.get, path) for path in sample.images]
        limits = shared_limits([o.image.size for o in originals], self.limits)
        return [(o, await self._shown_part(o, lim)) for o, lim in zip(originals, limits, strict=True)]

    async def _shown_part(self, original: Original, limits: PixelLimits) -> ImagePart:
        """``original`` resized by ``limits``, made once and shared by every trajectory that shows it."""
        key = (original.sha256, limits)
        part = self._shown.get(key)
        if part is None:
            pending = self._shown_pending.get(key)
            if pending is None:  # the first trajectory of this image resizes it; the others wait for that
                pending = asyncio.ensure_future(asyncio.to_thread(fit, original.image, limits))
                self._shown_pending[key] = pending
                pending.add_done_callback(lambda _: self._shown_pending.pop(key, None))
            image = await asyncio.shield(pending)
            part = self._shown.setdefault(key, ImagePart(image=image))
            while len(self._shown) > _SHOWN_CACHE:
                self._shown.popitem(last=False)
        self._shown.move_to_end(key)
        return part

    def _start(
        self, sample: Sample, i: int, loaded: list[tuple[Original, ImagePart]], t0: float, backend: Backend | None
    ) -> _Episode:
        refs = [
            ShownImageRef(path=o.path, sha256=o.sha256, width=o.width, height=o.height, shown_size=list(part.size))
            for o, part in loaded
        ]
        traj = Trajectory(
            id=f"{sample.id}#{i}",
            sample=sample,
            sample_index=i,
            image=ImageRef(**refs[0].model_dump(exclude={"shown_size"})),
            shown_size=refs[0].shown_size,
            more_images=refs[1:],
            settings=self.settings,
            started_at=_now(),
        )
        parts = [part for _, part in loaded]
        shown = [ImageState(Box.full(o.width, o.height), *part.size, k) for k, (o, part) in enumerate(loaded)]
        ep = _Episode(
            traj=traj,
            originals=[o.image for o, _ in loaded],
            shown=shown,
            images=shown[:1],
            parts=parts[:1],
            messages=self.protocol.start(parts, sample.question),
            seed=None if self.options.seed is None else self.options.seed + i,
            t0=t0,
            backend=backend or self.backend,
        )
        for k, part in enumerate(parts):
            ep.part_index[id(part)] = 0
            if len(parts) > 1:
                ep.part_original[id(part)] = k
        traj.prompt = _chat_form(ep.messages, ep.part_index, ep.part_original)
        return ep

    def _failed(self, sample: Sample, i: int, error: str, t0: float) -> Trajectory:
        traj = Trajectory(
            id=f"{sample.id}#{i}", sample=sample, sample_index=i, settings=self.settings, started_at=_now()
        )
        traj.stop_reason, traj.error, traj.wall_s = "error", error, round(time.perf_counter() - t0, 4)
        return traj

    def _stop(
        self,
        ep: _Episode,
        reason: StopReason,
        *,
        over_turn: bool = False,
        answer: str | None = None,
        error: str | None = None,
    ) -> None:
        traj = ep.traj
        traj.stop_reason, traj.over_turn, traj.answer, traj.error = reason, over_turn, answer, error
        traj.wall_s = round(time.perf_counter() - ep.t0, 4)

    # ----------------------------------------------------------------------------------------------------
    async def _first_replies(
        self, ep: _Episode, k: int, on_text: OnText | None
    ) -> list[Completion | BaseException | None]:
        """The first reply of all ``k`` samples in one request (their prompts are identical)."""
        budget = self._reply_budget(ep)
        if budget is None:
            return [None] * k
        try:
            got: list[Completion | BaseException | None] = list(
                await self._generate(ep, n=k, max_new_tokens=budget, seed=self.options.seed, on_text=on_text)
            )
        except BackendError as exc:
            return [exc] * k
        return (got + [None] * k)[:k]  # a server that returned fewer than n: the rest ask on their own

    async def _generate(
        self, ep: _Episode, *, n: int, max_new_tokens: int, seed: int | None = None, on_text: OnText | None = None
    ) -> list[Completion]:
        messages = self._visible_messages(ep)
        params = GenerateParams(
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=self.options.temperature,
            top_p=self.options.top_p,
            stop=list(self.protocol.stop),
            seed=ep.seed if seed is None else seed,
            tools=self.protocol.tools,
            return_token_ids=self.options.return_token_ids,
            on_text=on_text if n > 1 else ep.on_text,
        )
        completions = await ep.backend.generate(messages, params)
        if not completions:
            raise BackendError(f"{self.settings.model} returned no completion")
        reported = completions[0].prompt_tokens
        if reported:
            ep.calibration = reported - self._estimate(messages)
        return completions

    def _visible_messages(self, ep: _Episode) -> list[Message]:
        """The conversation as sent: with ``keep_images``, older observations become text notes."""
        observations = len(ep.images) - 1
        if self.options.keep_images is None or observations <= self.options.keep_images:
            return ep.messages
        oldest_kept = observations - self.options.keep_images + 1
        out = []
        for message in ep.messages:
            parts = message.parts()
            if not any(isinstance(p, ImagePart) and 0 < ep.part_index.get(id(p), 0) < oldest_kept for p in parts):
                out.append(message)
                continue
            swapped = [
                TextPart(self._dropped_note(ep, ep.part_index[id(p)]))
                if isinstance(p, ImagePart) and 0 < ep.part_index.get(id(p), 0) < oldest_kept
                else p
                for p in parts
            ]
            out.append(Message(message.role, swapped, message.tool_calls, message.tool_call_id))
        return out

    @staticmethod
    def _dropped_note(ep: _Episode, index: int) -> str:
        state = ep.images[index]
        if state.box is None:
            return (
                f"[observation_{index} is no longer shown, to save context. It was an image made by your code; "
                f'it is still available to code as images["observation_{index}"].]'
            )
        turn = next(t for t in ep.traj.turns if t.observation_index == index)
        src = ep.traj.image_name(turn.source_index or 0, turn.original_index)
        of = "the original image" if len(ep.originals) == 1 else f"image_{state.original_index + 1}"
        box = state.box
        return (
            f"[observation_{index} is no longer shown, to save context. It was a zoom into {src} covering "
            f"pixels ({box.x0}, {box.y0})–({box.x1}, {box.y1}) of {of}. You can still zoom into it by name.]"
        )

    def _estimate(self, messages: list[Message]) -> int:
        total = 0
        for message in messages:
            total += _MESSAGE_OVERHEAD
            for part in message.parts():
                if isinstance(part, TextPart):
                    total += len(part.text) // _CHARS_PER_TOKEN + 1
                else:
                    total += image_tokens(*part.size, self.limits.factor) + _IMAGE_OVERHEAD
            for call in message.tool_calls:
                total += (len(call.name) + len(call.arguments)) // _CHARS_PER_TOKEN + _MESSAGE_OVERHEAD
        return total

    def _reply_budget(self, ep: _Episode) -> int | None:
        """Tokens the next reply may use, or ``None`` if too few are left in the context."""
        prompt = self._estimate(self._visible_messages(ep)) + ep.calibration
        room = self.options.max_context_tokens - prompt
        if room < min(self.options.max_new_tokens, CONTEXT_RESERVE):
            return None
        return min(self.options.max_new_tokens, room)

    def _record_tokens(self, ep: _Episode, completion: Completion) -> None:
        """Extend the flat token view with this turn's injected (0) and sampled (1) tokens."""
        if not self.options.return_token_ids:
            return
        traj = ep.traj
        if completion.prompt_token_ids is None or completion.token_ids is None:
            if traj.token_view is not None:
                traj.token_view.aligned = False
            return
        view = traj.token_view
        prompt = completion.prompt_token_ids
        if view is None:
            if traj.turns and len(traj.turns) > 1:
                return  # an earlier turn had no ids; a partial view would be misleading
            view = traj.token_view = TokenView(ids=list(prompt), mask=[0] * len(prompt))
        else:
            if not view.aligned:
                return
            if prompt[: len(view.ids)] != view.ids:
                view.aligned = False
                return
            delta = prompt[len(view.ids) :]
            view.ids.extend(delta)
            view.mask.extend([0] * len(delta))
        view.ids.extend(completion.token_ids)
        view.mask.extend([1] * len(completion.token_ids))


def _tell(on_text: OnReplyText, traj: Trajectory, delta: TextDelta) -> None:
    on_text(traj, delta)


def _tell_choice(on_text: OnReplyText, episodes: list[_Episode], delta: TextDelta) -> None:
    """A piece of the first replies of ``k`` samples, asked for in one request: choice ``i`` is sample ``i``."""
    if 0 <= delta.index < len(episodes):
        on_text(episodes[delta.index].traj, delta)


def _image_ref(part: ImagePart, part_index: dict[int, int], part_original: dict[int, int]) -> dict[str, Any]:
    """An image part as the record keeps it: by observation index, and for several originals, which one."""
    ref: dict[str, Any] = {"type": "image", "index": part_index[id(part)]}
    if id(part) in part_original:
        ref["original"] = part_original[id(part)]
    return ref


def _chat_form(
    messages: list[Message], part_index: dict[int, int], part_original: dict[int, int]
) -> list[dict[str, Any]]:
    """Messages as the record keeps them: text parts, and images by observation index (see ``_image_ref``)."""
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role}
        if isinstance(m.content, str):
            item["content"] = m.content
        else:
            item["content"] = [
                {"type": "text", "text": p.text}
                if isinstance(p, TextPart)
                else _image_ref(p, part_index, part_original)
                for p in m.content
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def _written_call(call: dict[str, Any] | None) -> ZoomCall | None:
    """The zoom call as the model wrote it, when its box is four finite numbers (for the record)."""
    box = call.get("bbox_2d") if call else None
    if not isinstance(box, list) or len(box) != 4:
        return None
    values = []
    for v in box:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        try:
            value = float(v)
        except OverflowError:  # an integer no float can hold (the zoom tool reports it as out of range)
            return None
        if not math.isfinite(value):
            return None
        values.append(value)
    return ZoomCall(bbox_2d=values, source=str(call.get("source", "original_image")))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = ["CONTEXT_RESERVE", "AgentLoop", "Coords", "OnReplyText", "OnTurn"]
