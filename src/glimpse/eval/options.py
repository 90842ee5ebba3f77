"""How multiple-choice questions are presented: option order and wording.

One published evaluation never shuffled V*'s options, so the right answer was always "A" and scores were
inflated by several points. Here the order is decided per sample *and per repeat*, from a recorded seed:

* ``shuffle`` (default): a seeded random permutation for each (sample, repeat);
* ``cyclic``: repeat ``r`` rotates the options by ``r`` places, so over ``n`` repeats the correct option sits
  once in every position (HR-Bench's protocol; HR-Bench files already hold the four rotations as rows);
* ``fixed``: the order of the file (``--options auto`` picks it for HR-Bench, whose rows hold the rotations).

Options that point at the others ("All the above answers are wrong", "None of the above", MME-RealWorld's
option E) keep their place in every order: moved up, they would refer to nothing. Reordered samples drop
HR-Bench's ``cycle`` label, which names a position of the file's order.

The presented sample records the permutation (``meta.option_order``: position → original index), the mode and
the seed, so any trajectory shows exactly what the model was asked.
"""

from __future__ import annotations

import random
import re

from glimpse.errors import ConfigError
from glimpse.trajectory import Sample

MODES = ("shuffle", "cyclic", "fixed")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Answer with the letter of the correct option."
# An option about the other options: it stays where the file put it.
_POINTS_AT_OTHERS = re.compile(
    r"\b(?:all|none|any|both|neither) of (?:the )?(?:above|following|options|choices|others)\b"
    r"|\b(?:all|none of) the above\b|\babove (?:answers|options|choices)\b",
    re.IGNORECASE,
)


def option_order(sample: Sample, repeat: int, mode: str, seed: int) -> list[int]:
    """Position → original option index for this (sample, repeat); options that point at the others stay put."""
    options = sample.options or []
    n = len(options)
    if mode not in MODES:
        raise ConfigError(f"unknown option order {mode!r}; choose one of {', '.join(MODES)}")
    free = [i for i, text in enumerate(options) if not _POINTS_AT_OTHERS.search(str(text))]
    moved = list(free)
    if mode == "cyclic" and free:
        shift = repeat % len(free)
        moved = [free[(k - shift) % len(free)] for k in range(len(free))]
    elif mode == "shuffle":
        random.Random(f"glimpse-options/{seed}/{sample.id}/{repeat}").shuffle(moved)
    order = list(range(n))
    for position, index in zip(free, moved, strict=True):
        order[position] = index
    return order


def present(sample: Sample, repeat: int = 0, *, mode: str = "shuffle", seed: int = 0) -> Sample:
    """The sample as the model sees it in repeat ``repeat``: options reordered and written under the question.

    Samples without options come back unchanged (apart from ``meta.repeat``).
    """
    meta = {**sample.meta, "repeat": repeat}
    if not sample.options:
        return sample.model_copy(update={"meta": meta})
    order = option_order(sample, repeat, mode, seed)
    options = [sample.options[i] for i in order]
    gold = sample.answer
    if gold is not None:
        original = LETTERS.find(gold.strip().upper())
        if not 0 <= original < len(order):
            raise ConfigError(f"sample {sample.id}: gold answer {gold!r} is not an option letter")
        gold = LETTERS[order.index(original)]
    lines = "\n".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(options))
    question = f"{sample.question}\n{lines}\n{sample.meta.get('instruction', INSTRUCTION)}"
    meta.update(option_order=order, options_mode=mode, options_seed=seed, stem=sample.question)
    if order != sorted(order):
        meta.pop("cycle", None)  # HR-Bench's label of the file's answer position: not what was shown
    return sample.model_copy(update={"question": question, "options": options, "answer": gold, "meta": meta})
