"""The probes' question wording, written and read in one place, and the one reading order of their signs.

The generator (``synth.make_probe``) writes each question with ``question``; the expert policy reads one back with
``parse_question``; a test checks that every kind round-trips. Nothing outside ``glimpse.probes`` knows this
wording: a learned model reads the question's text like any other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from glimpse.probes.palette import BORDER_COLORS

BORDER_WORD = "border"


def where(border: str, marked: bool) -> str:
    """How a question names its target sign: by border colour, and by the star when look-alikes share it."""
    if marked:
        return f"the sign with a {border} border and a small star in its top-left corner"
    return f"the small sign with a {border} border"


def question(
    kind: str,
    border: str,
    *,
    marked: bool = False,
    choices: Sequence[str] | None = None,
    codes: Sequence[str] = (),
) -> str:
    """The question of a probe of ``kind`` about the sign(s) with a ``border`` border.

    Args:
        kind: one of ``synth.KINDS``, ``synth.SEARCH_KINDS`` or ``synth.PAIR_KINDS``.
        border: the border colour that names the candidate signs.
        marked: whether the target is told apart from its look-alikes by a star.
        choices: the options of a multiple-choice kind (marker colour or shape).
        codes: for ``relative_position``, the codes of the two signs compared (target first); for ``find_code``
            and ``find_marker``, the start of the target's code.
    """
    target = where(border, marked)
    if kind == "read_code":
        return f"What is the code written on {target}? Answer with the code only."
    if kind == "marker_color":
        return f"What colour is the small outlined marker on {target}? Answer with one of: {', '.join(choices or ())}."
    if kind == "marker_shape":
        return f"What shape is the small outlined marker on {target}? Answer with one of: {', '.join(choices or ())}."
    if kind == "count":
        return f"How many small black dots are on {target}? Answer with a number."
    if kind == "which_marked":
        return (
            f"Several signs with a {border} border show a number. Exactly one of them has a small red "
            "dot in its bottom-right corner. What is that sign's number? Answer with the number only."
        )
    if kind == "which_image":
        return (
            f"Both images show signs with a {border} border. Which image has the one with a small star in its "
            "top-left corner? Answer image_1 or image_2."
        )
    if kind == "split_code":
        return (
            f"A code is split across the two images: its first part is written on {target} in image_1, its "
            "second part on the same kind of sign in image_2. What is the whole code? Answer with the code only."
        )
    if kind == "find_code":
        return (
            f"Among the signs with a {border} border, exactly one has a code that starts with {codes[0]}. "
            "What is that sign's whole code? Answer with the code only."
        )
    if kind == "find_marker":
        return (
            f"Among the signs with a {border} border, exactly one has a code that starts with {codes[0]}. "
            f"What colour is the small outlined marker on that sign? Answer with one of: {', '.join(choices or ())}."
        )
    if kind == "relative_position":
        first, second = codes
        return (
            f"Among the signs with a {border} border, one reads {first} and one reads "
            f"{second}. Is the sign reading {first} to the left or to the right of the sign "
            f"reading {second}? Answer left or right."
        )
    raise ValueError(f"unknown probe kind {kind!r}")


@dataclass
class Question:
    """What a probe question asks, read back from its text.

    ``kind`` is ``read`` for any question that asks for text (a code, or a question that is not a probe's).
    """

    kind: str
    border: str | None
    codes: list[str] = field(default_factory=list)
    starred: bool = False


def parse_question(text: str, borders: Sequence[str] = tuple(BORDER_COLORS)) -> Question:
    """Read a question written by ``question`` (or any text: unknown questions come back as ``read``).

    Args:
        text: the question.
        borders: the border colour names to look for (default: the probes' palette).
    """
    low = text.lower()
    border = next((c for c in borders if f"{c} {BORDER_WORD}" in low), None)
    codes = re.findall(r"reads ([A-Z0-9]{2,6})", text)
    prefix = re.findall(r"code that starts with ([A-Z0-9]{2,6})\b", text)
    if prefix:
        kind = "find_marker" if "what colour" in low or "what color" in low else "find_code"
        codes = prefix[:1]
    elif "left or" in low and len(codes) >= 2:
        kind = "relative_position"
    elif "which image" in low and "image_2" in low:
        kind = "which_image"
    elif "split across" in low and "image_2" in low:
        kind = "split_code"
    elif "red dot" in low and "number" in low:
        kind = "which_marked"
    elif "what colour" in low or "what color" in low:
        kind = "marker_color"
    elif "what shape" in low:
        kind = "marker_shape"
    elif "how many" in low:
        kind = "count"
    else:
        kind = "read"
    return Question(kind, border, codes[:2], re.search(r"\bstar\b", low) is not None)


def reading_order(boxes: Sequence[Sequence[float]], height: float, rows: int = 8) -> list[int]:
    """Indices of ``boxes`` (x0, y0, x1, y1) in reading order: rows of ``height / rows`` by each box's centre, top to
    bottom, then left to right. The expert, the cold-start teacher and the built-in model's teacher all use it."""
    band = max(1e-9, height / rows)
    return sorted(range(len(boxes)), key=lambda i: (int((boxes[i][1] + boxes[i][3]) / 2 // band), boxes[i][0]))
