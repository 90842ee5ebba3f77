"""Answer normalisation and majority voting over several samples ("pro" mode).

``normalize_answer`` maps surface variants of one answer to one key: Unicode compatibility forms (full-width
letters) and invisible characters, LaTeX wrappers (``\\boxed{B}``, ``$\\text{red}$``), an ``Answer:`` prefix,
case, surrounding punctuation and quotes, Markdown emphasis, leading articles, option-letter forms (``(B)``,
``B.``, ``Option B``; not abbreviations such as ``U.S.``) and number formats (``1,000`` / ``1000.0`` /
``.5``). Votes are counted over the keys; the winner is reported in the words of its first sample. Ties go to
the answer reached first (lowest sample index), so a vote is deterministic.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# An option letter alone or leading the option's text; an abbreviation (U.S., D.C.) is not one.
_LETTER = re.compile(r"^(?:option\s+)?\(?([A-Z])\)?(?:[.):](?![A-Z]\.)|\s*$)", re.I)
_NUMBER = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$|^[-+]?\d+(?:\.\d+)?$")
_EDGE = " \t\n\"'`*_.,;:!?()[]{}"
_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*:?|:)\s*", re.I)
_LATEX = re.compile(r"\\(?:boxed|text|textbf|mathrm)\s*\{([^{}]*)\}")


def plain_answer(text: str) -> str:
    """``text`` without what only wraps an answer: compatibility forms folded (NFKC: full-width letters),
    invisible format characters (zero-width spaces, direction marks) removed, LaTeX's ``\\boxed{…}`` /
    ``\\text{…}`` and ``$…$`` unwrapped."""
    s = unicodedata.normalize("NFKC", text)
    s = "".join(c for c in s if unicodedata.category(c) != "Cf")
    for _ in range(3):  # \boxed{\text{red}}
        s = _LATEX.sub(r"\1", s)
    return s.replace("$", "") if s.count("$") >= 2 else s


def normalize_answer(text: str | None) -> str:
    """A comparison key for an answer (empty for no answer)."""
    if text is None:
        return ""
    s = _PREFIX.sub("", plain_answer(text).strip().strip("*_ ")).strip()
    letter = _LETTER.match(s.strip("*_ "))
    if letter:
        return letter.group(1).lower()
    if re.match(r"^[-+]?\.\d", s):  # ".5": the point is the number's
        s = s.replace(".", "0.", 1)
    s = s.strip(_EDGE).lower()
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"^(?:the|a|an) ", "", s)
    if _NUMBER.match(s):
        value = float(s.replace(",", ""))
        return str(int(value)) if value.is_integer() else repr(value)
    return s


@dataclass
class Vote:
    """The outcome of a majority vote.

    Attributes:
        answer: the winning answer as its first sample wrote it (``None`` if no sample answered).
        key: its normalised key.
        counts: votes per key, most first.
        answered: samples that gave an answer.
        total: samples in the vote.
    """

    answer: str | None
    key: str
    counts: dict[str, int] = field(default_factory=dict)
    answered: int = 0
    total: int = 0

    @property
    def agreement(self) -> float:
        """Share of all samples that gave the winning answer."""
        return self.counts.get(self.key, 0) / self.total if self.total else 0.0


def majority_vote(answers: list[str | None]) -> Vote:
    """Reconcile several samples' answers by majority over normalised keys."""
    keyed = [(normalize_answer(a), a) for a in answers]
    given = [(k, a) for k, a in keyed if k]
    if not given:
        return Vote(answer=None, key="", counts={}, answered=0, total=len(answers))
    counts = Counter(k for k, _ in given)
    first_seen = {}
    for i, (k, a) in enumerate(given):
        first_seen.setdefault(k, (i, a))
    best = max(counts, key=lambda k: (counts[k], -first_seen[k][0]))
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], first_seen[kv[0]][0])))
    return Vote(answer=first_seen[best][1], key=best, counts=ordered, answered=len(given), total=len(answers))
