"""CPU cost of the verl plugin's agent loop per trajectory, against re-rendering the conversation each turn.

``GlimpseAgentLoop`` tokenizes each turn's new messages only (verl's Continuous Token builder), so a turn costs
the same however long the trajectory already is. The baseline, measured back to back in this process on the
same conversations, is what a loop that re-renders the whole conversation through the processor before every
request would spend on tokenization alone (it grows with every image already shown).

Prints, for trajectories of T turns (T-1 zooms into a 9-megapixel probe, then the answer; the server is a
stand-in that replies at once, so everything measured is the loop's own work: parsing, crops, resizes,
tokenization):

* the plugin: milliseconds per trajectory and per turn;
* the baseline: milliseconds of re-rendering per trajectory;
* their ratio.

Needs verl installed (``scripts/verl-test-requirements.txt``). Usage: python bench/verl_loop.py [--turns 6,12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


class StandIn:
    """verl's server manager, replying with scripted token ids at once."""

    def __init__(self, replies: list[list[int]]):
        self.replies, self.calls = replies, 0

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict, **_: Any) -> Any:
        from verl.workers.rollout.replica import TokenOutput

        self.calls += 1
        return TokenOutput(token_ids=self.replies[min(self.calls, len(self.replies)) - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", default="6,12", help="trajectory lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from glimpse.eval.datasets import load_dataset
    from glimpse.hf.processor import load_processor
    from glimpse.hf.tiny import build_tiny_qwen
    from glimpse.train.verl.data import row
    from glimpse.train.verl.loop import GlimpseAgentLoop
    from glimpse.trajectory import Trajectory

    folder = Path(tempfile.mkdtemp(prefix="glimpse-bench-verl-"))
    model = build_tiny_qwen(folder / "tiny")
    processor = load_processor(model)
    tok = processor.tokenizer
    sample = load_dataset("probes:easy:1:4").samples[0]
    data = row(sample, 0, "probes")
    kwargs = {**data, "raw_prompt": data["prompt"]}
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    boxes = [[0.05 * k, 0.05 * k, 0.05 * k + 0.3, 0.05 * k + 0.3] for k in range(1, 32)]

    for turns in [int(t) for t in args.turns.split(",")]:
        replies = [
            tok.encode(f'<think>look</think><grounding>{{"bbox_2d": {json.dumps(box)}}}</grounding>') + end
            for box in boxes[: turns - 1]
        ] + [tok.encode(f"<answer>{sample.answer}</answer>") + end]
        config = {"rollout": {"prompt_length": 8192, "response_length": 65536}, "model": {"path": str(model)}}

        async def one(config: dict, replies: list[list[int]], turns: int) -> Any:
            loop = GlimpseAgentLoop(
                trainer_config=DictConfigWrap(OmegaConf.create({"actor_rollout_ref": config})),
                server_manager=StandIn(replies),
                tokenizer=tok,
                processor=processor,
                dataset_cls=RLHFDataset,
                data_config=DictConfigWrap(OmegaConf.create({"mm_processor_kwargs": {}})),
                hf_model_type="qwen2_5_vl",
                coords="relative",
                max_turns=turns,
            )
            return await loop.run({"temperature": 1.0}, **kwargs)

        plugin, baseline = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            out = asyncio.run(one(config, replies, turns))
            plugin.append(time.perf_counter() - started)
            traj = Trajectory.model_validate_json(out.extra_fields["glimpse_trajectory"])
            assert len(traj.turns) == turns and traj.stop_reason == "answer", traj.stop_reason
            images = out.multi_modal_data["images"]
            started = time.perf_counter()
            chat = list(traj.prompt)
            for turn in traj.turns:  # the request before each turn, rendered from scratch
                shown = sum(1 for m in chat for p in m["content"] if isinstance(p, dict) and p["type"] == "image")
                hf = [
                    {
                        "role": m["role"],
                        "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]
                        if isinstance(m["content"], list)
                        else m["content"],
                    }
                    for m in chat
                ]
                text = processor.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
                processor(text=[text], images=images[:shown])
                chat += [{"role": "assistant", "content": turn.text}, *turn.injected]
            baseline.append(time.perf_counter() - started)
        p, b = statistics.median(plugin), statistics.median(baseline)
        print(
            f"{turns} turns ({turns - 1} zooms): plugin {p * 1e3:,.0f} ms a trajectory ({p / turns * 1e3:,.0f} ms a "
            f"turn, crops and all); re-rendering each request {b * 1e3:,.0f} ms; ratio {b / p:.2f}"
        )


if __name__ == "__main__":
    main()
