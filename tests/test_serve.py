"""``glimpse serve`` over real HTTP on loopback, with the ``openai`` backend as its client: multi-turn runs, ``n``,
function calls, the command line, limits, injected failures, and streamed replies (server-sent events) reaching
the agent loop's listener. The server is a ``glimpse serve`` subprocess in front of the scripted backend.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from conftest import glimpse_server
from glimpse.agent import AgentLoop
from glimpse.models.base import GenerateParams, Message
from glimpse.models.openai_compat import OpenAIBackend
from glimpse.trajectory import Sample, load_jsonl
from test_openai_compat import Listener, _run_and_close, run, zoom

pytestmark = pytest.mark.slow


# -------------------------------------------------------------------------------- against glimpse serve
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    script = folder / "script.json"
    script.write_text(
        json.dumps(
            {
                "scripts": [
                    [
                        zoom([0.25, 0.25, 0.75, 0.75]),
                        zoom([0.5, 0.5, 1.0, 1.0], "observation_1"),
                        "<answer>42</answer>",
                    ],
                    [zoom([0.0, 0.0, 0.5, 0.5]), "<answer>41</answer>"],
                    [
                        {
                            "content": "",
                            "tool_calls": [
                                {
                                    "id": "c1",
                                    "name": "zoom_in",
                                    "arguments": {"bbox_2d": [0.1, 0.1, 0.6, 0.6], "source": "original_image"},
                                }
                            ],
                        },
                        {"content": "<answer>tool</answer>"},
                    ],
                ]
            }
        )
    )
    with glimpse_server("--model", f"scripted:{script}") as base:
        yield base, folder


def test_multi_turn_zoom_over_http(served, make_image):
    base, _ = served
    path = make_image(1000, 800)
    loop = AgentLoop(OpenAIBackend("scripted", base_url=base))
    (traj,) = run(_run_and_close(loop, Sample(id="h", images=[str(path)], question="?")))
    assert traj.stop_reason == "answer" and traj.answer == "42", traj.error
    assert [t.crop_box_px for t in traj.turns[:2]] == [[250, 200, 750, 600], [500, 400, 750, 600]]
    assert traj.settings.model == "openai:scripted"
    # The server counted the images it received (one per 28×28 pixels): more tokens every turn.
    prompts = [t.usage.prompt_tokens for t in traj.turns]
    assert prompts[0] > (1008 // 28) * (812 // 28) and prompts[0] < prompts[1] < prompts[2]


def test_samples_use_n_over_http(served, make_image):
    base, _ = served
    loop = AgentLoop(OpenAIBackend("scripted", base_url=base))
    trajs = run(_run_and_close(loop, Sample(id="h", images=[str(make_image())], question="?"), samples=2))
    assert [t.answer for t in trajs] == ["42", "41"]


def test_function_calls_over_http(served, make_image):
    base, _ = served

    async def go():
        # Three samples: the server's third script is the one written with native tool calls.
        backend = OpenAIBackend("scripted", base_url=base)
        loop = AgentLoop(backend, protocol="tools")
        try:
            return await loop.run(Sample(id="h", images=[str(make_image())], question="?"), samples=3)
        finally:
            await backend.aclose()

    trajs = run(go())
    tool_traj = trajs[2]
    assert tool_traj.turns[0].tool_call_id == "c1" and tool_traj.turns[0].crop_box_px == [100, 80, 600, 480]
    assert tool_traj.answer == "tool"


def test_cli_ask_against_the_server(served, make_image, tmp_path):
    base, _ = served
    path = make_image(1000, 800)
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "glimpse",
            "ask",
            str(path),
            "What is it?",
            "--model",
            "openai:scripted",
            "--base-url",
            base,
            "--save",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "turn 1" in proc.stdout and "zoom original_image" in proc.stdout and "Answer: 42" in proc.stdout
    assert '<think>zoom</think><grounding>{"bbox_2d"' in proc.stdout  # the reply was printed as it streamed
    (traj,) = load_jsonl(out)
    assert traj.answer == "42" and len(traj.turns) == 3
    assert json.loads(out.with_suffix(".config.json").read_text())["base_url"] == base


def test_server_limits_give_clear_4xx(tmp_path, write_script):
    script = write_script(["<answer>x</answer>"])
    with glimpse_server(
        "--model", f"scripted:{script}", "--max-body-mb", "1", "--max-n", "4", "--max-images", "1"
    ) as base:
        url = base + "/chat/completions"
        ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(url, json=ok).status_code == 200
        cases = [
            ({**ok, "n": 5}, 400, "above this server's limit of 4"),
            ({"model": "m", "messages": []}, 400, "non-empty"),
            (
                {
                    "model": "m",
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                        }
                    ],
                },
                400,
                "data URLs",
            ),
            (
                {
                    "model": "m",
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 2,
                        }
                    ],
                },
                400,
                "at most 1",
            ),
        ]
        for body, status, text in cases:
            r = httpx.post(url, json=body)
            assert r.status_code == status and text in r.json()["error"]["message"], (body, r.text)

        def image(url: str) -> dict:
            return {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}]}

        bomb = io.BytesIO()
        Image.new("1", (30_000, 30_000)).save(bomb, format="PNG")  # 112 kB, 900 megapixels decoded
        wrong = [
            ({**ok, "n": 0}, "'n' must be a positive integer"),
            ({**ok, "max_tokens": 0}, "positive integer"),
            ({**ok, "temperature": -3}, "'temperature' must be a number from 0 to 2"),
            ({**ok, "temperature": True}, "'temperature'"),
            ({**ok, "top_p": 5}, "'top_p'"),
            ({**ok, "seed": "abc"}, "'seed'"),
            ({**ok, "seed": 2**80}, "'seed'"),
            ({**ok, "tools": "zoom"}, "'tools'"),
            ({**ok, "stream": "false"}, "'stream'"),
            ({**ok, "stream_options": 5}, "'stream_options'"),
            ({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "must be a string"),
            ({**ok, "messages": [{"role": "tool", "content": "x", "tool_call_id": 3}]}, "tool_call_id"),
            (image("data:image/png;base64,not base64!"), "cannot be used"),
            (image("data:image/png;base64," + base64.b64encode(b"not an image").decode()), "cannot be used"),
            (image("data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode()), "cannot be used"),
        ]
        for body, text in wrong:
            r = httpx.post(url, json=body)
            assert r.status_code == 400 and text in r.json()["error"]["message"], (body, r.text)
        deep = httpx.post(url, content=b"[" * 100_000, headers={"content-type": "application/json"})
        assert deep.status_code == 400 and "not valid JSON" in deep.json()["error"]["message"]
        big = httpx.post(url, content=b"x" * (2 * 1024 * 1024), headers={"content-type": "application/json"})
        assert big.status_code == 413
        chunked = httpx.post(url, content=iter([b"x" * 65536] * 40), headers={"content-type": "application/json"})
        assert chunked.status_code == 413  # no declared length: counted as it came
        bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        assert httpx.get(base + "/models").json()["data"][0]["id"].startswith("scripted:")


def test_retries_through_injected_503s(make_image, write_script):
    script = write_script([zoom([0.1, 0.1, 0.6, 0.6]), "<answer>7</answer>"])
    with glimpse_server("--model", f"scripted:{script}", "--fail-every", "2") as base:
        backend = OpenAIBackend("scripted", base_url=base, backoff=0.01)
        (traj,) = run(_run_and_close(AgentLoop(backend), Sample(id="r", images=[str(make_image())], question="?")))
    assert traj.stop_reason == "answer" and traj.answer == "7"


# ------------------------------------------------------------------------------------------------- streaming
def stream_and_plain(base: str, messages: list[Message], **params):
    """The same request streamed (with a listener) and plain, on one backend."""

    async def go():
        backend = OpenAIBackend("scripted", base_url=base, backoff=0.01)
        try:
            listener = Listener()
            streamed = await backend.generate(messages, GenerateParams(on_text=listener, **params))
            plain = await backend.generate(messages, GenerateParams(**params))
            return listener, streamed, plain
        finally:
            await backend.aclose()

    return run(go())


def test_streamed_replies_arrive_in_pieces_and_equal_plain_ones(tmp_path):
    long = "<think>" + " ".join(f"word{i}" for i in range(60)) + "</think>" + zoom([0.1, 0.2, 0.6, 0.7])
    script = tmp_path / "s.json"
    script.write_text(json.dumps({"scripts": [[long, "<answer>a</answer>"], [long + " ", "<answer>b</answer>"]]}))
    with glimpse_server("--model", f"scripted:{script}", "--latency", "1.2") as base:
        listener, streamed, plain = stream_and_plain(
            base, [Message("user", "hi")], n=2, stop=["</grounding>"], temperature=0.0
        )
        # The raw events, as vLLM sends them: chunks, usage when asked for, then [DONE].
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with_usage = httpx.post(base + "/chat/completions", json={**body, "stream_options": {"include_usage": True}})
        without = httpx.post(base + "/chat/completions", json=body)
    assert [c.text for c in streamed] == [c.text for c in plain] and streamed[0].text.endswith("}")
    assert [c.finish_reason for c in streamed] == [c.finish_reason for c in plain] == ["stop", "stop"]
    assert streamed[0].prompt_tokens == plain[0].prompt_tokens > 0  # usage from the final chunk
    assert streamed[0].completion_tokens == plain[0].completion_tokens
    assert listener.text(0) == streamed[0].text and listener.text(1) == streamed[1].text
    times = [t for t, _ in listener.deltas]
    assert len(times) > 40 and times[-1] - times[0] > 0.6  # many pieces, spread over the simulated latency
    assert times[len(times) // 2] < times[-1] - 0.3  # half the text was shown well before the reply ended
    events = [line for line in with_usage.text.splitlines() if line.startswith("data: ")]
    assert with_usage.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] > 0
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    assert "usage" not in without.text


def test_streamed_tool_call_arguments_are_assembled(served):
    base, _ = served
    messages = [Message("user", "?")]
    listener, streamed, plain = stream_and_plain(base, messages, n=3, tools=[{"type": "function"}])
    assert [c.tool_calls for c in streamed] == [c.tool_calls for c in plain]
    (call,) = streamed[2].tool_calls
    assert call.id == "c1" and json.loads(call.arguments)["bbox_2d"] == [0.1, 0.1, 0.6, 0.6]
    assert streamed[2].finish_reason == "tool_calls" and listener.text(0) == streamed[0].text


def test_the_loop_hands_streamed_text_to_each_trajectory(served, make_image):
    base, _ = served
    got: dict[tuple[int, int], str] = {}

    def on_text(traj, delta):
        key = (traj.sample_index, len(traj.turns))
        got[key] = delta.text if delta.restart else got.get(key, "") + delta.text

    loop = AgentLoop(OpenAIBackend("scripted", base_url=base))
    sample = Sample(id="s", images=[str(make_image())], question="?")
    trajs = run(_run_and_close(loop, sample, samples=2, on_text=on_text))
    assert [t.answer for t in trajs] == ["42", "41"]
    for t in trajs:  # every turn's text came in pieces, to the right trajectory (n=2 first, then one by one)
        for turn in t.turns:  # the record puts back the stop string the server cut
            assert turn.text in (got[(t.sample_index, turn.index)], got[(t.sample_index, turn.index)] + "</grounding>")


def test_cancelling_a_run_ends_its_trajectories_with_cancelled(make_image, write_script):
    script = write_script([zoom([0.1, 0.1, 0.6, 0.6]), zoom([0.2, 0.2, 0.7, 0.7]), "<answer>7</answer>"])
    seen = {}
    with glimpse_server("--model", f"scripted:{script}", "--latency", "0.5") as base:

        async def go():
            loop = AgentLoop(OpenAIBackend("scripted", base_url=base))
            first_turn = asyncio.Event()

            def on_turn(traj, turn):
                seen["traj"] = traj
                first_turn.set()

            task = asyncio.create_task(
                loop.run(Sample(id="c", images=[str(make_image())], question="?"), on_turn=on_turn)
            )
            await first_turn.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await loop.backend.aclose()

        run(go())
    traj = seen["traj"]
    assert traj.stop_reason == "cancelled" and len(traj.turns) == 1 and traj.wall_s > 0
