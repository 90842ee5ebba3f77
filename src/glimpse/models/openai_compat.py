"""The ``openai`` backend: any OpenAI-compatible chat-completions server (vLLM, SGLang, OpenAI, others).

* Endpoint and key are read when the backend is created, from arguments or the environment
  (``GLIMPSE_BASE_URL`` / ``OPENAI_BASE_URL``, ``GLIMPSE_API_KEY`` / ``OPENAI_API_KEY``), never at import.
* Images go as base64 data URLs, encoded once per image (JPEG quality 95 by default, or PNG).
* Sampling parameters are always sent explicitly: servers otherwise apply a checkpoint's own, often
  near-greedy, ``generation_config.json``.
* Retries with exponential backoff and full jitter on 408/409/429/5xx, timeouts, connection errors and
  unreadable responses, honouring ``Retry-After``. At most ``max_concurrency`` requests are in flight.
* Parameters a server rejects (OpenAI's reasoning models refuse ``temperature``, ``top_p`` and ``stop``;
  some servers refuse ``n``) are dropped once, with a warning, and the request is retried; ``n`` is then
  emulated with parallel requests.
* A prompt that no longer fits the model's context raises ``ContextLengthError``, which the agent loop turns
  into the ``context_full`` stop.
* Replies stream (``stream: true``, server-sent events) when the caller listens for text (``GenerateParams.on_text``)
  and has not asked for token ids: text and tool-call pieces are assembled into the same ``Completion`` a plain
  request returns, with the usage of the final chunk (``stream_options.include_usage``) and the stop string the
  server cut (vLLM's ``stop_reason``). A stream that drops is retried like a dropped request (the caller is told
  to restart that reply); a server that refuses streaming gets plain requests from then on, after one warning.
  Cancelling the caller's task closes the stream, which stops generation on servers that watch the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import re
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from glimpse.errors import BackendError, ConfigError, ContextLengthError
from glimpse.models.base import Completion, GenerateParams, ImagePart, Message, OnText, TextDelta, TextPart, ToolCall

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
# Connections per pooled HTTP client (see OpenAIBackend._ensure_servers).
_CONNECTIONS_PER_CLIENT = 8
# Conversations remembered for sticky routing to one server.
_STICKY_CONVERSATIONS = 100_000
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# Parameters that may be dropped when a server says it does not support them.
_OPTIONAL_PARAMS = (
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "parallel_tool_calls",
    "return_token_ids",
    "reasoning_effort",
    "stream_options",
)
# Stands for an image's data URL while the body is JSON-encoded; json.dumps writes it as \u001fimg<nonce>:<k>\u001f,
# and the random nonce keeps any real text from matching.
_NONCE = secrets.token_hex(8)
_PLACEHOLDER = re.compile(rb"\\u001fimg" + _NONCE.encode() + rb":(\d+)\\u001f")
_CONTEXT_PATTERNS = re.compile(
    r"maximum context length|context length|context_length_exceeded|too many tokens|prompt is too long"
    r"|exceeds the model'?s? (?:max|context)|longer than the model",
    re.I,
)


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


class OpenAIBackend:
    """Client of an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: the model name the server knows.
        base_url: endpoint root ending in ``/v1``; default from the environment, else OpenAI's. Several URLs,
            comma-separated, are load-balanced: a conversation goes to the least busy server and stays there
            (so the server's prefix cache is reused), moving only if that server fails.
        api_key: bearer token; default (``None``) from the environment; ``""`` sends none, whatever the
            environment says. Local servers usually need none.
        max_concurrency: most requests in flight at once, per server.
        timeout: seconds to wait for one response, whole; for a streamed one, between two of its bytes.
        max_retries: retries of a failed request before giving up.
        backoff: first retry delay in seconds; doubles each retry (capped at ``max_backoff``).
        max_backoff: longest delay between retries.
        image_format: ``jpeg`` or ``png`` for images in requests.
        image_quality: JPEG quality.
        reasoning_effort: OpenAI reasoning models' ``reasoning_effort`` (``low`` / ``medium`` / ``high``).
        extra_body: more JSON fields for every request (e.g. vLLM's ``top_k`` or ``mm_processor_kwargs``).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 600.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        image_format: str = "jpeg",
        image_quality: int = 95,
        reasoning_effort: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ):
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, got {max_retries}")
        if image_format not in ("jpeg", "png"):
            raise ConfigError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
        self.model = model
        urls = base_url or _env("GLIMPSE_BASE_URL", "OPENAI_BASE_URL") or OPENAI_URL
        self.base_urls = [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]
        if not self.base_urls:
            raise ConfigError(f"no server URL in base_url={base_url!r}")
        for url in self.base_urls:
            if not re.match(r"https?://[^/\s]+", url):
                raise ConfigError(
                    f"base URL {url!r} is not an http:// or https:// address, e.g. http://localhost:8000/v1"
                )
        self.base_url = self.base_urls[0]
        self.api_key = api_key if api_key is not None else _env("GLIMPSE_API_KEY", "OPENAI_API_KEY")
        if OPENAI_URL in self.base_urls and not self.api_key:
            raise ConfigError(
                "no API key for api.openai.com: set OPENAI_API_KEY, or point --base-url at your own server "
                "(e.g. http://127.0.0.1:8000/v1 for vLLM)"
            )
        self.name = f"openai:{model}"
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.image_format = image_format
        self.image_quality = image_quality
        self.reasoning_effort = reasoning_effort
        self.extra_body = dict(extra_body or {})
        self.dropped: set[str] = set()
        self._servers: list[_Server] = []
        self._sticky: OrderedDict[int, _Server] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----------------------------------------------------------------------------------------------------
    async def generate(self, messages: list[Message], params: GenerateParams) -> list[Completion]:
        if params.n > 1 and "n" in self.dropped:
            batches = await asyncio.gather(
                *(self._request(messages, _as_choice(params, j), n=1) for j in range(params.n))
            )
            return [c for batch in batches for c in batch]
        return await self._request(messages, params, n=params.n)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        servers, self._servers = self._servers, []
        for server in servers:
            for client in server.clients:
                await client.aclose()

    # ----------------------------------------------------------------------------------------------------
    def _ensure_servers(self) -> None:
        """Create, once per event loop, each server's HTTP clients and the gate bounding its requests in flight.

        A server's connections are split over several small clients: httpx's pool checks every one of its
        connections on each request, which costs more CPU than the request itself in a pool of 64.
        """
        loop = asyncio.get_running_loop()
        if self._servers and self._loop is loop:
            return
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        shards = math.ceil(self.max_concurrency / _CONNECTIONS_PER_CLIENT)
        per_client = math.ceil(self.max_concurrency / shards)
        limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
        timeout = httpx.Timeout(self.timeout, connect=30.0)
        tls = ssl.create_default_context()  # built once: each client would otherwise load the CA store
        self._servers = [
            _Server(
                url=url,
                clients=[
                    httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits, verify=tls)
                    for _ in range(shards)
                ],
                busy=[0] * shards,
                gate=asyncio.Semaphore(self.max_concurrency),
            )
            for url in self.base_urls
        ]
        self._sticky.clear()
        self._loop = loop

    def _server_for(self, key: int) -> _Server:
        """The server of a conversation: the one it used before, else the least busy one of those that have not
        just failed (a server that failed is passed over for a while, longer the more it fails in a row)."""
        server = self._sticky.get(key)
        if server is None:
            now = time.monotonic()
            server = min(self._servers, key=lambda s: (s.resting_until > now, s.load))
            self._sticky[key] = server
            while len(self._sticky) > _STICKY_CONVERSATIONS:
                self._sticky.popitem(last=False)
        else:
            self._sticky.move_to_end(key)
        return server

    async def _post(self, server: _Server, payload: bytes, stream: _Stream | None) -> _Reply:
        """POST a body on the server's least busy client (which, under the gate, has a free connection).

        With ``stream``, an event-stream answer is read to its end and assembled (a JSON answer, such as an
        error, is read whole). The caller has counted the request in `server.waiting` when it chose the server.
        """
        try:
            await server.gate.acquire()
        finally:
            server.waiting -= 1
        try:
            i = min(range(len(server.clients)), key=server.busy.__getitem__)
            server.busy[i] += 1
            try:
                client = server.clients[i]
                if stream is None:  # the whole reply: it comes at once when done, so a server trickling bytes is cut
                    async with asyncio.timeout(self.timeout):
                        return _Reply(await client.post("/chat/completions", content=payload))
                # a stream may rightly last longer than --timeout: only the gap between its bytes is bounded
                async with client.stream("POST", "/chat/completions", content=payload) as response:
                    if response.status_code >= 400 or not _is_event_stream(response):
                        await response.aread()
                        return _Reply(response)
                    return _Reply(response, await stream.read(response))
            finally:
                server.busy[i] -= 1
        finally:
            server.gate.release()

    async def _request(self, messages: list[Message], params: GenerateParams, *, n: int) -> list[Completion]:
        self._ensure_servers()
        key = _conversation_key(messages)
        attempt = 0
        stream: _Stream | None = None
        while True:
            server = self._server_for(key)
            server.waiting += 1  # counted from now, so conversations starting together spread out
            streaming = self._streams(params)
            try:
                if self._all_encoded(messages):  # splicing cached URLs takes a few ms: no thread hand-off
                    body, payload = self._encode(messages, params, n, streaming)
                else:
                    body, payload = await asyncio.to_thread(self._encode, messages, params, n, streaming)
            except BaseException:
                server.waiting -= 1
                raise
            if "n" not in body and n > 1:  # the server refused n: emulate it
                server.waiting -= 1
                return await self.generate(messages, params)
            if stream is not None:  # an earlier attempt streamed some text: the caller starts those replies over
                for index in sorted(stream.started):
                    stream.on_text(TextDelta(index, "", restart=True))
            stream = _Stream(params.on_text) if streaming and params.on_text is not None else None
            response: httpx.Response | None = None
            try:
                reply = await self._post(server, payload, stream)
                response = reply.response
            except httpx.RequestError as exc:  # timeouts, dropped connections, a body that does not decode
                error = BackendError(f"{type(exc).__name__} talking to {server.url}: {exc}", retryable=True)
            except TimeoutError:
                error = BackendError(f"no whole reply from {server.url} within {self.timeout:g} s", retryable=True)
            except _StreamError as exc:
                error = BackendError(f"the stream from {server.url} broke off: {exc}", retryable=True)
            else:
                error = self._check(response, server.url)
                if error is None:
                    try:
                        completions = self._parse(reply.data if reply.data is not None else response.json(), n)
                        server.failures = 0
                        return completions
                    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
                        error = BackendError(
                            f"unreadable response from {server.url}: {exc}; body starts {response.text[:200]!r}",
                            status=response.status_code,
                            retryable=True,
                        )
                elif error.status == 400 and self._drop_rejected(response.text, body, server.url):
                    continue
            if error.retryable:
                server.failures += 1
                server.resting_until = time.monotonic() + min(self.max_backoff, self.backoff * 2**server.failures)
            if not error.retryable or attempt >= self.max_retries:
                if error.retryable:
                    raise BackendError(f"gave up after {attempt + 1} attempts: {error}", status=error.status)
                raise error
            if len(self._servers) > 1:  # let the retry go to the least busy server, which may be another
                self._sticky.pop(key, None)
            await asyncio.sleep(self._delay(attempt, response))
            attempt += 1

    def _check(self, response: httpx.Response, url: str) -> BackendError | None:
        status = response.status_code
        if status < 400:
            return None
        detail = _error_detail(response)
        if status in RETRY_STATUS:
            return BackendError(f"HTTP {status} from {url}: {detail}", status=status, retryable=True)
        if status in (400, 413, 422) and _CONTEXT_PATTERNS.search(detail):
            return ContextLengthError(f"the conversation no longer fits the model's context: {detail}", status=status)
        hint = {
            401: "check the API key (OPENAI_API_KEY or --api-key)",
            403: "the key is not allowed to use this model",
            404: f"check --base-url (now {url}) and the model name {self.model!r}",
        }.get(status, "")
        message = f"HTTP {status} from {url}: {detail}" + (f" ({hint})" if hint else "")
        return BackendError(message, status=status)

    def _streams(self, params: GenerateParams) -> bool:
        """Whether to ask for a stream: someone listens for text, the server streams, and no token ids are
        wanted (they are read from whole replies, so the token view does not depend on streaming)."""
        return params.on_text is not None and not params.return_token_ids and "stream" not in self.dropped

    def _drop_rejected(self, text: str, body: dict[str, Any], url: str) -> bool:
        """If the server rejected one of the optional parameters we sent, stop sending it."""
        lowered = text.lower()
        # a parameter the server does not take, not a value it did not like ("invalid value 5.0 for temperature")
        refusal = (
            "unsupported",
            "not supported",
            "does not support",
            "unrecognized",
            "unknown",
            "extra inputs",
            "not permitted",
            "invalid parameter",
            "invalid argument",
        )
        if not any(w in lowered for w in refusal):
            return False
        if body.get("stream") and re.search(r"(?<![\w])stream(?:ing|ed)?(?![\w])", lowered):
            self.dropped.add("stream")
            log.warning("%s refused a streamed reply; replies will come whole from now on", url)
            return True
        for name in _OPTIONAL_PARAMS:
            if name in body and re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", lowered):
                self.dropped.add(name)
                log.warning("%s rejected the parameter %r; it will not be sent again", url, name)
                return True
        if "max_completion_tokens" in body and "max_completion_tokens" in lowered:
            self.dropped.add("max_completion_tokens")
            log.warning("%s rejected 'max_completion_tokens'; sending 'max_tokens' instead", url)
            return True
        return False

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = response.headers.get("retry-after")
            if after:
                try:
                    wait = float(after)
                except ValueError:
                    wait = math.nan
                if math.isfinite(wait):  # "NaN" would make the sleep endless
                    return min(max(wait, 0.0), self.max_backoff)
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))

    # ----------------------------------------------------------------------------------------------------
    def _all_encoded(self, messages: list[Message]) -> bool:
        key = (self.image_format, self.image_quality)
        return all(p.has_url(*key) for m in messages for p in m.images())

    def _encode(
        self, messages: list[Message], params: GenerateParams, n: int, stream: bool = False
    ) -> tuple[dict[str, Any], bytes]:
        """The request body, and its JSON bytes with each image's data URL spliced in.

        Data URLs hold only base64 characters, so they need no JSON escaping: the body is encoded with short
        placeholders and the (cached) URLs are joined in as bytes, instead of re-escaping every image of the
        conversation on every turn.
        """
        urls: list[bytes] = []
        body = self._body(messages, params, n, urls)
        if stream:
            body["stream"] = True
            if "stream_options" not in self.dropped:
                body["stream_options"] = {"include_usage": True}
        skeleton = body_bytes(body)
        if not urls:
            return body, skeleton
        pieces = _PLACEHOLDER.split(skeleton)
        out = [pieces[0]]
        for i in range(1, len(pieces), 2):
            out.append(urls[int(pieces[i])])
            out.append(pieces[i + 1])
        return body, b"".join(out)

    def _body(self, messages: list[Message], params: GenerateParams, n: int, urls: list[bytes]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [self._message(m, urls) for m in messages]}
        if "max_completion_tokens" in self.dropped:
            body["max_tokens"] = params.max_new_tokens
        else:
            body["max_completion_tokens"] = params.max_new_tokens
        optional: dict[str, Any] = {
            "n": n if n > 1 else None,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": params.stop or None,
            "seed": params.seed,
            "reasoning_effort": self.reasoning_effort,
            "return_token_ids": True if params.return_token_ids else None,
        }
        if params.tools:
            body["tools"] = params.tools
            optional["parallel_tool_calls"] = False
        for key, value in optional.items():
            if value is not None and key not in self.dropped:
                body[key] = value
        body.update(self.extra_body)
        return body

    def _message(self, message: Message, urls: list[bytes]) -> dict[str, Any]:
        out: dict[str, Any] = {"role": message.role}
        if isinstance(message.content, str):
            out["content"] = message.content
        else:
            parts: list[dict[str, Any]] = []
            for part in message.content:
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, ImagePart):
                    urls.append(part.url_bytes(self.image_format, self.image_quality))
                    parts.append({"type": "image_url", "image_url": {"url": f"\x1fimg{_NONCE}:{len(urls) - 1}\x1f"}})
            out["content"] = parts
        if message.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ]
            if not out["content"]:
                out["content"] = None
        if message.tool_call_id is not None:
            out["tool_call_id"] = message.tool_call_id
        return out

    @staticmethod
    def _parse(data: dict[str, Any], n: int) -> list[Completion]:
        """The completions of a reply. Raises ``ValueError`` (or the like) for a shape no server writes."""
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise ValueError("no list of choices in the response")
        if not all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in data["choices"]):
            raise ValueError("a choice without a message object")
        choices = sorted(data["choices"], key=lambda c: _count(c.get("index")) or 0)
        if not choices:
            raise ValueError("no choices in the response")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        prompt_tokens = _count(usage.get("prompt_tokens"))
        total_completion = _count(usage.get("completion_tokens"))
        prompt_ids = _token_ids(data.get("prompt_token_ids"))
        out = []
        for choice in choices:
            message = choice["message"]
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            content = _text(content)
            calls = [
                ToolCall(
                    id=str(c.get("id") or f"call_{i}"),
                    name=str(c["function"]["name"]),
                    arguments=c["function"].get("arguments") or "{}",
                )
                for i, c in enumerate(message.get("tool_calls") or [])
            ]
            token_ids = _token_ids(choice.get("token_ids"))
            if token_ids is not None:
                completion_tokens = len(token_ids)
            elif total_completion is not None:
                completion_tokens = round(total_completion / len(choices))
            else:
                completion_tokens = None
            out.append(
                Completion(
                    text=content or "",
                    tool_calls=calls,
                    finish_reason=choice.get("finish_reason"),
                    reasoning=_text(message.get("reasoning_content") or message.get("reasoning")),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    token_ids=token_ids,
                    prompt_token_ids=prompt_ids,
                    matched_stop=_matched_stop(choice),
                )
            )
        return out


@dataclass
class _Reply:
    """A server's answer: the HTTP response, and for a stream the reply assembled from its events."""

    response: httpx.Response
    data: dict[str, Any] | None = None


class _StreamError(Exception):
    """An event stream that ended early or carried something unreadable (retried like a dropped request)."""


class _Stream:
    """Reads one streamed reply: passes text pieces to the caller and assembles the chunks into the shape of a
    plain chat completion (``choices[i].message``, ``usage``), so one parser reads both.

    Args:
        on_text: the caller's listener.
    """

    def __init__(self, on_text: OnText):
        self.on_text = on_text
        self.started: set[int] = set()
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.prompt_token_ids: list[int] | None = None

    async def read(self, response: httpx.Response) -> dict[str, Any]:
        done = False
        async for data in _event_data(response):
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                self._add(json.loads(data))
            except (json.JSONDecodeError, RecursionError) as exc:
                raise _StreamError(f"an event is not JSON ({exc!r}): {data[:200]!r}") from None
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                raise _StreamError(f"an event does not read as a chunk ({exc}): {data[:200]!r}") from None
        if not self.choices:
            raise _StreamError("it ended before any reply")
        if not done and any(c["finish_reason"] is None for c in self.choices.values()):
            raise _StreamError("it ended before [DONE] with a reply unfinished")
        out: dict[str, Any] = {"choices": [self.choices[i] for i in sorted(self.choices)]}
        for c in out["choices"]:
            c["message"]["content"] = "".join(c["message"]["content"])
            reasoning = "".join(c.pop("reasoning"))
            if reasoning:
                c["message"]["reasoning_content"] = reasoning
            by_index = c.pop("calls")
            calls = [by_index[k] for k in sorted(by_index)]
            if calls:
                c["message"]["tool_calls"] = calls
        if self.usage is not None:
            out["usage"] = self.usage
        if self.prompt_token_ids is not None:
            out["prompt_token_ids"] = self.prompt_token_ids
        return out

    def _add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise _StreamError(f"an event is not a JSON object: {str(chunk)[:200]!r}")
        if "error" in chunk:  # vLLM reports failures inside the stream
            err = chunk["error"]
            raise _StreamError(str(err.get("message", err) if isinstance(err, dict) else err)[:500])
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("prompt_token_ids") is not None:
            self.prompt_token_ids = chunk["prompt_token_ids"]
        for raw in chunk.get("choices") or []:
            index = int(raw.get("index", 0))
            choice = self.choices.setdefault(
                index,
                {"index": index, "message": {"content": []}, "reasoning": [], "calls": {}, "finish_reason": None},
            )
            delta = raw.get("delta") or {}
            text = _text(delta.get("content"))
            if text:
                choice["message"]["content"].append(text)
                self.started.add(index)
                self.on_text(TextDelta(index, text))
            thought = _text(delta.get("reasoning_content") or delta.get("reasoning"))
            if thought:
                choice["reasoning"].append(thought)
            for k, piece in enumerate(delta.get("tool_calls") or []):
                call = choice["calls"].setdefault(
                    int(piece.get("index", k)),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] = piece.get("id") or call["id"]
                fn = piece.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                arguments = fn.get("arguments") or ""
                if isinstance(arguments, dict):  # whole, as an object (as plain replies may give them)
                    arguments = json.dumps(arguments)
                call["function"]["arguments"] += arguments
            if raw.get("token_ids"):
                choice.setdefault("token_ids", []).extend(raw["token_ids"])
            if raw.get("finish_reason") is not None:
                choice["finish_reason"] = raw["finish_reason"]
            for key in ("stop_reason", "matched_stop"):
                if key in raw and (raw[key] is not None or raw.get("finish_reason") is not None):
                    choice[key] = raw[key]


def _text(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"text must be a string, got {type(value).__name__}")
    return value


async def _event_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an event stream, split where the SSE format splits them (LF, CRLF) and nowhere else.

    httpx's ``aiter_lines`` also splits at U+2028, U+0085 and other characters ``str.splitlines`` treats as line
    ends, which servers send unescaped inside JSON strings when a model writes them.
    """
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode("utf-8", errors="replace")
    if pending:
        yield pending.removesuffix(b"\r").decode("utf-8", errors="replace")


async def _event_data(response: httpx.Response) -> AsyncIterator[str]:
    """The data of each server-sent event: its ``data:`` lines joined by newlines, sent at the blank line that ends
    the event (comments and other fields are skipped)."""
    lines: list[str] = []
    async for line in _event_lines(response):
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            lines.append(value.removeprefix(" "))
    if lines:  # a stream that ended without the blank line after its last event
        yield "\n".join(lines)


def _is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _as_choice(params: GenerateParams, index: int) -> GenerateParams:
    """Params of one request standing in for choice ``index`` of an emulated ``n`` (its text keeps its index)."""
    on_text = params.on_text
    if on_text is None:
        return dataclasses.replace(params, n=1)
    return dataclasses.replace(params, n=1, on_text=lambda d: on_text(TextDelta(index, d.text, d.restart)))


@dataclass(eq=False)
class _Server:
    """One endpoint: its HTTP clients, their requests in flight, and the gate bounding them."""

    url: str
    clients: list[httpx.AsyncClient]
    busy: list[int]
    gate: asyncio.Semaphore
    waiting: int = 0
    failures: int = 0  # retryable failures in a row
    resting_until: float = 0.0  # time.monotonic() before which new conversations go elsewhere if they can

    @property
    def load(self) -> int:
        return sum(self.busy) + self.waiting


def _conversation_key(messages: list[Message]) -> int:
    """Identifies a conversation by its first user message (its text and the identity of its images)."""
    first = next((m for m in messages if m.role == "user"), None)
    if first is None:
        return 0
    return hash((first.text(), tuple(id(p) for p in first.images())))


def body_bytes(body: dict[str, Any]) -> bytes:
    """JSON-encode a request body."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _count(value: Any) -> int | None:
    """A token count as the server gave it, or ``None`` when it is not a non-negative integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _token_ids(value: Any) -> list[int] | None:
    """Token ids as the server gave them, or ``None`` when they are not a list of token ids."""
    if isinstance(value, list) and all(_count(x) is not None for x in value):
        return value
    return None


def _error_detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except (ValueError, RecursionError):
        return response.text[:300] or response.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        return str(err)[:500]
    return str(data)[:300]


def create(
    arg: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    max_concurrency: int = 64,
    timeout: float = 600.0,
    max_retries: int = 6,
    image_format: str = "jpeg",
    reasoning_effort: str | None = None,
    **_options: Any,
) -> OpenAIBackend:
    """``openai:MODEL``: a model behind an OpenAI-compatible server."""
    return OpenAIBackend(
        arg,
        base_url=base_url,
        api_key=api_key,
        max_concurrency=max_concurrency,
        timeout=timeout,
        max_retries=max_retries,
        image_format=image_format,
        reasoning_effort=reasoning_effort,
    )


def _matched_stop(choice: dict[str, Any]) -> str | None:
    """The stop string a server cut off: vLLM's ``stop_reason`` and SGLang's ``matched_stop`` say (a string, or a
    token id / null when the reply ended otherwise); OpenAI's API does not (``None``)."""
    for key in ("stop_reason", "matched_stop"):
        if key in choice:
            value = choice[key]
            return value if isinstance(value, str) else ""
    return None
