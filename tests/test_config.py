"""Effort presets and config resolution: precedence, validation, secrets, and the shared loop settings."""

from __future__ import annotations

import pytest

from glimpse.config import AskConfig, public_dict, resolve, write_resolved
from glimpse.effort import effort_budget
from glimpse.errors import ConfigError


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


def test_ask_and_eval_share_each_loop_setting_and_the_loop_takes_them():
    """A loop setting is defined once (LoopSettings): both commands have it as a flag with the same help, and
    LoopOptions.of carries every one of them into the loop."""
    import dataclasses

    from glimpse.agent import LoopOptions
    from glimpse.config import EvalConfig, LoopSettings, loop_setting_names

    names = loop_setting_names()
    assert names and set(names) == {f.name for f in dataclasses.fields(LoopSettings)}
    for cls in (AskConfig, EvalConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        shared = {f.name: f for f in dataclasses.fields(LoopSettings)}
        assert all(fields[n].metadata["help"] == shared[n].metadata["help"] for n in names)
    cfg = resolve(AskConfig, flags={"keep_images": 2, "protocol": "tools", "max_pixels": 300_000})
    options = LoopOptions.of(cfg, max_turns=5)
    assert (options.keep_images, options.protocol, options.max_pixels, options.max_turns) == (2, "tools", 300_000, 5)
    assert "sandbox" not in loop_setting_names(results_only=True)  # the isolation does not change results

