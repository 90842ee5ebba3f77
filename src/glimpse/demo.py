"""The offline demo: a generated 4K scene with a code too small to read in the downscaled view, and a
scripted model that searches for it.

This demo exercises the whole runtime (loading, resizing, nested zooms cut from full-resolution pixels, a
model mistake turned into an error observation, the trajectory record) with no server and no download. The
model's turns are written in advance by ``make_demo`` from the scene's known geometry: it is a replay, not a
model that learned anything.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from glimpse.images import MAX_PIXELS, PixelLimits, smart_resize

WIDTH, HEIGHT = 3840, 2160
# The code's text height in original pixels; at the default 2 MP limit the full view shows it at about
# half that, 6 pixels: not legible without zooming.
TEXT_PX = 12


@dataclass
class Demo:
    """Files and facts of a generated demo."""

    image: Path
    script: Path
    question: str
    answer: str
    target_box: list[int]


def _scene(rng: random.Random, code: str) -> tuple[Image.Image, list[int]]:
    img = Image.linear_gradient("L").resize((WIDTH, HEIGHT)).convert("RGB")
    img = Image.blend(img, Image.new("RGB", img.size, (70, 110, 90)), 0.75)
    draw = ImageDraw.Draw(img)
    palette = [(200, 60, 50), (60, 90, 200), (230, 230, 230), (40, 40, 40), (150, 90, 160), (80, 170, 80)]
    for _ in range(140):
        x, y = rng.randrange(WIDTH - 200), rng.randrange(HEIGHT - 200)
        w, h = rng.randrange(30, 200), rng.randrange(30, 200)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x, y, x + w, y + h), fill=rng.choice(palette))
    font = ImageFont.load_default(size=TEXT_PX)
    for _ in range(25):  # look-alike signs in other colours, with other codes
        x, y = rng.randrange(WIDTH - 100), rng.randrange(HEIGHT - 60)
        draw.rectangle((x, y, x + 64, y + 28), fill=(240, 240, 240), outline=(30, 30, 30))
        other = "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(4))
        draw.text((x + 8, y + 6), other, fill=(30, 30, 30), font=font)
    x, y = int(WIDTH * 0.781), int(HEIGHT * 0.744)
    draw.rectangle((x, y, x + 64, y + 28), fill=(250, 215, 40), outline=(30, 30, 30))
    draw.text((x + 8, y + 6), code, fill=(20, 20, 20), font=font)
    return img, [x, y, x + 65, y + 29]


def _turns(target: list[int], code: str) -> list[str]:
    x0, y0, x1, y1 = target
    cx, cy = (x0 + x1) / 2 / WIDTH, (y0 + y1) / 2 / HEIGHT
    # A first window of a fifth of each side around where the yellow speck is, then the sign within it.
    win = [round(cx - 0.1, 3), round(cy - 0.1, 3), round(cx + 0.1, 3), round(cy + 0.1, 3)]
    wx0, wy0 = win[0] * WIDTH, win[1] * HEIGHT
    ww, wh = 0.2 * WIDTH, 0.2 * HEIGHT
    sign = [
        round((x0 - 20 - wx0) / ww, 3),
        round((y0 - 12 - wy0) / wh, 3),
        round((x1 + 20 - wx0) / ww, 3),
        round((y1 + 12 - wy0) / wh, 3),
    ]
    call = '<grounding>{{"bbox_2d": {box}, "source": "{src}"}}</grounding>'
    return [
        "<think>I need the code on the small yellow sign. In the full view there is a yellow speck in the "
        "lower right, but it is only a few pixels across and I cannot read anything on it. I will zoom into "
        "that area first.</think>\n" + call.format(box=json.dumps(win), src="original_image"),
        "<think>The yellow sign is in the middle of this view. I can make out four dark characters, but they "
        "are small and I am not sure of them. I will zoom closer into observation 1.</think>\n"
        + call.format(box=json.dumps([sign[0], sign[1], sign[2] + 1.0, sign[3]]), src="observation_1"),
        "<think>That box went past the right edge of the image; relative coordinates stop at 1. Zooming into "
        "just the sign instead.</think>\n" + call.format(box=json.dumps(sign), src="observation_1"),
        f"<think>The sign fills this view and its characters are clear: {' '.join(code)}.</think>\n"
        f"<answer>{code}</answer>",
    ]


@dataclass
class ProbeDemo:
    """A generated probe for the live demo."""

    image: Path
    question: str
    answer: str
    size: tuple[int, int]
    candidates: int
    shown_px: float
    ocr: bool


def make_probe_demo(out_dir: str | Path) -> ProbeDemo:
    """Write the live demo's probe: a medium probe (look-alike candidates) asking for a code, or, where
    Tesseract is missing, for a count of dots. A fixed probe, so the demo is the same on every machine."""
    from glimpse.probes.expert import tesseract_available
    from glimpse.probes.synth import make_probe

    ocr = tesseract_available()
    probe = make_probe("medium", 0 if ocr else 1, seed=2026, kind="read_code" if ocr else "count")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scene.jpg"
    probe.image.save(path, quality=92)
    rec = probe.record
    return ProbeDemo(
        image=path,
        question=rec["problem"].replace("<image>", "").strip(),
        answer=rec["solution"],
        size=tuple(rec["size"]),  # type: ignore[arg-type]
        candidates=len(rec["candidates"]),
        shown_px=rec["shown_cap_px"],
        ocr=ocr,
    )


def make_demo(out_dir: str | Path, seed: int = 7) -> Demo:
    """Write ``scene.png`` and ``script.json`` into ``out_dir`` and describe them."""
    rng = random.Random(seed)
    code = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) + str(rng.randrange(10, 100))
    image, target = _scene(rng, code)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path, script_path = out / "scene.png", out / "script.json"
    image.save(image_path, optimize=False, compress_level=3)
    script_path.write_text(json.dumps(_turns(target, code), indent=2) + "\n", encoding="utf-8")
    return Demo(image_path, script_path, "What is the code on the small yellow sign?", code, target)


def shown_text_height(limits: PixelLimits | None = None) -> float:
    """Height in pixels of the demo's code in the downscaled full view."""
    limits = limits or PixelLimits(max_pixels=MAX_PIXELS)
    w, _ = smart_resize(WIDTH, HEIGHT, limits)
    return TEXT_PX * w / WIDTH
