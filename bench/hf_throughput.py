"""Throughput of the hf backend and of SFT on tiny random Qwen2.5-VL checkpoints (CPU by default).

Prints, each measured back to back in this process:

1. generation: 16 one-image conversations, sampled, 48 new tokens each, one request at a time vs batched
   (``max_batch`` 8): generated tokens/s and the ratio;
2. the prefix cache: building the prompt of a 4-image conversation when its first 3 images are known from the
   previous turn vs from scratch;
3. SFT: tokens/s (all tokens) and trained tokens/s, full fine-tuning with the vision tower frozen and LoRA, on
   cold-start trajectories of easy probes shown at the Mini-o3 pixel limits (40,000–2,000,000).

Usage: python bench/hf_throughput.py [--size tiny|small] [--device cpu|cuda] [--steps N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from glimpse.config import SFTConfig
from glimpse.eval.datasets import load_dataset
from glimpse.hf.tiny import build_tiny_qwen
from glimpse.models.base import GenerateParams, ImagePart, Message, TextPart
from glimpse.models.hf import HFBackend
from glimpse.train.coldstart import programmatic
from glimpse.train.sft import train


def _image(k: int, size: int = 364) -> Image.Image:
    return Image.new("RGB", (size, size), ((37 * k) % 256, (91 * k) % 256, (53 * k) % 256))


def generation(folder: Path, device: str) -> None:
    conversations = [
        [Message("system", "You answer."), Message("user", [ImagePart(image=_image(k)), TextPart(f"Question {k}?")])]
        for k in range(16)
    ]
    results = {}
    for max_batch in (1, 8):
        backend = HFBackend(str(folder), device=device, max_batch=max_batch)
        params = GenerateParams(max_new_tokens=48, temperature=1.0, top_p=1.0)

        async def run_all(b: HFBackend = backend, p: GenerateParams = params) -> list:
            return await asyncio.gather(*(b.generate(c, p) for c in conversations))

        asyncio.run(run_all())  # warm-up
        started = time.perf_counter()
        out = asyncio.run(run_all())
        seconds = time.perf_counter() - started
        tokens = sum(c[0].completion_tokens for c in out)
        results[max_batch] = tokens / seconds
        print(
            f"generation, max_batch {max_batch}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s "
            f"(batches: {dict(backend.batch_sizes)})"
        )
    print(f"  batched / one at a time: {results[8] / results[1]:.2f}x")


def prefix_cache(folder: Path, device: str) -> None:
    backend = HFBackend(str(folder), device=device)
    messages = [Message("system", "You answer."), Message("user", [ImagePart(image=_image(0, 812)), TextPart("Q?")])]
    for k in range(1, 4):
        messages.append(Message("assistant", f"<think>look {k}</think>"))
        messages.append(Message("user", [TextPart(f"Observation {k}:"), ImagePart(image=_image(k, 812))]))
    shorter = messages[:-2]
    reuse, scratch = [], []
    for _ in range(5):
        backend._prefixes.clear()
        text, prefix = backend._prompt(shorter, None)
        reply = messages[-2].content
        ids = backend.tokenizer.encode(reply, add_special_tokens=False)
        backend._prefixes[text + reply] = type(prefix)(ids=prefix.ids + ids, pixels=prefix.pixels, grids=prefix.grids)
        t0 = time.perf_counter()
        backend._prompt(messages, None)
        reuse.append(time.perf_counter() - t0)
        backend._prefixes.clear()
        t0 = time.perf_counter()
        backend._prompt(messages, None)
        scratch.append(time.perf_counter() - t0)
    a, b = statistics.median(reuse), statistics.median(scratch)
    print(
        f"prompt of a 4-image conversation (812x812 each): {1000 * a:.1f} ms with the prefix cache, "
        f"{1000 * b:.1f} ms from scratch: {b / a:.1f}x"
    )


def sft(folder: Path, device: str, steps: int, work: Path) -> None:
    samples = load_dataset("probes:easy:8:11").samples
    asyncio.run(programmatic(samples, work / "cs", seed=0))
    for name, extra in (("full (vision frozen)", {}), ("LoRA r=16", {"lora": True, "lr": 1e-4})):
        cfg = SFTConfig(
            model=str(folder),
            data=str(work / "cs"),
            out=str(work / name.split()[0]),
            max_steps=steps,
            batch_size=1,
            grad_accum=2,
            save_every=0,
            device=device,
            fresh=True,
            **extra,
        )
        r = train(cfg).as_dict()
        print(
            f"SFT {name}: {r['steps']} steps, {r['tokens']:,} tokens in {r['seconds']:.1f} s = "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['trained_tokens_per_s']:,.0f} trained tokens/s; "
            f"{r['trainable_params']:,} of {r['total_params']:,} parameters trained"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = build_tiny_qwen(work / "model", size=args.size)
        print(f"model: random Qwen2.5-VL, size {args.size}, device {args.device}")
        generation(folder, args.device)
        prefix_cache(folder, args.device)
        sft(folder, args.device, args.steps, work)


if __name__ == "__main__":
    main()
