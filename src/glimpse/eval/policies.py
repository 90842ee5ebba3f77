"""Reference policies that need no model: ``oracle`` and ``direct``.

* ``oracle`` zooms straight into each gold target box (with a margin), in the image the box is in (``image_K``
  when a question has several), then gives the gold answer. It checks
  the whole pipeline end to end (geometry, protocol, scoring, faithfulness) and must score 100 %.
* ``direct`` never zooms and answers with a seeded random guess from the question's answer space (an option
  letter, or one of the listed choices; "unknown" for open questions). It measures chance.

Both are built per sample (they read the gold answer and boxes) as ``scripted`` backends, so they run through
exactly the same agent loop as a model.
"""

from __future__ import annotations

import random
from typing import Any

from glimpse.errors import ImageInputError
from glimpse.geometry import Box, Coords, from_relative
from glimpse.images import PixelLimits, oriented_size, shared_limits, smart_resize
from glimpse.models.scripted import ScriptedBackend
from glimpse.protocol import make_protocol, script_turn
from glimpse.tools.zoom import MIN_BOX_SIDE
from glimpse.trajectory import Sample

POLICIES = ("oracle", "direct")


def chance(sample: Sample) -> float:
    """Probability of a correct answer by guessing uniformly from the sample's answer space."""
    if sample.options:
        return 1.0 / len(sample.options)
    choices = sample.meta.get("choices")
    return 1.0 / len(choices) if choices else 0.0


def _zoom_box(target: list[int], width: int, height: int) -> Box:
    """The target with a margin of half its size on each side, at least 2 × MIN_BOX_SIDE a side, in the image."""
    x0, y0, x1, y1 = target
    w = max(x1 - x0, 2 * MIN_BOX_SIDE) * 2
    h = max(y1 - y0, 2 * MIN_BOX_SIDE) * 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = min(w, width), min(h, height)
    left = int(min(max(cx - w / 2, 0), width - w))
    top = int(min(max(cy - h / 2, 0), height - h))
    return Box(left, top, left + int(w), top + int(h))


def oracle_turns(sample: Sample, protocol: str, coords: str, limits: PixelLimits) -> list[Any]:
    """Turns that zoom into each target of ``sample`` and then answer with its gold answer."""
    writer = make_protocol(protocol, coords)
    turns: list[Any] = []
    try:
        sizes = [oriented_size(path) for path in sample.images] if sample.target_boxes else []
    except ImageInputError:  # the loop records the question as an input error when it reads the image
        sizes = []
    if sizes:
        shown = [smart_resize(w, h, lim) for (w, h), lim in zip(sizes, shared_limits(sizes, limits), strict=True)]
        convention = Coords(coords)
        for i, (k, target) in enumerate(sample.targets()):
            (width, height), (shown_w, shown_h) = sizes[k], shown[k]
            box = _zoom_box(target, width, height)
            rel = (box.x0 / width, box.y0 / height, box.x1 / width, box.y1 / height)
            if convention is Coords.RELATIVE:
                written: list[Any] = [round(v, 6) for v in rel]
            else:
                written = from_relative(rel, convention, shown_w, shown_h)
            source = "original_image" if len(sizes) == 1 else f"image_{k + 1}"
            thought = f"The target is at {target}{'' if len(sizes) == 1 else ' of ' + source}; zooming there."
            turns.append(script_turn(writer.write_zoom(written, source, thought, call_id=f"oracle_{i}")))
    answer = sample.answer if sample.answer and sample.answer.strip() else "unknown"
    turns.append(script_turn(writer.write_answer(answer)))
    return turns


def direct_turns(sample: Sample, protocol: str, seed: int = 0) -> list[Any]:
    """One turn that answers at once with a seeded guess."""
    rng = random.Random(f"glimpse-direct/{seed}/{sample.id}/{sample.meta.get('repeat', 0)}")
    if sample.options:
        guess = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[rng.randrange(len(sample.options))]
    elif sample.meta.get("choices"):
        guess = rng.choice(sample.meta["choices"])
    else:
        guess = "unknown"
    reply = make_protocol(protocol).write_answer(guess, "Answering from the full view without zooming.")
    return [script_turn(reply)]


def policy_backend(
    name: str, sample: Sample, *, protocol: str, coords: str, limits: PixelLimits, seed: int = 0
) -> ScriptedBackend:
    """The scripted backend playing policy ``name`` on ``sample``."""
    turns = oracle_turns(sample, protocol, coords, limits) if name == "oracle" else direct_turns(sample, protocol, seed)
    return ScriptedBackend([turns], name=name, record=0)
