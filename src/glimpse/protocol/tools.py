"""Native function calling: the model calls ``zoom_in`` through the API's ``tools`` (o3, o4-mini, GPT-4.1, and
open models served with a tool-call parser).

Each call is answered by a ``tool`` message, as the API requires; because tool messages carry text only, the
zoomed image follows in a user message. A reply without a call is the final answer: the text inside
``<answer>…</answer>`` if present, otherwise the whole reply.
"""

from __future__ import annotations

import json
import re
from typing import Any

from glimpse.geometry import Coords
from glimpse.models.base import Completion, ImagePart, Message, ToolCall
from glimpse.protocol.base import (
    CODE_CALL,
    Action,
    Protocol,
    clean_text,
    load_json,
    mistake,
    parse_call_payload,
    quote,
    think_block,
)
from glimpse.protocol.prompts import PromptSet, fill
from glimpse.protocol.tags import CLOSE_THINK, OPEN_THINK, blocks, parse_tagged, thought_of

# Answer tags (read as the tags protocol); in this dialect a plain reply is the answer, so other cases stay text.
_ANSWER_TAG = re.compile(r"</?answer>")
# A call written into the reply's text (a server without a tool-call parser, or a model trained on another
# protocol): Hermes-style ``<tool_call>``, Mini-o3's tags, or the zoom's own argument.
_TEXT_CALL = re.compile(r"</?\s*(tool_call|grounding|python)\b|\"bbox_2d\"|'bbox_2d'", re.IGNORECASE)

ZOOM_TOOL_NAME = "zoom_in"
CODE_TOOL_NAME = "python"


def zoom_tool_schema(coords: Coords) -> dict[str, Any]:
    """The OpenAI function schema of the zoom tool; its fields are exactly those the parser reads."""
    return {
        "type": "function",
        "function": {
            "name": ZOOM_TOOL_NAME,
            "description": (
                "Zoom into a rectangular region of the original image or of an earlier zoomed view, and "
                "receive that region as a new image at higher resolution."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "bbox_2d": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 4,
                        "maxItems": 4,
                        "description": f"[x0, y0, x1, y1]: top-left and bottom-right corners, in {coords.describe()}.",
                    },
                    "source": {
                        "type": "string",
                        "description": 'The image to zoom into: "original_image" or "observation_N".',
                    },
                },
                "required": ["bbox_2d", "source"],
                "additionalProperties": False,
            },
        },
    }


def code_tool_schema() -> dict[str, Any]:
    """The OpenAI function schema of the code tool."""
    return {
        "type": "function",
        "function": {
            "name": CODE_TOOL_NAME,
            "description": "Run Python in a sandbox without network; state persists between calls. The images are "
            "PIL images in `images` (images['original_image'] …); show(image) returns an image as an observation.",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "The Python source to run."}},
                "required": ["code"],
                "additionalProperties": False,
            },
        },
    }


class ToolCallProtocol(Protocol):
    """Function calling with a ``zoom_in`` tool (and, with ``code``, a ``python`` tool); box coordinates in the
    ``coords`` convention."""

    name = "tools"

    def __init__(self, coords: Coords, prompts: PromptSet, code: bool = False):
        super().__init__(coords, prompts, code)
        self.stop = []
        self.tools = [zoom_tool_schema(coords)] + ([code_tool_schema()] if code else [])

    def parse(self, completion: Completion) -> Action:
        text = clean_text(completion.text or "")
        thought = clean_text(completion.reasoning or "").strip() or thought_of(text)
        calls = completion.tool_calls
        ids = [clean_text(str(c.id)) for c in calls]  # they go into the record and back to the server
        if len(calls) > 1:
            return mistake(
                "multiple_calls",
                f"you made {len(calls)} calls at once; make one zoom call per reply",
                text=text,
                thought=thought,
                call_ids=ids,
            )
        if calls:
            call = calls[0]
            arguments = _arguments_text(call.arguments)
            if call.name == CODE_TOOL_NAME and self.code:
                return self._code_call(arguments, text, thought, ids)
            if call.name != ZOOM_TOOL_NAME:
                offered = ", ".join(t["function"]["name"] for t in self.tools or [])
                return mistake(
                    "unknown_tool",
                    f"there is no function {quote(call.name)}; the functions are {offered}",
                    text=text,
                    thought=thought,
                    call_ids=ids,
                )
            payload = parse_call_payload(arguments)
            if isinstance(payload, Action):
                payload.text, payload.thought, payload.call_ids = text, thought, ids
                return payload
            return Action(kind="zoom", text=text, thought=thought, call=payload, tool_attempt=True, call_ids=ids)
        if _ANSWER_TAG.search(text) or completion.finish_reason == "length":
            action = parse_tagged(text, completion.finish_reason, self.code)
            if action.kind in ("answer", "error"):
                action.thought = action.thought or thought
                return action
        answer = blocks(text, OPEN_THINK, CLOSE_THINK).outside
        if CLOSE_THINK in answer:  # the template opened the reasoning in the prompt: it ends at the last close
            answer = answer.rsplit(CLOSE_THINK, 1)[1]
        if OPEN_THINK in answer:
            return mistake(
                "unclosed_think",
                f"your reasoning was never closed with {CLOSE_THINK}; close it, then answer or call a function",
                tool_attempt=False,
                text=text,
                thought=thought,
            )
        if _TEXT_CALL.search(answer):
            return mistake(
                "call_as_text",
                "you wrote a function call as text; call the function itself (zoom_in"
                + (f" or {CODE_TOOL_NAME}" if self.code else "")
                + "), or reply with the answer alone",
                text=text,
                thought=thought,
            )
        answer = answer.strip()
        if not answer:
            return Action(kind="none", text=text, thought=thought)
        return Action(kind="answer", text=text, thought=thought, answer=answer)

    @staticmethod
    def _code_call(arguments: str, text: str, thought: str | None, ids: list[str]) -> Action:
        args = load_json(arguments, "the arguments of python")
        if isinstance(args, Action):
            args.text, args.thought, args.call_ids = text, thought, ids
            return args
        code = args.get("code") if isinstance(args, dict) else None
        if not isinstance(code, str) or not code.strip():
            return mistake(
                "bad_call", 'python needs a non-empty "code" string', text=text, thought=thought, call_ids=ids
            )
        return Action(kind="code", text=text, thought=thought, code=clean_text(code), tool_attempt=True, call_ids=ids)

    def assistant_message(self, action: Action, completion: Completion) -> Message:
        calls = [
            ToolCall(clean_text(str(c.id)), clean_text(str(c.name)), clean_text(_arguments_text(c.arguments)))
            for c in completion.tool_calls
        ]
        return Message("assistant", action.text, tool_calls=calls)

    def _write_call(self, kind: str, arguments: dict[str, Any], thought: str, call_id: str) -> Completion:
        name = CODE_TOOL_NAME if kind == CODE_CALL else ZOOM_TOOL_NAME
        call = ToolCall(call_id or "call_0", name, json.dumps(arguments))
        return Completion(text=think_block(thought).rstrip("\n"), tool_calls=[call], finish_reason="tool_calls")

    def observation(
        self, action: Action, image: ImagePart, observation_index: int, action_turn: int, source: str
    ) -> list[Message]:
        note = f"Done: observation_{observation_index} is shown in the next message."
        replies = [Message("tool", note, tool_call_id=i) for i in action.call_ids]
        text = self.observation_text(observation_index, action_turn, source)
        return [*replies, Message("user", self._with_image(text, image))]

    def error(self, action: Action, message: str, action_turn: int) -> list[Message]:
        text = self.error_text(message, action_turn)
        if action.call_ids:
            return [Message("tool", text, tool_call_id=i) for i in action.call_ids]
        return [Message("user", text)]

    def code_result(self, action: Action, output: str, images: list[tuple[int, ImagePart]]) -> list[Message]:
        text = fill(self.prompts.code_result, output=output)
        replies = [Message("tool", text, tool_call_id=i) for i in action.call_ids]
        return [*replies, Message("user", self._image_parts(images))] if images else replies


def _arguments_text(arguments: object) -> str:
    """A call's arguments as JSON text: some servers send them as an object instead of a string."""
    if isinstance(arguments, str):
        return arguments
    try:
        return json.dumps(arguments)
    except (TypeError, ValueError, RecursionError):
        return str(type(arguments).__name__)
