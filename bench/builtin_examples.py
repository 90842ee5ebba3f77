"""Training examples per second for the built-in model: whole scenes drawn and written as files (the first
trainer) against only the views a trajectory shows drawn (``Scene.view``), one process, per level.

Each example is a probe (or a reading card), the teacher's script run through the real agent loop, and SFT's
encoding; the figures are for one core, so a trainer with N generator processes makes about N times as many.

    python bench/builtin_examples.py [--n 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from glimpse.builtin.model import build_builtin
from glimpse.builtin.train import ExampleMaker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="examples per level and path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_builtin(Path(tmp) / "model", size="tiny")
        for draw_views in (False, True):
            folder = Path(tmp) / f"scratch-{draw_views}"
            folder.mkdir()
            make = ExampleMaker(model, seed=0, folder=folder, draw_views=draw_views)
            name = "views only" if draw_views else "whole scene"
            for level in ("card", "easy", "medium", "hard"):
                make(level, 0)  # warm-up: fonts, tokenizer
                t0 = time.perf_counter()
                tokens = 0
                for i in range(1, args.n + 1):
                    ex, _ = make(level, 2_000_000 + i)
                    tokens += len(ex.input_ids) if ex is not None else 0
                dt = time.perf_counter() - t0
                print(
                    f"{name:12s} {level:7s} {args.n / dt:6.2f} examples/s  {1000 * dt / args.n:7.0f} ms each  "
                    f"{tokens / args.n:6.0f} tokens each",
                    flush=True,
                )


if __name__ == "__main__":
    main()
