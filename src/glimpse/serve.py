"""``glimpse serve``: an OpenAI-compatible chat-completions endpoint over any Glimpse backend.

Behind it, a ``scripted`` backend makes a local test server: a real HTTP server on loopback that answers
with scripted zoom calls, optionally after a simulated per-request latency, for end-to-end tests and the
harness benchmark. The same server will front local checkpoints on machines without vLLM.

Endpoints: ``POST /v1/chat/completions`` (images as base64 data URLs, ``n``, ``stop``, ``tools``, sampling
parameters, ``max_completion_tokens`` / ``max_tokens``, vLLM's ``return_token_ids``), ``GET /v1/models``,
``GET /health`` (with the ``hf`` backend, also what its KV cache reused: a client that resends a conversation's
prefix, as every agent loop does, reuses the past key/values of its previous turn). Requests beyond the
server's limits get a 4xx with a message saying which limit. With
``stream: true`` the reply comes as server-sent events in vLLM's format (``chat.completion.chunk`` deltas of
about one token, tool-call arguments in pieces, ``stop_reason`` and ``finish_reason`` in each choice's last
chunk, usage in a final chunk when ``stream_options.include_usage`` asks, then ``data: [DONE]``); the backend
still makes the whole reply first, so only the simulated latency is spread over the chunks. A client that
disconnects ends its stream. With a simulated latency, each response says how long it was held in the header
``x-glimpse-simulated-latency`` (seconds), so a benchmark can separate model time from harness time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import re
import time
import uuid
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from glimpse.errors import BackendError, ContextLengthError, ImageInputError, ScriptExhaustedError
from glimpse.models.base import Backend, Completion, GenerateParams, ImagePart, Message, Part, TextPart, ToolCall

log = logging.getLogger(__name__)

# Defaults of the server's limits: a 32-turn conversation of 2-megapixel JPEGs is about 30 MB.
MAX_BODY_BYTES = 128 * 1024 * 1024
MAX_IMAGES = 64
MAX_N = 64
MAX_NEW_TOKENS = 32768
# Request bodies larger than this are JSON-decoded in a worker thread.
_INLINE_JSON_BYTES = 256 * 1024
# Streamed text goes in pieces of about one token: a word with its leading space, long words cut at 4 characters
# (the scripted backend's characters per token).
_PIECE = re.compile(r"\s*[^\s]{1,4}|\s+")


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(message: str, status: int = 400, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _parse_messages(raw: Any, max_images: int) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise _BadRequest("'messages' must be a non-empty list")
    messages: list[Message] = []
    images = 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise _BadRequest(f"messages[{i}] needs a role of system, user, assistant or tool")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        parts: list[Part] = []
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [TextPart(content)]
        elif isinstance(content, list):
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text":
                    text = p.get("text", "")
                    if not isinstance(text, str):
                        raise _BadRequest(f"messages[{i}].content[{j}].text must be a string")
                    parts.append(TextPart(text))
                elif kind == "image_url":
                    url = p.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url.startswith("data:image/"):
                        raise _BadRequest(f"messages[{i}].content[{j}]: only base64 data URLs are accepted for images")
                    parts.append(ImagePart(url=url))
                    images += 1
                else:
                    raise _BadRequest(f"messages[{i}].content[{j}] has unsupported type {kind!r}")
        else:
            raise _BadRequest(f"messages[{i}].content must be a string or a list of parts")
        calls = []
        for j, c in enumerate(m.get("tool_calls") or []):
            try:
                fn = c["function"]
                args = fn.get("arguments", "{}")
                calls.append(
                    ToolCall(
                        str(c.get("id", f"call_{j}")),
                        str(fn["name"]),
                        args if isinstance(args, str) else json.dumps(args),
                    )
                )
            except (KeyError, TypeError, AttributeError):
                raise _BadRequest(f"messages[{i}].tool_calls[{j}] is malformed") from None
        content_out: str | list[Part] = parts[0].text if len(parts) == 1 and isinstance(parts[0], TextPart) else parts
        call_id = m.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise _BadRequest(f"messages[{i}].tool_call_id must be a string")
        messages.append(Message(role, content_out, tool_calls=calls, tool_call_id=call_id))
    if images > max_images:
        raise _BadRequest(f"the request has {images} images; this server accepts at most {max_images}")
    return messages


def _decode_images(messages: list[Message]) -> None:
    """Decode every image of the request now, so that one that is not an image is the client's 400."""
    for m in messages:
        for part in m.images():
            try:
                part.pil()
            except (ImageInputError, ValueError, OSError, Image.DecompressionBombError) as exc:
                raise _BadRequest(f"an image of the request cannot be used: {exc}") from None


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise _BadRequest(f"'{key}' must be a number from {low:g} to {high:g}")
    return value


def _params(body: dict[str, Any], max_n: int, max_new_tokens: int) -> GenerateParams:
    n = body.get("n")
    n = 1 if n is None else n
    if not _integer(n) or n < 1:
        raise _BadRequest("'n' must be a positive integer")
    if n > max_n:
        raise _BadRequest(f"'n'={n} is above this server's limit of {max_n}")
    given = [body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    tokens = given[0] if given else max_new_tokens
    if not _integer(tokens) or tokens < 1:
        raise _BadRequest("'max_completion_tokens' must be a positive integer")
    if tokens > max_new_tokens:
        raise _BadRequest(f"'max_completion_tokens'={tokens} is above this server's limit of {max_new_tokens}")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _BadRequest("'stop' must be a string or a list of strings")
    temperature, top_p = _number(body, "temperature", 0, 2), _number(body, "top_p", 0, 1)  # OpenAI's ranges
    seed = body.get("seed")
    if seed is not None and (not _integer(seed) or not -(2**63) <= seed < 2**63):
        raise _BadRequest("'seed' must be a 64-bit integer")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise _BadRequest("'tools' must be a list of tool objects")
    for key in ("stream", "return_token_ids"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise _BadRequest(f"'{key}' must be true or false")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise _BadRequest("'stream_options' must be an object")
    return GenerateParams(
        n=n,
        max_new_tokens=tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
        tools=tools,
        return_token_ids=bool(body.get("return_token_ids")),
    )


def _choice(index: int, c: Completion, with_ids: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    if c.tool_calls:
        message["tool_calls"] = [
            {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
            for t in c.tool_calls
        ]
    if c.reasoning:
        message["reasoning_content"] = c.reasoning
    out: dict[str, Any] = {"index": index, "message": message, "finish_reason": c.finish_reason or "stop"}
    if c.matched_stop is not None:  # as vLLM reports it: the stop string cut off, else null
        out["stop_reason"] = c.matched_stop or None
    if with_ids and c.token_ids is not None:
        out["token_ids"] = c.token_ids
    return out


def _pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


def _chunk_events(completions: list[Completion], with_ids: bool) -> list[list[dict[str, Any]]]:
    """Each completion as the ``choices`` entries of its stream chunks: the role, text pieces, tool calls with
    their arguments in pieces, and a last entry with ``finish_reason`` and ``stop_reason`` (vLLM's order)."""
    out = []
    for i, c in enumerate(completions):
        events: list[dict[str, Any]] = [{"index": i, "delta": {"role": "assistant", "content": ""}}]
        if c.reasoning:
            events += [{"index": i, "delta": {"reasoning_content": p}} for p in _pieces(c.reasoning)]
        events += [{"index": i, "delta": {"content": p}} for p in _pieces(c.text)]
        for k, t in enumerate(c.tool_calls):
            head = {"index": k, "id": t.id, "type": "function", "function": {"name": t.name, "arguments": ""}}
            events.append({"index": i, "delta": {"tool_calls": [head]}})
            events += [
                {"index": i, "delta": {"tool_calls": [{"index": k, "function": {"arguments": p}}]}}
                for p in _pieces(t.arguments)
            ]
        last: dict[str, Any] = {"index": i, "delta": {}, "finish_reason": c.finish_reason or "stop"}
        if c.matched_stop is not None:
            last["stop_reason"] = c.matched_stop or None
        if with_ids and c.token_ids is not None:
            last["token_ids"] = c.token_ids
        events.append(last)
        out.append(events)
    return out


def _sse(data: dict[str, Any] | str) -> bytes:
    # ASCII JSON: a client that splits lines where str.splitlines does (at U+2028 …) still reads every event.
    return b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"


def build_app(
    backend: Backend,
    *,
    model_name: str | None = None,
    latency: float = 0.0,
    jitter: float = 0.0,
    fail_every: int = 0,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_images: int = MAX_IMAGES,
    max_n: int = MAX_N,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Starlette:
    """The ASGI app.

    Args:
        backend: what answers.
        model_name: the name in ``/v1/models`` and responses (default: the backend's name).
        latency: seconds each completion request takes at least (a simulated model).
        jitter: extra random latency, uniform in ``[0, jitter]`` seconds.
        fail_every: answer every N-th completion request with HTTP 503 (fault injection; 0 = never).
        max_body_bytes: largest request body accepted.
        max_images: most images in one request.
        max_n: largest ``n``.
        max_new_tokens: largest ``max_completion_tokens``.
    """
    name = model_name or getattr(backend, "name", "glimpse")
    counter = itertools.count(1)

    async def health(_: Request) -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "model": name}
        kv_cache = getattr(backend, "kv_cache", None)  # the hf backend's kept key/values (models/kv_cache.py)
        if kv_cache is not None:
            body["kv_cache"] = {**kv_cache.stats, "entries": len(kv_cache.entries), "bytes": kv_cache.nbytes}
        return JSONResponse(body)

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "glimpse"}]})

    async def chat(request: Request) -> Response:
        started = time.perf_counter()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            return _error(f"request body of {int(declared):,} bytes is above the limit of {max_body_bytes:,}", 413)
        received = bytearray()
        async for piece in request.stream():  # counted as it comes: a chunked body declares no length
            received += piece
            if len(received) > max_body_bytes:
                return _error(f"request body of over {max_body_bytes:,} bytes is above the limit", 413)
        raw = bytes(received)
        if fail_every and next(counter) % fail_every == 0:
            return _error("injected failure (fail_every)", 503, "server_error")
        try:
            # Large bodies (many images) are parsed off the event loop, so other replies are not held up.
            body = await asyncio.to_thread(json.loads, raw) if len(raw) > _INLINE_JSON_BYTES else json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            return _error(f"the body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error("the body must be a JSON object")
        stream = body.get("stream") is True
        try:
            messages = _parse_messages(body.get("messages"), max_images)
            params = _params(body, max_n, max_new_tokens)
            await asyncio.to_thread(_decode_images, messages)
            completions = await backend.generate(messages, params)
        except _BadRequest as exc:
            return _error(str(exc), exc.status)
        except ContextLengthError as exc:
            return _error(f"This model's maximum context length is exceeded: {exc}", 400)
        except ScriptExhaustedError as exc:
            return _error(f"the scripted backend has no reply for this conversation: {exc}", 400)
        except BackendError as exc:
            return _error(f"the backend failed: {exc}", 502, "server_error")
        simulated = latency + (random.uniform(0, jitter) if jitter else 0.0)
        wait = simulated - (time.perf_counter() - started)
        prompt_tokens = completions[0].prompt_tokens if completions else 0
        completion_tokens = sum(c.completion_tokens or 0 for c in completions)
        usage = {
            "prompt_tokens": prompt_tokens or 0,
            "completion_tokens": completion_tokens,
            "total_tokens": (prompt_tokens or 0) + completion_tokens,
        }
        head: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        prompt_ids = completions[0].prompt_token_ids if params.return_token_ids and completions else None
        headers = {"x-glimpse-simulated-latency": f"{simulated:.6f}"} if simulated else None
        if stream:
            options = body.get("stream_options")
            with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            events = _stream(
                head, completions, params.return_token_ids, usage if with_usage else None, prompt_ids, wait
            )
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        if wait > 0:
            await asyncio.sleep(wait)
        payload: dict[str, Any] = {
            **head,
            "object": "chat.completion",
            "choices": [_choice(i, c, params.return_token_ids) for i, c in enumerate(completions)],
            "usage": usage,
        }
        if prompt_ids is not None:
            payload["prompt_token_ids"] = prompt_ids
        return JSONResponse(payload, headers=headers)

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


async def _stream(
    head: dict[str, Any],
    completions: list[Completion],
    with_ids: bool,
    usage: dict[str, Any] | None,
    prompt_ids: list[int] | None,
    wait: float,
) -> Any:
    """The server-sent events of a streamed reply; ``wait`` seconds of simulated latency are spread evenly over
    the chunks, so a reply arrives piece by piece and ends when a plain one would have."""
    per_choice = _chunk_events(completions, with_ids)
    order = [e for round_ in itertools.zip_longest(*per_choice) for e in round_ if e is not None]
    pause = wait / len(order) if wait > 0 and order else 0.0
    chunk = {**head, "object": "chat.completion.chunk"}
    for k, event in enumerate(order):
        if pause:
            await asyncio.sleep(pause)
        out: dict[str, Any] = {**chunk, "choices": [event]}
        if k == 0 and prompt_ids is not None:
            out["prompt_token_ids"] = prompt_ids
        yield _sse(out)
    if usage is not None:
        yield _sse({**chunk, "choices": [], "usage": usage})
    yield _sse("[DONE]")


def serve(backend: Backend, *, host: str = "127.0.0.1", port: int = 8000, **app_options: Any) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    app = build_app(backend, **app_options)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
