"""Answer normalisation and the majority vote."""

from __future__ import annotations

import pytest

from glimpse.answers import majority_vote, normalize_answer


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("B", "(b)"),
        ("B.", "Option B"),
        ("**C**", "c"),
        ("1,000", "1000.0"),
        ("The red car.", "red car"),
        ("  Yes ", "yes"),
        ("3", "3.0"),
        ("Answer: B", "B"),
        ("The final answer is: B", "b"),
        ("\\boxed{B}", "B"),
        ("$\\boxed{\\text{White}}$", "white."),
        ("\u200bB", "B"),  # a zero-width space
        ("\uff22", "B"),  # a full-width letter
        (".5", "0.5"),
    ],
)
def test_normalisation_merges_variants(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [("Blue", "b"), ("A car", "a"), ("7", "1"), ("red", "read"), ("U.S.", "U.K."), ("D.C.", "D"), (".5", "5")],
)
def test_normalisation_keeps_different_answers_apart(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_majority_vote_breaks_ties_by_first_answer():
    vote = majority_vote(["B", None, "c", "(B)", "C"])
    assert vote.answer == "B" and vote.key == "b" and vote.counts == {"b": 2, "c": 2}
    assert vote.answered == 4 and vote.total == 5 and vote.agreement == pytest.approx(0.4)
    assert majority_vote([None, None]).answer is None
