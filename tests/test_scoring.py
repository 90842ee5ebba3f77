"""Scoring: rules, the judge and its cache and failures, the RL reward, and option presentation."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from glimpse.errors import BackendError
from glimpse.eval.judge import LLMJudge
from glimpse.eval.options import option_order, present
from glimpse.eval.scoring import extract_choice, reward, score, score_rules
from glimpse.models.scripted import ScriptedBackend
from glimpse.trajectory import RunSettings, Sample, Trajectory

OPTIONS = ["red car", "blue truck", "green bus", "white van"]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("**B**", "B"),
        ("B) blue truck", "B"),
        ("B. blue truck", "B"),
        ("The answer is C", "C"),
        ("answer: (D)", "D"),
        ("Option A", "A"),
        ("green bus", "C"),
        ("It is the white van.", "D"),
        ("I think (B) fits best", "B"),
        ("A or B", None),
        ("maybe", None),
        ("", None),
        ("E", None),
        ("red car or blue truck", None),
        ("b", "B"),  # alone, any case
        ("(b)", "B"),
        ("(b) blue truck", "B"),
        ("\\boxed{B}", "B"),
        ("$\\boxed{C}$", "C"),
        ("I choose D.", "D"),
        ("Based on the image, D", "D"),
        ("C, D", None),  # a list of letters is no pick
        ("The options are A, B, C, D", None),
        ("I would pick a different one: C", "C"),  # "pick a" is English, not option A
        ("\uff22", "B"),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text, OPTIONS) == letter


def mc(answer="B", **meta) -> Sample:
    return Sample(id="q", images=["x.jpg"], question="Which vehicle?", options=OPTIONS, answer=answer, meta=meta)


def open_q(answer: str, **meta) -> Sample:
    return Sample(id="q", images=["x.jpg"], question="What does the sign say?", answer=answer, meta=meta)


def run(coro):
    return asyncio.run(coro)


def test_rules():
    assert score_rules("(B)", mc()).correct is True
    assert score_rules("C", mc()).method == "choice" and score_rules("C", mc()).correct is False
    assert score_rules("hmm", mc()).method == "undecided"
    assert score_rules("YE OLDE", open_q("Ye Olde.")).method == "exact"
    assert score_rules("twenty", open_q("20")).correct is True
    assert score_rules("There are 7 dots", open_q("7")).extracted == "7"
    assert score_rules("3 or 4", open_q("4")).method == "undecided"
    assert score_rules("4.05", open_q("4", tolerance=0.1)).correct is True
    color = open_q("red", choices=["red", "green", "blue"])
    assert score_rules("It is red.", color).method == "closed_set" and score_rules("It is red.", color).correct
    assert score_rules("green", color).correct is False
    assert score_rules("crimson", open_q("red", synonyms=["crimson"])).correct is True
    assert score_rules(None, mc()).method == "no_answer"
    assert (
        score_rules("B", Sample(id="x", images=[], question="", meta={"input_error": "bad row"})).method
        == "input_error"
    )


def test_without_a_judge_undecided_is_wrong_and_says_so():
    s = run(score("The sign reads YE OLDE INN", open_q("Ye Olde")))
    assert s.correct is False and s.method == "no_match"
    assert run(score("hmm", mc())).method == "no_choice"


def test_judge_decides_and_caches(tmp_path):
    backend = ScriptedBackend(lambda messages, params: "CORRECT")
    judge = LLMJudge(backend, cache_path=tmp_path / "cache.jsonl")
    s = run(score("The sign reads YE OLDE INN", open_q("Ye Olde"), judge))
    assert s.correct is True and s.method == "judge"
    assert "Reference answer: Ye Olde" in backend.requests[0].messages[-1].text()
    run(score("The sign reads YE OLDE INN", open_q("Ye Olde"), judge))
    assert judge.calls == 1  # the second verdict came from the cache
    again = LLMJudge(ScriptedBackend(lambda m, p: "INCORRECT"), cache_path=tmp_path / "cache.jsonl")
    assert run(score("The sign reads YE OLDE INN", open_q("Ye Olde"), again)).correct is True
    assert again.calls == 0
    # Multiple choice: the judge sees the gold option's text too.
    run(score("the second one", mc(), judge))
    assert "Reference answer: B. blue truck" in backend.requests[-1].messages[-1].text()


def test_judge_failures_are_recorded_not_scored_zero():
    def broken(messages, params):
        raise BackendError("judge server down")

    s = run(score("The sign reads YE OLDE INN", open_q("Ye Olde"), LLMJudge(ScriptedBackend(broken))))
    assert s.correct is None and s.method == "judge_error" and "judge server down" in s.detail
    s = run(score("The sign reads YE OLDE INN", open_q("Ye Olde"), LLMJudge(ScriptedBackend(lambda m, p: "Maybe?"))))
    assert s.correct is None and s.method == "judge_error" and "unreadable verdict" in s.detail
    assert s.value == 0.0


def test_reward_is_the_eval_score():
    settings = RunSettings(
        model="m",
        protocol="tags",
        coords="relative",
        max_turns=6,
        max_images=None,
        max_new_tokens=10,
        max_context_tokens=100,
        min_pixels=40000,
        max_pixels=2000000,
        resize_factor=28,
        min_box_side=28,
        max_aspect_ratio=100,
        keep_images=None,
        temperature=1,
        top_p=1,
        seed=None,
        prompt="default",
    )
    good = Trajectory(id="t", sample=mc(), settings=settings, answer="(B)")
    bad = Trajectory(id="t", sample=mc(), settings=settings, answer="D")
    assert reward(good) == 1.0 and reward(bad) == 0.0
    assert reward(good) == run(score(good.answer, good.sample)).value


def test_shuffle_is_seeded_per_sample_and_repeat():
    s = Sample(id="q1", images=["x"], question="Which?", options=OPTIONS, answer="B")
    orders = [tuple(option_order(s, r, "shuffle", 0)) for r in range(8)]
    assert orders == [tuple(option_order(s, r, "shuffle", 0)) for r in range(8)]
    assert len(set(orders)) > 1
    assert orders[0] != tuple(option_order(s, 0, "shuffle", 1)) or orders[1] != tuple(option_order(s, 1, "shuffle", 1))


def test_presented_gold_follows_its_option():
    s = Sample(id="q1", images=["x"], question="Which?", options=OPTIONS, answer="B")
    for r in range(6):
        p = present(s, r, mode="shuffle", seed=3)
        letter = p.answer
        assert p.options["ABCD".index(letter)] == "blue truck"
        assert f"({letter}) blue truck" in p.question and p.meta["option_order"] == option_order(s, r, "shuffle", 3)
        assert p.question.startswith("Which?\n(A) ")


def test_cyclic_puts_the_answer_everywhere_and_shuffle_spreads_it():
    s = Sample(id="q1", images=["x"], question="Which?", options=OPTIONS, answer="A")
    assert sorted(present(s, r, mode="cyclic").answer for r in range(4)) == ["A", "B", "C", "D"]
    assert present(s, 0, mode="fixed").answer == "A"
    # Over many questions whose file lists the right answer first, shuffling spreads it evenly.
    counts = Counter(present(s.model_copy(update={"id": f"q{i}"}), 0, mode="shuffle").answer for i in range(400))
    assert all(70 < counts[letter] < 130 for letter in "ABCD")


def test_an_option_about_the_others_keeps_its_place():
    """MME-RealWorld's option E ("All the above answers are wrong") and the like stay where the file put them;
    the others are still shuffled and rotated."""
    options = ["red car", "blue truck", "green bus", "white van", "All the above answers are wrong."]
    s = Sample(id="q1", images=["x"], question="Which?", options=options, answer="E")
    for mode in ("shuffle", "cyclic"):
        shown = [present(s, r, mode=mode, seed=0) for r in range(6)]
        assert all(p.options[4] == options[4] and p.answer == "E" for p in shown)
        assert len({tuple(p.options) for p in shown}) > 1
    moved = ["none of the above", "red", "blue"]
    assert option_order(Sample(id="q2", images=["x"], question="?", options=moved), 1, "cyclic", 0)[0] == 0


def test_hrbench_rows_are_shown_in_file_order_and_keep_their_cycle_only_then():
    s = Sample(id="q1", images=["x"], question="Which?", options=OPTIONS, answer="A", meta={"cycle": "0"})
    assert present(s, 0, mode="fixed").meta["cycle"] == "0"
    shuffled = [present(s.model_copy(update={"id": f"q{i}"}), 0, mode="shuffle") for i in range(8)]
    assert all("cycle" not in p.meta for p in shuffled if p.meta["option_order"] != [0, 1, 2, 3])


def test_open_questions_are_unchanged():
    s = open_q("Ye Olde")
    assert present(s, 2).question == s.question and present(s, 2).meta["repeat"] == 2
