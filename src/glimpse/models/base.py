"""The backend contract: a chat conversation in, one or more completions out.

A backend is anything with ``name`` and one coroutine::

    async def generate(messages: list[Message], params: GenerateParams) -> list[Completion]

It returns ``params.n`` completions of the same conversation. A backend that knows its model family may also
set ``default_coords`` (``relative``, ``pixels`` or ``thousand``) and ``resize_factor``: the agent loop then
uses the model's native box convention and image grid unless the user chose otherwise.

Images travel as ``ImagePart`` objects that hold pixels and/or a data URL and convert lazily, so an HTTP
backend encodes each image once and a local model never encodes at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from glimpse.images import data_url, data_url_size, decode_data_url

Role = Literal["system", "user", "assistant", "tool"]


@dataclass
class TextPart:
    text: str


@dataclass(eq=False)
class ImagePart:
    """An image in a message: pixels, a data URL, or both (each derived from the other on first use)."""

    image: Image.Image | None = None
    url: str | None = None
    _urls: dict[tuple[str, int], bytes] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _size: tuple[int, int] | None = field(default=None, repr=False)

    def pil(self) -> Image.Image:
        """The pixels (decoded from the data URL on first use)."""
        if self.image is None:
            if self.url is None:
                raise ValueError("ImagePart holds neither pixels nor a URL")
            self.image = decode_data_url(self.url)
        return self.image

    def has_url(self, fmt: str = "jpeg", quality: int = 95) -> bool:
        """Whether ``url_bytes`` is already cached for this format."""
        return (fmt, quality) in self._urls

    def url_bytes(self, fmt: str = "jpeg", quality: int = 95) -> bytes:
        """The data URL as ASCII bytes, ready to be spliced into a request body (cached)."""
        key = (fmt, quality)
        with self._lock:  # one image shared by many trajectories is encoded once
            if key not in self._urls:
                url = self.url if self.image is None and self.url is not None else data_url(self.pil(), fmt, quality)
                self._urls[key] = url.encode("ascii")
            return self._urls[key]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``; for a data URL only the header is decoded."""
        if self.image is not None:
            return self.image.size
        if self._size is None:
            self._size = data_url_size(self.url or "")
        return self._size


Part = TextPart | ImagePart


@dataclass
class ToolCall:
    """A native function call: its id, the function name and the arguments as a JSON string."""

    id: str
    name: str
    arguments: str


@dataclass
class Message:
    """One chat message. ``content`` is a string or a list of text and image parts."""

    role: Role
    content: str | list[Part] = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None

    def parts(self) -> list[Part]:
        return [TextPart(self.content)] if isinstance(self.content, str) else list(self.content)

    def text(self) -> str:
        """All text parts joined (images left out)."""
        return "".join(p.text for p in self.parts() if isinstance(p, TextPart))

    def images(self) -> list[ImagePart]:
        return [p for p in self.parts() if isinstance(p, ImagePart)]


@dataclass
class TextDelta:
    """A piece of a reply's text, as a streaming backend receives it.

    Attributes:
        index: which of the request's ``n`` completions it belongs to.
        text: the new text.
        restart: the reply starts over (its stream dropped and the request was retried): forget the earlier
            pieces of this completion before adding ``text``.
    """

    index: int
    text: str
    restart: bool = False


OnText = Callable[[TextDelta], None]


@dataclass
class GenerateParams:
    """What to generate. ``None`` sampling values are left to the server's defaults.

    Attributes:
        n: completions to return for this conversation.
        max_new_tokens: cap on generated tokens per completion.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling.
        stop: strings that end generation (servers usually leave them out of the text).
        seed: sampling seed, where the server supports one.
        tools: OpenAI function schemas, for native function calling.
        return_token_ids: ask for prompt and completion token ids (vLLM's ``return_token_ids``).
        on_text: called with each piece of text as it arrives, by backends that stream (``openai``); the others
            return whole replies and never call it. The returned completions are the same either way.
    """

    n: int = 1
    max_new_tokens: int = 1024
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_ids: bool = False
    on_text: OnText | None = None


@dataclass
class Completion:
    """One generated reply.

    Attributes:
        text: the generated text (without a stop string the server cut off).
        tool_calls: native function calls, if any.
        finish_reason: ``stop``, ``length``, ``tool_calls`` … as the server said.
        reasoning: separate reasoning text, for servers that return it apart from the content.
        prompt_tokens: prompt size the server counted (shared by the ``n`` completions of a request).
        completion_tokens: tokens generated for this completion.
        token_ids: generated token ids, when requested and available.
        prompt_token_ids: prompt token ids, when requested and available.
        matched_stop: the stop string the server cut off the text; ``""`` when it cut none (the reply ended
            with the end-of-turn token, or the backend keeps stop strings in the text); ``None`` when the
            server does not say (OpenAI's API), and the protocol has to guess.
    """

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = "stop"
    reasoning: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    matched_stop: str | None = None


@runtime_checkable
class Backend(Protocol):
    """A model that continues a chat. See the module docstring."""

    name: str

    async def generate(self, messages: list[Message], params: GenerateParams) -> list[Completion]: ...
