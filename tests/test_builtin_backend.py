"""The ``builtin`` backend: which policy answers (the learned built-in model on the probe levels its manifest
lists, greedy as measured; the expert everywhere else), the manifest it reads, the explicit choices, and one
real ``glimpse eval`` of the shipped weights on a hard probe."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from glimpse.builtin import backend as builtin
from glimpse.errors import ConfigError
from glimpse.eval.harness import probe_levels
from glimpse.models import load_backend
from glimpse.trajectory import Sample, load_jsonl

SHIPPED = Path(builtin.__file__).with_name("weights")
HAS_HF = builtin.missing_packages() is None


def ship(folder: Path, levels: list[str], temperature: float = 0) -> Path:
    """A weights folder with a manifest (the model files are not needed to choose)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    accuracy = {"easy": {"learned": 30.0, "expert": 60.0}, "medium": {"learned": 70.0, "expert": 65.0}}
    accuracy["hard"] = {"learned": 46.8, "expert": 37.4}
    measured = {"probes": 500, "seed": 0, "max_turns": 6, "temperature": temperature, "accuracy": accuracy}
    (folder / builtin.MANIFEST).write_text(json.dumps({"probe_levels": levels, "measured": measured}))
    return folder


@pytest.fixture
def shipped_here(tmp_path, monkeypatch):
    """Point the backend at a weights folder of the test's own, with torch and transformers 'installed'."""

    def make(levels: list[str], temperature: float = 0) -> Path:
        folder = ship(tmp_path / "weights", levels, temperature)
        monkeypatch.setattr(builtin, "WEIGHTS", folder)
        monkeypatch.setattr(builtin, "missing_packages", lambda: None)
        return folder

    return make


def sign_test(a: int, b: int) -> float:
    """The exact two-sided sign test's p for ``a`` probes only one policy got right and ``b`` only the other."""
    n, k = a + b, min(a, b)
    return min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2**n) if n else 1.0


def test_the_shipped_manifest_lists_exactly_the_levels_where_the_learned_model_beats_the_expert_beyond_chance():
    manifest = builtin.read_manifest()
    assert manifest is not None, "the package ships the learned model's weights and manifest"
    assert manifest.temperature == 0 and manifest.probe_levels
    probes = manifest.measured["probes"]
    assert probes == 500 and manifest.measured["max_turns"] == 6
    for level in ("easy", "medium", "hard"):
        accuracy, pair = manifest.accuracy[level], manifest.measured["paired"][level]
        only_learned, only_expert = pair["learned_only"], pair["expert_only"]
        # the pair's counts are those accuracies' difference, and its p their sign test's
        assert abs(100 * (only_learned - only_expert) / probes - (accuracy["learned"] - accuracy["expert"])) < 0.11
        assert abs(pair["p"] - sign_test(only_learned, only_expert)) < 5e-4, level
        beats = accuracy["learned"] > accuracy["expert"] and pair["p"] < 0.05
        assert (level in manifest.probe_levels) == beats, level


def test_every_file_of_the_weights_is_package_data():
    """pyproject's package-data glob must carry the tokenizer, prompts and manifest, not only the model."""
    import tomllib

    globs = tomllib.loads((SHIPPED.parents[3] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = [g for g in globs["glimpse"] if g.startswith("builtin/weights/")]
    files = [p for p in SHIPPED.iterdir() if p.name != "__pycache__"]
    assert {"model.safetensors", "tokenizer.json", "glimpse_prompts.yaml", builtin.MANIFEST} <= {p.name for p in files}
    for path in files:
        relative = path.relative_to(SHIPPED.parents[1]).as_posix()  # from src/glimpse
        assert path.is_file() and any(Path(relative).match(p) for p in patterns), relative


@pytest.mark.parametrize(
    ("levels", "temperature", "learned", "said"),
    [
        ({"hard"}, 0, True, "on hard probes it beats the expert: 46.8 % against 37.4 % on 500 probes, greedy"),
        ({"easy"}, 0, False, "the default only on hard probes"),
        ({"hard", "easy"}, 0, False, "the default only on hard probes"),  # a mixed run
        (None, 0, False, "--model builtin:learned runs it here"),  # glimpse ask, a benchmark
        ({"hard"}, 1.0, False, "add --temperature 0 to run it"),  # measured greedy; sampled it scores 2 %
        ({"hard"}, None, False, "add --temperature 0"),
    ],
)
def test_builtin_runs_the_learned_model_only_where_the_manifest_says(shipped_here, levels, temperature, learned, said):
    shipped_here(["hard"])
    choice = builtin.choose(levels, temperature)
    assert choice.learned is learned and said in choice.line
    assert choice.line.startswith("the learned built-in model (" if learned else "the expert (")


def test_the_levels_are_data_a_new_manifest_changes_the_choice(shipped_here):
    shipped_here(["medium", "hard"])
    assert builtin.choose({"medium"}, 0).learned and builtin.choose({"medium", "hard"}, 0).learned
    assert "on medium and hard probes" in builtin.choose({"hard"}, 0).line
    assert "medium 70.0 % against 65.0 %, hard 46.8 %" in builtin.choose({"hard"}, 0).line
    assert not builtin.choose({"easy"}, 0).learned
    shipped_here(["hard", "easy", "medium"])  # three levels are listed as a person would write them
    assert "on easy, medium and hard probes" in builtin.choose({"hard"}, 0).line
    shipped_here([])
    assert not builtin.choose({"hard"}, 0).learned
    shipped_here(["hard"], temperature=0.7)  # measured sampled: the default at that temperature only
    assert builtin.choose({"hard"}, 0.7).learned and not builtin.choose({"hard"}, 0).learned


def test_without_torch_or_the_weights_builtin_is_the_expert_and_says_why(shipped_here, monkeypatch, tmp_path):
    shipped_here(["hard"])
    monkeypatch.setattr(builtin, "missing_packages", lambda: "torch")
    choice = builtin.choose({"hard"}, 0)
    assert not choice.learned and "needs torch" in choice.line and "pip install 'glimpse[hf]'" in choice.line
    assert load_backend("builtin", probe_levels={"hard"}, temperature=0).name == "expert"
    with pytest.raises(ConfigError, match=r"builtin:learned needs torch.*pip install 'glimpse\[hf\]'"):
        load_backend("builtin:learned")
    monkeypatch.setattr(builtin, "WEIGHTS", tmp_path / "none")  # an install without the weights
    assert builtin.choose({"hard"}, 0).line == "the expert (no learned built-in model ships with this install)"
    assert load_backend("builtin", probe_levels={"hard"}, temperature=0).name == "expert"
    with pytest.raises(ConfigError, match="ships no learned built-in model"):
        load_backend("builtin:learned")


def test_a_manifest_that_cannot_say_where_is_our_bug_and_raises_with_the_fix(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(builtin, "WEIGHTS", folder)
    with pytest.raises(ConfigError, match=r"come without glimpse_ship\.json"):
        builtin.choose({"hard"}, 0)
    for manifest, message in [
        ("{not json", "cannot be read"),
        ({"probe_levels": ["hard"]}, "cannot be read"),  # no measurement
        ({"probe_levels": "hard", "measured": {"temperature": 0, "accuracy": {}}}, "must be a list"),
        ({"probe_levels": ["hard"], "measured": {"temperature": 0, "accuracy": {}}}, "no measured accuracy"),
    ]:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (folder / builtin.MANIFEST).write_text(text)
        with pytest.raises(ConfigError, match=message):
            builtin.read_manifest()


def test_explicit_choices():
    assert load_backend("builtin:expert", probe_levels={"hard"}, temperature=0).name == "expert"
    assert load_backend("builtin").name == "expert"  # glimpse ask: no probe levels
    with pytest.raises(ConfigError, match="builtin:learned or builtin:expert"):
        load_backend("builtin:best")


@pytest.mark.skipif(not HAS_HF, reason="needs glimpse[hf]")
def test_the_shipped_weights_load_as_the_learned_model():
    for backend in (load_backend("builtin:learned"), load_backend("builtin", probe_levels={"hard"}, temperature=0)):
        assert backend.name == "hf:builtin_weights" and backend.family == "glimpse_vl"
        assert backend.default_prompt_file == str(SHIPPED / "glimpse_prompts.yaml")


def probe(level: str, images: int = 1, source: str = "glimpse_probe") -> Sample:
    meta = {"data_source": f"{source}_{level}", "level": level}
    return Sample(id=f"{level}/{images}", images=[f"{i}.jpg" for i in range(images)], question="?", meta=meta)


def test_the_harness_says_which_probe_levels_a_run_is_on():
    from glimpse.eval.datasets import load_probes

    assert probe_levels(load_probes("hard", 1).samples) == {"hard"}
    assert probe_levels([probe("hard"), probe("hard")]) == {"hard"}
    assert probe_levels([probe("hard"), probe("easy")]) == {"hard", "easy"}
    assert probe_levels([probe("hard"), probe("hard", source="visual_probe")]) is None  # a benchmark's hard
    assert probe_levels([probe("hard", images=2)]) is None  # two-image probes were not measured
    assert probe_levels([]) is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_HF, reason="needs glimpse[hf]")
def test_glimpse_eval_on_a_hard_probe_runs_the_shipped_learned_model(tmp_path):
    """The real thing: no --model, one hard probe, greedy; the record names the learned model. The same probe
    sampled (the model was measured greedy) runs the expert, and the first line says how to run the model."""
    for name, temperature, model, said in [
        ("greedy", ["--temperature", "0"], "hf:builtin_weights", "builtin: the learned built-in model (on "),
        ("sampled", [], "expert", "builtin: the expert (the learned built-in model beats it on "),
    ]:
        out = tmp_path / name
        args = ["eval", "--data", "probes:hard:1", "--max-turns", "3", *temperature, "--out", str(out)]
        proc = subprocess.run([sys.executable, "-m", "glimpse", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0].startswith(said), proc.stdout
        assert temperature or "add --temperature 0 to run it" in proc.stdout.splitlines()[0]
        (traj,) = load_jsonl(out / "trajectories.jsonl")
        assert traj.settings.model == model and traj.stop_reason in ("answer", "max_turns")
        assert traj.turns[0].kind in ("zoom", "answer") and traj.score is not None
        assert json.loads((out / "config.json").read_text())["config"]["model"] == "builtin"
