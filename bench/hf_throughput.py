"""Throughput of the hf backend and of SFT on tiny random Qwen2.5-VL checkpoints (CPU by default).

Prints, each measured back to back in this process:

1. generation: 16 one-image conversations, sampled, 48 new tokens each, one request at a time vs batched
   (``max_batch`` 8): generated tokens/s and the ratio;
2. the prefix cache: building the prompt of a 4-image conversation when its first 3 images are known from the
   previous turn vs from scratch;
3. the KV cache across turns, on a random Qwen2.5-VL of size ``small`` (the decoder of the built-in model's
   ``base`` size) or the checkpoint given with ``--model`` (a trained built-in model: its pointer's state is
   kept with the key/values): the time of turn 16 against turn 1 of one conversation that gets a new 364x364
   view (169 Qwen tokens; about 90 region tokens of the built-in model) every turn, with and without reuse
   (``--repeats N``: the conversation N times from cold caches, each turn's median time); and
   the wall time of a greedy ``glimpse eval`` of hard probes at a 32-turn cap (originals shown at most 200,704
   pixels, or at the ``--model`` checkpoint's native limits), with and without reuse (the same batching; the
   probes made before either is timed), checking both runs wrote the same replies;
4. SFT: tokens/s (all tokens) and trained tokens/s, full fine-tuning with the vision tower frozen and LoRA, on
   cold-start trajectories of easy probes shown at the Mini-o3 pixel limits (40,000–2,000,000).

Usage: python bench/hf_throughput.py [--size tiny|small] [--device cpu|cuda] [--steps N]
       [--only generation,prefix,turns,eval,sft] [--probes 50] [--turns 32] [--reply-tokens 48] [--repeats 1]
       [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from glimpse.config import EvalConfig, SFTConfig
from glimpse.eval.datasets import load_dataset
from glimpse.eval.harness import RESULTS, run_eval
from glimpse.hf.tiny import build_tiny_qwen
from glimpse.models.base import GenerateParams, ImagePart, Message, TextPart
from glimpse.models.hf import HFBackend
from glimpse.train.coldstart import programmatic
from glimpse.train.sft import train
from glimpse.trajectory import load_jsonl

# The eval section's largest view: 256 tokens of a Qwen2.5-VL, so a 32-turn run fits a CPU.
SMALL_VIEW = 256 * 28 * 28


def _image(k: int, size: int = 364) -> Image.Image:
    """A view with things in it (a Qwen model's tokens depend on its size only; the built-in model proposes
    regions on what it shows: about 90 here, 8 on a flat colour)."""
    image = Image.new("RGB", (size, size), ((37 * k) % 256, (91 * k) % 256, (53 * k) % 256))
    draw, rng = ImageDraw.Draw(image), np.random.default_rng(k)
    for _ in range(10):
        x, y = (int(v) for v in rng.integers(0, size * 5 // 6, 2))
        w, h = int(rng.integers(12, 60)), int(rng.integers(8, 40))
        draw.rectangle((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw.text((20, 20), f"VIEW {k}", fill=(0, 0, 0))
    return image


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
        backend._prefixes[(text + reply, tuple(prefix.digests))] = type(prefix)(
            prefix.ids + ids, prefix.pixels, prefix.grids, prefix.digests
        )
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


def turn_growth(folder: Path, device: str, turns: int = 16, reply_tokens: int = 48, repeats: int = 1) -> None:
    """Turn 16 against turn 1 of one conversation that gets a new view every turn (seeded sampling). The two
    backends answer each turn back to back, in alternating order, so a changing load hits both alike; with
    ``repeats``, the conversation is run again from cold caches and each turn's median time is reported."""
    backends = {gb: HFBackend(str(folder), device=device, kv_cache_gb=gb) for gb in (4.0, 0.0)}
    system = Message("system", "Answer.")
    warm = [system, Message("user", [ImagePart(image=_image(98, 364)), TextPart("Hi?")])]
    for backend in backends.values():  # warm-up, in a conversation of its own
        asyncio.run(backend.generate(warm, GenerateParams(max_new_tokens=4)))
    runs: dict[float, list[list[float]]] = {gb: [] for gb in backends}
    cpu_runs: dict[float, list[list[float]]] = {gb: [] for gb in backends}
    for _ in range(repeats):
        for backend in backends.values():
            backend._prefixes.clear()
            if backend.kv_cache:
                backend.kv_cache.clear()
        messages = [system, Message("user", [ImagePart(image=_image(99, 364)), TextPart("Q?")])]
        times: dict[float, list[float]] = {gb: [] for gb in backends}
        cpu_times: dict[float, list[float]] = {gb: [] for gb in backends}  # this process's: less swayed by others
        sampled, same = [], True
        for t in range(turns):
            params = GenerateParams(max_new_tokens=reply_tokens, temperature=1.0, seed=t)
            replies = {}
            for gb in sorted(backends, reverse=bool(t % 2)):
                started, cpu = time.perf_counter(), time.process_time()
                (replies[gb],) = asyncio.run(backends[gb].generate(messages, params))
                times[gb].append(time.perf_counter() - started)
                cpu_times[gb].append(time.process_time() - cpu)
            same = same and replies[4.0].token_ids == replies[0.0].token_ids
            sampled.append(len(replies[4.0].token_ids or []))
            messages.append(Message("assistant", replies[4.0].text))
            messages.append(Message("user", [TextPart(f"Observation {t + 1}:"), ImagePart(image=_image(t, 364))]))
        for gb in backends:
            runs[gb].append(times[gb])
            cpu_runs[gb].append(cpu_times[gb])
    for gb, label in ((4.0, "with the KV cache"), (0.0, "recomputed every turn")):
        median = [statistics.median(run[t] for run in runs[gb]) for t in range(turns)]
        cpu = [statistics.median(run[t] for run in cpu_runs[gb]) for t in range(turns)]
        a, b = median[0], median[-1]
        every = ", ".join(f"{1000 * x:.0f}" for x in median)
        print(
            f"turn {turns} vs turn 1 of one conversation ({label}): {1000 * b:.0f} ms vs {1000 * a:.0f} ms = "
            f"{b / a:.2f}x (CPU time {1000 * cpu[-1]:.0f} ms vs {1000 * cpu[0]:.0f} ms = {cpu[-1] / cpu[0]:.2f}x); "
            f"all {turns} turns {sum(median):.1f} s (ms per turn, median of {repeats}: {every})",
            flush=True,
        )
    print(
        f"  prompt of turn {turns}: {replies[4.0].prompt_tokens} tokens; tokens sampled per turn (at most "
        f"{reply_tokens}): {', '.join(map(str, sampled))}; every turn's tokens the same both ways: {same}",
        flush=True,
    )


def eval_wall(
    folder: Path, device: str, probes: int, turns: int, reply_tokens: int, work: Path, view: int | None
) -> None:
    """A greedy 32-turn eval of hard probes with and without reuse: wall time, and the same replies. ``view``:
    the largest area an original is shown at (None: the checkpoint's native limits)."""
    seconds, replies = {}, {}
    load_dataset(f"probes:hard:{probes}")  # the probes are drawn once, before either run is timed
    for gb in (4.0, 0.0):
        backend = HFBackend(str(folder), device=device, kv_cache_gb=gb)
        out = work / f"eval-{gb}"
        cfg = EvalConfig(
            data=f"probes:hard:{probes}",
            model=f"hf:{folder.name}",
            out=str(out),
            fresh=True,
            max_turns=str(turns),
            temperature=0.0,
            max_new_tokens=reply_tokens,
            max_pixels=view,
        )
        started = time.perf_counter()
        run = asyncio.run(run_eval(cfg, backend=backend))
        seconds[gb] = time.perf_counter() - started
        trajectories = sorted(load_jsonl(run.out / RESULTS), key=lambda t: t.id)
        replies[gb] = [[turn.text for turn in t.turns] for t in trajectories]
        n_turns = sum(len(t.turns) for t in trajectories)
        stats = dict(backend.kv_cache.stats) if backend.kv_cache else {}
        print(
            f"eval of {probes} hard probes at a {turns}-turn cap, greedy, {'with' if gb else 'without'} the KV "
            f"cache: {seconds[gb]:.1f} s ({n_turns} turns; batches {dict(backend.batch_sizes)}) {stats}",
            flush=True,
        )
    same = replies[0.0] == replies[4.0]
    print(f"  without / with: {seconds[0.0] / seconds[4.0]:.2f}x; the same replies: {same}")


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
    parser.add_argument("--only", default="generation,prefix,turns,eval,sft", help="comma-separated sections")
    parser.add_argument("--probes", type=int, default=50, help="hard probes in the eval section")
    parser.add_argument("--turns", type=int, default=32, help="turn cap in the eval section")
    parser.add_argument("--reply-tokens", type=int, default=48, help="most tokens per reply in the KV sections")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the turns section (medians reported)")
    parser.add_argument("--model", help="checkpoint folder for the KV sections (default: a random Qwen2.5-VL small)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = build_tiny_qwen(work / "model", size=args.size)
        print(f"model: random Qwen2.5-VL, size {args.size}, device {args.device}")
        if "generation" in only:
            generation(folder, args.device)
        if "prefix" in only:
            prefix_cache(folder, args.device)
        if only & {"turns", "eval"}:
            if args.model:
                kv_model, view = Path(args.model), None
                print(f"model: {args.model}, device {args.device}")
            else:
                kv_model, view = build_tiny_qwen(work / "small", size="small"), SMALL_VIEW
                print(f"model: random Qwen2.5-VL, size small, device {args.device}")
            if "turns" in only:
                turn_growth(kv_model, args.device, reply_tokens=args.reply_tokens, repeats=args.repeats)
            if "eval" in only:
                eval_wall(kv_model, args.device, args.probes, args.turns, args.reply_tokens, work, view)
        if "sft" in only:
            sft(folder, args.device, args.steps, work)


if __name__ == "__main__":
    main()
