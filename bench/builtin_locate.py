"""Can the built-in model's encoder find a probe's candidate signs in its first view, and at what resolution?

The built-in model's first zoom goes to a candidate sign (a sign with the border colour the question names). At
its native 147,456-pixel limit such a sign is about 5 × 3 pixels of the view. This measures the first move alone,
without the decoder: the built-in model's convolutional encoder (same stages, one vector per 32-pixel cell), a
learned vector for the named colour added to every cell, and a per-cell score, trained for a fixed time on first
views of fresh probes (drawn cheaply by ``synth.Scene``) to put its highest score on a cell holding a candidate.

It prints, on held-out probes, how often the best-scoring cell's zoom window (1/8 of the image on a side, the
built-in model's coarse zoom) holds a candidate's centre, against a uniformly random cell (chance). Run one
resolution per process (they are independent); e.g. on two cores:

    python bench/builtin_locate.py --pixels 147456 --minutes 25 &
    python bench/builtin_locate.py --pixels 589824 --minutes 25

Usage: python bench/builtin_locate.py [--pixels N] [--minutes M] [--level easy] [--eval 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import random
import time

import numpy as np
import torch
from torch import nn

from glimpse.builtin.model import ConvEncoder
from glimpse.images import PixelLimits, smart_resize
from glimpse.probes.synth import make_probe

CELL = 32
CHANNELS = [24, 48, 96, 160, 256]  # the built-in model's encoder stages


class Locator(nn.Module):
    def __init__(self, colours: int, hidden: int = 128):
        super().__init__()
        self.encoder = ConvEncoder(CHANNELS, hidden, max_grid=64)
        self.colour = nn.Embedding(colours, hidden)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, image: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        cells = self.encoder(image) + self.colour(colour)
        return self.head(cells).squeeze(-1)  # one score per cell, row-major


def example(level: str, seed: int, index: int, pixels: int, colours: dict[str, int]) -> dict:
    probe = make_probe(level, index, seed=seed, render=False)
    scene, record = probe.scene, probe.record
    w, h = smart_resize(scene.width, scene.height, PixelLimits(min(65536, pixels), pixels, CELL))
    view = scene.view((0, 0, scene.width, scene.height), (w, h))
    pixels_t = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1)
    cols, rows = w // CELL, h // CELL
    centres = [((b[0] + b[2]) / 2 / scene.width, (b[1] + b[3]) / 2 / scene.height) for b in record["candidate_boxes"]]
    hit = torch.zeros(rows * cols)
    for x, y in centres:
        hit[min(rows - 1, int(y * rows)) * cols + min(cols - 1, int(x * cols))] = 1.0
    border = record["candidates"][0]["border"]
    colour = colours.setdefault(border, len(colours))
    return {
        "image": pixels_t,
        "colour": torch.tensor(colour),
        "hit": hit,
        "rows": rows,
        "cols": cols,
        "centres": centres,
    }


def window_hit(cell: int, ex: dict) -> bool:
    """Whether a zoom window of 1/8 of the image on a side, centred on the cell, holds a candidate's centre."""
    r, c = divmod(cell, ex["cols"])
    cx, cy = (c + 0.5) / ex["cols"], (r + 0.5) / ex["rows"]
    return any(abs(x - cx) <= 1 / 16 and abs(y - cy) <= 1 / 16 for x, y in ex["centres"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixels", type=int, default=147456)
    parser.add_argument("--minutes", type=float, default=25)
    parser.add_argument("--level", default="easy")
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    colours: dict[str, int] = {}
    held_out = [example(args.level, 99, i, args.pixels, colours) for i in range(args.eval)]
    model = Locator(colours=16)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    started, seen, losses = time.time(), 0, []
    rng = random.Random(0)
    while time.time() - started < args.minutes * 60:
        for _ in range(args.accumulate):
            ex = example(args.level, 7, rng.randrange(10**9), args.pixels, colours)
            scores = model(ex["image"], ex["colour"])
            target = ex["hit"] / ex["hit"].sum()
            loss = -(target * torch.log_softmax(scores, dim=0)).sum() / args.accumulate
            loss.backward()
            losses.append(loss.item() * args.accumulate)
            seen += 1
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()
    hits = cell_hits = 0
    chance = 0.0
    with torch.no_grad():
        for ex in held_out:
            best = int(model(ex["image"], ex["colour"]).argmax())
            hits += window_hit(best, ex)
            cell_hits += bool(ex["hit"][best])
            n = ex["rows"] * ex["cols"]
            chance += sum(window_hit(c, ex) for c in range(n)) / n
    k = len(held_out)
    tail = losses[-500:]
    print(
        f"{args.pixels:,} px ({held_out[0]['cols']}x{held_out[0]['rows']} cells or so), {args.level}: {seen:,} "
        f"examples in {args.minutes:g} min; loss {sum(losses[:200]) / min(200, len(losses)):.2f} -> "
        f"{sum(tail) / len(tail):.2f}; held-out {k}: best cell's window holds a candidate {100 * hits / k:.1f} % "
        f"(chance {100 * chance / k:.1f} %), best cell holds one {100 * cell_hits / k:.1f} % "
        f"(log of cells {math.log(held_out[0]['rows'] * held_out[0]['cols']):.2f})"
    )


if __name__ == "__main__":
    main()
