"""Cold-start data and SFT on a tiny random Qwen2.5-VL: the teacher's trajectories, few-shot generation with
acceptance statistics, labels on the model's own turns only, a step that changes every trainable weight and
lowers the loss, LoRA that changes only adapters, resuming after a crash, and the command line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glimpse.agent import AgentLoop
from glimpse.config import SFTConfig
from glimpse.errors import ConfigError
from glimpse.eval.datasets import load_dataset
from glimpse.eval.policies import policy_backend
from glimpse.hf.processor import load_processor
from glimpse.images import PixelLimits, image_tokens
from glimpse.models.scripted import ScriptedBackend
from glimpse.train.coldstart import few_shot, programmatic, teacher_turns
from glimpse.train.common import IGNORE, assistant_labels, grid_tokens, image_runs
from glimpse.train.sft import TrajectoryData, train
from glimpse.trajectory import Sample, load_jsonl, save_jsonl

SMALL = PixelLimits(20_000, 120_000)


@pytest.fixture(scope="module")
def coldstart(tmp_path_factory) -> Path:
    """Teacher trajectories of a few easy probes, both protocols, shown small so training is quick."""
    root = tmp_path_factory.mktemp("coldstart")
    samples = load_dataset("probes:easy:4:5").samples
    for protocol in ("tags", "tools"):
        stats = asyncio.run(programmatic(samples, root / protocol, seed=1, protocol=protocol, limits=SMALL))
        assert stats.kept == stats.tried == 4
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_teacher_patterns_are_truthful_and_end_right():
    samples = load_dataset("probes:medium:6:2").samples
    import random

    for sample in samples:
        for pattern in ("search", "backtrack", "nested", "verify"):
            turns, used = teacher_turns(sample, random.Random(0), pattern=pattern)
            assert used in (pattern, f"{pattern}+verify") and turns[-1].endswith(f"<answer>{sample.answer}</answer>")
            # Before the first zoom the teacher has seen only the downscaled view: no detail is named.
            first = turns[0]
            assert sample.answer not in first.split("<grounding>")[0]


def test_programmatic_statistics_and_record(coldstart):
    stats = json.loads((coldstart / "tags" / "stats.json").read_text())
    assert stats["method"] == "programmatic" and stats["acceptance"] == 1.0 and sum(stats["patterns"].values()) == 4
    for traj in load_jsonl(coldstart / "tags" / "trajectories.jsonl"):
        assert traj.stop_reason == "answer" and traj.score.correct and traj.prompt
        assert traj.settings.max_pixels == SMALL.max_pixels


def test_few_shot_keeps_only_correct_trajectories(make_image, tmp_path):
    gold = {f"Question {i}?": str(10 + i) for i in range(4)}
    samples = [Sample(id=f"q{i}", images=[str(make_image(name=f"{i}.png"))], question=q, answer=a)
               for i, (q, a) in enumerate(gold.items())]  # fmt: skip
    prompts = []

    def policy(messages, params):
        prompts.append(messages[0].text())
        question = next(q for q in gold if q in messages[1].text())
        if len(messages) == 2:
            box = '{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"}'
            return f"<think>Too small.</think><grounding>{box}</grounding>"
        right = question in ("Question 0?", "Question 2?")
        return f"<think>I see it.</think><answer>{gold[question] if right else 'no idea'}</answer>"

    stats = asyncio.run(few_shot(ScriptedBackend(policy, name="teacher"), samples, tmp_path, attempts=2))
    assert (stats.tried, stats.kept) == (8, 4) and stats.reasons["wrong_answer"] == 4
    kept = load_jsonl(tmp_path / "trajectories.jsonl")
    assert {t.sample.id for t in kept} == {"q0", "q2"} and all(len(t.turns) == 2 for t in kept)
    assert "Example 1" in prompts[0]  # the exemplars were in the system prompt
    assert json.loads((tmp_path / "stats.json").read_text())["acceptance"] == 0.5


def test_assistant_labels_mask_everything_but_replies():
    header, end = [1, 2], 9
    ids = [5, 1, 2, 7, 7, 9, 3, 1, 2, 8, 9, 4]
    assert assistant_labels(ids, header, end) == [IGNORE] * 3 + [7, 7, 9] + [IGNORE] * 3 + [8, 9, IGNORE]


@pytest.mark.parametrize("protocol", ["tags", "tools"])
def test_labels_are_exactly_the_replies(coldstart, tiny_qwen, protocol):
    processor = load_processor(tiny_qwen)
    data = TrajectoryData(coldstart / protocol, processor, max_length=100_000)
    for i, traj in enumerate(data.trajectories):
        example = data.example(i)
        spans, current = [], []
        for token, label in zip(example.input_ids, example.labels, strict=True):
            if label != IGNORE:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        assert not current or spans.append(current) is None
        decoded = [processor.tokenizer.decode(s) for s in spans]
        tool_text = [t.text + "".join(f"<tool_call>{{\"name\": \"{c['name']}\", \"arguments\": {c['arguments']}}}"
                                       "</tool_call>" for c in t.tool_calls or []) for t in traj.turns]  # fmt: skip
        assert decoded == [t + "<|im_end|>" for t in tool_text]
        # Image tokens are never trained.
        image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert all(lab == IGNORE for tok, lab in zip(example.input_ids, example.labels, strict=True) if tok == image_id)


def _cfg(tiny_qwen, data, out, **kw) -> SFTConfig:
    base = dict(model=str(tiny_qwen), data=str(data), out=str(out), lr=2e-3, batch_size=1, grad_accum=1,
                warmup_ratio=0.0, schedule="constant", save_every=0, device="cpu")  # fmt: skip
    return SFTConfig(**{**base, **kw})


def _one_trajectory(coldstart: Path, tmp_path: Path) -> Path:
    line = (coldstart / "tags" / "trajectories.jsonl").read_text().splitlines()[0]
    path = tmp_path / "one.jsonl"
    path.write_text(line + "\n")
    return path


def test_full_step_changes_every_trainable_weight_and_lowers_the_loss(coldstart, tiny_qwen, tmp_path):
    data = _one_trajectory(coldstart, tmp_path)  # the same batch every step
    result = train(_cfg(tiny_qwen, data, tmp_path / "out", max_steps=4))
    assert result.steps == 4 and all(b < a for a, b in zip(result.losses, result.losses[1:], strict=False))
    before, after = _weights(tiny_qwen), _weights(tmp_path / "out" / "model")
    assert before.keys() == after.keys()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == (".visual." not in f".{name}"), name  # vision tower and projector frozen by default
    reloaded = load_processor(tmp_path / "out" / "model")
    assert reloaded.chat_template and json.loads((tmp_path / "out" / "result.json").read_text())["tokens_per_s"] > 0


def test_lora_changes_only_the_adapters(coldstart, tiny_qwen, tmp_path):
    data = _one_trajectory(coldstart, tmp_path)
    result = train(_cfg(tiny_qwen, data, tmp_path / "out", max_steps=2, lora=True, lora_r=4))
    assert result.trainable_params < result.total_params / 5
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    before, merged = _weights(tiny_qwen), _weights(tmp_path / "out" / "model")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, value in before.items():
        lora_target = "visual." not in name and name.endswith(tuple(f"{t}.weight" for t in targets))
        assert (not torch.equal(value, merged[name])) == lora_target, name


def test_a_crashed_run_resumes_to_the_same_weights(coldstart, tiny_qwen, tmp_path):
    data = coldstart / "tags"
    straight = train(_cfg(tiny_qwen, data, tmp_path / "straight", max_steps=4, batch_size=2, lr=1e-3))

    class Crash(Exception):
        pass

    def crash_at_3(entry):
        if entry.step == 3:
            raise Crash

    cfg = _cfg(tiny_qwen, data, tmp_path / "resumed", max_steps=4, batch_size=2, lr=1e-3, save_every=2)
    with pytest.raises(Crash):
        train(cfg, on_step=crash_at_3)
    resumed = train(cfg)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert straight.losses[2:] == pytest.approx(resumed.losses, rel=1e-5)
    a, b = _weights(tmp_path / "straight" / "model"), _weights(tmp_path / "resumed" / "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError, match="different settings"):
        train(_cfg(tiny_qwen, data, tmp_path / "resumed", max_steps=4, batch_size=2, lr=5e-4, save_every=2))


@pytest.fixture(scope="module")
def two_image(tmp_path_factory) -> Path:
    """The oracle's trajectories of two-image probes (split_code: a zoom into each image), shown small."""
    samples = load_dataset("probes:easy:2:5:split_code").samples
    trajs = []
    for sample in samples:
        backend = policy_backend("oracle", sample, protocol="tags", coords="relative", limits=SMALL)
        loop = AgentLoop(backend, min_pixels=SMALL.min_pixels, max_pixels=SMALL.max_pixels)
        trajs += asyncio.run(loop.run(sample))
    assert all(t.stop_reason == "answer" and len(t.originals()) == 2 for t in trajs)
    assert [[t.original_index for t in traj.turns[:2]] for traj in trajs] == [[0, 1]] * 2
    path = tmp_path_factory.mktemp("two") / "trajectories.jsonl"
    save_jsonl(trajs, path)
    return path


def test_sft_on_two_image_trajectories(two_image, tiny_qwen, tmp_path):
    """Each image's tokens where its image is, in order (image_1, image_2, then the crops, each as long as its
    shown size implies), no label on them, and training on them moves the loss."""
    processor = load_processor(tiny_qwen)
    data = TrajectoryData(two_image, processor, max_length=100_000)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for i, traj in enumerate(data.trajectories):
        example = data.example(i)
        shown = [o.shown_size for o in traj.observations()]  # the originals, then the crops in order
        runs = image_runs(example.input_ids, image_id)
        assert [r.length for r in runs] == [image_tokens(*size, 28) for size in shown] and len(runs) == 4
        assert grid_tokens(example.image_grid_thw, 2) == [r.length for r in runs]
        assert all(example.labels[r.start + j] == IGNORE for r in runs for j in range(r.length))
        text = processor.tokenizer.decode(example.input_ids)
        assert text.index("image_1:") < text.index("image_2:") < text.index("<|im_start|>assistant")
    result = train(_cfg(tiny_qwen, two_image, tmp_path / "out", max_steps=3, batch_size=2))
    assert result.steps == 3 and result.losses[-1] < result.losses[0]


def test_the_teacher_refuses_two_image_probes_with_the_way_out(tmp_path):
    samples = load_dataset("probes:easy:1:5:which_image").samples
    with pytest.raises(ConfigError, match=r"several images.*--method fewshot"):
        asyncio.run(programmatic(samples, tmp_path, limits=SMALL))
    assert not (tmp_path / "trajectories.jsonl").exists()


def test_too_long_conversations_are_skipped_not_cut(coldstart, tiny_qwen, tmp_path):
    with pytest.raises(ConfigError, match="longer than max_length"):
        train(_cfg(tiny_qwen, coldstart / "tags", tmp_path / "out", max_steps=1, max_length=64))


def test_cli_coldstart_then_sft(tiny_qwen, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "glimpse", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=600, cwd=tmp_path)  # fmt: skip
    proc = run("coldstart", "--data", "probes:easy:3:9", "--out", "cs", "--max-pixels", "120000",
               "--min-pixels", "20000", "--export", "none")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kept 3 of 3" in proc.stdout and (tmp_path / "cs" / "trajectories.jsonl").exists()
    proc = run("train", "sft", "--model", str(tiny_qwen), "--data", "cs", "--out", "sft", "--max-steps", "2",
               "--lr", "1e-3", "--log-every", "1", "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stdout and "tokens/s" in proc.stdout and "hf:sft/model" in proc.stdout
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["max_steps"] == 2
    proc = run("train", "sft", "--model", str(tiny_qwen), "--out", "x")
    assert proc.returncode == 2 and "--data" in proc.stderr


def test_training_dtype_keeps_updates_full_fine_tuning_is_float32_and_half_precision_is_refused():
    from glimpse.train.common import resolve_dtype

    assert resolve_dtype("auto", "cuda", lora=False) == "float32"  # AdamW's small steps survive
    assert resolve_dtype("auto", "cuda", lora=True) == "bfloat16"  # the frozen base; peft keeps adapters in float32
    assert resolve_dtype("auto", "cpu", lora=True) == "float32"
    assert resolve_dtype("float16", "cuda", lora=True) == "float16"
    for half in ("bfloat16", "float16"):
        with pytest.raises(ConfigError, match="full fine-tuning"):
            resolve_dtype(half, "cuda", lora=False)
    # why: at a training learning rate, a bfloat16 weight does not move

    w = torch.nn.Parameter(torch.tensor([0.02, 0.01], dtype=torch.bfloat16))
    opt = torch.optim.AdamW([w], lr=1e-5, weight_decay=0.0)
    before = w.detach().clone()
    for _ in range(5):
        w.grad = torch.ones_like(w)
        opt.step()
    assert torch.equal(w.detach(), before)
