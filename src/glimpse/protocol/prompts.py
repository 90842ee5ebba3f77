"""Prompt templates: Glimpse's own defaults, and prompt files to match the prompt a checkpoint was trained with.

A prompt set has eight templates. Only these placeholders are replaced (other braces, such as JSON examples,
are left alone):

=============  =====================================================================================
``system``     ``{coords}``: how the protocol's coordinates are written.
``user``       ``{image}``: where the original image goes; ``{question}``.
``observation`` ``{image}``: the new zoomed image; ``{observation_turn}``: N of observation_N;
               ``{action_turn}``: 0-based index of the turn that asked for it; ``{source}``: the image it
               zoomed into.
``error``      ``{error}``: what was wrong; ``{action_turn}``.
``code``       (appended to the system prompt when the code tool is on) no placeholders.
``code_result`` ``{output}``: what the code printed, its error, and notes.
``code_image`` ``{image}``: an image the code passed to ``show()``; ``{observation_turn}``.
``images``     (a question about several images only: put before them in the first user message, each of
               which then follows its name, ``image_1:`` …) ``{count}``: how many.
=============  =====================================================================================

``<image>`` and ``<|vision_start|><|image_pad|><|vision_end|>`` also mark the image position, so templates
copied from LLaMA-Factory data or from a Qwen chat string work unchanged.

A prompt file is YAML or TOML with any of the keys ``system``, ``user``, ``observation``, ``error``, ``code``,
``code_result``, ``code_image``, ``images`` (missing keys keep the defaults), or a plain text file that replaces
the system prompt only.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from glimpse.errors import ConfigError

IMAGE_MARKERS = ("{image}", "<|vision_start|><|image_pad|><|vision_end|>", "<image>")
_KNOWN = ("coords", "question", "observation_turn", "action_turn", "source", "error", "output", "count")
_KEYS = ("system", "user", "observation", "error", "code", "code_result", "code_image", "images")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(_KNOWN) + r")\}")

TAGS_SYSTEM = """\
You answer questions about an image. The image may be large and is shown to you at reduced resolution, so \
small details can be hard to make out. Reason step by step inside <think> and </think>.

When part of an image is unclear, zoom into it by writing exactly one call at the end of your reply:
<grounding>{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}</grounding>
(x0, y0) is the top-left and (x1, y1) the bottom-right corner of the region, in {coords}. "source" is the \
image you zoom into: "original_image", or "observation_N" for the N-th zoomed view you have received. The \
zoomed region comes back to you as a new image at higher resolution, and you may zoom again into the \
original or into any observation, as often as you need.

When you are sure, give the final answer inside <answer> and </answer>, with no zoom call in the same reply."""

TOOLS_SYSTEM = """\
You answer questions about an image. The image may be large and is shown to you at reduced resolution, so \
small details can be hard to make out.

When part of an image is unclear, call the zoom_in function with the region's corners bbox_2d = \
[x0, y0, x1, y1] in {coords}, and source = "original_image" or "observation_N" for the N-th zoomed view you \
have received. The region comes back as a new image at higher resolution, and you may zoom again into the \
original or into any observation, as often as you need. Call one function at a time.

When you are sure, reply without a function call and put the final answer inside <answer> and </answer>."""

USER = "{image}\n{question}"

TAGS_OBSERVATION = """\
Observation {observation_turn}, the zoomed region of {source}:
{image}
Continue reasoning inside <think> and </think>. Zoom again into the original image or any observation if \
you need to, or give the final answer inside <answer> and </answer>."""

TOOLS_OBSERVATION = """\
Observation {observation_turn}, the zoomed region of {source}:
{image}
Zoom again if you need to, or give the final answer inside <answer> and </answer>."""

ERROR = """\
Your last call could not be carried out: {error}
Continue reasoning, then make a corrected call or give the final answer."""

TAGS_CODE = """\

You can also run Python, to crop, rotate, enhance or measure an image or to compute something: write the code \
between <python> and </python> at the end of a reply, instead of a zoom call. It runs in a sandbox without \
network; variables and imports persist from one code reply to the next. The images you have are available at \
full resolution as PIL images, images["original_image"], images["observation_1"] and so on (also as files \
/images/<name>.png). What the code prints comes back to you, and show(image) sends an image back to you as a \
new observation. Pillow and NumPy are installed."""

TOOLS_CODE = """\

You can also call the python function to run code, to crop, rotate, enhance or measure an image or to compute \
something. It runs in a sandbox without network; variables and imports persist between calls. The images you \
have are available at full resolution as PIL images, images["original_image"], images["observation_1"] and so \
on. What the code prints comes back to you, and show(image) sends an image back as a new observation. Pillow \
and NumPy are installed."""

CODE_RESULT = "Result of your code:\n{output}"

CODE_IMAGE = "Observation {observation_turn}, made by your code:\n{image}"

# Only questions about several images show this; a single-image prompt is unchanged.
IMAGES = """\
There are {count} images, named image_1 to image_{count} in the order shown ("original_image" also names \
image_1); name the one you zoom into as the source.
"""


@dataclass(frozen=True)
class PromptSet:
    """The eight templates of a protocol, and a name recorded in every trajectory."""

    system: str
    user: str
    observation: str
    error: str
    code: str = ""
    code_result: str = CODE_RESULT
    code_image: str = CODE_IMAGE
    images: str = IMAGES
    name: str = "default"


DEFAULT_PROMPTS = {
    "tags": PromptSet(system=TAGS_SYSTEM, user=USER, observation=TAGS_OBSERVATION, error=ERROR, code=TAGS_CODE),
    "tools": PromptSet(system=TOOLS_SYSTEM, user=USER, observation=TOOLS_OBSERVATION, error=ERROR, code=TOOLS_CODE),
}


def fill(template: str, **values: object) -> str:
    """Replace the known placeholders present in ``values``; leave every other brace untouched."""

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        return str(values[key]) if key in values else match.group(0)

    return _PLACEHOLDER.sub(sub, template)


def split_on_image(text: str) -> tuple[str, str] | None:
    """Split a filled template at its image marker: ``(before, after)``, or ``None`` if it has none."""
    for marker in IMAGE_MARKERS:
        if marker in text:
            before, _, after = text.partition(marker)
            return before, after
    return None


def load_prompt_file(path: str | Path, base: PromptSet) -> PromptSet:
    """Read a prompt file (YAML, TOML or plain text) over ``base``.

    Raises:
        ConfigError: the file is missing, unparsable, has unknown keys, or a template lacks its image marker.
    """
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read prompt file {p}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    name = f"{p.name}#{digest}"
    if p.suffix.lower() in (".yaml", ".yml", ".toml"):
        try:
            data = tomllib.loads(raw) if p.suffix.lower() == ".toml" else yaml.safe_load(raw)
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"prompt file {p} is not valid {p.suffix[1:].upper()}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"prompt file {p} must map keys (system, user, observation, error) to text")
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise ConfigError(f"prompt file {p} has unknown keys {sorted(unknown)}; use {', '.join(_KEYS)}")
        bad = [k for k, v in data.items() if not isinstance(v, str)]
        if bad:
            raise ConfigError(f"prompt file {p}: {', '.join(bad)} must be text")
        prompts = replace(base, name=name, **data)
    else:
        prompts = replace(base, system=raw.strip(), name=name)
    for key in ("user", "observation", "code_image"):
        if split_on_image(getattr(prompts, key)) is None:
            raise ConfigError(f"the {key!r} template of {p} has no image marker; put {{image}} where the image goes")
    return prompts
