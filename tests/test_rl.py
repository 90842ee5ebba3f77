"""RL with over-turn masking: the engine-agnostic core on hand-computed numbers, and ``glimpse train rl`` on a
tiny built-in model taught one search by heart (so its rollouts zoom, answer and can be checked token by token)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from glimpse.agent import AgentLoop
from glimpse.builtin.model import build_builtin
from glimpse.builtin.train import grid_turns
from glimpse.config import RLConfig
from glimpse.errors import ConfigError
from glimpse.eval.datasets import load_dataset
from glimpse.hf.processor import PROMPT_FILE, load_processor
from glimpse.images import PixelLimits
from glimpse.models.hf import HFBackend
from glimpse.models.scripted import ScriptedBackend
from glimpse.train import grpo
from glimpse.train.common import ASSISTANT_HEADER, END, collate, encode
from glimpse.train.grpo import group_advantages, informative, keeps_loss, policy_loss, score_group
from glimpse.train.rl import StepStats, Trainer, _batch, sampled_logprobs, trajectory_inputs
from glimpse.trajectory import Score, TokenView

DATA = "probes:easy:1:9"


# ------------------------------------------------------------------------------------------------------ core
def test_group_advantages_hand_computed():
    adv = group_advantages([1, 0, 0, 0])
    # mean 0.25, sample std (as torch.std and verl) sqrt(0.75 / 3) = 0.5
    assert adv[0] == pytest.approx(0.75 / 0.5, rel=1e-5)
    assert adv[1:] == pytest.approx([-0.25 / 0.5] * 3, rel=1e-5)
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0]
    t = torch.tensor(rewards)
    assert group_advantages(rewards) == pytest.approx(((t - t.mean()) / (t.std() + 1e-6)).tolist(), rel=1e-5)
    assert group_advantages([1]) == [0.0]
    assert group_advantages([1, 1, 1]) == [0.0, 0.0, 0.0]
    assert group_advantages([]) == []
    assert not informative([0, 0, 0]) and not informative([1, 1]) and informative([0, 1])


SAMPLE_STD_1001 = [a * 0.5 / math.sqrt(1 / 3) for a in (1, -1, -1, 1)]  # [1, 0, 0, 1]: mean 0.5, sample std √(1/3)


def test_over_turn_counts_in_the_statistics_but_carries_no_loss(tmp_path, make_image):
    """Rewards [1, 0 (over-turn), 0, 1]: the over-turn 0 is in the mean (0.5) and sample std (√(1/3)), so
    advantages are ±0.866 (±1 would mean it was left out); only its loss flag changes with masking."""
    sample = load_dataset(DATA).samples[0]
    zoom = '<grounding>{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"}</grounding>'
    right, wrong = f"<answer>{sample.answer}</answer>", "<answer>nothing</answer>"
    other = zoom.replace("0.1, 0.1", "0.2, 0.2")
    scripts = [[right], [zoom, zoom, zoom], [wrong], [other, right]]
    group = asyncio.run(AgentLoop(ScriptedBackend(scripts), max_turns=3).run(sample, samples=4))
    assert [t.over_turn for t in group] == [False, True, False, False]
    for t in group:
        t.token_view = TokenView(ids=[1, 2, 3], mask=[0, 1, 1])
    masked = score_group(group)
    assert [r.reward for r in masked] == [1, 0, 0, 1]
    assert [r.advantage for r in masked] == pytest.approx(SAMPLE_STD_1001, abs=1e-5)
    assert [r.trained for r in masked] == [True, False, True, True]
    for t in group:
        t.score = None
    unmasked = score_group(group, mask_over_turn=False)
    assert [r.advantage for r in unmasked] == pytest.approx(SAMPLE_STD_1001, abs=1e-5)
    assert all(r.trained for r in unmasked)
    assert keeps_loss(True, mask_over_turn=False) and not keeps_loss(True) and keeps_loss(False)
    # A trajectory without a usable token view cannot be trained on faithfully.
    group[0].token_view.aligned = False
    assert not score_group(group)[0].trained


def test_policy_loss_hand_computed_and_only_on_sampled_tokens():
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask)
    assert float(loss.detach()) == pytest.approx((-1 - 1 + 1) / 3)  # ratio 1: −A per token, mean over 3 tokens
    loss.backward()
    assert logp.grad[0, 2] == 0 and logp.grad[1, 1] == 0 and logp.grad[1, 2] == 0  # masked: no gradient
    assert stats == {"clip_frac": 0.0, "ratio_mean": pytest.approx(1.0), "tokens": 3.0}
    one = torch.tensor([[1]])
    for delta, a, expected, binds in [
        (0.5, 1.0, -1.3, True),  # ratio 1.65 clipped at 1 + 0.3
        (0.5, -1.0, math.exp(0.5), False),  # a negative advantage keeps the unclipped (worse) value
        (-0.5, 1.0, -math.exp(-0.5), False),  # ratio 0.61 with a positive advantage: unclipped
        (-0.5, -1.0, 0.8, True),  # ratio 0.61 clipped at 1 − 0.2
    ]:
        loss, stats = policy_loss(torch.tensor([[delta]]), torch.zeros(1, 1), torch.tensor([a]), one)
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert stats["clip_frac"] == float(binds)  # counted only where the clip takes the gradient away
    empty, stats = policy_loss(logp, logp.detach(), adv, torch.zeros(2, 3))
    assert float(empty.detach()) == 0 and stats["tokens"] == 0


# ------------------------------------------------------------------------------------------ model and loop
@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> Path:
    """A tiny built-in model trained on one probe's teacher search until it replays it greedily."""
    from transformers import AutoModelForImageTextToText

    folder = build_builtin(tmp_path_factory.mktemp("rl") / "model", size="tiny", seed=0)
    processor = load_processor(folder)
    tok = processor.tokenizer
    sample = load_dataset(DATA).samples[0]
    loop = AgentLoop(
        ScriptedBackend([grid_turns(sample, PixelLimits(65_536, 147_456, 32))]),
        prompt_file=str(folder / PROMPT_FILE),
        coords="relative",
        resize_factor=32,
        min_pixels=65_536,
        max_pixels=147_456,
    )
    traj = asyncio.run(loop.run(sample))[0]
    example = encode(
        traj, processor, tok.encode(ASSISTANT_HEADER, add_special_tokens=False), tok.convert_tokens_to_ids(END)
    )
    model = AutoModelForImageTextToText.from_pretrained(folder)
    batch = collate([example], tok.pad_token_id, model.config.image_token_id)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


def test_rollout_tokens_and_images_are_what_the_model_saw(memorised):
    """Greedy rollouts: at every sampled position the training forward pass (ids from the token view, images
    re-rendered from the record) must predict exactly the token that was sampled."""
    backend = HFBackend(str(memorised))
    sample = load_dataset(DATA).samples[0]
    traj = asyncio.run(AgentLoop(backend, max_turns=6, temperature=0.0, return_token_ids=True).run(sample))[0]
    assert traj.stop_reason == "answer" and traj.answer == sample.answer
    assert sum(1 for t in traj.turns if t.observation_index) >= 1  # it zoomed (the teacher points at the target)
    traj.score = Score(correct=True, method="exact")
    rollout = score_group([traj])[0]
    item = trajectory_inputs(rollout, backend.processor)
    assert item.image_grid_thw.shape[0] == len(traj.turns)  # the original and one image per zoom
    batch = _batch([item], [rollout.advantage], 0, backend.image_token_id, "cpu", torch.float32)
    with torch.no_grad():
        _, mask, logits = sampled_logprobs(backend.model, batch)
    target = batch["labels"][:, 1:]
    assert int(mask.sum()) == sum(traj.token_view.mask)
    assert torch.equal(logits.argmax(-1)[mask], target[mask])


def _cfg(model: Path, out: Path, **kw) -> RLConfig:
    base = dict(
        model=str(model),
        data=DATA,
        out=str(out),
        steps=2,
        prompts=1,
        group=4,
        max_turns=6,
        max_new_tokens=64,
        lr=1e-4,
        save_every=1,
        device="cpu",
        seed=0,
    )
    return RLConfig(**{**base, **kw})


def _half_right(monkeypatch):
    """Make every group informative: alternate trajectories are scored right and wrong, whatever they answer."""
    calls = itertools.count(1)
    monkeypatch.setattr(
        grpo, "score_rules", lambda prediction, sample: Score(correct=next(calls) % 2 == 0, method="exact")
    )


def test_train_rl_updates_logs_and_resumes(memorised, tmp_path, monkeypatch):
    _half_right(monkeypatch)
    out = tmp_path / "rl"
    before = {n: p.clone() for n, p in HFBackend(str(memorised)).model.named_parameters()}
    Trainer(_cfg(memorised, out)).run()
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for x in lines:
        # every trajectory trains, except over-turn ones (masked)
        assert x["groups_kept"] == 1 and x["trained"] == 4 - round(4 * x["over_turn"])
        assert x["reward"] == 0.5 and x["turns"] > 1 and x["entropy"] >= 0
        assert set(x) >= {"accuracy", "tool_errors", "loss", "grad_norm", "clip_frac", "lr", "stop_reasons"}
    assert lines[0]["trained"] and lines[0]["trained_tokens"] > 0
    after = HFBackend(str(out / "model"))
    assert any(not torch.equal(before[n], p) for n, p in after.model.named_parameters())
    assert (out / "model" / PROMPT_FILE).exists() and after.default_prompt_file  # prompted as it was trained
    assert json.loads((out / "config.json").read_text())["mask_over_turn"] is True
    # Resume: the same OUT with more steps continues from the newest checkpoint.
    trainer = Trainer(_cfg(memorised, out, steps=3))
    assert trainer.step == 2 and trainer.draws == 2
    trainer.run()
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    # A run stopped after step 4 but before its checkpoint (and mid-line) repeats step 4 once, logged once.
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "reward": 9.0}) + '\n{"step": 5, "rew')
    Trainer(_cfg(memorised, out, steps=4)).run()
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4] and rows[-1]["reward"] != 9.0
    with pytest.raises(ConfigError, match="different settings"):
        Trainer(_cfg(memorised, out, steps=4, group=8))


def test_over_turn_trajectories_train_only_without_the_mask(memorised, tmp_path, monkeypatch):
    """With a 1-turn cap the memorised search (its first reply is a zoom) is always cut off: masked, nothing trains."""
    _half_right(monkeypatch)
    masked = Trainer(_cfg(memorised, tmp_path / "a", steps=1, max_turns=1, dynamic_sampling=False))
    stats, _ = masked.one_step()
    assert stats.over_turn == 1.0 and stats.trained == 0 and stats.loss == 0
    # (a probe made for the step: its image is deleted once the update has re-rendered it)
    plain = Trainer(
        _cfg(
            memorised,
            tmp_path / "b",
            steps=1,
            max_turns=1,
            dynamic_sampling=False,
            mask_over_turn=False,
            mini_batches=2,  # two updates: the second's ratio is against the sampling policy's log-probabilities
            data="stream:easy",
        )
    )
    stats, groups = plain.one_step()
    assert stats.over_turn == 1.0 and stats.trained == 4 and stats.trained_tokens > 0
    assert not Path(groups[0][0].trajectory.sample.images[0]).exists()
    # the rollouts and the update share one decode of it, and it is forgotten with its file (no dead 8K originals
    # filling the cache's budget step after step)
    assert plain.loop.cache is plain.cache and plain.cache.misses == 1 and plain.cache.hits >= 1
    assert not plain.cache._items and plain.cache._bytes == 0


def test_dynamic_sampling_drops_uninformative_groups(memorised, tmp_path):
    """The memorised model answers right every time at temperature 0: no group teaches anything."""
    trainer = Trainer(_cfg(memorised, tmp_path / "c", steps=1, temperature=0.0, max_draws=3))
    stats, kept = trainer.one_step()
    assert stats.groups_drawn == 3 and stats.groups_kept == 0 and not kept and stats.trained == 0
    assert stats.accuracy == 1.0


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--model"):
        Trainer(RLConfig(out=str(tmp_path)))
    with pytest.raises(ConfigError, match="group"):
        Trainer(RLConfig(model="x", group=1, out=str(tmp_path)))


def test_turn_scaling_repro_runs_arm_by_arm_and_reports(memorised, tmp_path):
    """Every arm, tiny, end to end: trained (or not), evaluated at the caps and folded at a larger one, reported."""
    from glimpse.config import ReproConfig
    from glimpse.eval.harness import RESULTS, ResultStore
    from glimpse.train.repro import ARMS, FOLD, run_repro, trained_any

    root = tmp_path / "repro"
    base = dict(
        model=str(memorised),
        out=str(root),
        steps=1,
        prompts=1,
        group=2,
        eval_n=2,
        caps="2,6",
        max_new_tokens=48,
        device="cpu",
        fold_cap=8,
        keep_images=1,
    )
    run_repro(ReproConfig(**base, arms="sft"), say=lambda _: None)
    said: list[str] = []
    report = run_repro(ReproConfig(**base, arms="full,no-mask,no-coldstart,no-hard"), say=said.append)
    assert list(report["arms"]) == list(ARMS)  # the earlier arm is kept
    assert not trained_any(root / "no-coldstart" / "train" / "log.jsonl")  # a fresh model earns no reward
    untrained = ["no-coldstart"]
    assert any(line.startswith("[no-coldstart] its training made no update") for line in said)
    assert set(report["arms"]["no-coldstart"]["caps"]) == {6} and report["arms"]["no-coldstart"]["fold"] is None
    for name, arm in report["arms"].items():
        if name in untrained:
            continue  # evaluated at its training cap only: its model is where it started
        assert set(arm["caps"]) == {2, 6} and 0 <= arm["caps"][6]["accuracy"] <= 1
        low, high = arm["caps"][6]["interval"]
        assert arm["caps"][6]["questions"] == 2 and low <= arm["caps"][6]["accuracy"] <= high and high - low > 0.3
        # the folded evaluation: its own cap, and the loop kept only the last image
        assert arm["fold"]["cap"] == 8 and arm["fold"]["keep_images"] == 1 and arm["fold"]["questions"] == 2
        folded = ResultStore(root / name / FOLD / RESULTS).load()
        assert len(folded) == 2 and {(t.settings.max_turns, t.settings.keep_images) for t in folded} == {(8, 1)}
        if name != "sft":
            assert arm["train"]["steps"] == 1 and [r["step"] for r in arm["train_steps"]] == [1]
    assert report["arms"]["sft"]["train"] is None
    trained = {a: json.loads((root / a / "train" / "config.json").read_text()) for a in ARMS if a != "sft"}
    assert [c["mask_over_turn"] for c in trained.values()] == [True, False, True, True]
    assert trained["no-hard"]["data"] == "stream:medium+easy" and trained["full"]["data"].count("hard") == 1
    assert report["arms"]["no-hard"]["train"]["data"] == "stream:medium+easy"
    # no-coldstart starts from a fresh model of the same architecture, with the checkpoint's prompts
    init = root / "no-coldstart" / "init"
    assert (init / PROMPT_FILE).exists()
    assert json.loads((init / "config.json").read_text())["model_type"] == "glimpse_vl"
    assert trained["no-coldstart"]["model"] == str(init)
    md = (root / "turn_scaling.md").read_text()
    assert all(f"| {a} | 2 |" in md for a in ARMS) and "| cap 8, last 1 images |" in md
    assert "no-coldstart's mean turns at cap 6:" in md  # its only cap
    assert "](train_curves.png)" in md and (root / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "turn_scaling.png").exists() and "## Claims" in md
    assert [c["claim"] for c in json.loads((root / "turn_scaling.json").read_text())["claims"]] == [
        "over-turn masking",
        "cold start",
        "hard data",
    ]
    # An arm made with other settings is not reported beside these ones: refused before anything runs.
    with pytest.raises(ConfigError, match=r"full was made with lr 2e-05 \(this command: lr 0.001\)"):
        run_repro(ReproConfig(**base | {"lr": 1e-3}, arms="sft"), say=said.append)
    with pytest.raises(ConfigError, match="no-mask was made with steps 1 "):  # only full would train further
        run_repro(ReproConfig(**base | {"steps": 2}, arms="full"), say=said.append)


def test_turn_scaling_repro_evaluates_an_arm_again_when_its_weights_changed(memorised, tmp_path):
    from safetensors.torch import load_file, save_file

    from glimpse.config import ReproConfig
    from glimpse.eval.harness import RESULTS
    from glimpse.train.repro import run_repro

    model = tmp_path / "model"
    shutil.copytree(memorised, model)
    cfg = ReproConfig(model=str(model), out=str(tmp_path / "r"), arms="sft", eval_n=1, caps="2", max_new_tokens=48)
    said: list[str] = []
    run_repro(cfg, say=said.append)
    results = tmp_path / "r" / "sft" / "eval" / RESULTS
    first = results.stat().st_mtime_ns
    run_repro(cfg, say=said.append)  # the same weights: the evaluation is reused
    assert results.stat().st_mtime_ns == first and not any("changed" in line for line in said)
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 1}, model / "model.safetensors", metadata={"format": "pt"})
    run_repro(cfg, say=said.append)
    assert "[sft] its weights changed since they were evaluated: evaluating again" in said
    assert results.stat().st_mtime_ns != first


def test_turn_scaling_repro_train_levels_mix_and_errors(tmp_path):
    """``--train-levels`` sets what the RL arms train on (cycled, a repeat weighs more); no-hard drops hard; a bad
    mix stops the command before any arm runs."""
    from glimpse.config import ReproConfig
    from glimpse.train.repro import rl_config, run_repro

    cfg = ReproConfig(model="m", train_levels="hard+hard+medium", kind="relative_position")
    assert rl_config(cfg, "full", tmp_path).data == "stream:hard+hard+medium:1:relative_position"
    assert rl_config(cfg, "no-hard", tmp_path).data == "stream:medium:1:relative_position"
    assert rl_config(ReproConfig(model="m", train_levels="hard"), "no-mask", tmp_path).data == "stream:hard"
    for levels, arms, match in (
        ("hard", "sft,full,no-hard", "no-hard arm .* no other level"),
        ("hard+expert", "full", "levels are easy, medium, hard"),
        ("", "full", "levels are"),
    ):
        with pytest.raises(ConfigError, match=match):
            run_repro(ReproConfig(model="m", out=str(tmp_path / "r"), arms=arms, train_levels=levels))
    assert not (tmp_path / "r").exists()  # nothing ran


def test_turn_scaling_repro_wilson_interval_hand_computed():
    from glimpse.eval.report import wilson

    z2 = 1.959963984540054**2
    assert wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # at 0 correct: [0, z² / (n + z²)]
    assert wilson(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook value
    assert wilson(33, 100) == pytest.approx((0.2456, 0.4270), abs=1e-4)
    with pytest.raises(ValueError, match="n=0"):
        wilson(0, 0)


def _made_up_eval(folder: Path, caps: dict[int, tuple[float, float]], questions: int = 100) -> None:
    """An evaluation's summary.json with only what the report reads: (accuracy, mean turns) per cap."""
    folder.mkdir(parents=True)
    summary = {
        str(cap): {
            "accuracy": {"avg": acc, "pass": acc, "majority": acc},
            "questions": questions,
            "turns_mean": turns,
            "over_turn_rate": 0.0,
            "chance": 0.157,
        }
        for cap, (acc, turns) in caps.items()
    }
    (folder / "summary.json").write_text(json.dumps({"k": 1, "sweep": "derive", "caps": summary}))


def _made_up_repro(root: Path, arms: dict[str, dict[int, tuple[float, float]]], over_turn: float = 0.2) -> dict:
    """A repro folder from made-up summaries and training logs (10 steps each; ``no-mask`` hits the cap 2 % of the
    time late in training, the others ``over_turn``); returns the report written from it."""
    from glimpse.train.repro import collect, write_report

    for arm, caps in arms.items():
        _made_up_eval(root / arm / "eval", caps)
        if arm != "sft":
            rate = 0.02 if arm == "no-mask" else over_turn
            rows = [
                {"step": i, "reward": 0.3, "turns": 3.0, "over_turn": rate, "trajectories": 32, "seconds": 60.0}
                for i in range(1, 11)
            ]
            (root / arm / "train").mkdir()
            (root / arm / "train" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = collect(root, sorted({c for caps in arms.values() for c in caps}), train_turns=6)
    write_report(root, report)
    return report


# Mini-o3's ablation, shaped for caps 6 and 32: (accuracy, mean turns). Every claim holds; full rises exactly 10
# points and no-coldstart is exactly 10 points below full (the thresholds, which count as met although in floats
# 0.43 - 0.33 < 0.1).
PAPER = {
    "full": {6: (0.33, 4.0), 32: (0.43, 5.5)},
    "no-mask": {6: (0.30, 4.0), 32: (0.36, 4.8)},
    "no-coldstart": {6: (0.33, 1.0), 32: (0.33, 1.0)},
    "no-hard": {6: (0.28, 3.0), 32: (0.32, 3.0)},
}


def _verdicts(report: dict) -> dict[str, str]:
    return {c["claim"]: c["verdict"] for c in report["claims"]}


def test_turn_scaling_repro_claims_hold_on_the_papers_numbers(tmp_path):
    from glimpse.train.repro import FOLD

    _made_up_eval(tmp_path / "full" / FOLD, {64: (0.5, 7.0)})
    (tmp_path / "full" / FOLD / "config.json").write_text(json.dumps({"config": {"keep_images": 4}}))
    report = _made_up_repro(tmp_path, PAPER)
    assert _verdicts(report) == {"over-turn masking": "holds", "cold start": "holds", "hard data": "holds"}
    assert all(x["holds"] for c in report["claims"] for x in c["checks"])
    md = (tmp_path / "turn_scaling.md").read_text()
    assert "- **over-turn masking: holds**" in md and "- **hard data: holds**" in md
    assert "full: 33.0 % (24.6–42.7) at cap 6 → 43.0 % (33.7–52.8) at cap 32, +10.0 points" in md
    # the figures with their intervals, and the fold column (only full was folded)
    assert "| full | 100 | 33.0 (24.6–42.7) | 43.0 (33.7–52.8) | 50.0 (40.4–59.6) | 5.50 |" in md
    assert "| no-mask | 100 | 30.0 (21.9–39.6) | 36.0 (27.3–45.8) | – | 4.80 |" in md
    assert "cap 64, last 4 images" in md
    assert "](train_curves.png)" in md and (tmp_path / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
    # the training cap bound for every arm but no-mask: the report says masking had little to mask there
    assert "- full: 20.0 % → 20.0 %\n" in md and "- no-mask: 2.0 % → 2.0 %: under 5 % throughout, the cap hardly" in md
    assert json.loads((tmp_path / "turn_scaling.json").read_text())["claims"] == report["claims"]


@pytest.mark.parametrize(
    ("claim", "arm", "cap", "figures"),
    [
        ("over-turn masking", "full", 6, (0.40, 4.0)),  # rises 3 points only
        ("over-turn masking", "no-mask", 32, (0.50, 4.8)),  # no-mask scores higher
        ("over-turn masking", "no-mask", 32, (0.36, 6.0)),  # no-mask takes more turns
        ("cold start", "no-coldstart", 32, (0.33, 2.0)),  # two turns, not one
        ("cold start", "no-coldstart", 32, (0.40, 1.0)),  # only 3 points below
        ("hard data", "no-hard", 32, (0.32, 6.0)),  # more turns than full
        ("hard data", "no-hard", 32, (0.46, 3.0)),  # scores higher than full
    ],
)
def test_turn_scaling_repro_each_claim_fails_on_its_own_check(tmp_path, claim, arm, cap, figures):
    arms = {a: dict(caps) for a, caps in PAPER.items()}
    arms[arm][cap] = figures
    report = _made_up_repro(tmp_path, arms)
    verdicts = _verdicts(report)
    assert verdicts.pop(claim) == "does not hold" and set(verdicts.values()) == {"holds"}
    assert f"- **{claim}: does not hold**" in (tmp_path / "turn_scaling.md").read_text()


def test_turn_scaling_repro_claims_without_an_arm_are_not_measured(tmp_path):
    report = _made_up_repro(tmp_path, {"sft": PAPER["full"], **{a: PAPER[a] for a in ("full", "no-mask")}})
    assert _verdicts(report) == {
        "over-turn masking": "holds",
        "cold start": "not measured",
        "hard data": "not measured",
    }
    md = (tmp_path / "turn_scaling.md").read_text()
    assert "- **cold start: not measured**" in md and "no no-coldstart arm evaluated yet" in md
    assert "(needs no-hard below full): not measured" in md
    # only sft: nothing trained, so no training curves
    only_sft = _made_up_repro(tmp_path / "sft-only", {"sft": PAPER["full"]})
    assert set(_verdicts(only_sft).values()) == {"not measured"}
    assert not (tmp_path / "sft-only" / "train_curves.png").exists()
    assert "train_curves.png" not in (tmp_path / "sft-only" / "turn_scaling.md").read_text()


def test_turn_scaling_repro_fold_settings_are_config_errors(tmp_path):
    from glimpse.config import ReproConfig
    from glimpse.train.repro import run_repro

    for fold_cap, keep_images in ((64, 0), (-1, 4)):
        with pytest.raises(ConfigError, match="--fold-cap"):
            run_repro(ReproConfig(model="x", out=str(tmp_path), fold_cap=fold_cap, keep_images=keep_images))


def test_turn_scaling_repro_of_one_question_kind_trains_and_evaluates_on_that_kind_only(tmp_path):
    """``--kind``: every arm's training stream and the evaluation's probes are of that kind (a stream spec's
    fourth field); an unknown kind is a config error before anything runs."""
    from glimpse.config import ReproConfig
    from glimpse.train.repro import eval_config, rl_config, run_repro
    from glimpse.train.rl import Prompts

    cfg = ReproConfig(model="x", out=str(tmp_path), kind="relative_position", eval_n=3)
    assert rl_config(cfg, "no-hard", tmp_path).data == "stream:medium+easy:1:relative_position"
    assert eval_config(cfg, "m", tmp_path).data == "probes:hard:3:0:relative_position"
    assert eval_config(ReproConfig(model="x", eval_n=3), "m", tmp_path).data == "probes:hard:3"
    prompts = Prompts(rl_config(cfg, "full", tmp_path).data, 0, tmp_path / "stream", keep_images=False)
    try:
        samples = [prompts.get(i) for i in range(3)]
    finally:
        prompts.close()
    assert [s.meta["level"] for s in samples] == ["hard", "medium", "easy"]
    assert {s.meta["category"] for s in samples} == {"relative_position"}
    with pytest.raises(ConfigError, match="question kind"):
        Prompts("stream:hard:1:colour", 0, tmp_path / "bad", keep_images=False)
    with pytest.raises(ConfigError, match="--kind: unknown probe question kind 'colour'"):
        run_repro(ReproConfig(model="x", out=str(tmp_path), kind="colour"))


def test_the_command_line_trains_and_says_where_the_model_is(memorised, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "cli"
    args = ["train", "rl", "--model", str(memorised), "--data", DATA, "--steps", "1", "--prompts", "1"]
    args += ["--group", "2", "--max-new-tokens", "48", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "glimpse", *args], capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert proc.returncode == 0, proc.stderr
    assert "over-turn masking" in proc.stdout and "step 1/1" in proc.stdout and "hf:" in proc.stdout
    assert (out / "model" / "config.json").exists() and len((out / "log.jsonl").read_text().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "glimpse", *args[:-2], "--group", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "group=1 must be at least 2" in proc.stderr


def test_a_fresh_copy_of_the_built_in_model_needs_no_earlier_import(memorised, tmp_path):
    """In a new interpreter (nothing has registered glimpse_vl with transformers yet), as the command runs it."""
    import subprocess
    import sys

    code = (
        "from pathlib import Path; from glimpse.train.repro import fresh_copy; "
        f"fresh_copy({str(memorised)!r}, Path({str(tmp_path / 'init')!r}), 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "init" / "model.safetensors").exists() and (tmp_path / "init" / PROMPT_FILE).exists()


# ------------------------------------------------------------------------------------------- several images
PAIRS = "probes:easy:1:9:split_code"  # two images, a part of the code in each
SMALL = {"min_pixels": 20_000, "max_pixels": 120_000}


def _sampling_logprobs(backend: HFBackend, run):
    """Run ``run()`` and record the log-probs the model gave each token as it sampled it: one list per
    ``generate`` call (a from-scratch backend: the first forward of a call takes the whole prompt)."""
    calls: list[list[torch.Tensor]] = []

    def record(module, args, kwargs, out) -> None:
        if kwargs["input_ids"].shape[1] > 1:
            calls.append([])
        calls[-1].append(out.logits[0, -1].float().log_softmax(-1))

    hook = backend.model.register_forward_hook(record, with_kwargs=True)
    try:
        return run(), calls
    finally:
        hook.remove()


def test_two_image_rollouts_train_on_what_the_model_saw(tiny_qwen, monkeypatch):
    """Rollouts of the tiny Qwen2.5-VL on a two-image question: the training forward pass (ids from the token
    view, both originals re-rendered from the record) gives every sampled token the log-prob the model gave it
    when sampling (RL's ratio is 1 before an update). Image_2's tokens given image_1's pixels move them (the test
    can tell); images handed over in the wrong order are refused, not trained on."""
    from glimpse.errors import GlimpseError
    from glimpse.train import rl

    backend = HFBackend(str(tiny_qwen), kv_cache_gb=0)
    sample = load_dataset(PAIRS).samples[0]
    loop = AgentLoop(backend, max_turns=2, max_new_tokens=12, temperature=0.0, return_token_ids=True, **SMALL)
    traj, calls = _sampling_logprobs(backend, lambda: asyncio.run(loop.run(sample))[0])
    assert len(traj.originals()) == 2 and traj.token_view.aligned and len(calls) == len(traj.turns)
    view = traj.token_view
    left = [t for t, m in zip(view.ids, view.mask, strict=True) if m]  # every sampled token, turn after turn
    logprobs = []
    for call, turn in zip(calls, traj.turns, strict=True):
        reply, left = left[: turn.usage.completion_tokens], left[turn.usage.completion_tokens :]
        logprobs += [call[i][token] for i, token in enumerate(reply)]
    sampled = torch.stack(logprobs)
    traj.score = Score(correct=True, method="exact")
    rollout = score_group([traj])[0]

    def trained_logprobs() -> torch.Tensor:
        item = trajectory_inputs(rollout, backend.processor)
        batch = _batch([item], [rollout.advantage], 0, backend.image_token_id, "cpu", torch.float32)
        with torch.no_grad():
            logp, mask, _ = sampled_logprobs(backend.model, batch)
        return logp[mask]

    assert torch.allclose(trained_logprobs(), sampled, atol=1e-4)
    shown = rl.render_images
    monkeypatch.setattr(rl, "render_images", lambda *a, **k: _second_as_first(shown(*a, **k)))
    assert not torch.allclose(trained_logprobs(), sampled, atol=1e-3)
    monkeypatch.setattr(rl, "render_images", lambda *a, **k: [*shown(*a, **k)[1::-1], *shown(*a, **k)[2:]])
    with pytest.raises(GlimpseError, match="out of step"):
        trajectory_inputs(rollout, backend.processor)


def _second_as_first(images: list) -> list:
    """image_2 replaced by image_1 resized to image_2's size: the same tokens, other pixels."""
    return [images[0], images[0].resize(images[1].size), *images[2:]]


def test_train_rl_on_a_two_image_probe_set(tiny_qwen, tmp_path, monkeypatch):
    _half_right(monkeypatch)
    before = {n: p.clone() for n, p in HFBackend(str(tiny_qwen)).model.named_parameters()}
    cfg = _cfg(tiny_qwen, tmp_path / "rl", data=PAIRS, steps=1, group=2, max_turns=2, max_new_tokens=16, **SMALL)
    trainer = Trainer(cfg)
    stats, groups = trainer.one_step()
    assert stats.trained == 2 and stats.trained_tokens > 0 and math.isfinite(stats.loss)
    assert all(len(r.trajectory.originals()) == 2 for r in groups[0])
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed and all(".visual." not in f".{n}" for n in changed)  # the vision tower stays frozen
    # A sampled image placeholder (a slip of the model: there is no image for it) makes its trajectory
    # untrainable, not the run fail when the images and their tokens are out of step.
    view = groups[0][0].trajectory.token_view
    view.ids[view.mask.index(1)] = trainer.image_token
    again = StepStats(step=2)
    trainer.update(groups, again)
    assert again.untrainable == 1 and again.trained == 1 and not groups[0][0].trained


def test_turn_scaling_repro_judges_an_untrained_no_coldstart_arm_at_its_training_cap(tmp_path):
    """An arm whose training made no update is evaluated at the training cap only (``run_repro``): the cold-start
    claim compares it with full there, and the table shows "–" at the caps it skipped."""
    arms = {a: dict(caps) for a, caps in PAPER.items()}
    arms["no-coldstart"] = {6: (0.20, 1.0)}
    report = _made_up_repro(tmp_path, arms)
    assert _verdicts(report)["cold start"] == "holds"
    md = (tmp_path / "turn_scaling.md").read_text()
    assert "no-coldstart's mean turns at cap 6: 1.00" in md and "accuracy at cap 6: no-coldstart 20.0 %" in md
    assert "| no-coldstart | 100 | 20.0 (13.3–28.9) | – | 1.00 (cap 6) |" in md
    arms["no-coldstart"] = {6: (0.30, 1.0)}  # 3 points below full at cap 6: not far below
    assert _verdicts(_made_up_repro(tmp_path / "close", arms))["cold start"] == "does not hold"


@pytest.mark.parametrize("freeze", [True, False])
def test_freezing_vision_freezes_every_part_of_the_builtin_model_that_reads_pixels(tmp_path, freeze):
    from types import SimpleNamespace

    from transformers import AutoModelForImageTextToText

    from glimpse.train.common import prepare_model, trainable

    model = AutoModelForImageTextToText.from_pretrained(build_builtin(tmp_path / "m", size="tiny"))
    settings = SimpleNamespace(lora=False, freeze_vision=freeze, freeze_projector=True, gradient_checkpointing=False)
    names = set(trainable(prepare_model(model, settings)))
    seeing = [n for n, _ in model.named_parameters() if n.startswith(("visual.", "reader.", "region_heads."))]
    assert {n.split(".")[0] for n in seeing} == {"visual", "reader", "region_heads"}
    assert any(n.startswith("model.layers.") for n in names) and "found.direction" in names
    assert names.isdisjoint(seeing) if freeze else names.issuperset(seeing)


def test_trained_log_probabilities_are_those_of_the_sampling_temperature():
    """Rollouts sampled at temperature T come from softmax(logits / T): the ratio and gradient must use it too."""
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 0.0]]])

    class Fixed(torch.nn.Module):
        def forward(self, **_inputs):
            return type("Out", (), {"logits": logits})()

    batch = {"inputs": {}, "labels": torch.tensor([[-100, 0, 1]])}
    for temperature in (0.7, 1.0, 0.0):
        logp, mask, _ = sampled_logprobs(Fixed(), batch, temperature)
        scaled = torch.log_softmax(logits[:, :-1] / (temperature or 1.0), dim=-1)
        assert torch.allclose(logp[mask], torch.stack([scaled[0, 0, 0], scaled[0, 1, 1]]))


def test_a_resume_cuts_the_log_and_the_saved_rollouts_back_to_its_checkpoint(tmp_path):
    from types import SimpleNamespace

    rows = [{"step": 1, "rollouts_end": 6}, {"step": 2, "rollouts_end": 12}, {"step": 3, "rollouts_end": 18}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rol')
    (tmp_path / "rollouts.jsonl").write_bytes(b"one.\n" * 4 + b"part")
    Trainer._cut_back(SimpleNamespace(out=tmp_path, step=2))
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "rollouts.jsonl").read_bytes() == (b"one.\n" * 4)[:12]  # what steps 1 and 2 wrote
    Trainer._cut_back(SimpleNamespace(out=tmp_path, step=0))  # a fresh start (no checkpoint) keeps nothing
    assert (tmp_path / "log.jsonl").read_text() == "" and (tmp_path / "rollouts.jsonl").read_bytes() == b""


def test_turn_scaling_claims_are_within_noise_when_the_paired_probes_do_not_tell_the_arms_apart(tmp_path):
    """The same 100 probes in every arm: a claim whose every check passes holds only if each paired difference
    is significant (exact sign test); 41 against 40 % is "within noise", whatever the point estimates say."""
    from glimpse.eval.report import sign_test
    from glimpse.train.repro import check_claims

    report = _made_up_repro(tmp_path, PAPER)
    caps = {arm: a["caps"] for arm, a in report["arms"].items()}

    def outcomes(right: range, turns: int) -> dict[str, list[int]]:
        return {f"p{i}#0": [int(i in right), turns] for i in range(100)}

    caps["full"][6]["outcomes"] = outcomes(range(33), 4)
    caps["full"][32]["outcomes"] = outcomes(range(43), 6)
    caps["no-mask"][32]["accuracy"] = 0.40
    caps["no-mask"][32]["outcomes"] = outcomes(range(3, 43), 5)  # full alone right on 3 probes, no-mask on none
    claims = {c["claim"]: c for c in check_claims(report)}
    masking = claims["over-turn masking"]
    assert masking["verdict"] == "holds in sign, within noise"
    assert masking["checks"][0]["p"] < 0.05 and masking["checks"][1]["p"] == sign_test(3, 0) == 0.25
    assert "paired on 100 probes, right only: full on 3, no-mask on 0" in masking["checks"][1]["paired"]
    assert masking["checks"][2]["p"] < 0.05  # no-mask took fewer turns on every probe
    caps["no-mask"][32]["outcomes"] = outcomes(range(20), 5)  # full alone right on 23: significant
    assert {c["claim"]: c["verdict"] for c in check_claims(report)}["over-turn masking"] == "holds"
    assert sign_test(23, 0) < 0.05 and sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0


def test_turn_scaling_report_tells_a_cap_that_never_bound_from_one_the_policy_learned_to_stay_inside(tmp_path):
    from glimpse.train.repro import _claims_lines

    report = _made_up_repro(tmp_path, PAPER)
    report["arms"]["no-mask"]["train"]["over_turn_first"] = 0.31  # cut often at first, then answered early
    lines = "\n".join(_claims_lines(report))
    assert "- no-mask: 31.0 % → 2.0 %: the policy learned to stay inside the cap" in lines
    assert "- full: 20.0 % → 20.0 %\n" in lines + "\n"
