"""Answer normalisation, majority vote, effort presets and config resolution."""

from __future__ import annotations

import pytest

from glimpse.answers import majority_vote, normalize_answer
from glimpse.config import AskConfig, public_dict, resolve, write_resolved
from glimpse.effort import effort_budget
from glimpse.errors import ConfigError


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
    ],
)
def test_normalisation_merges_variants(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize(("a", "b"), [("Blue", "b"), ("A car", "a"), ("7", "1"), ("red", "read")])
def test_normalisation_keeps_different_answers_apart(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_majority_vote_breaks_ties_by_first_answer():
    vote = majority_vote(["B", None, "c", "(B)", "C"])
    assert vote.answer == "B" and vote.key == "b" and vote.counts == {"b": 2, "c": 2}
    assert vote.answered == 4 and vote.total == 5 and vote.agreement == pytest.approx(0.4)
    assert majority_vote([None, None]).answer is None


def test_effort_presets():
    assert effort_budget("low").max_turns == 4
    assert effort_budget("high").max_turns == 32
    assert effort_budget("medium", max_turns=7).max_turns == 7
    with pytest.raises(ConfigError, match="unknown effort"):
        effort_budget("extreme")


def test_config_precedence_and_validation(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("max_turns: 9\ntemperature: none\neffort: high\n")
    cfg = resolve(AskConfig, file, {"max_turns": 5, "top_p": None})
    assert cfg.max_turns == 5 and cfg.temperature is None and cfg.effort == "high" and cfg.top_p == 1.0
    toml = tmp_path / "c.toml"
    toml.write_text('protocol = "tools"\nsamples = 4\n')
    assert resolve(AskConfig, toml).samples == 4
    with pytest.raises(ConfigError, match=r"unknown settings.*max_turn\b"):
        file.write_text("max_turn: 9\n")
        resolve(AskConfig, file)
    with pytest.raises(ConfigError, match="not one of"):
        resolve(AskConfig, None, {"protocol": "xml"})
    with pytest.raises(ConfigError, match="not a valid int"):
        resolve(AskConfig, None, {"samples": "many"})
    with pytest.raises(ConfigError, match="samples='none' is not a valid int"):
        resolve(AskConfig, None, {"samples": "none"})


def test_secrets_are_never_written(tmp_path):
    cfg = AskConfig(model="openai:x", api_key="sk-secret")
    assert "api_key" not in public_dict(cfg)
    write_resolved(cfg, tmp_path / "c.json")
    assert "sk-secret" not in (tmp_path / "c.json").read_text()
