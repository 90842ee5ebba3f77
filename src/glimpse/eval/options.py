"""How multiple-choice questions are presented: option order and wording.

One published evaluation never shuffled V*'s options, so the right answer was always "A" and scores were
inflated by several points. Here the order is decided per sample *and per repeat*, from a recorded seed:

* ``shuffle`` (default): a seeded random permutation for each (sample, repeat);
* ``cyclic``: repeat ``r`` rotates the options by ``r`` places, so over ``n`` repeats the correct option sits
  once in every position (HR-Bench's protocol; HR-Bench files already hold the four rotations as rows);
* ``fixed``: the order of the file.

The presented sample records the permutation (``meta.option_order``: position → original index), the mode and
the seed, so any trajectory shows exactly what the model was asked.
"""

from __future__ import annotations

import random

from glimpse.errors import ConfigError
from glimpse.trajectory import Sample

MODES = ("shuffle", "cyclic", "fixed")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Answer with the letter of the correct option."


def option_order(sample: Sample, repeat: int, mode: str, seed: int) -> list[int]:
    """Position → original option index for this (sample, repeat)."""
    n = len(sample.options or [])
    if mode == "fixed":
        return list(range(n))
    if mode == "cyclic":
        shift = repeat % n if n else 0
        return [(i - shift) % n for i in range(n)]
    if mode == "shuffle":
        order = list(range(n))
        random.Random(f"glimpse-options/{seed}/{sample.id}/{repeat}").shuffle(order)
        return order
    raise ConfigError(f"unknown option order {mode!r}; choose one of {', '.join(MODES)}")


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
    return sample.model_copy(update={"question": question, "options": options, "answer": gold, "meta": meta})
