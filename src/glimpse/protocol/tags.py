"""Mini-o3's tag protocol: ``<think>…</think>``, ``<grounding>{json}</grounding>``, ``<answer>…</answer>``.

Generation stops at ``</grounding>``; OpenAI-compatible servers leave the stop string out of the text, so a
reply that ends inside a call has its closing tag put back (the harness closes the turn itself). Observations
and errors come back as user turns. Reasoning inside closed ``<think>`` blocks is never searched for calls or
answers, nor is the code inside a closed ``<python>`` block, so a model may mention the tags while thinking
or in its code. Tags are found by plain string search, linear in a reply's length even when it is full of
unclosed tags (a non-greedy regular expression is quadratic there).
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from glimpse.geometry import Coords
from glimpse.models.base import Completion, ImagePart, Message
from glimpse.protocol.base import (
    CODE_CALL,
    Action,
    Protocol,
    clean_text,
    mistake,
    parse_call_payload,
    refuse_tags,
    think_block,
)
from glimpse.protocol.prompts import PromptSet

OPEN_CALL, CLOSE_CALL = "<grounding>", "</grounding>"
OPEN_CODE, CLOSE_CODE = "<python>", "</python>"
OPEN_ANSWER, CLOSE_ANSWER = "<answer>", "</answer>"
OPEN_THINK, CLOSE_THINK = "<think>", "</think>"
# Pieces that show the model meant to use a tag but did not write it properly.
# Any case: ``<ANSWER>`` is the tag, mistyped.
_CALL_DEBRIS = re.compile(r"</?\s*grounding\b|\"bbox_2d\"|'bbox_2d'", re.IGNORECASE)
_ANSWER_DEBRIS = re.compile(r"</?\s*answer\b", re.IGNORECASE)


def restore_stop(text: str, finish_reason: str | None, matched_stop: str | None = None) -> str:
    """Put back a ``</grounding>`` or ``</python>`` the server cut off as a stop string.

    ``matched_stop`` is what the server said it cut (``""``: nothing); when it does not say (``None``), an
    opened, unclosed call is taken to have been cut at its closing tag.
    """
    if finish_reason == "length":
        return text
    if matched_stop is not None:
        return text + matched_stop if matched_stop in (CLOSE_CALL, CLOSE_CODE) else text
    opened = max((text.rfind(o), c) for o, c in ((OPEN_CALL, CLOSE_CALL), (OPEN_CODE, CLOSE_CODE)))
    start, close = opened
    if start >= 0 and text.rfind(close) < start:
        return text + close
    return text


class Blocks(NamedTuple):
    """The closed blocks of one tag in a text, and the text outside them."""

    inside: list[str]
    outside: str


def blocks(text: str, open_tag: str, close_tag: str) -> Blocks:
    """Each closed ``open_tag … close_tag`` block of ``text``, left to right; a block ends at the first closing
    tag after it opens (as a non-greedy ``open(.*?)close`` would match, but in linear time)."""
    inside: list[str] = []
    outside: list[str] = []
    pos = 0
    while (start := text.find(open_tag, pos)) >= 0:
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:  # no later opening tag can be closed either
            break
        outside.append(text[pos:start])
        inside.append(text[start + len(open_tag) : end])
        pos = end + len(close_tag)
    outside.append(text[pos:])
    return Blocks(inside, "".join(outside))


def thought_of(text: str) -> str | None:
    """The reasoning of a reply: its ``<think>`` blocks (an unclosed one runs to the first tag after it)."""
    found, rest = blocks(text, OPEN_THINK, CLOSE_THINK)
    parts = [b.strip() for b in found]
    if OPEN_THINK in rest:
        tail = rest.split(OPEN_THINK, 1)[1]
        cut = min((i for i in (tail.find(OPEN_CALL), tail.find(OPEN_ANSWER)) if i >= 0), default=len(tail))
        parts.append(tail[:cut].strip())
    joined = "\n".join(b for b in parts if b)
    return joined or None


def parse_tagged(text: str, finish_reason: str | None, code: bool = False) -> Action:
    """Read a reply written with tags into an action (``code``: the Python tool is offered). Never raises.

    Answer tags nested inside an answer are dropped: ``<answer><answer>x</answer></answer>`` answers ``x``.
    """
    text = clean_text(text)
    thought = thought_of(text)
    body = blocks(text, OPEN_THINK, CLOSE_THINK).outside.replace(OPEN_THINK, "")
    codes, rest = blocks(body, OPEN_CODE, CLOSE_CODE)
    calls = blocks(rest, OPEN_CALL, CLOSE_CALL).inside
    answers = [
        a.replace(OPEN_ANSWER, "").replace(CLOSE_ANSWER, "") for a in blocks(rest, OPEN_ANSWER, CLOSE_ANSWER).inside
    ]
    open_call = rest.count(OPEN_CALL) > len(calls)
    open_code = body.count(OPEN_CODE) > len(codes)
    open_answer = rest.count(OPEN_ANSWER) > len(answers)
    truncated = finish_reason == "length"

    def err(kind: str, message: str, tool_attempt: bool = True) -> Action:
        return mistake(kind, message, tool_attempt=tool_attempt, text=text, thought=thought)

    if truncated and not calls and not codes and not answers:
        return err(
            "truncated",
            "your reply was cut off at the token limit of a turn before it finished. Keep your reasoning "
            "shorter and end the reply with one call or the answer.",
            tool_attempt=open_call or open_code or bool(_CALL_DEBRIS.search(body)),
        )
    kinds = sum(bool(x) for x in (calls or open_call, codes or open_code, answers or open_answer))
    if (calls or open_call) and (answers or open_answer) and not (codes or open_code):
        return err("answer_and_call", "a reply must hold either one zoom call or the final answer, not both")
    if kinds > 1:
        return err("multiple_actions", "a reply must hold one action: a zoom call, code, or the final answer")
    if codes or open_code:
        if not code:
            return err("unknown_tool", "there is no code tool in this run; zoom into the image or answer")
        if len(codes) + int(open_code) > 1:
            return err("multiple_calls", "send one block of code per reply; you will see its result first")
        if open_code:
            return err("unclosed_tag", f"the code was not closed; end it with {CLOSE_CODE}")
        source = _strip_fence(codes[0])
        if not source.strip():
            return err("bad_call", "the code block is empty")
        return Action(kind="code", text=text, thought=thought, code=source, tool_attempt=True)
    if len(calls) + int(open_call) > 1:
        return err("multiple_calls", "make one zoom call per reply; you will see its result before the next")
    if open_call:
        return err("unclosed_tag", f"the zoom call was not closed; end it with {CLOSE_CALL}")
    if calls:
        payload = parse_call_payload(calls[0])
        if isinstance(payload, Action):
            payload.text, payload.thought = text, thought
            return payload
        return Action(kind="zoom", text=text, thought=thought, call=payload, tool_attempt=True)
    if answers:
        distinct = {a.strip() for a in answers}
        if len(distinct) > 1:
            return err("multiple_answers", "give exactly one final answer", tool_attempt=False)
        answer = distinct.pop()
        if not answer:
            return err("empty_answer", "the answer tags are empty; put the answer between them", tool_attempt=False)
        return Action(kind="answer", text=text, thought=thought, answer=answer)
    if open_answer or _ANSWER_DEBRIS.search(rest):
        return err("unclosed_tag", f"write the answer as {OPEN_ANSWER}your answer{CLOSE_ANSWER}", tool_attempt=False)
    if _CALL_DEBRIS.search(rest):
        return err(
            "missing_tag",
            f'write a zoom call as {OPEN_CALL}{{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}}{CLOSE_CALL}',
        )
    return Action(kind="none", text=text, thought=thought)


def _strip_fence(code: str) -> str:
    """Code inside the tags, without a Markdown fence around it."""
    stripped = code.strip("\n")
    lines = stripped.strip().splitlines()
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1].strip() == "```":
        return "\n".join(lines[1:-1])
    return stripped


class TagProtocol(Protocol):
    """Mini-o3's protocol; box coordinates in the ``coords`` convention (relative by default), and with
    ``code`` a ``<python>…</python>`` block for the code tool."""

    name = "tags"

    def __init__(self, coords: Coords, prompts: PromptSet, code: bool = False):
        super().__init__(coords, prompts, code)
        self.stop = [CLOSE_CALL, CLOSE_CODE] if code else [CLOSE_CALL]
        self.tools: list[dict[str, Any]] | None = None

    def parse(self, completion: Completion) -> Action:
        text = restore_stop(completion.text, completion.finish_reason, completion.matched_stop)
        action = parse_tagged(text, completion.finish_reason, self.code)
        if action.thought is None and completion.reasoning:
            action.thought = clean_text(completion.reasoning).strip() or None
        return action

    def assistant_message(self, action: Action, completion: Completion) -> Message:
        return Message("assistant", action.text)

    def _write_call(self, kind: str, arguments: dict[str, Any], thought: str, call_id: str) -> Completion:
        if kind == CODE_CALL:
            code = arguments["code"]
            refuse_tags(code, "the code", (OPEN_CODE, CLOSE_CODE, "<think>", "</think>"))
            body = f"{OPEN_CODE}\n{code}\n{CLOSE_CODE}"
        else:
            # "<" escaped inside JSON strings, so that a source name cannot hold a tag the parser would read.
            body = f"{OPEN_CALL}{json.dumps(arguments).replace('<', chr(92) + 'u003c')}{CLOSE_CALL}"
        # The whole reply, closing tag included: nothing was cut off as a stop string.
        return Completion(text=think_block(thought) + body, finish_reason="stop", matched_stop="")

    def observation(
        self, action: Action, image: ImagePart, observation_index: int, action_turn: int, source: str
    ) -> list[Message]:
        text = self.observation_text(observation_index, action_turn, source)
        return [Message("user", self._with_image(text, image))]

    def error(self, action: Action, message: str, action_turn: int) -> list[Message]:
        return [Message("user", self.error_text(message, action_turn))]

    def code_result(self, action: Action, output: str, images: list[tuple[int, ImagePart]]) -> list[Message]:
        return [Message("user", self._code_parts(output, images))]
