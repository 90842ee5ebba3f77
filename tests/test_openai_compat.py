"""The ``openai`` backend over real HTTP on loopback: retries, dropped parameters, streaming.

Each case runs a small Starlette app with uvicorn in a thread that answers the way a server under test would (a
429, garbage, a dropped stream, a refused parameter); no client is mocked. ``test_serve.py`` runs the backend
against ``glimpse serve`` end to end.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from conftest import app_server, free_port, interruptible
from glimpse.agent import AgentLoop
from glimpse.errors import BackendError, ContextLengthError
from glimpse.models.base import GenerateParams, Message, TextDelta
from glimpse.models.openai_compat import OpenAIBackend
from glimpse.trajectory import Sample

pytestmark = pytest.mark.slow


def zoom(box, source="original_image") -> str:
    return f"<think>zoom</think><grounding>{json.dumps({'bbox_2d': box, 'source': source})}</grounding>"


def run(coro):
    return asyncio.run(coro)


async def _run_and_close(loop: AgentLoop, sample: Sample, **kw):
    try:
        return await loop.run(sample, **kw)
    finally:
        await loop.backend.aclose()


# ------------------------------------------------------------------------------------- fault injection
def _reply(text: str = "<answer>ok</answer>", **extra) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3},
        **extra,
    }


def scripted_app(handler) -> Starlette:
    """An app whose chat endpoint calls ``handler(attempt, body)``; attempts and bodies are recorded."""
    seen: list[dict] = []

    async def chat(request: Request):
        body = json.loads(await request.body())
        seen.append(body)
        return await handler(len(seen), body)

    async def health(_):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])
    app.state.seen = seen
    return app


def generate(base: str, n: int = 1, **backend_options) -> list:
    async def go():
        backend = OpenAIBackend("m", base_url=base, backoff=0.01, **backend_options)
        try:
            return await backend.generate([Message("user", "hi")], GenerateParams(n=n))
        finally:
            await backend.aclose()

    return run(go())


def test_retry_after_429_and_garbage_then_success():
    async def handler(attempt, body):
        if attempt == 1:
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "0.2"})
        if attempt == 2:
            return PlainTextResponse("<html>bad gateway</html>", status_code=200)
        return JSONResponse(_reply())

    app = scripted_app(handler)
    with app_server(app) as base:
        started = time.perf_counter()
        (completion,) = generate(base)
        assert time.perf_counter() - started >= 0.2  # Retry-After was honoured
    assert completion.text == "<answer>ok</answer>" and len(app.state.seen) == 3


def test_gives_up_after_max_retries_with_the_last_error():
    async def handler(attempt, body):
        return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)

    app = scripted_app(handler)
    with app_server(app) as base, pytest.raises(BackendError, match=r"gave up after 3 attempts.*overloaded"):
        generate(base, max_retries=2)
    assert len(app.state.seen) == 3


def test_client_errors_are_not_retried_and_carry_a_hint():
    async def handler(attempt, body):
        return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)

    app = scripted_app(handler)
    with app_server(app) as base, pytest.raises(BackendError, match="check the API key"):
        generate(base)
    assert len(app.state.seen) == 1


def test_rejected_parameters_are_dropped_once():
    async def handler(attempt, body):
        if "temperature" in body:
            return JSONResponse(
                {"error": {"message": "Unsupported parameter: 'temperature' is not supported with this model."}},
                status_code=400,
            )
        return JSONResponse(_reply())

    app = scripted_app(handler)
    with app_server(app) as base:

        async def go():
            backend = OpenAIBackend("m", base_url=base)
            try:
                for _ in range(2):
                    await backend.generate([Message("user", "hi")], GenerateParams(temperature=0.5))
            finally:
                await backend.aclose()
            return backend

        backend = run(go())
    assert backend.dropped == {"temperature"}
    assert ["temperature" in b for b in app.state.seen] == [True, False, False]


def test_n_is_emulated_when_the_server_refuses_it():
    async def handler(attempt, body):
        if body.get("n", 1) > 1:
            return JSONResponse({"error": {"message": "'n' is not supported by this model"}}, status_code=400)
        return JSONResponse(_reply(f"<answer>{attempt}</answer>"))

    app = scripted_app(handler)
    with app_server(app) as base:
        completions = generate(base, n=3)
    assert len(completions) == 3 and len(app.state.seen) == 4


def test_context_overflow_becomes_context_full(make_image):
    async def handler(attempt, body):
        if len(body["messages"]) > 2:
            return JSONResponse(
                {
                    "error": {
                        "message": "This model's maximum context length is 4096 tokens. "
                        "However, you requested 5000 tokens."
                    }
                },
                status_code=400,
            )
        return JSONResponse(_reply(zoom([0.1, 0.1, 0.6, 0.6])))

    with app_server(scripted_app(handler)) as base:
        with pytest.raises(ContextLengthError):
            run(OpenAIBackend("m", base_url=base).generate([Message("user", "a")] * 3, GenerateParams()))
        loop = AgentLoop(OpenAIBackend("m", base_url=base))
        (traj,) = run(_run_and_close(loop, Sample(id="c", images=[str(make_image())], question="?")))
    assert traj.stop_reason == "context_full" and traj.over_turn


def test_timeouts_are_retried():
    async def handler(attempt, body):
        if attempt == 1:
            await asyncio.sleep(2.0)
        return JSONResponse(_reply())

    app = scripted_app(handler)
    with app_server(app) as base:
        (completion,) = generate(base, timeout=0.5)
    assert completion.text and len(app.state.seen) == 2


def test_token_ids_and_reasoning_are_read():
    async def handler(attempt, body):
        assert body["return_token_ids"] is True and body["max_completion_tokens"] == 1024
        reply = _reply(prompt_token_ids=[1, 2, 3])
        reply["choices"][0]["token_ids"] = [4, 5]
        reply["choices"][0]["message"]["reasoning_content"] = "because"
        return JSONResponse(reply)

    with app_server(scripted_app(handler)) as base:

        async def go():
            backend = OpenAIBackend("m", base_url=base)
            try:
                return await backend.generate([Message("user", "hi")], GenerateParams(return_token_ids=True))
            finally:
                await backend.aclose()

        (c,) = run(go())
    assert c.prompt_token_ids == [1, 2, 3] and c.token_ids == [4, 5] and c.completion_tokens == 2
    assert c.reasoning == "because"


def test_unreachable_server_fails_with_exit_code_4(make_image, tmp_path):
    port = free_port()  # nothing listens here
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "glimpse",
            "ask",
            str(make_image()),
            "?",
            "--model",
            "openai:m",
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--max-retries",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "ConnectError" in proc.stdout or "ConnectError" in proc.stderr


def test_several_servers_share_the_load_and_keep_conversations_sticky(make_image):
    def make(tag):
        async def handler(attempt, body):
            turns = sum(m["role"] == "assistant" for m in body["messages"])
            text = zoom([0.1, 0.1, 0.6, 0.6]) if turns < 2 else f"<answer>{tag}</answer>"
            return JSONResponse(_reply(text))

        return scripted_app(handler)

    a, b = make("a"), make("b")
    path = make_image(400, 300)
    with app_server(a) as url_a, app_server(b) as url_b:
        backend = OpenAIBackend("m", base_url=f"{url_a},{url_b}", max_concurrency=4)
        results = _run_questions(backend, path, 8, concurrency=8)
    assert len(a.state.seen) > 0 and len(b.state.seen) > 0
    assert len(a.state.seen) + len(b.state.seen) == 24
    for app in (a, b):  # every turn of a conversation went to the server its first turn went to
        questions = [
            m["content"][-1]["text"] for body in app.state.seen for m in body["messages"][:2] if m["role"] == "user"
        ]
        for q in set(questions):
            assert questions.count(q) == 3
    assert {t.answer for (t,) in results} == {"a", "b"}


def test_a_dead_server_among_several_is_passed_over_on_retries(make_image):
    """One of two servers refuses connections: conversations that hit it are retried on the other, and later ones
    avoid it while it rests, so a small retry budget is enough."""
    good = scripted_app(lambda attempt, body: _answer())
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    path = make_image(400, 300)
    with app_server(good) as url:
        backend = OpenAIBackend("m", base_url=f"{dead},{url}", max_retries=1, backoff=0.2, max_concurrency=2)
        results = _run_questions(backend, path, 6, concurrency=3)
    assert [t.stop_reason for (t,) in results] == ["answer"] * 6


def _run_questions(backend: OpenAIBackend, path, n: int, *, concurrency: int) -> list:
    """``n`` questions ("question 0" …) on one image through the loop, then the backend closed."""
    loop = AgentLoop(backend)
    samples = [Sample(id=f"s{i}", images=[str(path)], question=f"question {i}") for i in range(n)]

    async def go():
        try:
            return await loop.run_many(samples, concurrency=concurrency)
        finally:
            await backend.aclose()

    return run(go())


async def _answer():
    return JSONResponse(_reply())


# ------------------------------------------------------------------------------------------------- streaming
class Listener:
    """Collects streamed pieces with their arrival times; ``text(i)`` is what choice ``i`` shows now."""

    def __init__(self):
        self.started = time.perf_counter()
        self.deltas: list[tuple[float, TextDelta]] = []

    def __call__(self, delta: TextDelta) -> None:
        self.deltas.append((time.perf_counter() - self.started, delta))

    def text(self, index: int = 0) -> str:
        out = ""
        for _, d in self.deltas:
            if d.index == index:
                out = d.text if d.restart else out + d.text
        return out


def sse(*chunks, done: bool = True) -> list[bytes]:
    out = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    return out + ([b"data: [DONE]\n\n"] if done else [])


def piece(text=None, finish=None, index=0, **extra) -> dict:
    delta = {} if text is None else {"content": text}
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, **extra}],
    }


def test_stream_reports_the_stop_string_the_server_cut():
    async def handler(attempt, body):
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        chunks = sse(
            piece("<grounding>", stop_reason=None),
            piece("{}", stop_reason=None),
            piece(finish="stop", stop_reason="</grounding>"),
            {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
        )
        return StreamingResponse(iter(chunks), media_type="text/event-stream")

    with app_server(scripted_app(handler)) as base:
        listener, (c,), _ = stream_and_plain_app(base)
    assert c.text == "<grounding>{}" and c.matched_stop == "</grounding>" and c.prompt_tokens == 7
    assert listener.text() == c.text


def stream_and_plain_app(base: str, **backend_options):
    async def go():
        backend = OpenAIBackend("m", base_url=base, backoff=0.01, **backend_options)
        try:
            listener = Listener()
            return listener, await backend.generate([Message("user", "hi")], GenerateParams(on_text=listener)), backend
        finally:
            await backend.aclose()

    return run(go())


def test_a_dropped_stream_is_retried_and_the_reply_restarts():
    async def handler(attempt, body):
        if attempt == 1:  # two pieces, then the connection ends without a finish or [DONE]
            return StreamingResponse(
                iter(sse(piece("Hel"), piece("lo wo"), done=False)), media_type="text/event-stream"
            )
        return StreamingResponse(iter(sse(piece("Hello"), piece(" world", "stop"))), media_type="text/event-stream")

    app = scripted_app(handler)
    with app_server(app) as base:
        listener, (c,), _ = stream_and_plain_app(base)
    assert c.text == "Hello world" and len(app.state.seen) == 2
    assert [d.restart for _, d in listener.deltas] == [False, False, True, False, False]
    assert listener.text() == "Hello world"


def test_a_server_refusing_streams_gets_plain_requests_after_one_warning(caplog):
    async def handler(attempt, body):
        if body.get("stream"):
            return JSONResponse({"error": {"message": "Streaming is not supported"}}, status_code=400)
        return JSONResponse(_reply())

    app = scripted_app(handler)
    with app_server(app) as base:

        async def go():
            backend = OpenAIBackend("m", base_url=base)
            try:
                for _ in range(3):
                    await backend.generate([Message("user", "hi")], GenerateParams(on_text=lambda d: None))
            finally:
                await backend.aclose()
            return backend

        with caplog.at_level("WARNING"):
            backend = run(go())
    assert backend.dropped == {"stream"}
    assert [bool(b.get("stream")) for b in app.state.seen] == [True, False, False, False]
    assert sum("refused a streamed reply" in r.message for r in caplog.records) == 1


def test_token_ids_are_never_streamed():
    async def handler(attempt, body):
        assert "stream" not in body
        reply = _reply(prompt_token_ids=[1])
        reply["choices"][0]["token_ids"] = [2]
        return JSONResponse(reply)

    with app_server(scripted_app(handler)) as base:

        async def go():
            backend = OpenAIBackend("m", base_url=base)
            try:
                params = GenerateParams(return_token_ids=True, on_text=lambda d: None)
                return await backend.generate([Message("user", "hi")], params)
            finally:
                await backend.aclose()

        (c,) = run(go())
    assert c.token_ids == [2]


def slow_stream(pieces: int) -> tuple[dict, object]:
    """A handler that streams ``pieces`` words, one every 50 ms, and records how many it sent and whether the client
    closed the stream."""
    state = {"sent": 0, "closed": False}

    async def handler(attempt, body):
        async def events():
            try:
                for i in range(pieces):
                    state["sent"] += 1
                    yield sse(piece(f"w{i} "), done=False)[0]
                    await asyncio.sleep(0.05)
                yield b"data: [DONE]\n\n"
            finally:
                state["closed"] = True

        return StreamingResponse(events(), media_type="text/event-stream")

    return state, handler


def test_cancelling_closes_the_stream():
    state, handler = slow_stream(100)

    with app_server(scripted_app(handler)) as base:

        async def go():
            backend = OpenAIBackend("m", base_url=base)
            first = asyncio.Event()
            task = asyncio.create_task(
                backend.generate([Message("user", "hi")], GenerateParams(on_text=lambda d: first.set()))
            )
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await backend.aclose()

        run(go())
        deadline = time.monotonic() + 3
        while not state["closed"] and time.monotonic() < deadline:
            time.sleep(0.02)
    assert state["closed"] and state["sent"] < 40, state  # the server stopped well before its 100 pieces


def test_ctrl_c_in_glimpse_ask_closes_the_stream(make_image):
    import signal

    state, handler = slow_stream(200)

    with app_server(scripted_app(handler)) as base:
        args = ["ask", str(make_image()), "?", "--model", "openai:m", "--base-url", base]
        proc = subprocess.Popen(
            [sys.executable, "-m", "glimpse", *args], stdout=subprocess.PIPE, text=True, preexec_fn=interruptible
        )
        deadline = time.monotonic() + 60
        while state["sent"] < 5 and time.monotonic() < deadline:  # the reply is streaming
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
        deadline = time.monotonic() + 5
        while not state["closed"] and time.monotonic() < deadline:
            time.sleep(0.02)
    assert proc.returncode == 130 and "w0 w1" in out  # the text so far was printed as it came
    assert state["closed"] and state["sent"] < 150, state


def test_stream_text_with_unicode_line_separators_is_read_whole():
    text = "a\u2028b\u2029c\x85d\x1ce\u00e9\r\nf"

    async def handler(attempt, body):
        raw = [  # as vLLM writes them: UTF-8 JSON, line separators unescaped
            b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\r\n\r\n"
            for c in (piece(text[:5]), piece(text[5:], "stop"))
        ]
        return StreamingResponse(iter([*raw, b"data: [DONE]\r\n\r\n"]), media_type="text/event-stream")

    with app_server(scripted_app(handler)) as base:
        listener, (c,), _ = stream_and_plain_app(base)
    assert c.text == text and listener.text() == text


def test_events_are_read_as_the_sse_format_frames_them():
    async def handler(attempt, body):
        events = [
            b": a comment, then an event whose JSON spans two data lines\n",
            b'event: chunk\ndata: {"choices": [{"index": 0,\ndata: "delta": {"content": "Hel"}}]}\n\n',
            b'data:{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n',
            b"data: [DONE]",  # no blank line after the last event
        ]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    with app_server(scripted_app(handler)) as base:
        listener, (c,), _ = stream_and_plain_app(base)
    assert c.text == "Hello" and c.finish_reason == "stop" and listener.text() == "Hello"


@pytest.mark.parametrize(
    "bad",
    [
        {"choices": [{"index": "first", "delta": {"content": "x"}}]},
        {"choices": [{"index": 0, "delta": ["x"]}]},
        {"choices": ["x"]},
        {"choices": [{"index": 0, "delta": {"content": 7}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 5}}]}}]},
    ],
)
def test_unreadable_chunks_are_retried_like_unreadable_responses(bad):
    async def handler(attempt, body):
        if attempt == 1:
            return StreamingResponse(iter(sse(bad)), media_type="text/event-stream")
        return StreamingResponse(iter(sse(piece("ok", "stop"))), media_type="text/event-stream")

    app = scripted_app(handler)
    with app_server(app) as base:
        listener, (c,), _ = stream_and_plain_app(base)
    assert c.text == "ok" and len(app.state.seen) == 2 and listener.text() == "ok"


def retried_after(first: Response) -> None:
    """A server answers ``first``, then a good reply: the backend retries once and returns the good one."""

    async def handler(attempt, body):
        return first if attempt == 1 else JSONResponse(_reply())

    app = scripted_app(handler)
    with app_server(app) as base:
        (completion,) = generate(base)
    assert completion.text == "<answer>ok</answer>" and len(app.state.seen) == 2


def test_a_reply_whose_text_is_not_text_is_retried():
    retried_after(JSONResponse(_reply(7)))


@pytest.mark.parametrize(
    "body",
    [
        {"choices": ["x"]},
        {"choices": [{"index": 0, "message": None, "finish_reason": "stop"}]},
        {"choices": [{"index": 0, "message": {"content": None, "tool_calls": ["x"]}}]},
        [1, 2],
        "[" * 100_000,
    ],
)
def test_replies_of_no_server_shape_are_retried_as_unreadable(body):
    """Shapes no server writes (a choice that is a string, a null message, nesting deeper than Python parses)
    are a backend error that is retried, never an exception out of the backend."""
    text = body if isinstance(body, str) else json.dumps(body)
    retried_after(PlainTextResponse(text, media_type="application/json"))


def test_counts_and_token_ids_of_the_wrong_type_are_not_taken():
    async def handler(attempt, body):
        reply = _reply(usage={"prompt_tokens": "10", "completion_tokens": [3]}, prompt_token_ids="abc")
        reply["choices"][0]["token_ids"] = "xyz"
        return JSONResponse(reply)

    app = scripted_app(handler)
    with app_server(app) as base:
        (c,) = generate(base)
    assert (c.prompt_tokens, c.completion_tokens, c.token_ids, c.prompt_token_ids) == (None, None, None, None)


@pytest.mark.parametrize("after", ["NaN", "inf", "-5"])
def test_a_retry_after_that_is_no_wait_is_not_waited_on(after):
    async def handler(attempt, body):
        if attempt == 1:
            return JSONResponse({"error": {"message": "busy"}}, status_code=503, headers={"Retry-After": after})
        return JSONResponse(_reply())

    app = scripted_app(handler)
    with app_server(app) as base:
        started = time.perf_counter()
        (completion,) = generate(base, max_backoff=1.0)
        assert time.perf_counter() - started < 5  # NaN slept for ever; inf is capped at max_backoff
    assert completion.text == "<answer>ok</answer>"


def test_a_body_that_does_not_decompress_is_retried():
    retried_after(Response(b"not gzip at all", headers={"Content-Encoding": "gzip"}, media_type="application/json"))


@pytest.mark.parametrize(
    "message",
    [
        "Invalid image: Exception: cannot identify image file",  # "n:" inside a word
        "temperature: invalid value 5.0, must be in [0, 2]",  # a value, not the parameter
        "upstream tokenizer rejected the prompt",  # "stream" inside a word
    ],
)
def test_a_400_about_something_else_drops_no_parameter(message):
    async def handler(attempt, body):
        return JSONResponse({"error": {"message": message}}, status_code=400)

    app = scripted_app(handler)
    with app_server(app) as base:

        async def go():
            backend = OpenAIBackend("m", base_url=base)
            try:
                with pytest.raises(BackendError, match="HTTP 400"):
                    await backend.generate([Message("user", "hi")], GenerateParams(n=4, temperature=5.0))
            finally:
                await backend.aclose()
            return backend

        assert run(go()).dropped == set()
    assert len(app.state.seen) == 1


def test_streamed_tool_arguments_given_whole_as_an_object_are_read():
    call = {"index": 0, "id": "c1", "function": {"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 1, 1]}}}

    async def handler(attempt, body):
        chunks = sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}, piece(None, "tool_calls"))
        return StreamingResponse(iter(chunks), media_type="text/event-stream")

    app = scripted_app(handler)
    with app_server(app) as base:
        _, (c,), _ = stream_and_plain_app(base)
    assert json.loads(c.tool_calls[0].arguments) == {"bbox_2d": [0, 0, 1, 1]} and len(app.state.seen) == 1


def test_a_reply_that_trickles_in_is_cut_at_the_timeout():
    """The timeout bounds the whole reply, not only the wait between two of its bytes."""

    async def trickle():
        for _ in range(100):
            yield b" "
            await asyncio.sleep(0.1)

    async def handler(attempt, body):
        if attempt == 1:
            return StreamingResponse(trickle(), media_type="application/json")
        return JSONResponse(_reply())

    app = scripted_app(handler)
    with app_server(app) as base:
        started = time.perf_counter()
        (completion,) = generate(base, timeout=1.0)
        assert time.perf_counter() - started < 5  # the trickle would take 10 s
    assert completion.text == "<answer>ok</answer>" and len(app.state.seen) == 2


def test_a_stream_may_last_longer_than_the_timeout_while_bytes_keep_coming():
    async def slow():
        for i in range(6):
            yield sse(piece(f"w{i} "))[0]
            await asyncio.sleep(0.3)
        for chunk in sse(piece(None, "stop")):
            yield chunk

    async def handler(attempt, body):
        return StreamingResponse(slow(), media_type="text/event-stream")

    app = scripted_app(handler)
    with app_server(app) as base:
        _, (c,), _ = stream_and_plain_app(base, timeout=1.0, max_retries=0)
    assert c.text == "w0 w1 w2 w3 w4 w5 " and len(app.state.seen) == 1
