"""The offline demos: generated probes (``glimpse.probes``) searched live by the expert, or by a replayed script.

``make_probe_demo`` writes the live demo's probe. ``make_demo`` writes the scripted tour of the runtime: an easy
probe whose code is too small to read in the downscaled view, and a model whose turns are written in advance from
the probe's known target box (a coarse zoom, a nested zoom that overshoots the edge and is answered with an error
observation, a nested zoom onto the sign, the answer). It is a replay, not a model that learned anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from glimpse.images import MAX_PIXELS, PixelLimits, smart_resize
from glimpse.protocol import make_protocol

# The scripted tour's probe: fixed, so the demo is the same on every machine.
TOUR_LEVEL, TOUR_SEED, TOUR_INDEX = "easy", 7, 0


@dataclass
class Demo:
    """Files and facts of a generated demo."""

    image: Path
    script: Path
    question: str
    answer: str
    target_box: list[int]
    size: tuple[int, int]
    text_px: float  # the code's cap height in original pixels


def _turns(target: list[int], width: int, height: int, code: str) -> list[str]:
    x0, y0, x1, y1 = target
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    # A first window of a fifth of each side around the sign (kept inside the image), then the sign within it.
    left, top = min(max(cx - 0.1, 0.0), 0.8), min(max(cy - 0.1, 0.0), 0.8)
    win = [round(left, 3), round(top, 3), round(left + 0.2, 3), round(top + 0.2, 3)]
    wx0, wy0 = win[0] * width, win[1] * height
    ww, wh = (win[2] - win[0]) * width, (win[3] - win[1]) * height
    pad_x, pad_y = (x1 - x0) / 3, (y1 - y0) / 3
    sign = [
        round(max(0.0, (x0 - pad_x - wx0) / ww), 3),
        round(max(0.0, (y0 - pad_y - wy0) / wh), 3),
        round(min(1.0, (x1 + pad_x - wx0) / ww), 3),
        round(min(1.0, (y1 + pad_y - wy0) / wh), 3),
    ]
    speaker = make_protocol("tags", "relative")
    replies = [
        speaker.write_zoom(
            win,
            "original_image",
            "I need the code on the small sign. In the full view I can see where it is, but it is only a few "
            "pixels across and I cannot read anything on it. I will zoom into that area first.",
        ),
        speaker.write_zoom(
            [sign[0], sign[1], sign[2] + 1.0, sign[3]],
            "observation_1",
            "The sign is in this view. I can make out dark characters, but they are small and I am not sure "
            "of them. I will zoom closer into observation 1.",
        ),
        speaker.write_zoom(
            sign,
            "observation_1",
            "That box went past the right edge of the image; relative coordinates stop at 1. Zooming into "
            "just the sign instead.",
        ),
        speaker.write_answer(code, f"The sign fills this view and its characters are clear: {' '.join(code)}."),
    ]
    return [r.text for r in replies]


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
    target_boxes: list[list[int]]  # the gold boxes, in original pixels, recorded with the gold answer


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
        target_boxes=[list(b) for b in rec["boxes"]],
    )


def make_demo(out_dir: str | Path) -> Demo:
    """Write the scripted tour's probe (``scene.png``) and script (``script.json``) into ``out_dir``."""
    from glimpse.probes.synth import make_probe

    probe = make_probe(TOUR_LEVEL, TOUR_INDEX, seed=TOUR_SEED, kind="read_code")
    rec = probe.record
    width, height = rec["size"]
    target = [int(v) for v in rec["boxes"][0]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path, script_path = out / "scene.png", out / "script.json"
    probe.image.save(image_path, optimize=False, compress_level=3)
    script = _turns(target, width, height, rec["solution"])
    script_path.write_text(json.dumps(script, indent=2) + "\n", encoding="utf-8")
    question = rec["problem"].replace("<image>", "").strip()
    return Demo(image_path, script_path, question, rec["solution"], target, (width, height), rec["cap_px"])


def shown_text_height(demo: Demo, limits: PixelLimits | None = None) -> float:
    """Height in pixels of the tour's code in the downscaled full view."""
    limits = limits or PixelLimits(max_pixels=MAX_PIXELS)
    w, _ = smart_resize(demo.size[0], demo.size[1], limits)
    return demo.text_px * w / demo.size[0]
