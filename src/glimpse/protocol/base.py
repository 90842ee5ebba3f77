"""What a protocol does: build the messages of a conversation, read the model's replies, and write them.

A protocol is the dialect a model speaks: how it is told about the zoom tool, how it writes a call and an
answer, and how observations and errors come back to it. Parsing never raises: anything the model writes
becomes an ``Action``, and a malformed reply is an ``error`` action whose text goes back to the model.

Writing is the inverse, for policies that are programs (the oracle, the expert, the cold-start teacher, the
demo): ``write_zoom``, ``write_code`` and ``write_answer`` return the ``Completion`` a backend would return,
and ``parse`` reads it back as the same action. ``script_turn`` turns it into a scripted backend's turn.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from glimpse.geometry import Coords
from glimpse.models.base import Completion, ImagePart, Message, Part, TextPart
from glimpse.protocol.prompts import PromptSet, fill, split_on_image

ActionKind = Literal["zoom", "code", "answer", "error", "none"]

# A JSON integer longer than this cannot be a float (the largest float is about 1.8e308); it is refused as
# out of range when read, which also keeps Python's 4,300-digit limit on int() out of reach.
_MAX_INT_DIGITS = 308
# Longest piece of model output quoted back in an error message.
QUOTE_LIMIT = 60


@dataclass
class Action:
    """What the model asked for in one reply.

    Attributes:
        kind: ``zoom`` (a call to run; its values are checked by the tool), ``code`` (Python to run),
            ``answer``, ``error`` (a format mistake) or ``none`` (neither a call nor an answer).
        text: the reply text as recorded (with a cut-off closing tag restored).
        thought: the reasoning, when the reply has any.
        call: ``{"bbox_2d": …, "source": …}`` as written, for ``zoom``.
        code: the Python source, for ``code``.
        answer: the answer text, for ``answer``.
        error: the message for the model, for ``error``.
        error_kind: short category, for metrics.
        tool_attempt: the reply tried to call the tool (also true for malformed calls).
        call_ids: ids of native function calls that must each be answered.
    """

    kind: ActionKind
    text: str = ""
    thought: str | None = None
    call: dict[str, Any] | None = None
    code: str | None = None
    answer: str | None = None
    error: str | None = None
    error_kind: str | None = None
    tool_attempt: bool = False
    call_ids: list[str] = field(default_factory=list)


def mistake(kind: str, message: str, *, tool_attempt: bool = True, **extra: Any) -> Action:
    """An ``error`` action."""
    return Action(kind="error", error=message, error_kind=kind, tool_attempt=tool_attempt, **extra)


def clean_text(text: str) -> str:
    """``text`` as valid Unicode: surrogate pairs joined, lone surrogates (which no encoding can write, so a
    trajectory holding one could not be saved) replaced by U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def quote(value: Any, limit: int = QUOTE_LIMIT, _depth: int = 0) -> str:
    """A short ``repr`` of model output for an error message: long strings and deep or large containers are
    cut, and integers too long for ``repr`` are described by their size. Never raises."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        text = repr(value)
    elif isinstance(value, int):
        digits = int(value.bit_length() * 0.30103) + 1  # log10(2): the digit count without converting
        text = repr(value) if digits <= limit else f"an integer of about {digits} digits"
    elif isinstance(value, str):
        text = repr(value[: limit + 1])
    elif isinstance(value, list):
        if value and _depth:
            text = "[…]"
        elif len(value) > 8:
            text = f"a list of {len(value)} values"
        else:
            text = "[" + ", ".join(quote(v, 12, _depth + 1) for v in value) + "]"
    elif isinstance(value, dict):
        text = ("{…}" if value else "{}") if _depth else f"an object with {len(value)} fields"
    else:
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


class _NumberTooLarge(Exception):
    def __init__(self, literal: str):
        self.literal = literal


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _json_int(literal: str) -> int:
    if len(literal.lstrip("-")) > _MAX_INT_DIGITS:
        raise _NumberTooLarge(literal)
    return int(literal)


def _json_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):  # a finite literal such as 1e999 that no float can hold
        raise _NumberTooLarge(literal)
    return value


def unfence(text: str) -> str:
    """``text`` stripped, without a Markdown code fence (```json … ```) around it."""
    text = text.strip()
    if len(text) >= 6 and text.startswith("```") and text.endswith("```"):
        return text[3:-3].lstrip(string.ascii_letters).strip()
    return text


def load_json(text: str, what: str = "the call") -> Any:
    """Read model-written JSON (in a Markdown fence or not), or say what is wrong with it.

    Stricter than ``json.loads`` where Python's reading would hide the model's mistake: a key given twice
    is a ``duplicate_key`` mistake (not the last one silently winning), and a number no float can hold (an
    integer of hundreds of digits, ``1e999``) is an ``out_of_range`` mistake. ``NaN`` and ``Infinity`` are
    read as floats; the zoom tool refuses them.

    Returns:
        The value, or an ``error`` action.
    """
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_json_int, parse_float=_json_float)
    except _DuplicateKey as exc:
        return mistake("duplicate_key", f"{what} gives the field {quote(exc.key)} more than once; give each field once")
    except _NumberTooLarge as exc:
        shown = exc.literal if len(exc.literal) <= 24 else exc.literal[:20] + "…"
        return mistake(
            "out_of_range",
            f"{what} holds the number {shown} ({len(exc.literal)} characters long), far too large for any "
            "coordinate; give values within the image",
        )
    except json.JSONDecodeError as exc:
        return mistake("invalid_json", f"{what} is not valid JSON ({exc.msg} at character {exc.pos})")
    except RecursionError:
        return mistake("invalid_json", f"{what} is not valid JSON: it is nested too deeply")
    except ValueError:
        return mistake("invalid_json", f"{what} is not valid JSON")


def parse_call_payload(payload: str) -> dict[str, Any] | Action:
    """Read the JSON of a zoom call: ``{"bbox_2d": [...], "source": ...}``.

    Also accepted: the object inside a one-element list (Qwen's grounding output style), a bare list of four
    numbers (source defaults to the original), and JSON wrapped in a Markdown code fence. ``source`` defaults
    to ``original_image``. Values are checked later, by the zoom tool; what ``load_json`` refuses is a mistake
    here.

    Returns:
        The call, or an ``error`` action explaining what is wrong.
    """
    text = unfence(payload)
    if not text:
        return mistake("bad_call", 'the call is empty; write {"bbox_2d": [x0, y0, x1, y1], "source": ...}')
    obj = load_json(text)
    if isinstance(obj, Action):
        return obj
    if isinstance(obj, list):
        if len(obj) == 1 and isinstance(obj[0], dict):
            obj = obj[0]
        elif len(obj) > 1 and all(isinstance(o, dict) for o in obj):
            return mistake("multiple_calls", f"the call holds {len(obj)} boxes; zoom into one region per reply")
        elif len(obj) == 4 and not any(isinstance(o, (list, dict)) for o in obj):
            obj = {"bbox_2d": obj}
    if not isinstance(obj, dict):
        return mistake("bad_call", 'the call must be a JSON object like {"bbox_2d": [x0, y0, x1, y1], "source": ...}')
    if "bbox_2d" not in obj:
        return mistake("bad_call", 'the call has no "bbox_2d" field; give the region as "bbox_2d": [x0, y0, x1, y1]')
    source = obj.get("source", "original_image")
    if source is None:
        source = "original_image"
    if not isinstance(source, str):
        return mistake("bad_call", '"source" must be a string such as "original_image" or "observation_1"')
    return {"bbox_2d": obj["bbox_2d"], "source": clean_text(source)}


# The two calls a reply can make, as the writers name them.
ZOOM_CALL, CODE_CALL = "zoom", "code"
# Every tag the parsers read: text written inside a reply must not hold them, or it would be read differently.
TAGS = ("<think>", "</think>", "<grounding>", "</grounding>", "<python>", "</python>", "<answer>", "</answer>")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def refuse_tags(text: str, what: str, tags: Sequence[str] = TAGS) -> None:
    found = [t for t in tags if t in text]
    if found:
        raise ValueError(f"{what} holds {found[0]}, which the parser would read as a tag: {text[:80]!r}")


def _thought(thought: str | None) -> str:
    thought = (thought or "").strip()
    refuse_tags(thought, "the thought", ("<think>", "</think>"))
    return thought


def think_block(thought: str) -> str:
    """The reasoning block that opens a written reply (nothing when there is no thought)."""
    return f"<think>{thought}</think>\n" if thought else ""


def script_turn(completion: Completion) -> str | dict[str, Any]:
    """A written reply as a turn of the ``scripted`` backend: its text, or, with native calls, the text and
    the calls (arguments as JSON objects, so that a script file stays readable)."""
    if not completion.tool_calls:
        return completion.text
    calls = [{"id": c.id, "name": c.name, "arguments": json.loads(c.arguments)} for c in completion.tool_calls]
    return {"content": completion.text, "tool_calls": calls}


class Protocol:
    """Base of the two protocols. Subclasses implement ``parse``, ``assistant_message``, ``observation``,
    ``error``, ``code_result`` and ``_write_call``, and set ``name``, ``stop`` and ``tools``.

    Args:
        coords: how boxes are written.
        prompts: the templates.
        code: whether the Python code tool is offered.
    """

    name: str = ""
    stop: list[str]
    tools: list[dict[str, Any]] | None = None

    def __init__(self, coords: Coords, prompts: PromptSet, code: bool = False):
        self.coords = coords
        self.prompts = prompts
        self.code = code
        self.stop = []

    def system_text(self) -> str:
        text = self.prompts.system + (self.prompts.code if self.code else "")
        return fill(text, coords=self.coords.describe())

    def start(self, image: ImagePart | Sequence[ImagePart], question: str) -> list[Message]:
        """The system message (if any) and the first user message: the image(s) and the question.

        One image goes where the user template's image marker is. Several go there in order, after the
        ``images`` template (which names them) and each after its name (``image_1:``, ``image_2:`` …).
        """
        images = [image] if isinstance(image, ImagePart) else list(image)
        if not images:
            raise ValueError("start() needs at least one image")
        messages = []
        system = self.system_text()
        if system.strip():
            messages.append(Message("system", system))
        # Split the template before filling it: a question may itself contain "<image>" or "{image}".
        halves = split_on_image(self.prompts.user)
        if halves is None:
            raise ValueError(f"user template has no image marker: {self.prompts.user[:60]!r}")
        before, after = (fill(h, question=question) for h in halves)
        parts: list[Part] = [TextPart(before)] if before else []
        if len(images) == 1:
            parts.append(images[0])
        else:
            parts.append(TextPart(fill(self.prompts.images, count=len(images))))
            for k, shown in enumerate(images, 1):
                parts += [TextPart(f"\nimage_{k}:\n" if k > 1 else f"image_{k}:\n"), shown]
        if after:
            parts.append(TextPart(after))
        messages.append(Message("user", parts))
        return messages

    @staticmethod
    def _with_image(text: str, image: ImagePart) -> list[Part]:
        halves = split_on_image(text)
        if halves is None:  # templates are checked when loaded; a default without a marker is our bug
            raise ValueError(f"template has no image marker: {text[:60]!r}")
        before, after = halves
        parts: list[Part] = [TextPart(before)] if before else []
        parts.append(image)
        if after:
            parts.append(TextPart(after))
        return parts

    def observation_text(self, observation_index: int, action_turn: int, source: str) -> str:
        return fill(
            self.prompts.observation,
            observation_turn=observation_index,
            action_turn=action_turn,
            source=source,
        )

    def error_text(self, error: str, action_turn: int) -> str:
        return fill(self.prompts.error, error=error, action_turn=action_turn)

    def parse(self, completion: Completion) -> Action:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ writing
    def write_zoom(
        self, box: Sequence[float], source: str = "original_image", thought: str | None = None, *, call_id: str = ""
    ) -> Completion:
        """A reply that zooms into ``box`` (in this protocol's coordinates, relative to ``source``).

        Args:
            box: ``[x0, y0, x1, y1]``; written as given (a policy may write a box the tool refuses).
            source: ``original_image`` or ``observation_N``.
            thought: the reasoning before the call (``None``: none).
            call_id: the native call's id (function calling only; default ``call_0``).

        Raises:
            ValueError: ``box`` is not four finite numbers, or ``thought`` holds a think tag.
        """
        values = list(box)
        if len(values) != 4 or not all(_is_finite_number(v) for v in values):
            raise ValueError(f"a zoom box is four finite numbers [x0, y0, x1, y1], got {box!r}")
        return self._write_call(ZOOM_CALL, {"bbox_2d": values, "source": source}, _thought(thought), call_id)

    def write_code(self, code: str, thought: str | None = None, *, call_id: str = "") -> Completion:
        """A reply that runs ``code`` with the code tool (its leading and trailing newlines are not kept).

        Raises:
            ValueError: this protocol was made without the code tool, the code is empty or holds a tag that
                would end it early, or ``thought`` holds a think tag.
        """
        if not self.code:
            raise ValueError("this protocol does not offer the code tool; make it with code=True")
        code = code.strip("\n")
        if not code.strip():
            raise ValueError("the code to write is empty")
        return self._write_call(CODE_CALL, {"code": code}, _thought(thought), call_id)

    def write_answer(self, answer: str, thought: str | None = None) -> Completion:
        """A reply that gives the final ``answer`` (without surrounding whitespace).

        Raises:
            ValueError: the answer is empty or holds one of the protocol's tags, or ``thought`` holds a think
                tag.
        """
        answer = answer.strip()
        if not answer:
            raise ValueError("the answer to write is empty")
        refuse_tags(answer, "the answer")
        text = think_block(_thought(thought)) + f"<answer>{answer}</answer>"
        return Completion(text=text, finish_reason="stop", matched_stop="")

    def _write_call(self, kind: str, arguments: dict[str, Any], thought: str, call_id: str) -> Completion:
        raise NotImplementedError

    def assistant_message(self, action: Action, completion: Completion) -> Message:
        raise NotImplementedError

    def observation(
        self, action: Action, image: ImagePart, observation_index: int, action_turn: int, source: str
    ) -> list[Message]:
        raise NotImplementedError

    def error(self, action: Action, message: str, action_turn: int) -> list[Message]:
        raise NotImplementedError

    def code_result(self, action: Action, output: str, images: list[tuple[int, ImagePart]]) -> list[Message]:
        raise NotImplementedError

    def _code_parts(self, output: str, images: list[tuple[int, ImagePart]]) -> list[Part]:
        """The code's output, then each image it showed as a numbered observation."""
        return [TextPart(fill(self.prompts.code_result, output=output)), *self._image_parts(images, lead="\n")]

    def _image_parts(self, images: list[tuple[int, ImagePart]], lead: str = "") -> list[Part]:
        parts: list[Part] = []
        for n, (index, image) in enumerate(images):
            if lead or n:
                parts.append(TextPart("\n"))
            parts.extend(self._with_image(fill(self.prompts.code_image, observation_turn=index), image))
        return parts
