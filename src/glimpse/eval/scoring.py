"""Scoring answers: rules first, an LLM judge only when the rules cannot decide. Also the RL reward.

``score(prediction, sample, judge=None)`` is the one scoring function: ``glimpse eval`` calls it for every
trajectory, and ``reward(trajectory)`` (the RL reward) calls it too, so the two can never disagree.

Rules, in order:

* **Multiple choice** (``sample.options``): the option letter is extracted robustly (``B``, ``(B)``,
  ``B. red``, ``Option B``, ``The answer is B``, ``**B**``, or the text of exactly one option) and compared
  with the gold letter. Nothing extractable: ``no_choice`` (wrong), unless a judge is given.
* **Closed sets** (``sample.meta["choices"]``, e.g. colours): the one choice named in the answer.
* **Numbers**: a gold answer that is a number is compared with the one number in the answer (digits or a
  number word up to twenty), within ``sample.meta["tolerance"]`` (default: exact).
* **Normalised exact match** against the gold answer and any ``sample.meta["synonyms"]``: case, punctuation,
  quotes, articles and spacing are ignored.
* Otherwise a judge, if one is given (``glimpse.eval.judge``); a judge failure scores ``correct=None``
  (``judge_error``), never a silent 0. Without a judge: ``no_match`` (wrong).
"""

from __future__ import annotations

import asyncio
import re
from typing import Protocol

from glimpse.answers import normalize_answer, plain_answer
from glimpse.errors import ConfigError
from glimpse.trajectory import Sample, Score, Trajectory

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
_EMPHASIS = re.compile(r"[*_`\"']+")


class Judge(Protocol):
    """Anything that decides an open answer: ``await judge.verdict(question, gold, prediction)``."""

    async def verdict(self, question: str, gold: str, prediction: str) -> Score: ...


def extract_choice(text: str, options: list[str]) -> str | None:
    """The option letter a reply picks among ``options``, or ``None`` if it names none or several."""
    letters = LETTERS[: len(options)]
    s = _EMPHASIS.sub("", plain_answer(text)).strip()
    if not s:
        return None
    patterns = (  # (pattern, any case)
        (rf"^\(?([{letters}])\)?[.):]?$", True),  # "B", "(b)", "B." (alone, even "a" is a letter)
        (rf"^\(?([{letters}])\)?[.):]\s", False),  # "B. red car", "(B) red car"
        (rf"^\(([{letters}])\)\s", True),  # "(b) red car"
        (rf"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([{letters}])\)?(?![\w])", True),  # "Answer: b"
        (rf"\b(?i:choose|chose|select|pick)\s*:?\s*\(?([{letters}])\)?(?![\w])", False),  # "I choose D" (not "a")
        (rf"[,:]\s*\(?([{letters}])\)?[.)]?$", False),  # "Based on the image, D" (and no other letter: below)
    )
    named = set(re.findall(rf"(?<![\w])([{letters}])(?![\w])", s))  # every option letter standing alone
    for i, (pattern, any_case) in enumerate(patterns):
        found = {m.group(1) for m in re.finditer(pattern, s, flags=re.IGNORECASE if any_case else 0)}
        if i == len(patterns) - 1 and len(named) > 1:  # "C, D" or "A, B, C, D": a list, not a pick
            found = set()
        found = {f.upper() for f in found}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    key = normalize_answer(s)
    named = [letters[i] for i, opt in enumerate(options) if normalize_answer(opt) == key]
    if len(named) == 1:
        return named[0]
    contained = [letters[i] for i, opt in enumerate(options) if _contains_phrase(s, opt)]
    if len(contained) == 1:
        return contained[0]
    parenthesised = set(re.findall(rf"\(([{letters}])\)", s))
    return parenthesised.pop() if len(parenthesised) == 1 else None


def _contains_phrase(text: str, phrase: str) -> bool:
    p = normalize_answer(phrase)
    return bool(p) and re.search(rf"(?<![\w]){re.escape(p)}(?![\w])", normalize_answer(text)) is not None


def _numbers(text: str) -> list[float]:
    found = [float(m.replace(",", "")) for m in _NUMBER.findall(text) if any(c.isdigit() for c in m)]
    words = re.findall(r"[a-z]+", text.lower())
    found += [float(_NUMBER_WORDS[w]) for w in words if w in _NUMBER_WORDS]
    return found


def _as_number(text: str) -> float | None:
    s = normalize_answer(text)
    if s in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[s])
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def score_rules(prediction: str | None, sample: Sample) -> Score:
    """The rule-based verdict; ``correct=None`` with method ``undecided`` when only a judge could tell."""
    if sample.meta.get("input_error"):
        return Score(correct=None, method="input_error", detail=str(sample.meta["input_error"]))
    if prediction is None or not prediction.strip():
        return Score(correct=False, method="no_answer")
    gold = sample.answer
    if gold is None:
        return Score(correct=None, method="no_gold", detail="the sample has no gold answer")
    if sample.options:
        letter = extract_choice(prediction, sample.options)
        if letter is None:
            return Score(correct=None, method="undecided", detail="no single option letter could be read")
        return Score(correct=letter == gold.strip().upper(), method="choice", extracted=letter)
    accepted = [gold, *sample.meta.get("synonyms", [])]
    choices = sample.meta.get("choices")
    if choices:
        named = {c for c in choices if _contains_phrase(prediction, c)}
        if len(named) == 1:
            pick = named.pop()
            return Score(
                correct=any(normalize_answer(pick) == normalize_answer(a) for a in accepted),
                method="closed_set",
                extracted=pick,
            )
    target = _as_number(gold)
    if target is not None:
        numbers = _numbers(prediction)
        if len(set(numbers)) == 1:
            tolerance = float(sample.meta.get("tolerance", 0.0))
            value = numbers[0]
            ok = abs(value - target) <= tolerance + 1e-9 * max(1.0, abs(target))
            return Score(correct=ok, method="numeric", extracted=f"{value:g}")
    key = normalize_answer(prediction)
    if any(key == normalize_answer(a) for a in accepted):
        return Score(correct=True, method="exact", extracted=key)
    return Score(correct=None, method="undecided", extracted=key)


async def score(prediction: str | None, sample: Sample, judge: Judge | None = None) -> Score:
    """Score one answer: rules first, then the judge for what the rules cannot decide (see the module docs)."""
    verdict = score_rules(prediction, sample)
    if verdict.method != "undecided":
        return verdict
    if judge is not None:
        assert prediction is not None
        gold = sample.answer or ""
        if sample.options:
            letter = gold.strip().upper()
            index = LETTERS.find(letter)
            if 0 <= index < len(sample.options):
                gold = f"{letter}. {sample.options[index]}"
        return await judge.verdict(sample.question, gold, prediction)
    method = "no_choice" if sample.options else "no_match"
    return Score(correct=False, method=method, extracted=verdict.extracted, detail=verdict.detail)


def reward(trajectory: Trajectory, judge: Judge | None = None) -> float:
    """The RL reward of a finished trajectory: 1.0 if its answer scores correct, else 0.0.

    It calls ``score`` (the same function as evaluation). Call it outside a running event loop; inside one,
    ``await score(...)`` instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(score(trajectory.answer, trajectory.sample, judge)).value
    raise ConfigError("reward() was called inside a running event loop; use `await score(...)` there")
