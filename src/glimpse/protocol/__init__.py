"""Protocols: how the model is told about the zoom tool, how its replies are read, and how a program writes them.

* ``tags`` (default): Mini-o3's ``<think>`` / ``<grounding>`` / ``<answer>`` tags.
* ``tools``: native function calling with a ``zoom_in`` function, for API models.

Either works with any of the coordinate conventions in ``glimpse.geometry.Coords``.

Reading: ``protocol.parse(completion) -> Action`` never raises; every malformed reply is an ``error`` action
with a specific ``error_kind`` (see ``base.load_json`` and ``tags.parse_tagged``).

Writing: a policy that is a program (oracle, expert, cold-start teacher, demo, the built-in model's decoder)
writes its replies through the protocol it speaks, never by hand, so it speaks both dialects::

    protocol = make_protocol("tools" if params.tools else "tags", coords="relative")
    protocol.write_zoom([0.1, 0.2, 0.5, 0.6], "original_image", thought="The sign is top left.", call_id="call_0")
    protocol.write_code("print(images['original_image'].size)", thought="...")  # made with code=True
    protocol.write_answer("K7XW", thought="It reads K7XW.")

Each returns the ``Completion`` a backend would return (text, and for function calling the native call), and
``protocol.parse`` reads it back as the same action (a property test checks this for both dialects). The box
is written as given, in the protocol's coordinates relative to ``source``; thoughts and answers are written
without surrounding whitespace, and text that holds one of the parser's tags is refused with ``ValueError``
(it would be read differently). ``script_turn(completion)`` gives the turn a ``scripted`` backend replays
(a string, or ``{"content", "tool_calls"}``), for policies that are scripts or policy callables.
"""

from __future__ import annotations

from pathlib import Path

from glimpse.errors import ConfigError
from glimpse.geometry import Coords
from glimpse.protocol.base import Action, Protocol, parse_call_payload, script_turn
from glimpse.protocol.prompts import DEFAULT_PROMPTS, PromptSet, load_prompt_file
from glimpse.protocol.tags import TagProtocol, parse_tagged
from glimpse.protocol.tools import ToolCallProtocol, zoom_tool_schema

PROTOCOLS = {"tags": TagProtocol, "tools": ToolCallProtocol}


def make_protocol(
    name: str = "tags", coords: str | Coords = "relative", prompt_file: str | Path | None = None, code: bool = False
) -> Protocol:
    """Build a protocol by name, with the default prompts or those of a prompt file (``code``: offer the code
    tool).

    Raises:
        ConfigError: unknown protocol or coordinate convention, or a bad prompt file.
    """
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    try:
        convention = Coords(coords)
    except ValueError:
        choices = ", ".join(c.value for c in Coords)
        raise ConfigError(f"unknown coordinate convention {coords!r}; choose one of {choices}") from None
    prompts = DEFAULT_PROMPTS[name]
    if prompt_file is not None:
        prompts = load_prompt_file(prompt_file, prompts)
    return PROTOCOLS[name](convention, prompts, code)


__all__ = [
    "PROTOCOLS",
    "Action",
    "PromptSet",
    "Protocol",
    "TagProtocol",
    "ToolCallProtocol",
    "make_protocol",
    "parse_call_payload",
    "parse_tagged",
    "script_turn",
    "zoom_tool_schema",
]
