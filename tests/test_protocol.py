"""Reading model replies: every mistake becomes an error observation, and nothing raises.

Property-based fuzzing sends 4,000 generated malformed replies through the parser and the zoom tool's checks
(``MALFORMED_EXAMPLES`` plus the tool-call and free-text runs below), and 400 hostile replies per protocol
through the real agent loop (huge numbers, fields given twice, deep nesting, lone surrogates, enormous
replies …); ``bench/fuzz_replies.py`` runs 100,000 of those per protocol with the same strategies.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import gradient_image
from glimpse.agent import AgentLoop
from glimpse.geometry import Box, Coords
from glimpse.images import PixelLimits
from glimpse.models.base import Completion, ToolCall
from glimpse.models.scripted import ScriptedBackend
from glimpse.protocol import make_protocol, script_turn
from glimpse.protocol.base import TAGS as PROTOCOL_TAGS
from glimpse.tools.zoom import ImageState, ZoomTool
from glimpse.trajectory import Sample

MALFORMED_EXAMPLES = 2_000

TAGS = make_protocol("tags", "relative")
TOOLS = make_protocol("tools", "relative")
TOOL = ZoomTool(Coords.RELATIVE, PixelLimits())
# The original (1000×800, shown at 1008×812) and two observations.
IMAGES = [
    ImageState(Box(0, 0, 1000, 800), 1008, 812),
    ImageState(Box(250, 200, 750, 600), 504, 420),
    ImageState(Box(500, 400, 750, 600), 252, 196),
]


def outcome(text: str, finish: str = "stop", protocol=TAGS, calls=None) -> tuple[str, str | None, str | None]:
    """(kind, error_kind, error) after parsing and, for a zoom, the tool's checks."""
    action = protocol.parse(Completion(text=text, finish_reason=finish, tool_calls=calls or []))
    if action.kind == "zoom":
        result = TOOL.resolve(action.call, IMAGES)
        if not result.ok:
            return "error", result.error_kind, result.error
        return "zoom", None, None
    return action.kind, action.error_kind, action.error


def call(payload, source: str | None = "original_image", raw: bool = False) -> str:
    body = payload if raw else json.dumps({"bbox_2d": payload, "source": source} if source else {"bbox_2d": payload})
    return f"<think>looking</think><grounding>{body}</grounding>"


# ---------------------------------------------------------------------------------------------- table tests
@pytest.mark.parametrize(
    ("text", "finish", "kind"),
    [
        (call([0.1, 0.1, 0.5, 0.5]), "stop", None),
        ('<grounding>{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "observation_2"}', "stop", None),  # stop cut off
        (call("[0.1, 0.2,", raw=True), "stop", "invalid_json"),
        ('<grounding>{"bbox_2d": [0.1, 0.1', "length", "truncated"),
        ("<think>I will zoom into the top left, then", "length", "truncated"),
        (call([float("nan"), 0, 1, 1]).replace("NaN", "NaN"), "stop", "not_a_number"),
        (
            call("[Infinity, 0, 1, 1]", raw=True)
            .replace("[Infinity", '{"bbox_2d": [Infinity')
            .replace("1]</", "1]}</"),
            "stop",
            "not_a_number",
        ),
        (call([-0.1, 0, 0.5, 0.5]), "stop", "out_of_range"),
        (call([0.1, 0.1, 1.5, 0.5]), "stop", "out_of_range"),
        (call([120, 80, 400, 300]), "stop", "out_of_range"),
        (call([0.5, 0.1, 0.2, 0.5]), "stop", "inverted_box"),
        (call([0.3, 0.3, 0.3, 0.5]), "stop", "inverted_box"),
        (call([0.1, 0.1, 0.11, 0.5]), "stop", "box_too_small"),
        (call([0.0, 0.4, 1.0, 0.43]), "stop", "box_too_small"),
        (call([0.1, 0.1, 0.5, 0.5], source="observation_9"), "stop", "unknown_source"),
        (call([0.1, 0.1, 0.5, 0.5], source="observation_0"), "stop", "unknown_source"),
        (call([0.1, 0.1, 0.5], source="original_image"), "stop", "bad_box"),
        (call([0.1, 0.1, 0.5, 0.5, 0.6]), "stop", "bad_box"),
        (call(["0.1", 0.1, 0.5, 0.5]), "stop", "not_a_number"),
        (call([True, 0.1, 0.5, 0.5]), "stop", "not_a_number"),
        (call('{"box": [0.1, 0.1, 0.5, 0.5]}', raw=True), "stop", "bad_call"),
        (call('"zoom please"', raw=True), "stop", "bad_call"),
        (call("", raw=True), "stop", "bad_call"),
        (call('{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": 3}', raw=True), "stop", "bad_call"),
        (call([0.1, 0.1, 0.5, 0.5]) + call([0.2, 0.2, 0.6, 0.6]), "stop", "multiple_calls"),
        (
            call('[{"bbox_2d": [0.1, 0.1, 0.5, 0.5]}, {"bbox_2d": [0.2, 0.2, 0.6, 0.6]}]', raw=True),
            "stop",
            "multiple_calls",
        ),
        ("<answer>B</answer>" + call([0.1, 0.1, 0.5, 0.5]), "stop", "answer_and_call"),
        ("<answer>B</answer><answer>C</answer>", "stop", "multiple_answers"),
        ("<answer>  </answer>", "stop", "empty_answer"),
        ("<answer>B", "stop", "unclosed_tag"),
        ("<ANSWER>B</ANSWER>", "stop", "unclosed_tag"),
        ("<Grounding>{}</Grounding>", "stop", "missing_tag"),
        ('I would zoom {"bbox_2d": [0.1, 0.1, 0.5, 0.5]}', "stop", "missing_tag"),
        ('<grounding {"bbox_2d": [0.1,0.1,0.5,0.5]}>', "stop", "missing_tag"),
    ],
)
def test_each_mistake_has_its_kind(text, finish, kind):
    got_kind, error_kind, error = outcome(text, finish)
    if kind is None:
        assert got_kind == "zoom", error
    else:
        assert (got_kind, error_kind) == ("error", kind), (text, error)
        assert error and len(error) > 10


def test_aspect_ratio_limit():
    tool = ZoomTool(Coords.PIXELS, PixelLimits(), max_aspect_ratio=10)
    images = [ImageState(Box(0, 0, 5000, 5000), 1400, 1400)]
    result = tool.resolve({"bbox_2d": [0, 0, 1400, 100], "source": "original_image"}, images)
    assert result.error_kind == "aspect_ratio" and "10:1" in result.error


def test_accepted_variants():
    assert outcome('<grounding>```json\n{"bbox_2d": [0.1, 0.1, 0.5, 0.5]}\n```</grounding>')[0] == "zoom"
    assert outcome('<grounding>[{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "label": "sign"}]</grounding>')[0] == "zoom"
    assert outcome("<grounding>[0.1, 0.1, 0.5, 0.5]</grounding>")[0] == "zoom"
    assert outcome('<grounding>{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "Observation_1"}</grounding>')[0] == "zoom"
    # Tags mentioned while thinking are not actions.
    text = "<think>I could write <answer>A</answer> but first <grounding>{}</grounding>...</think><answer>B</answer>"
    action = TAGS.parse(Completion(text=text))
    assert action.kind == "answer" and action.answer == "B"
    assert "I could write" in action.thought
    # The same answer twice is one answer.
    assert TAGS.parse(Completion(text="<answer>7</answer> so <answer> 7 </answer>")).answer == "7"
    # Plain prose is no action.
    assert TAGS.parse(Completion(text="The sign is too small.")).kind == "none"


def test_stop_string_is_restored_in_the_recorded_text():
    action = TAGS.parse(Completion(text='<grounding>{"bbox_2d": [0, 0, 1, 1]}', finish_reason="stop"))
    assert action.kind == "zoom" and action.text.endswith("</grounding>")


def test_tool_call_protocol():
    args = json.dumps({"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"})
    assert outcome("", "tool_calls", TOOLS, [ToolCall("c1", "zoom_in", args)])[0] == "zoom"
    two = [ToolCall("c1", "zoom_in", args), ToolCall("c2", "zoom_in", args)]
    assert outcome("", "tool_calls", TOOLS, two)[:2] == ("error", "multiple_calls")
    assert outcome("", "tool_calls", TOOLS, [ToolCall("c1", "crop", args)])[1] == "unknown_tool"
    assert outcome("", "tool_calls", TOOLS, [ToolCall("c1", "zoom_in", "{bbox")])[1] == "invalid_json"
    action = TOOLS.parse(Completion(text="It says <answer>42</answer>."))
    assert action.kind == "answer" and action.answer == "42"
    assert TOOLS.parse(Completion(text="Forty-two")).answer == "Forty-two"
    assert TOOLS.parse(Completion(text="  ")).kind == "none"
    # reasoning is not the answer: closed blocks go, and so does everything up to a lone close (a template
    # that opened the block in the prompt); a block never closed is a mistake, not an answer
    action = TOOLS.parse(Completion(text="<think>The sign is far away, maybe A.</think>\n\nB"))
    assert (action.kind, action.answer, action.thought) == ("answer", "B", "The sign is far away, maybe A.")
    assert TOOLS.parse(Completion(text="Far away, maybe A.</think>\nB")).answer == "B"
    assert TOOLS.parse(Completion(text="<think>Far away, maybe A.")).error_kind == "unclosed_think"
    # a call written as text (a server without a tool-call parser) is not an answer
    for text in (
        '<tool_call>\n{"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 1, 1]}}\n</tool_call>',
        '<grounding>{"bbox_2d": [0, 0, 1, 1]}</grounding>',
        '{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}',
    ):
        action = TOOLS.parse(Completion(text=text))
        assert (action.kind, action.error_kind) == ("error", "call_as_text"), text
        assert "call the function itself" in action.error
    assert TOOLS.parse(Completion(text="A python, coiled.")).answer == "A python, coiled."
    assert TOOLS.parse(Completion(text="The answer is B. <ANSWER>B</ANSWER>")).kind == "answer"  # text, as before


def test_tool_schema_agrees_with_the_parser():
    schema = TOOLS.tools[0]["function"]
    assert schema["name"] == "zoom_in"
    props = schema["parameters"]["properties"]
    assert set(props) == {"bbox_2d", "source"}
    assert set(schema["parameters"]["required"]) <= set(props)
    example = {"bbox_2d": [0.1, 0.1, 0.6, 0.6], "source": "original_image"}
    assert outcome("", "tool_calls", TOOLS, [ToolCall("c", schema["name"], json.dumps(example))])[0] == "zoom"


# ------------------------------------------------------------------------------------------------ fuzzing
noise = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40).map(
    lambda s: s.replace("<", "(").replace(">", ")")
)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


def _box_json(values: list) -> str:
    return "[" + ", ".join(v if isinstance(v, str) else json.dumps(v) for v in values) + "]"


@st.composite
def bad_values(draw) -> str:
    """A bbox_2d that the tool must refuse, as JSON text."""
    kind = draw(st.sampled_from(["nonfinite", "type", "length", "range", "inverted", "tiny"]))
    good = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2)))
    box: list = [good[0], 0.1, max(good[1], good[0] + 0.3) if good[0] < 0.7 else 1.0, 0.9]
    if kind == "nonfinite":
        box[draw(st.integers(0, 3))] = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
    elif kind == "type":
        box[draw(st.integers(0, 3))] = draw(st.sampled_from(['"0.5"', "true", "null", "[0.1]", "{}"]))
    elif kind == "length":
        n = draw(st.sampled_from([0, 1, 2, 3, 5, 6, 9]))
        box = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    elif kind == "range":
        i = draw(st.integers(0, 3))
        box[i] = draw(st.one_of(st.floats(-1e9, -1e-3), st.floats(1.001, 1e9)))
    elif kind == "inverted":
        a, b = draw(st.floats(0, 1)), draw(st.floats(0, 1))
        lo, hi = min(a, b), max(a, b)
        if draw(st.booleans()):
            box = [hi, 0.1, lo, 0.9]
        else:
            box = [0.1, hi, 0.9, lo]
    else:  # tiny: under 28 original pixels of a 1000-pixel-wide original
        x = draw(st.floats(0, 0.9))
        box = [x, 0.1, x + draw(st.floats(0.0005, 0.026)), 0.9]
    return _box_json(box)


@st.composite
def malformed_reply(draw) -> tuple[str, str]:
    """A reply that must end as an error observation, and its finish reason."""
    pre, post = draw(noise), draw(noise)
    think = f"<think>{draw(noise)}</think>" if draw(st.booleans()) else ""
    good = '{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"}'
    kind = draw(st.integers(0, 11))
    finish = "stop"
    if kind == 0:  # bad numbers in an otherwise well-formed call
        body = f'{{"bbox_2d": {draw(bad_values())}, "source": "original_image"}}'
        text = f"{think}{pre}<grounding>{body}</grounding>"
    elif kind == 1:  # unknown source
        src = draw(
            st.one_of(
                st.integers(3, 10**6).map(lambda n: f"observation_{n}"),
                st.text(max_size=12).map(lambda s: f"image_{s}"),
                st.sampled_from(
                    [
                        "",
                        "original",
                        "observation",
                        "observation_0",
                        "observation_-1",
                        "original image",
                        "obs_1",
                        "observation_1.5",
                    ]
                ),
            )
        )
        text = f"{think}<grounding>{json.dumps({'bbox_2d': [0.1, 0.1, 0.5, 0.5], 'source': src})}</grounding>"
    elif kind == 2:  # invalid JSON inside the tags
        body = draw(
            st.text(max_size=60).filter(lambda s: not _parses(s) and "</grounding>" not in s and "<grounding>" not in s)
        )
        text = f"{think}<grounding>{body}</grounding>"
    elif kind == 3:  # cut off by the token limit before finishing
        full = f"{think}{pre}<grounding>{good}</grounding>"
        cut = draw(st.integers(len(think) + len(pre) + 1, len(full) - len("</grounding>")))
        text, finish = full[:cut], "length"
    elif kind == 4:  # two calls
        text = f"{think}<grounding>{good}</grounding>{pre}<grounding>{good}</grounding>"
    elif kind == 5:  # an answer and a call
        text = f"{think}<answer>{draw(noise)}x</answer>{pre}<grounding>{good}</grounding>"
    elif kind == 6:  # well-formed JSON of the wrong shape
        body = draw(
            st.sampled_from(
                [
                    '"text"',
                    "42",
                    "null",
                    "[]",
                    "[1, 2]",
                    '{"bbox": [0,0,1,1]}',
                    '{"source": "original_image"}',
                    "[[0.1, 0.1, 0.5, 0.5]]",
                    '{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": 7}',
                    '{"bbox_2d": "0.1, 0.1, 0.5, 0.5"}',
                    '{"bbox_2d": {"x0": 0.1}}',
                ]
            )
        )
        text = f"{think}<grounding>{body}</grounding>"
    elif kind == 7:  # a call without its tags
        text = f'{think}{pre} {{"bbox_2d": [0.1, 0.1, 0.5, 0.5]}} {post}'
    elif kind == 8:  # answer tag trouble
        text = think + draw(
            st.sampled_from(
                [
                    "<answer>",
                    "<answer></answer>",
                    "</answer>",
                    "<answer>A",
                    "<answer>A</answer><answer>B</answer>",
                    "<answer >A</answer >",
                ]
            )
        )
    elif kind == 9:  # an unclosed call with junk after it
        text = f'{think}<grounding>{{"bbox_2d": [0.1, 0.1, 0.5, 0.5]}} {draw(noise)}x'
    elif kind == 10:  # only whitespace inside the answer
        text = f"{think}<answer>{draw(st.sampled_from(['', ' ', chr(10), chr(9) + ' ']))}</answer>"
    else:  # a huge or deeply nested payload
        depth = draw(st.integers(50, 5000))
        text = f"<grounding>{'[' * depth}{']' * depth}</grounding>"
    return text, finish


def _parses(s: str) -> bool:
    try:
        json.loads(s.strip().strip("`"))
        return True
    except (ValueError, RecursionError):
        return False


@given(malformed_reply())
@settings(max_examples=MALFORMED_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_malformed_replies_become_error_observations(case):
    text, finish = case
    kind, error_kind, error = outcome(text, finish)
    assert kind == "error", f"{text!r} was accepted as {kind}"
    assert error_kind and error


@given(
    st.one_of(
        st.text(max_size=80),
        st.dictionaries(
            st.text(max_size=8),
            st.one_of(st.none(), st.floats(), st.text(max_size=8), st.lists(st.floats(), max_size=6)),
            max_size=4,
        ).map(json.dumps),
    ),
    st.sampled_from(["zoom_in", "zoom", "python"]),
    st.integers(1, 3),
)
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_tool_calls_never_raise(arguments, name, n):
    calls = [ToolCall(f"c{i}", name, arguments) for i in range(n)]
    kind, error_kind, error = outcome("", "tool_calls", TOOLS, calls)
    assert kind in ("zoom", "error")
    if kind == "zoom":
        assert n == 1 and name == "zoom_in"
        loaded = json.loads(arguments)
        box = loaded["bbox_2d"] if isinstance(loaded, dict) else loaded
        assert all(isinstance(v, float) and math.isfinite(v) for v in box)
    else:
        assert error_kind and error


fragments = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<grounding>",
        "</grounding>",
        "<answer>",
        "</answer>",
        '{"bbox_2d": ',
        "[0.1, 0.2, 0.6, 0.7]",
        '"source": "observation_1"',
        "}",
        "{",
        "NaN",
        "observation_",
        "<",
        ">",
        "\n",
    ]
)


@given(
    st.lists(st.one_of(fragments, st.text(max_size=10)), max_size=25).map("".join),
    st.sampled_from(["stop", "length", None]),
)
@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_any_text_parses_without_raising(text, finish):
    kind, error_kind, error = outcome(text, finish)
    assert kind in ("zoom", "answer", "error", "none")
    assert (kind == "error") == (error is not None) == (error_kind is not None)


def test_a_closing_tag_is_put_back_only_where_the_server_cut_one():
    """OpenAI's API does not say which stop string it cut: an unclosed call is taken to have been cut at
    </grounding>. vLLM / SGLang / the hf backend say; a reply that ended on its own keeps exactly its text."""
    from glimpse.models.openai_compat import _matched_stop

    tags = make_protocol("tags", Coords.RELATIVE)
    cut = '<grounding>{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"}'
    assert tags.parse(Completion(text=cut)).kind == "zoom"  # unknown: put back
    assert tags.parse(Completion(text=cut, matched_stop="</grounding>")).kind == "zoom"
    ended = tags.parse(Completion(text="<grounding>H</answer>", matched_stop=""))
    assert ended.text == "<grounding>H</answer>" and ended.kind == "error"  # nothing the model did not write
    assert _matched_stop({"stop_reason": "</grounding>"}) == "</grounding>"
    assert _matched_stop({"stop_reason": None}) == "" and _matched_stop({"stop_reason": 151645}) == ""
    assert _matched_stop({"matched_stop": 151645}) == "" and _matched_stop({}) is None


# ---------------------------------------------------------------------------------------- hostile replies
HUGE = "1" + "0" * 400  # a 401-digit integer: int() reads it, float() cannot hold it


def tool_call(arguments, name: str = "zoom_in") -> list[ToolCall]:
    return [ToolCall("c1", name, arguments if isinstance(arguments, str) else json.dumps(arguments))]


@pytest.mark.parametrize("protocol", ["tags", "tools"])
@pytest.mark.parametrize(
    ("box", "kind"),
    [
        (f"[0, 0, {HUGE}, 1]", "out_of_range"),
        (f"[-{HUGE}, 0, 1, 1]", "out_of_range"),
        (f"[0, 0, 1{'0' * 5000}, 1]", "out_of_range"),  # past Python's 4,300-digit limit on int()
        ("[0, 0, 1e999, 1]", "out_of_range"),
        ("[0, 0, 1E+400, 1]", "out_of_range"),
        ("[0, 0, 0.5, NaN]", "not_a_number"),
        ("[0, 0, -Infinity, 1]", "not_a_number"),
        ("[0, 0, true, 1]", "not_a_number"),
        ('[0, 0, "1", 1]', "not_a_number"),
        ("[[0, 0, 1, 1]]", "bad_box"),
        ("[0, 0, [0.5], 1]", "not_a_number"),
        ("[-0, -0.0, 0.5, 0.5]", None),
        ("[0, 0, 0.5, 1e-999]", "inverted_box"),
    ],
)
def test_numbers_no_float_holds_are_mistakes(box, kind, protocol):
    payload = f'{{"bbox_2d": {box}, "source": "original_image"}}'
    if protocol == "tags":
        got = outcome(f"<grounding>{payload}</grounding>")
    else:
        got = outcome("", "tool_calls", TOOLS, tool_call(payload))
    assert got[:2] == (("zoom", None) if kind is None else ("error", kind)), got
    assert got[2] is None or len(got[2]) < 300  # the message quotes a long number briefly


def test_the_zoom_tool_refuses_integers_too_large_for_a_float():
    for value in (10**400, -(10**400), 10**5000, 2**53 + 1):
        result = TOOL.resolve({"bbox_2d": [0, 0, value, 1], "source": "original_image"}, IMAGES)
        assert result.error_kind == "out_of_range" and len(result.error) < 200, result.error
    for value in ("9" * 10_000, ["x"] * 10_000, [[[[0.5]]]], {"x": 1}):
        result = TOOL.resolve({"bbox_2d": [0, 0, value, 1], "source": "original_image"}, IMAGES)
        assert result.error_kind == "not_a_number" and len(result.error) < 200, result.error


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("observation_" + "9" * 5000, "unknown_source"),  # int() refuses over 4,300 digits
        ("observation_١", "unknown_source"),  # an Arabic-Indic one is not observation_1
        ("observation_１", "unknown_source"),
        ("observation_1\n", None),
        ("original_image\x00", "unknown_source"),
        ("\ud800", "unknown_source"),
    ],
)
def test_odd_sources(source, kind):
    got = outcome(call([0.1, 0.1, 0.5, 0.5], source=source))
    assert got[:2] == (("zoom", None) if kind is None else ("error", kind)), got
    assert got[2] is None or len(got[2]) < 300


@pytest.mark.parametrize(
    "payload",
    [
        '{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "bbox_2d": [0.2, 0.2, 0.6, 0.6]}',
        '{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image", "source": "observation_1"}',
        '[{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "label": "a", "label": "b"}]',
    ],
)
def test_a_field_given_twice_is_a_mistake(payload):
    tags = outcome(f"<grounding>{payload}</grounding>")
    tools = outcome("", "tool_calls", TOOLS, tool_call(payload))
    for kind, error_kind, error in (tags, tools):
        assert (kind, error_kind) == ("error", "duplicate_key") and "more than once" in error
    code = make_protocol("tools", code=True)
    action = code.parse(Completion("", tool_calls=tool_call('{"code": "print(1)", "code": "x"}', "python")))
    assert action.error_kind == "duplicate_key" and action.call_ids == ["c1"]


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<answer><answer>x</answer></answer>", "x"),
        ("<answer><answer>x</answer>", "x"),
        ("<answer>x</answer></answer>", "x"),
        ("<think>so</think><answer> <answer> B </answer> </answer>", "B"),
    ],
)
def test_nested_answer_tags_are_stripped(text, answer):
    for protocol in (TAGS, TOOLS):
        action = protocol.parse(Completion(text=text))
        assert (action.kind, action.answer) == ("answer", answer)


def test_tags_inside_code_are_code():
    code = make_protocol("tags", code=True)
    action = code.parse(Completion(text='<python>print("<answer>A</answer> <grounding>")</python>'))
    assert action.kind == "code" and "<answer>A</answer>" in action.code
    assert code.parse(Completion(text="<python>x = 1</python><answer>A</answer>")).error_kind == "multiple_actions"


def test_lone_surrogates_are_replaced_so_the_record_can_be_saved():
    action = TAGS.parse(Completion(text="<think>\ud800</think><answer>x\udfff\ud83d\ude00</answer>"))
    assert action.answer == "x\ufffd\U0001f600" and action.thought == "\ufffd"
    action.text.encode("utf-8")
    code = make_protocol("tools", code=True)
    action = code.parse(Completion("\ud800", tool_calls=tool_call('{"code": "\\ud800"}', "python")))
    assert action.code == "\ufffd" and action.text == "\ufffd"
    calls = [ToolCall("\udfff", "zoom_in", '{"bbox_2d": [0.1, 0.1, 0.5, 0.5]}')]
    action = TOOLS.parse(Completion("", tool_calls=calls))
    assert action.call_ids == ["\ufffd"]
    assert TOOLS.assistant_message(action, Completion("", tool_calls=calls)).tool_calls[0].id == "\ufffd"


def test_arguments_sent_as_an_object_are_read():
    calls = [ToolCall("c1", "zoom_in", {"bbox_2d": [0.1, 0.1, 0.5, 0.5]})]  # type: ignore[arg-type]
    action = TOOLS.parse(Completion("", tool_calls=calls))
    assert action.kind == "zoom" and action.call["bbox_2d"] == [0.1, 0.1, 0.5, 0.5]
    message = TOOLS.assistant_message(action, Completion("", tool_calls=calls))
    assert json.loads(message.tool_calls[0].arguments) == {"bbox_2d": [0.1, 0.1, 0.5, 0.5]}


@pytest.mark.parametrize(
    "text",
    [
        "<grounding>```" + " " * 200_000 + "x</grounding>",  # quadratic for a fence regex: hours
        "<think>" * 100_000,
        "<grounding>" * 100_000,
        "<answer>" * 100_000 + "x",
        "<python>" * 50_000 + "</python>" * 10,
    ],
)
def test_enormous_replies_are_read_in_linear_time(text):
    for protocol in (TAGS, make_protocol("tags", code=True), TOOLS):
        action = protocol.parse(Completion(text=text))
        assert action.kind in ("error", "answer", "none", "code")


# ------------------------------------------------------------------- hostile-reply fuzzing through the loop
# Strategies for replies a hostile or broken model might send, shared with bench/fuzz_replies.py (which runs
# 100,000 of them per protocol). Sizes of long pieces are drawn as numbers, so that Hypothesis can make
# payloads far beyond its own per-example data limit.
NAN_SPELLINGS = ["NaN", "nan", "-NaN", "+NaN", "NAN", "Infinity", "-Infinity", "+Infinity", "inf", "-inf", "Inf"]
NAN_SPELLINGS += ["INF", "infinity", "1e999", "-1e999", '"NaN"', '"Infinity"', "null", "NaN0", "Nan", "∞", "-∞"]
ODD_NUMBERS = ["-0", "-0.0", "0e0", "-0e-0", "true", "false", '"0.5"', '"1"', '"١"', "[0.5]", "[[]]", "{}", "0x10"]
ODD_NUMBERS += ["007", ".5", "5.", "+1", "1_000", "1,5", "½", "²", "Ⅻ", "1e", "--1", "0.1.2", '"\\u0000"', '"\\ud800"']
UNICODE_DIGITS = "0123456789٠١٢٣٤٥٦٧٨٩۰۱۲０１２３４５６７８９𝟎𝟏𝟐𝟗߀१२३.-eE+"
TAG_FRAGMENTS = ["<think>", "</think>", "<grounding>", "</grounding>", "<answer>", "</answer>", "<python>"]
TAG_FRAGMENTS += ["</python>", "<grounding >", "</ answer>", "<ANSWER>", '{"bbox_2d": ', "```", "```json\n", "\x00"]
TAG_FRAGMENTS += ["<tool_call>", '"source": "observation_1"', "<|im_end|>", "\ud800", "\udfff", "\ud83d\ude00", "‮"]

# Any character, lone surrogates and NUL included.
hostile_char = st.one_of(
    st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.sampled_from(["\x00", "\n"])
)
hostile_prose = st.text(alphabet=hostile_char, max_size=30)


def _long(piece: str, low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(lambda n: piece * n)


hostile_number = st.one_of(
    finite.map(json.dumps),
    st.integers(-(10**6), 10**6).map(str),
    st.integers(300, 20_000).map(lambda k: "1" + "0" * k),  # huge integers
    st.integers(300, 20_000).map(lambda k: "-9" + "9" * k),
    st.tuples(  # big exponents
        st.sampled_from(["1", "-2.5", "9.99", "0", "1e", "0.0"]),
        st.sampled_from(["e", "E"]),
        st.sampled_from(["", "+", "-"]),
        st.integers(300, 10**12).map(str),
    ).map("".join),
    st.sampled_from(NAN_SPELLINGS),
    st.sampled_from(ODD_NUMBERS),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "true", "false", "null", '"0.5"', "[0.5]"]),  # valid JSON
    st.text(alphabet=UNICODE_DIGITS, min_size=1, max_size=12),  # digits of other scripts, mixed
)


@st.composite
def one_bad_number(draw) -> str:
    """A good box with one of its four numbers replaced."""
    box = ["0.1", "0.1", "0.6", "0.6"]
    box[draw(st.integers(0, 3))] = draw(hostile_number)
    return "[" + ", ".join(box) + "]"


hostile_box = st.one_of(
    one_bad_number(),
    one_bad_number(),
    st.lists(hostile_number, max_size=6).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.lists(hostile_number, min_size=4, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.integers(1, 50_000).map(lambda d: "[" * d + "0.5" + "]" * d),  # deep nesting
    st.integers(5, 100_000).map(lambda n: "[" + "0.5, " * n + "0.5]"),  # very long
    st.sampled_from(['"0.1, 0.1, 0.5, 0.5"', "null", "{}", '{"x0": 0.1}', "[0.1, 0.1, 0.5, 0.5]"]),
)
hostile_source = st.one_of(
    st.sampled_from(["original_image", "observation_1", "observation_2", "observation_0", "Observation_1"]),
    st.sampled_from(["observation 1", "observation_١", "observation_１", "observation_01", "observation_-1", ""]),
    st.integers(0, 20_000).map(lambda n: "observation_" + "9" * n),
    st.text(alphabet=hostile_char, max_size=20),
).map(json.dumps)
hostile_key = st.sampled_from(["bbox_2d", "bbox_2d", "source", "label", "BBOX_2D", "bbox_2d\x00", "code"])


@st.composite
def hostile_call(draw) -> str:
    """The JSON (or not) inside a zoom call: odd numbers and sources, fields given twice, odd wrappings."""
    keys = draw(st.lists(hostile_key, max_size=4))
    if draw(st.integers(0, 3)):
        keys.insert(0, "bbox_2d")
    fields = []
    for key in keys:
        if key.startswith("bbox"):
            value = draw(hostile_box)
        elif key == "source":
            value = draw(hostile_source)
        else:
            value = json.dumps(draw(hostile_prose))
        fields.append(f"{json.dumps(key)}: {value}")
    body = "{" + ", ".join(fields) + "}"
    wrap = draw(st.sampled_from(["plain", "plain", "list", "fence", "bare", "cut", "padded", "text"]))
    if wrap == "list":
        body = f"[{body}]"
    elif wrap == "fence":
        body = f"```json\n{body}\n```"
    elif wrap == "bare":
        body = draw(hostile_box)
    elif wrap == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif wrap == "padded":
        pad = " " * draw(st.integers(0, 200_000))
        body = f"```{pad}{body}{pad}```"
    elif wrap == "text":
        body = draw(hostile_prose)
    return body


@st.composite
def hostile_segment(draw) -> str:
    kind = draw(st.integers(0, 11))
    if kind == 0:
        return draw(hostile_prose)
    if kind == 1:
        return f"<think>{draw(hostile_prose)}{draw(st.sampled_from(TAG_FRAGMENTS))}{draw(hostile_prose)}</think>"
    if kind in (2, 3):
        closing = draw(st.sampled_from(["</grounding>", "</grounding>", "", "</answer>"]))
        return f"<grounding>{draw(hostile_call())}{closing}"
    if kind == 4:
        inner = draw(st.one_of(hostile_prose, hostile_prose.map(lambda s: f"<answer>{s}</answer>")))
        return f"<answer>{inner}{draw(st.sampled_from(['</answer>', '</answer>', '', '</answer></answer>']))}"
    if kind == 5:
        return f"<python>{draw(hostile_prose)}{draw(st.sampled_from(TAG_FRAGMENTS))}</python>"
    if kind == 6:  # tags inside a Markdown code block
        return f"```\n{draw(st.sampled_from(TAG_FRAGMENTS))}{draw(hostile_prose)}</answer>\n```"
    if kind == 7:
        return draw(st.sampled_from(TAG_FRAGMENTS))
    if kind == 8:  # enormous replies
        piece = draw(st.sampled_from(["<think>", "<grounding>", "<answer>", "a", " ", "[", "{", "\ud800", "١"]))
        return draw(_long(piece, 1, 150_000))
    if kind == 9:
        return draw(st.sampled_from(NAN_SPELLINGS + ODD_NUMBERS))
    if kind == 10:
        return '<grounding>{"bbox_2d": [0.1, 0.1, 0.6, 0.6], "source": "original_image"}</grounding>'
    return "<answer>B</answer>"


finish_reasons = st.sampled_from(["stop", "stop", "length", None, "tool_calls", "content_filter", ""])


@st.composite
def hostile_tagged_reply(draw) -> dict:
    """A reply for the ``tags`` protocol, as a scripted turn: one call with hostile contents, or a mix."""
    if draw(st.booleans()):
        think = draw(st.sampled_from(["", "<think>zooming</think>", "<think>"]))
        content = f"{think}<grounding>{draw(hostile_call())}</grounding>"
    else:
        content = "".join(draw(st.lists(hostile_segment(), max_size=5)))
    return {"content": content, "finish_reason": draw(finish_reasons)}


@st.composite
def hostile_tool_reply(draw) -> dict:
    """A reply for the ``tools`` protocol: one zoom call with hostile arguments, or text and calls with
    hostile names and arguments."""
    if draw(st.booleans()):
        content = draw(st.sampled_from(["", "Zooming in.", "<think>zoom</think>"]))
        call = {"id": "call_0", "name": "zoom_in", "arguments": draw(hostile_call())}
        return {"content": content, "tool_calls": [call], "finish_reason": "tool_calls"}
    content = "".join(draw(st.lists(hostile_segment(), max_size=3)))
    calls: list[dict] = []
    for i in range(draw(st.integers(0, 2))):
        name = draw(st.one_of(st.sampled_from(["zoom_in", "python", "zoom", "ZOOM_IN", ""]), hostile_prose))
        arguments = draw(
            st.one_of(
                hostile_call(),
                st.tuples(hostile_prose, hostile_prose).map(lambda c: f'{{"code": {json.dumps(c[0])}}}'),
                st.just('{"code": "print(1)", "code": "print(2)"}'),
                hostile_prose,
            )
        )
        calls.append({"id": draw(st.one_of(st.just(f"call_{i}"), hostile_prose)), "name": name, "arguments": arguments})
    return {"content": content, "tool_calls": calls, "finish_reason": draw(finish_reasons)}


HOSTILE_REPLIES = {"tags": hostile_tagged_reply(), "tools": hostile_tool_reply()}
# What the model says after its hostile reply, so that a mistake's message and a zoom's crop are sent back.
FOLLOW_UP = {"tags": "<answer>B</answer>", "tools": "B"}
TURN_KINDS = {"zoom", "code", "answer", "error", "none"}


@dataclass
class FuzzRun:
    """Replies sent through the agent loop: how many, and what escaped (reply, exception) or broke a rule."""

    replies: int = 0
    escapes: list[tuple[str, str]] = field(default_factory=list)
    violations: list[tuple[str, str]] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)


def run_replies(protocol: str, replies: list[dict], image: Path, concurrency: int = 32) -> FuzzRun:
    """Send each reply as the first turn of its own trajectory through the real ``AgentLoop`` (the scripted
    backend replays it, then answers), save each trajectory as JSON, and read it also with the code tool on.

    An escape is any exception out of the loop or the record; a violation is a trajectory that broke the
    loop's contract (a backend error, a turn kind outside the five, an error without its kind).
    """
    run = FuzzRun()
    loop = AgentLoop(
        ScriptedBackend([["unused"]], record=0),
        protocol=protocol,
        max_turns=2,
        max_new_tokens=2**22,  # never cut a reply: the parser must read it whole
        max_context_tokens=2**26,
    )
    with_code = make_protocol(protocol, code=True)

    def replay(reply: dict) -> ScriptedBackend:
        def policy(messages, params):
            return reply if not any(m.role == "assistant" for m in messages) else FOLLOW_UP[protocol]

        return ScriptedBackend(policy, record=0)

    async def one(i: int, reply: dict) -> None:
        shown = repr(reply)[:300]
        try:
            (traj,) = await loop.run(Sample(id=str(i), images=[str(image)], question="Q"), backend=replay(reply))
            traj.model_dump_json()
            completion = Completion(
                reply["content"], [ToolCall(**c) for c in reply.get("tool_calls", [])], reply["finish_reason"]
            )
            with_code.parse(completion)
        except Exception as exc:  # what the fuzzing is for: count it, keep going
            run.escapes.append((shown, f"{type(exc).__name__}: {str(exc)[:200]}"))
            return
        first = traj.turns[0] if traj.turns else None
        if traj.stop_reason == "error" or first is None:
            run.violations.append((shown, f"stopped with {traj.stop_reason}: {traj.error}"))
        elif first.kind not in TURN_KINDS or (first.kind == "error") != bool(first.error and first.error_kind):
            run.violations.append((shown, f"turn kind {first.kind!r}, error_kind {first.error_kind!r}"))
        else:
            run.kinds[first.error_kind or first.kind] += 1

    async def all_of() -> None:
        gate = asyncio.Semaphore(concurrency)

        async def gated(i: int, reply: dict) -> None:
            async with gate:
                await one(i, reply)

        await asyncio.gather(*(gated(i, r) for i, r in enumerate(replies)))

    asyncio.run(all_of())
    run.replies = len(replies)
    return run


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "image.png"
    gradient_image(320, 240).save(path)
    return path


@pytest.mark.parametrize("protocol", ["tags", "tools"])
def test_fuzz_hostile_replies_through_the_loop(protocol, small_image):
    """The suite's subset of bench/fuzz_replies.py: every reply ends as an answer or a specific mistake."""
    replies: list[dict] = []

    @given(HOSTILE_REPLIES[protocol])
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def collect(reply):
        replies.append(reply)

    collect()
    run = run_replies(protocol, replies, small_image)
    assert run.replies >= 400 and not run.escapes and not run.violations, (run.escapes or run.violations)[:3]
    # The strategies reach the mistakes they were written for, and some replies are accepted (NaN spellings are
    # rarer in 400 draws than these; the tests above check each of them).
    assert {"out_of_range", "duplicate_key", "invalid_json", "answer"} <= set(run.kinds), run.kinds


# --------------------------------------------------------------------------------------------------- writing
written_text = st.lists(
    st.one_of(st.text(max_size=8), st.sampled_from(["<think>", "</think>", "```", "\n", " ", "{", '"', "\\"])),
    max_size=6,
).map("".join)
tag_laden_text = st.lists(st.one_of(written_text, st.sampled_from(list(PROTOCOL_TAGS))), max_size=4).map("".join)
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**6), 10**6))


@given(
    st.sampled_from(["tags", "tools"]),
    st.sampled_from(["zoom", "code", "answer"]),
    st.lists(numbers, min_size=4, max_size=4),
    written_text,
    st.one_of(st.none(), tag_laden_text),
    tag_laden_text,
)
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_written_replies_read_back_as_the_same_action(name, kind, box, source, thought, text):
    """write → parse → the same action, in both dialects; the writer refuses only what could not read back."""
    protocol = make_protocol(name, code=True)
    said = (thought or "").strip() or None
    if said and ("<think>" in said or "</think>" in said):
        with pytest.raises(ValueError, match="think"):
            protocol.write_answer("x", thought)
        return
    if kind == "zoom":
        action = protocol.parse(protocol.write_zoom(box, source, thought, call_id="c7"))
        assert (action.kind, action.call, action.thought) == ("zoom", {"bbox_2d": box, "source": source}, said)
        assert action.call_ids == (["c7"] if name == "tools" else [])
    elif kind == "code":
        code = text.strip("\n")
        assume(name == "tools" or not code.startswith("```"))  # tags read a fenced block without its fence
        tags = ("<python>", "</python>", "<think>", "</think>") if name == "tags" else ()
        if not code.strip() or any(t in code for t in tags):
            with pytest.raises(ValueError):
                protocol.write_code(text, thought)
            return
        action = protocol.parse(protocol.write_code(text, thought))
        assert (action.kind, action.code, action.thought) == ("code", code, said)
    else:
        answer = text.strip()
        if not answer or any(t in answer for t in PROTOCOL_TAGS):
            with pytest.raises(ValueError):
                protocol.write_answer(text, thought)
            return
        action = protocol.parse(protocol.write_answer(text, thought))
        assert (action.kind, action.answer, action.thought) == ("answer", answer, said)


def test_writing_refuses_what_would_read_differently():
    with pytest.raises(ValueError, match="four finite numbers"):
        TAGS.write_zoom([0.1, 0.2, float("nan"), 0.5])
    with pytest.raises(ValueError, match="four finite numbers"):
        TOOLS.write_zoom([0.1, 0.2, 0.5])
    with pytest.raises(ValueError, match="code tool"):
        TAGS.write_code("print(1)")
    with pytest.raises(ValueError, match="tag"):
        TAGS.write_answer("<answer>x</answer>")
    # A box the zoom tool refuses is still written: a scripted policy may show a mistake on purpose.
    assert outcome(TAGS.write_zoom([0.1, 0.1, 1.5, 0.5]).text)[1] == "out_of_range"


def test_script_turns_replay_as_written(make_image):
    """What a scripted policy replays through the loop is read as the action that was written."""
    for name in ("tags", "tools"):
        protocol = make_protocol(name)
        replies = [
            protocol.write_zoom([0.2, 0.2, 0.6, 0.6], thought="first look", call_id="call_0"),
            protocol.write_zoom([0.0, 0.0, 0.5, 0.5], "observation_1", thought="closer", call_id="call_1"),
            protocol.write_answer("42", thought="it reads 42"),
        ]
        backend = ScriptedBackend([[script_turn(r) for r in replies]])
        (traj,) = asyncio.run(
            AgentLoop(backend, protocol=name).run(Sample(id="s", images=[str(make_image())], question="Q"))
        )
        assert [t.kind for t in traj.turns] == ["zoom", "zoom", "answer"] and traj.answer == "42"
        assert traj.turns[1].call.source == "observation_1" and traj.turns[1].thought == "closer"
        assert traj.turns[1].crop_box_px == [200, 160, 400, 320]  # a quarter of the first zoom


def test_the_expert_speaks_function_calling_end_to_end(tmp_path):
    """``glimpse ask --model expert --protocol tools``: the expert zooms through native zoom_in calls and reaches
    the same answer, through the same crops, as with tags (a count question: no OCR needed)."""
    from glimpse.probes.synth import make_probe

    probe = make_probe("medium", 0, seed=11, kind="count")  # three zooms before the answer
    path = tmp_path / "probe.png"
    probe.image.save(path)
    question = probe.record["problem"].replace("<image>", "").strip()
    runs = {}
    for name in ("tags", "tools"):
        command = ["ask", str(path), question, "--model", "expert", "--protocol", name, "--json"]
        proc = subprocess.run(
            [sys.executable, "-m", "glimpse", *command],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads(proc.stdout)
    tags, tools = runs["tags"], runs["tools"]
    assert tools["settings"]["protocol"] == "tools" and tools["stop_reason"] == "answer"
    assert tools["answer"] == tags["answer"] == probe.record["solution"]
    assert [t["crop_box_px"] for t in tools["turns"]] == [t["crop_box_px"] for t in tags["turns"]]
    zooms = [t for t in tools["turns"] if t["kind"] == "zoom"]
    assert len(zooms) >= 2 and all(t["tool_calls"][0]["name"] == "zoom_in" for t in zooms)
    assert all("<grounding>" not in t["text"] for t in tools["turns"])  # no tags in the function-calling dialect
    assert tools["metrics"]["tool_errors"] == 0


def test_the_loop_records_a_call_no_float_can_hold_as_a_mistake(make_image):
    """A protocol that passes a huge integer through (a user's own) still gets a mistake, not an OverflowError
    from the loop's record of the call."""
    from glimpse.protocol.base import Action
    from glimpse.protocol.tags import TagProtocol

    class Lenient(TagProtocol):
        def parse(self, completion):
            if "zoom" in completion.text:
                call = {"bbox_2d": [0, 0, 10**400, 1], "source": "original_image"}
                return Action(kind="zoom", text=completion.text, call=call, tool_attempt=True)
            return super().parse(completion)

    protocol = Lenient(Coords.RELATIVE, TAGS.prompts)
    backend = ScriptedBackend([["zoom", "<answer>B</answer>"]])
    sample = Sample(id="s", images=[str(make_image())], question="Q")
    (traj,) = asyncio.run(AgentLoop(backend, protocol=protocol).run(sample))
    assert traj.stop_reason == "answer" and traj.turns[0].error_kind == "out_of_range" and traj.turns[0].call is None


# ------------------------------------------------------------------------------------------------ several images
def test_start_with_several_images_names_each_before_it():
    from PIL import Image

    from glimpse.models.base import ImagePart, TextPart

    parts = [ImagePart(image=Image.new("RGB", (56, 56), c)) for c in ("red", "blue", "green")]
    for protocol in (TAGS, TOOLS):
        single = protocol.start(parts[0], "Which?")[-1].parts()
        assert [type(p) for p in single] == [ImagePart, TextPart] and single[1].text == "\nWhich?"  # as before
        content = protocol.start(parts, "Which?")[-1].parts()
        images = [i for i, p in enumerate(content) if isinstance(p, ImagePart)]
        assert [content[i] for i in images] == parts
        assert [content[i - 1].text.strip() for i in images] == ["image_1:", "image_2:", "image_3:"]
        assert "3 images, named image_1 to image_3" in content[0].text and content[-1].text == "\nWhich?"


def test_a_prompt_file_can_reword_the_several_images_note(tmp_path):
    from PIL import Image

    from glimpse.models.base import ImagePart
    from glimpse.protocol.prompts import load_prompt_file

    path = tmp_path / "p.yaml"
    path.write_text('images: "Look at all {count} pictures.\\n"\n')
    prompts = load_prompt_file(path, TAGS.prompts)
    protocol = make_protocol("tags", "relative", str(path))
    assert prompts.images == "Look at all {count} pictures.\n" and protocol.prompts.images == prompts.images
    two = [ImagePart(image=Image.new("RGB", (56, 56))) for _ in range(2)]
    assert protocol.start(two, "?")[-1].parts()[0].text == "Look at all 2 pictures.\n"


def test_the_zoom_tool_resolves_each_original_and_lists_the_names():
    first = ImageState(Box(0, 0, 1000, 800), 1008, 812, 0)
    second = ImageState(Box(0, 0, 600, 900), 588, 896, 1)
    crop = ImageState(Box(0, 0, 300, 450), 392, 588, 1)  # observation_1: a zoom into image_2
    images, originals = [first, crop], [first, second]
    for source, index, original, box in (
        ("image_2", 0, 1, [0, 0, 300, 450]),
        ("IMAGE_1", 0, 0, [0, 0, 500, 400]),
        ("original_image", 0, 0, [0, 0, 500, 400]),
        ("observation_1", 1, 1, [0, 0, 150, 225]),
    ):
        result = TOOL.resolve({"bbox_2d": [0, 0, 0.5, 0.5], "source": source}, images, originals)
        assert result.ok and (result.source_index, result.original_index) == (index, original), source
        assert result.box.as_list() == box
    bad = TOOL.resolve({"bbox_2d": [0, 0, 0.5, 0.5], "source": "image_3"}, images, originals)
    assert bad.error_kind == "unknown_source"
    assert bad.error.endswith("you can zoom into: image_1 (also original_image), image_2, observation_1")
    single = TOOL.resolve({"bbox_2d": [0, 0, 0.5, 0.5], "source": "image_2"}, IMAGES)
    assert single.error.endswith("you can zoom into: original_image, observation_1, observation_2")
