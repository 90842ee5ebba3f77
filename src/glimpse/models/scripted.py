"""The ``scripted`` backend: replays pre-written assistant turns, and records what it was sent.

It is a first-class backend for tests, demos and examples: it behaves like an OpenAI-compatible server
(stop strings are cut off and left out of the text, replies longer than ``max_new_tokens`` are truncated
with ``finish_reason="length"``), so the agent loop runs exactly as it does against a real model.

Scripts come from a JSON file or from Python:

* ``["turn 1", "turn 2", …]``: one script;
* ``[["a1", "a2"], ["b1", "b2", "b3"]]`` or ``{"scripts": [...]}``: several;
* a turn is a string, or ``{"content": "…", "tool_calls": [{"name": "zoom_in", "arguments": {…}}]}``;
* or a callable ``policy(messages, params) -> str | dict``, called once per completion.

The backend keeps no state between calls: turn *t* of a conversation is the script whose first *t* turns
match the assistant messages already in the conversation. Sample *j* of a request with ``n`` samples starts
script ``j mod len(scripts)``. So it works the same behind ``glimpse serve`` over HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glimpse.errors import ConfigError, ScriptExhaustedError
from glimpse.images import image_tokens
from glimpse.models.base import Completion, GenerateParams, Message, ToolCall

# Rough characters per token, to emulate ``max_new_tokens`` truncation and usage counts (images count as
# Qwen-family image tokens, one per 28×28 pixels).
_CHARS_PER_TOKEN = 4

ScriptTurn = str | dict[str, Any]
Policy = Callable[[list[Message], GenerateParams], ScriptTurn]


@dataclass
class Request:
    """One call the backend received."""

    messages: list[Message]
    params: GenerateParams


def load_scripts(source: str | Path | list[Any] | dict[str, Any]) -> list[list[ScriptTurn]]:
    """Read scripts from a JSON file path or an already-parsed object.

    Raises:
        ConfigError: the file is missing or not in one of the accepted shapes.
    """
    data: Any = source
    if isinstance(source, (str, Path)):
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read script file {source}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"script file {source} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("scripts")
    if not isinstance(data, list) or not data:
        raise ConfigError('a script is a non-empty JSON list of turns, a list of such lists, or {"scripts": [...]}')
    scripts = data if all(isinstance(s, list) for s in data) else [data]
    for i, script in enumerate(scripts):
        if not script:
            raise ConfigError(f"script {i} has no turns")
        for turn in script:
            if not isinstance(turn, (str, dict)):
                raise ConfigError(f"script {i}: a turn must be a string or an object, got {turn!r}")
    return scripts


def _signature(content: str, calls: list[tuple[str, str]]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return content.strip(), tuple(calls)


def _canonical_args(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, sort_keys=True)


class ScriptedBackend:
    """Replays scripts (see the module docstring).

    Args:
        scripts: scripts as loaded by ``load_scripts``, a path, or a policy callable.
        name: shown in trajectories.
        record: how many of the latest requests to keep in ``requests`` (0 keeps none).
    """

    def __init__(
        self, scripts: list[list[ScriptTurn]] | str | Path | Policy, *, name: str = "scripted", record: int = 1000
    ):
        self.policy: Policy | None = None
        self.scripts: list[list[ScriptTurn]] = []
        if callable(scripts):
            self.policy = scripts
        else:
            self.scripts = load_scripts(scripts)
        self.name = name
        self.requests: deque[Request] = deque(maxlen=record)

    async def generate(self, messages: list[Message], params: GenerateParams) -> list[Completion]:
        if self.requests.maxlen:
            self.requests.append(Request(messages=copy.copy(messages), params=copy.copy(params)))
        if self.policy is not None:  # off the event loop: a policy may think for seconds (the expert reads images)
            policy = self.policy
            replies = await asyncio.to_thread(lambda: [policy(messages, params) for _ in range(params.n)])
            return [self._emulate(reply, params, messages) for reply in replies]
        history = [m for m in messages if m.role == "assistant"]
        turn_index = len(history)
        candidates = [s for s in self.scripts if self._matches(s, history, params)]
        if not candidates:
            said = history[-1].text()[:80] if history else ""
            raise ScriptExhaustedError(
                f"no script matches this conversation (assistant turn {turn_index - 1} was {said!r}); "
                "the conversation left the script"
            )
        out = []
        for j in range(params.n):
            script = candidates[j % len(candidates)] if turn_index == 0 else candidates[0]
            if turn_index >= len(script):
                raise ScriptExhaustedError(
                    f"the script has {len(script)} turns but turn {turn_index + 1} was asked for; "
                    "end the script with an answer or lower max_turns"
                )
            out.append(self._emulate(script[turn_index], params, messages))
        return out

    def _matches(self, script: list[ScriptTurn], history: list[Message], params: GenerateParams) -> bool:
        if len(script) < len(history):
            return False
        for said, planned in zip(history, script, strict=False):
            calls = [(c.name, _canonical_args(c.arguments)) for c in said.tool_calls]
            done = self._emulate(planned, params, [])
            expected = _signature(done.text, [(c.name, _canonical_args(c.arguments)) for c in done.tool_calls])
            got = _signature(said.text(), calls)
            if got != expected and not _same_up_to_stop(said.text(), done.text, params.stop):
                return False
        return True

    @staticmethod
    def _emulate(turn: ScriptTurn, params: GenerateParams, messages: list[Message]) -> Completion:
        """Turn a script entry into what an OpenAI-compatible server would return."""
        if isinstance(turn, str):
            text, raw_calls, finish = turn, [], None
        else:
            text = str(turn.get("content") or "")
            raw_calls = list(turn.get("tool_calls") or [])
            finish = turn.get("finish_reason")
        calls = [
            ToolCall(
                id=str(c.get("id") or f"call_{i}"),
                name=str(c["name"]),
                arguments=c["arguments"] if isinstance(c["arguments"], str) else json.dumps(c["arguments"]),
            )
            for i, c in enumerate(raw_calls)
        ]
        cut = [text.find(s) for s in params.stop if s and s in text]
        if cut:
            text, finish = text[: min(cut)], finish or "stop"
        limit = params.max_new_tokens * _CHARS_PER_TOKEN
        if len(text) > limit:
            text, finish, calls = text[:limit], "length", []
        finish = finish or ("tool_calls" if calls else "stop")
        prompt_tokens = sum(
            len(m.text()) // _CHARS_PER_TOKEN + sum(image_tokens(*p.size) for p in m.images()) for m in messages
        )
        return Completion(
            text=text,
            tool_calls=calls,
            finish_reason=finish,
            prompt_tokens=prompt_tokens + 1 if messages else None,
            completion_tokens=len(text) // _CHARS_PER_TOKEN + 1,
        )


def _same_up_to_stop(said: str, planned: str, stop: list[str]) -> bool:
    """Whether ``said`` is ``planned`` with a stop string the harness put back."""
    return any(said.strip() == (planned + s).strip() for s in stop)


def create(arg: str, *, record: int = 1000, **_options: Any) -> ScriptedBackend:
    """``scripted:PATH``: replay the scripts in a JSON file."""
    return ScriptedBackend(arg, name=f"scripted:{Path(arg).name}", record=record)
