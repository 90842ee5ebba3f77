"""The verl plugin on CPU: ``GlimpseAgentLoop`` with a stand-in for verl's server manager, the tiny Qwen2.5-VL
checkpoint's real tokenizer and processor, and verl's own classes (agent-loop base, dataset, worker helpers).

verl pins an older transformers than Glimpse's hf extra, so it is not a dependency: ``scripts/test.sh`` installs
verl without its dependencies plus the few the agent loop imports. Without verl these tests are skipped, unless
``GLIMPSE_REQUIRE_VERL=1`` (set by CI) makes that a failure. The reward function and the converter need no verl.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from glimpse.images import image_tokens
from glimpse.trajectory import Sample, Trajectory


def _require_verl() -> None:
    try:
        import verl.experimental.agent_loop.agent_loop  # noqa: F401
    except ImportError as exc:
        if os.environ.get("GLIMPSE_REQUIRE_VERL") == "1":
            pytest.fail(f"GLIMPSE_REQUIRE_VERL=1 but verl cannot be imported ({exc}); see scripts/test.sh")
        pytest.skip(f"verl is not installed ({exc})")


CALL = '<grounding>{"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"}</grounding>'


class StandIn:
    """verl's server manager, replaying scripted replies; records every request."""

    def __init__(self, tokenizer: Any, replies: list[list[int]], logprobs: bool = True):
        self.tokenizer, self.replies, self.calls, self.logprobs = tokenizer, list(replies), [], logprobs

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict, **kw: Any):
        from verl.workers.rollout.replica import TokenOutput

        self.calls.append({"request_id": request_id, "prompt_ids": list(prompt_ids), "sampling": sampling_params, **kw})
        ids = self.replies[min(len(self.calls), len(self.replies)) - 1]
        ids = ids[: sampling_params["max_tokens"]]
        steps = {"min_global_steps": 7, "max_global_steps": 7 + len(self.calls)}  # as verl's client reports them
        return TokenOutput(
            token_ids=ids,
            log_probs=[-0.01 * (i + 1) for i in range(len(ids))] if self.logprobs else None,
            num_preempted=1,
            extra_fields=steps,
        )


@pytest.fixture(scope="module")
def processor(tiny_qwen: Path):
    from glimpse.hf.processor import load_processor

    return load_processor(tiny_qwen)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Sample:
    from glimpse.eval.datasets import load_minio3
    from glimpse.probes.synth import write_probes

    folder = tmp_path_factory.mktemp("probes")
    write_probes(folder, "easy", 2, seed=3)
    return load_minio3(folder / "val.json").samples[0]


def _encode(processor: Any, text: str, eos: bool = True) -> list[int]:
    tok = processor.tokenizer
    return tok.encode(text, add_special_tokens=False) + ([tok.convert_tokens_to_ids("<|im_end|>")] if eos else [])


def _loop(processor: Any, tiny_qwen: Path, server: StandIn, response_length: int = 8192, **options: Any):
    """The loop as verl's worker builds it: Hydra instantiates the packaged YAML entry with verl's arguments."""
    import hydra
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    entries = OmegaConf.load(Path(importlib.import_module("glimpse.train.verl").__file__).parent / "agent_loop.yaml")
    name = options.pop("agent", "glimpse")
    engine = options.pop("engine", "sglang")
    mm = options.pop("mm_processor_kwargs", {})  # the processor's pixel limits; the loop takes them too
    entry = next(e for e in entries if e.name == name)
    config = OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {"name": engine, "prompt_length": 4096, "response_length": response_length},
                "model": {"path": str(tiny_qwen)},
            }
        }
    )
    data = OmegaConf.create({"apply_chat_template_kwargs": {}, "mm_processor_kwargs": mm})
    return hydra.utils.instantiate(
        config={k: v for k, v in entry.items() if k != "name"},
        trainer_config=DictConfigWrap(config),
        server_manager=server,
        tokenizer=processor.tokenizer,
        processor=processor,
        hf_model_type="qwen2_5_vl",
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(data),
        tools=ToolListWrap([]),
        coords="relative",  # the stand-in's calls use relative boxes (Qwen2.5-VL's native ones are pixels)
        **options,
    )


def _run(processor: Any, tiny_qwen: Path, server: StandIn, row: dict, sampling: dict, **options: Any):
    """Build the loop inside the event loop, as verl's worker does (the base class keeps the running loop)."""

    async def go():
        return await _loop(processor, tiny_qwen, server, **options).run(sampling, **row)

    return asyncio.run(go())


def _row(sample: Sample, **options: Any) -> dict[str, Any]:
    """A row of ``glimpse train verl-data`` as verl's dataset hands it to the agent loop."""
    from glimpse.train.verl.data import row

    out = row(sample, 0, "probes", **options)
    out["raw_prompt"] = out["prompt"]
    return out


def _rerender(processor: Any, traj: Trajectory, images: list[Any], **limits: int) -> list[int]:
    """The whole conversation of a record rendered from scratch by the processor (no incremental tokens), with
    the pixel limits of the run (``min_pixels``, ``max_pixels``) when they are not the processor's."""
    chat = list(traj.prompt)
    for turn in traj.turns:
        chat.append({"role": "assistant", "content": turn.text})
        chat.extend(turn.injected)
    hf = []
    for m in chat:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image" else p for p in content]
        hf.append({"role": m["role"], "content": content})
    text = processor.apply_chat_template(hf, tokenize=False)
    size = {"size": {"shortest_edge": limits["min_pixels"], "longest_edge": limits["max_pixels"]}} if limits else {}
    return processor(text=[text], images=images, return_tensors="pt", **size)["input_ids"][0].tolist()


def test_zoom_then_answer_token_by_token(processor, tiny_qwen, sample):
    _require_verl()
    tok = processor.tokenizer
    # The first reply runs past its stop string without an end-of-turn token: the loop must cut it there.
    first = _encode(processor, f"<think>look closer</think>{CALL}", eos=False) + _encode(processor, " and more")
    kept = _encode(processor, f"<think>look closer</think>{CALL}", eos=False)
    second = _encode(processor, f"<think>found it</think><answer>{sample.answer}</answer>")
    server = StandIn(tok, [first, second])
    out = _run(processor, tiny_qwen, server, _row(sample), {"temperature": 1.0, "logprobs": True})

    traj = Trajectory.model_validate_json(out.extra_fields["glimpse_trajectory"])
    assert traj.stop_reason == "answer" and traj.answer == sample.answer and not traj.over_turn
    assert [t.kind for t in traj.turns] == ["zoom", "answer"]
    images = out.multi_modal_data["images"]
    assert [list(im.size) for im in images] == [traj.shown_size, traj.turns[0].observation_size]

    # ids: exactly the processor's rendering of the whole conversation from scratch
    full = out.prompt_ids + out.response_ids
    expected = _rerender(processor, traj, images)
    newline = tok.encode("\n", add_special_tokens=False)
    assert expected == full + newline  # the template ends the last reply with <|im_end|>\n
    # the prompt is the first request, and every request extends the last one with the reply it got
    assert server.calls[0]["prompt_ids"] == out.prompt_ids
    assert server.calls[1]["prompt_ids"][: len(out.prompt_ids) + len(kept)] == out.prompt_ids + kept
    assert [len(c["image_data"]) for c in server.calls] == [1, 2]
    assert server.calls[1]["image_data"][1] is images[1]
    stop_id = tok.convert_tokens_to_ids("</grounding>")
    assert stop_id in server.calls[0]["sampling"]["stop_token_ids"] and "stop" not in server.calls[0]["sampling"]
    assert server.calls[0]["request_id"] == server.calls[1]["request_id"]  # sticky session

    # mask: 1 on the sampled tokens (the cut first reply, the second reply), 0 on everything injected
    mask = out.response_mask
    assert len(mask) == len(out.response_ids)
    assert [t for t, m in zip(out.response_ids, mask, strict=True) if m] == kept + second
    assert mask[: len(kept)] == [1] * len(kept) and mask[-len(second) :] == [1] * len(second)
    injected = out.response_ids[len(kept) : -len(second)]
    assert set(mask[len(kept) : -len(second)]) == {0}
    assert injected[:2] == [tok.convert_tokens_to_ids("<|im_end|>"), *newline]  # the cut reply closed
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert injected.count(pad) == image_tokens(*images[1].size, 28)
    assert out.prompt_ids.count(pad) == image_tokens(*images[0].size, 28)
    assert tok.decode(injected, skip_special_tokens=True).startswith("\nuser\n")  # an observation user turn

    # logprobs: the server's on sampled tokens, 0 on injected ones
    lp = out.response_logprobs
    assert lp[: len(kept)] == pytest.approx([-0.01 * (i + 1) for i in range(len(kept))])
    assert lp[-len(second) :] == pytest.approx([-0.01 * (i + 1) for i in range(len(second))])
    assert set(lp[len(kept) : -len(second)]) == {0.0}

    # verl's training side runs the processor on these images for pixel values and grids: they must agree
    grids = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    assert (grids.prod(dim=1) // 4).tolist() == [image_tokens(*im.size, 28) for im in images]

    assert out.extra_fields["over_turn"] is False and out.extra_fields["zooms"] == 1
    assert out.num_turns == 4  # prompt, reply, observation, reply
    # what verl's client reports goes on, as its own loops pass it: the first call's, the last max_global_steps
    assert (out.extra_fields["min_global_steps"], out.extra_fields["max_global_steps"]) == (7, 9)
    assert out.metrics.num_preempted == 2


def test_function_calling_protocol(processor, tiny_qwen, sample):
    """The ``tools`` protocol: a Hermes call, a tool reply and a user turn with the crop, then the answer."""
    _require_verl()
    tok = processor.tokenizer
    call = {"name": "zoom_in", "arguments": {"bbox_2d": [0.1, 0.1, 0.5, 0.5], "source": "original_image"}}
    first = _encode(processor, f"Let me look.<tool_call>{json.dumps(call)}</tool_call>")
    second = _encode(processor, f"<answer>{sample.answer}</answer>")
    server = StandIn(tok, [first, second])
    out = _run(processor, tiny_qwen, server, _row(sample), {"temperature": 1.0}, protocol="tools")
    assert out.extra_fields["stop_reason"] == "answer" and out.extra_fields["zooms"] == 1
    assert [t for t, m in zip(out.response_ids, out.response_mask, strict=True) if m] == first + second
    injected = tok.decode(out.response_ids[len(first) : -len(second)], skip_special_tokens=True)
    assert "<tool_response>" in injected and "observation_1" in injected
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    images = out.multi_modal_data["images"]
    assert out.response_ids.count(pad) == image_tokens(*images[1].size, 28)
    assert server.calls[0]["prompt_ids"].count(tok.convert_tokens_to_ids("<tool_call>")) >= 1  # tools listed


def test_vllm_gets_the_stop_strings_and_missing_logprobs_fail(processor, tiny_qwen, sample):
    _require_verl()
    zoom = _encode(processor, f"<think>again</think>{CALL}", eos=False)
    answer = _encode(processor, f"<answer>{sample.answer}</answer>")
    server = StandIn(processor.tokenizer, [zoom, answer])
    out = _run(processor, tiny_qwen, server, _row(sample), {"temperature": 1.0}, engine="vllm")
    assert out.extra_fields["stop_reason"] == "answer"
    assert server.calls[0]["sampling"]["stop"] == ["</grounding>"]
    assert server.calls[0]["sampling"]["include_stop_str_in_output"] is True
    broken = StandIn(processor.tokenizer, [answer], logprobs=False)
    with pytest.raises(RuntimeError, match="no logprobs"):
        _run(processor, tiny_qwen, broken, _row(sample), {"temperature": 1.0, "logprobs": True})


def test_image_sources_other_than_inline_bytes(processor, tiny_qwen, sample):
    """Rows written with --image-paths, and a plain verl row with the image in its prompt."""
    _require_verl()
    from PIL import Image

    answer = _encode(processor, f"<answer>{sample.answer}</answer>")
    by_path = _row(sample, image_paths=True)
    assert by_path["extra_info"]["glimpse_images"] is None
    out = _run(processor, tiny_qwen, StandIn(processor.tokenizer, [answer]), by_path, {"temperature": 1.0})
    traj = Trajectory.model_validate_json(out.extra_fields["glimpse_trajectory"])
    assert traj.image.path == str(Path(sample.images[0]).resolve()) and traj.answer == sample.answer

    with Image.open(sample.images[0]) as im:
        pixels = im.convert("RGB")
    plain = {
        "raw_prompt": [
            {"role": "user", "content": [{"type": "image", "image": pixels}, {"type": "text", "text": "Q?"}]}
        ],
        "reward_model": {"ground_truth": "B"},
        "extra_info": {"index": 3},
        "index": 3,
    }
    out = _run(processor, tiny_qwen, StandIn(processor.tokenizer, [answer]), plain, {"temperature": 1.0})
    traj = Trajectory.model_validate_json(out.extra_fields["glimpse_trajectory"])
    assert (traj.sample.question, traj.sample.answer, traj.sample.id) == ("Q?", "B", "row-3")
    assert [traj.image.width, traj.image.height] == list(pixels.size)


def test_over_turn_masks_the_whole_response(processor, tiny_qwen, sample):
    _require_verl()
    zoom = _encode(processor, f"<think>again</think>{CALL}")
    for masked in (True, False):
        server = StandIn(processor.tokenizer, [zoom])
        sampling = {"temperature": 1.0, "logprobs": True}
        agent = "glimpse" if masked else "glimpse_no_mask"
        out = _run(processor, tiny_qwen, server, _row(sample), sampling, max_turns=3, agent=agent)
        assert out.extra_fields["over_turn"] is True and out.extra_fields["stop_reason"] == "max_turns"
        assert len(server.calls) == 3 and len(out.multi_modal_data["images"]) == 3  # the third zoom never ran
        ones = sum(out.response_mask)
        assert ones == (0 if masked else 3 * (len(zoom) - 1))  # each reply ends at </grounding>
        assert len(out.response_mask) == len(out.response_ids)


def test_observation_that_does_not_fit_stops_context_full(processor, tiny_qwen, sample):
    _require_verl()
    zoom = _encode(processor, f"<think>again</think>{CALL}", eos=False)
    server = StandIn(processor.tokenizer, [zoom])
    out = _run(processor, tiny_qwen, server, _row(sample), {"temperature": 1.0}, response_length=len(zoom) + 20)
    assert out.extra_fields["stop_reason"] == "context_full" and out.extra_fields["over_turn"] is True
    assert out.response_ids == zoom and out.response_mask == [0] * len(zoom)  # masked, observation left out
    assert out.response_logprobs is None and len(out.multi_modal_data["images"]) == 1


def test_parquet_rows_through_verl_dataset_loop_and_reward(processor, tiny_qwen, sample, tmp_path):
    _require_verl()
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from glimpse.train.verl import data
    from glimpse.train.verl.reward import compute_score

    path = tmp_path / "train.parquet"
    assert data.write([sample, sample], path, "probes") == 2
    config = {"max_prompt_length": 4096, "filter_overlong_prompts": True, "cache_dir": str(tmp_path)}
    config["filter_overlong_prompts_workers"] = 1
    dataset = RLHFDataset([str(path)], processor.tokenizer, OmegaConf.create(config), processor)
    assert len(dataset) == 2  # the text prompts pass verl's length filter
    row = dataset[1]
    assert row["extra_info"]["index"] == 1 and row["reward_model"]["ground_truth"] == sample.answer
    assert row["extra_info"]["glimpse_images"] == [Path(sample.images[0]).read_bytes()]

    for answer, reward in ((sample.answer, 1.0), ("not it", 0.0)):
        reply = _encode(processor, f"<answer>{answer}</answer>")
        fields = {k: v for k, v in row.items() if k != "dummy_tensor"}
        out = _run(processor, tiny_qwen, StandIn(processor.tokenizer, [reply]), fields, {"temperature": 1.0})
        traj = Trajectory.model_validate_json(out.extra_fields["glimpse_trajectory"])
        assert traj.sample.id == sample.id and traj.image.width == sample_width(sample)
        got = compute_score(
            data_source=row["data_source"],
            solution_str=processor.tokenizer.decode(out.response_ids, skip_special_tokens=True),
            ground_truth=row["reward_model"]["ground_truth"],
            extra_info={**row["extra_info"], **out.extra_fields},
        )
        assert got == {"score": reward, "acc": reward, "over_turn": False, "answered": True}


def sample_width(sample: Sample) -> int:
    from PIL import Image

    with Image.open(sample.images[0]) as im:
        return im.width


def test_reward_without_the_glimpse_loop(sample):
    from glimpse.train.verl.reward import compute_score

    info = {"index": 0, "glimpse_sample": sample.model_dump_json()}
    right = compute_score("glimpse/probes", f"<think>x</think><answer>{sample.answer}</answer>", sample.answer, info)
    assert right["score"] == 1.0 and right["answered"]
    none = compute_score("glimpse/probes", "no answer here", sample.answer, dict(info))
    assert none["score"] == 0.0 and not none["answered"]
    # a plain verl row: gold from ground_truth only
    assert compute_score("other", "<answer>B</answer>", "B", {})["score"] == 1.0


def test_converter_refuses_samples_it_cannot_reward(sample, tmp_path):
    from glimpse.errors import ConfigError
    from glimpse.train.verl import data

    with pytest.raises(ConfigError, match="no gold answer"):
        data.write([sample.model_copy(update={"answer": None})], tmp_path / "x.parquet", "probes")
    with pytest.raises(ConfigError, match="cannot read"):
        data.write([sample.model_copy(update={"images": [str(tmp_path / "gone.png")]})], tmp_path / "x.parquet", "p")
    with pytest.raises(ConfigError, match="no samples"):
        data.write([], tmp_path / "x.parquet", "probes")
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.parquet.tmp").exists()
    row = data.row(sample, 0, "probes")
    assert row["extra_info"]["glimpse_images"] == [Path(sample.images[0]).read_bytes()]
    assert Sample.model_validate_json(row["extra_info"]["glimpse_sample"]) == sample


@pytest.mark.parametrize("script", ["mini_o3_qwen25vl7b.sh", "single_node_lora.sh"])
def test_example_runs_compose_with_verls_config(script, tmp_path):
    """The example scripts, run by bash with a stand-in ``python`` that records what verl would get: every
    override names a real key of verl's trainer config, with a valid value."""
    _require_verl()
    import subprocess
    import sys

    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.import_utils import load_extern_object

    got = tmp_path / "argv.json"
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = glimpse.train.verl ]; then exec {sys.executable} -m glimpse.train.verl; fi\n'
        f'if [ "$2" = verl.trainer.main_ppo ]; then shift 2; exec {sys.executable} -c '
        f'\'import json, sys; json.dump(sys.argv[1:], open("{got}", "w"))\' "$@"; fi\n'
        "exit 99\n"
    )
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "MODEL": "/ckpt"}
    examples = Path(__file__).parents[1] / "examples" / "verl"
    subprocess.run(["bash", str(examples / script), "trainer.total_epochs=2"], env=env, check=True, timeout=60)
    overrides = json.loads(got.read_text())
    assert overrides[-1] == "trainer.total_epochs=2" and len(overrides) > 40  # extra overrides pass through
    plugin = Path(importlib.import_module("glimpse.train.verl").__file__).parent
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.multi_turn.enable and rollout.agent.default_agent_loop == "glimpse" and rollout.limit_images == 12
    assert Path(rollout.agent.agent_loop_config_path) == plugin / "agent_loop.yaml"
    actor = cfg.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.use_kl_loss) == (0.2, 0.3, False)
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.algorithm.filter_groups.enable
    assert not cfg.algorithm.use_kl_in_reward and actor.loss_agg_mode == "token-mean"
    if script.startswith("mini_o3"):  # the paper's numbers
        assert (rollout.n, cfg.data.train_batch_size, actor.ppo_mini_batch_size) == (16, 256, 32)
        assert actor.optim.lr == 1e-6 and cfg.trainer.nnodes == 8
    else:
        assert cfg.actor_rollout_ref.model.lora_rank == 64 and cfg.trainer.nnodes == 1
    reward = cfg.reward.custom_reward_function
    assert load_extern_object(reward.path, reward.name).__module__ == "glimpse.train.verl.reward"


def test_verl_data_from_the_command_line(tmp_path):
    import subprocess
    import sys

    import pyarrow.parquet as pq

    def glimpse(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "glimpse", *args], capture_output=True, text=True, timeout=120)

    out = tmp_path / "data" / "train.parquet"
    done = glimpse("train", "verl-data", "probes:easy:3:9", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote 3 rows of probes-easy" in done.stdout and "examples/verl/single_node_lora.sh" in done.stdout
    table = pq.read_table(out)
    assert table.num_rows == 3 and table.column("data_source")[0].as_py() == "glimpse/probes-easy"
    bad = glimpse("train", "verl-data", "nope:x", "--out", str(tmp_path / "x.parquet"))
    assert bad.returncode != 0 and "unknown dataset 'nope'" in bad.stderr and not (tmp_path / "x.parquet").exists()


# ------------------------------------------------------------------------------------------- several images
# The loop's and the processor's pixel limits (the same, as a run must set them): a few hundred image tokens
# per image, quick on CPU.
LIMITS = {"min_pixels": 20_000, "max_pixels": 120_000}
SMALL = {**LIMITS, "mm_processor_kwargs": LIMITS}


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> Sample:
    """A question about two images of different sizes (so a swap of their token runs would show)."""
    from conftest import gradient_image

    folder = tmp_path_factory.mktemp("two")
    gradient_image(900, 640).save(folder / "a.png")
    gradient_image(420, 700).transpose(0).save(folder / "b.png")
    return Sample(id="two", images=[str(folder / "a.png"), str(folder / "b.png")], question="Which?", answer="B")


@pytest.fixture(scope="module")
def model(tiny_qwen: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_qwen).eval()


def _zoom(source: str, box: str = "0.1, 0.1, 0.5, 0.5") -> str:
    return f'<think>closer</think><grounding>{{"bbox_2d": [{box}], "source": "{source}"}}</grounding>'


def _verl_trains(processor: Any, model: Any, prompt_ids: list[int], response_ids: list[int], images: list[Any]):
    """A loop's output as verl trains on it, run through the model: the ids, and the image features verl's worker
    makes from the image list (``_compute_multi_modal_inputs`` runs the processor on ``multi_modal_data`` with
    the run's ``mm_processor_kwargs``; the text it passes only carries placeholders). The features must land on
    the image tokens. Returns the image-token runs and the tokens each processed image takes."""
    from glimpse.train.common import grid_tokens, image_runs

    size = {"shortest_edge": LIMITS["min_pixels"], "longest_edge": LIMITS["max_pixels"]}
    inputs = processor.image_processor(images=images, size=size, return_tensors="pt")
    ids = torch.tensor([prompt_ids + response_ids])
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():  # Qwen2.5-VL raises when features and tokens differ in number
        model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=(ids == pad).long(),
        )
    return [r.length for r in image_runs(ids[0].tolist(), pad)], grid_tokens(inputs["image_grid_thw"], 2)


def test_two_images_zoom_into_the_second_then_its_crop(processor, tiny_qwen, two_images, model):
    _require_verl()
    tok = processor.tokenizer
    replies = [_zoom("image_2"), _zoom("observation_1", "0.2, 0.2, 0.9, 0.9"), "<answer>B</answer>"]
    server = StandIn(tok, [_encode(processor, r) for r in replies])
    out = _run(processor, tiny_qwen, server, _row(two_images), {"temperature": 1.0, "logprobs": True}, **SMALL)

    traj = Trajectory.model_validate_json(out.extra_fields["glimpse_trajectory"])
    assert traj.stop_reason == "answer" and [t.kind for t in traj.turns] == ["zoom", "zoom", "answer"]
    assert [t.original_index for t in traj.turns[:2]] == [1, 1]  # both crops cut from image_2
    images = out.multi_modal_data["images"]
    shown = [o.shown_size for o in traj.originals()] + [t.observation_size for t in traj.turns[:2]]
    assert [list(im.size) for im in images] == shown and shown[0] != shown[1]
    assert [len(c["image_data"]) for c in server.calls] == [2, 3, 4]

    # the prompt: each original's run of tokens after its name, in order; the whole: the processor's rendering
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    from glimpse.train.common import image_runs

    runs = image_runs(out.prompt_ids, pad)
    assert [r.length for r in runs] == [image_tokens(*s, 28) for s in shown[:2]]
    for k, run in enumerate(runs, 1):
        assert tok.decode(out.prompt_ids[: run.start]).endswith(f"image_{k}:\n<|vision_start|>")
    assert _rerender(processor, traj, images, **LIMITS) == out.prompt_ids + out.response_ids + tok.encode("\n")

    runs, features = _verl_trains(processor, model, out.prompt_ids, out.response_ids, images)
    assert runs == features == [image_tokens(*s, 28) for s in shown]


def test_context_full_with_several_images_keeps_images_and_tokens_in_step(processor, tiny_qwen, two_images, model):
    """The second crop does not fit: the trajectory stops context_full with the two originals and the first
    crop, and verl's training inputs built from the output line up."""
    _require_verl()
    tok = processor.tokenizer
    replies = [_encode(processor, r) for r in (_zoom("image_2"), _zoom("observation_1"), "<answer>B</answer>")]
    full = _run(processor, tiny_qwen, StandIn(tok, replies), _row(two_images), {}, **SMALL)
    assert full.extra_fields["stop_reason"] == "answer" and len(full.multi_modal_data["images"]) == 4
    length = len(full.response_ids) - len(replies[2]) - 5  # the second crop's observation is longer than 5 tokens
    out = _run(processor, tiny_qwen, StandIn(tok, replies), _row(two_images), {}, response_length=length, **SMALL)
    assert out.extra_fields["stop_reason"] == "context_full" and len(out.multi_modal_data["images"]) == 3
    assert out.response_ids == full.response_ids[: len(out.response_ids)]  # up to the second crop, left out
    assert len(out.response_ids) <= length and len(out.response_mask) == len(out.response_ids)
    runs, features = _verl_trains(processor, model, out.prompt_ids, out.response_ids, out.multi_modal_data["images"])
    assert runs == features and len(runs) == 3


def test_a_cut_never_splits_an_image_and_drops_the_images_after_it(processor, tiny_qwen, two_images, model):
    """``fit_response`` at every kind of cut (inside a crop's run, at its vision-start token, on a text token,
    past the end) of a response that holds two crops after a two-image prompt; a plain slice is the bug."""
    _require_verl()
    from glimpse.train.common import image_runs
    from glimpse.train.verl.loop import fit_response

    tok = processor.tokenizer
    replies = [_zoom("image_2"), _zoom("image_1"), "<answer>B</answer>"]
    out = _run(processor, tiny_qwen, StandIn(tok, [_encode(processor, r) for r in replies]), _row(two_images), {},
               **SMALL)  # fmt: skip
    ids, images = out.response_ids, out.multi_modal_data["images"]
    pad, start = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|vision_start|>")
    crop_1, crop_2 = image_runs(ids, pad)
    cuts = {
        crop_2.start + 3: 1,  # inside the second crop: it goes, with its vision-start token
        crop_1.start: 0,  # at the first crop's first image token
        crop_1.start - 1: 0,  # on its vision-start token
        crop_1.start + crop_1.length + 1: 1,  # just after it
        len(ids) + 10: 2,  # nothing to cut
    }
    for limit, crops in cuts.items():
        kept = fit_response(ids, out.response_mask, None, images, 2, limit, pad, start)
        assert len(kept.ids) <= limit and len(kept.mask) == len(kept.ids) and len(kept.images) == 2 + crops
        assert not kept.ids or kept.ids[-1] != start  # no image opened and left empty
        runs, features = _verl_trains(processor, model, out.prompt_ids, kept.ids, kept.images)
        assert runs == features and len(runs) == 2 + crops
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        _verl_trains(processor, model, out.prompt_ids, ids[: crop_2.start + 3], images)  # what a plain slice gives


def test_multi_image_rows_through_verl_dataset(processor, tiny_qwen, two_images, tmp_path):
    _require_verl()
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from glimpse.train.verl import data

    # rows as a node without the image files gets them: the bytes in the row are all there is
    away = tmp_path / "gone"
    away.mkdir()
    copies = [shutil.copy(p, away / f"{k}.png") for k, p in enumerate(two_images.images)]
    path = tmp_path / "train.parquet"
    assert data.write([two_images.model_copy(update={"images": copies})], path, "two") == 1
    shutil.rmtree(away)
    config = {"max_prompt_length": 4096, "cache_dir": str(tmp_path), "filter_overlong_prompts_workers": 1}
    row = RLHFDataset([str(path)], processor.tokenizer, OmegaConf.create(config), processor)[0]
    assert row["extra_info"]["glimpse_images"] == [Path(p).read_bytes() for p in two_images.images]
    fields = {k: v for k, v in row.items() if k != "dummy_tensor"}
    answer = _encode(processor, "<answer>B</answer>")
    for source in (fields, _row(two_images, image_paths=True)):
        out = _run(processor, tiny_qwen, StandIn(processor.tokenizer, [answer]), source, {}, **SMALL)
        traj = Trajectory.model_validate_json(out.extra_fields["glimpse_trajectory"])
        assert [o.sha256 for o in traj.originals()] == [_sha(p) for p in two_images.images]
        assert len(out.multi_modal_data["images"]) == 2 and traj.answer == "B"
    # a plain verl row with two images in its prompt
    from PIL import Image

    pixels = [Image.open(p).convert("RGB") for p in two_images.images]
    blocks = [{"type": "image", "image": im} for im in pixels] + [{"type": "text", "text": "Which?"}]
    plain = {"raw_prompt": [{"role": "user", "content": blocks}], "reward_model": {"ground_truth": "B"}, "index": 1}
    out = _run(processor, tiny_qwen, StandIn(processor.tokenizer, [answer]), plain, {}, **SMALL)
    traj = Trajectory.model_validate_json(out.extra_fields["glimpse_trajectory"])
    assert [[o.width, o.height] for o in traj.originals()] == [list(im.size) for im in pixels]


def _sha(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
