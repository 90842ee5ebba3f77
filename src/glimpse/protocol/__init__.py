"""Protocols: how the model is told about the zoom tool and how its replies are read.

* ``tags`` (default): Mini-o3's ``<think>`` / ``<grounding>`` / ``<answer>`` tags.
* ``tools``: native function calling with a ``zoom_in`` function, for API models.

Either works with any of the coordinate conventions in ``glimpse.geometry.Coords``.
"""

from __future__ import annotations

from pathlib import Path

from glimpse.errors import ConfigError
from glimpse.geometry import Coords
from glimpse.protocol.base import Action, Protocol, parse_call_payload
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
    "zoom_tool_schema",
]
