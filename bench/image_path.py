"""Time one zoom turn on a 7680×4320 original: crop, resize to the pixel limits, encode for the request.

Compares, in the same run, the runtime's path (the decoded original comes from the bounded ``ImageCache``)
with re-opening and decoding the original from disk on every turn. Prints both medians and their ratio.

    python bench/image_path.py [--turns 30] [--format jpeg]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from glimpse.images import ImageCache, PixelLimits, data_url, fit, read_image


def make_original(path: Path) -> None:
    """A 7680×4320 photo-like JPEG: smooth gradients plus noise, so it neither compresses nor decodes trivially."""
    rng = np.random.default_rng(0)
    h, w = 4320, 7680
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    base = np.stack([x * 200 + 30 * np.sin(y * 40), y * 180 + 40 * np.cos(x * 30), (x + y) * 100], axis=-1)
    noise = rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def one_turn(image: Image.Image, box: tuple[int, int, int, int], limits: PixelLimits, fmt: str) -> int:
    return len(data_url(fit(image, limits, box), fmt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=30, help="zoom turns timed per variant")
    parser.add_argument("--format", default="jpeg", choices=("jpeg", "png"))
    args = parser.parse_args()

    limits = PixelLimits()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "original.jpg"
        make_original(path)
        boxes = []
        for _ in range(args.turns):
            w, h = rng.randint(400, 3000), rng.randint(300, 2000)
            x, y = rng.randint(0, 7680 - w), rng.randint(0, 4320 - h)
            boxes.append((x, y, x + w, y + h))
        cache = ImageCache()
        cache.get(path)  # the first turn of a trajectory decodes once; every later turn reuses it
        cached, fresh = [], []
        for box in boxes:  # interleaved, so both variants see the same machine load
            t = time.perf_counter()
            one_turn(cache.get(path).image, box, limits, args.format)
            cached.append(time.perf_counter() - t)
            t = time.perf_counter()
            one_turn(read_image(path).image, box, limits, args.format)
            fresh.append(time.perf_counter() - t)

    c, f = statistics.median(cached), statistics.median(fresh)
    print(f"zoom turn on a 7680×4320 JPEG ({args.turns} turns, crops of 400–3000 px, {args.format} encoding)")
    print(f"  cached original (glimpse):  median {c * 1000:7.1f} ms")
    print(f"  re-decode every turn:       median {f * 1000:7.1f} ms")
    print(f"  ratio re-decode / cached:   {f / c:.1f}×")


if __name__ == "__main__":
    main()
