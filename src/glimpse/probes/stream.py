"""Probes streamed to a trainer: generated on request, drawn only where a trajectory looks, never stored.

A trainer (the built-in model's, ``glimpse train rl``) asks for probe ``index`` of a level and gets a ``Sample``.
With a ``SceneCache`` the probe is not drawn at all: its scene (``synth.Scene``, the drawing calls) stands in
for the decoded original, and the agent loop's zoom tool and SFT's encoder draw just the views they show
(``Scene.view``), about ten times cheaper than drawing a whole 4–8K scene (``bench/builtin_examples.py``).
Without one, the probe is written as a JPEG for any loop to read.

``card_sample`` makes a cheaper example still: one legible sign on a small patch of scene, with the probes'
question for it (reading without searching). Everything that knows the probes' palette and wording lives in
``glimpse.probes``; a model reads the question's text.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

from glimpse.errors import ImageInputError
from glimpse.images import ImageCache, Original
from glimpse.trajectory import Sample

PROBE_JPEG_QUALITY = 92  # a probe's file is a JPEG at this quality (Pillow's defaults otherwise)


class SceneImage:
    """A probe's scene standing in for its decoded original.

    The agent loop's zoom tool and SFT's encoder only ever resize a box of the original (``images.fit``) or crop
    it, so this draws just that box at the resolution it is shown (``Scene.view``) instead of the whole
    10–50-megapixel scene. Views are kept, since the encoder asks again for every image the loop showed. Pixels
    drawn at full resolution go through the JPEG a probe's file goes through (``quality``), so a zoom shows what
    it shows on the files evaluations read (before, a dark blue marker drawn crisp in training was black after the
    JPEG's chroma subsampling in evaluation: docs/builtin-model.md, attempt 12).
    """

    mode = "RGB"

    def __init__(self, scene: Any, quality: int | None = None):
        self.scene, self.quality = scene, quality
        self.size = (scene.width, scene.height)
        self._views: dict[tuple[Any, ...], Any] = {}

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def resize(self, size: tuple[int, int], resample: Any = None, box: Any = None) -> Any:
        box = tuple(int(v) for v in box) if box is not None else (0, 0, *self.size)
        key = (box, tuple(size))
        if key not in self._views:
            self._views[key] = self.scene.view(box, tuple(size), self.quality)
        return self._views[key]

    def crop(self, box: Any) -> Any:
        from glimpse.probes.synth import jpeg

        crop = self.scene.render(tuple(int(v) for v in box))
        return crop if self.quality is None else jpeg(crop, self.quality)


class SceneCache(ImageCache):
    """An image cache whose originals are probe scenes drawn on request (``scene:`` paths), never files; ``quality``:
    the JPEG their full-resolution pixels go through (``SceneImage``; None: none)."""

    def __init__(self, quality: int | None = None) -> None:
        super().__init__()
        self._scenes: dict[str, Original] = {}
        self.quality = quality

    def add(self, name: str, scene: Any) -> str:
        """Register a scene under ``scene:NAME``; returns that path, for a sample's ``images``."""
        path = f"scene:{name}"
        digest = hashlib.sha256(f"{path}/{scene.background_seed}/{len(scene.ops)}".encode()).hexdigest()
        self._scenes[path] = Original(path, digest, SceneImage(scene, self.quality))  # type: ignore[arg-type]
        return path

    def discard(self, path: str) -> None:
        self._scenes.pop(path, None)

    def peek(self, path: str | os.PathLike[str]) -> Original | None:
        return self._scenes.get(str(path))

    def get(self, path: str | os.PathLike[str]) -> Original:
        found = self._scenes.get(str(path))
        if found is None:
            raise ImageInputError(str(path), "no such scene in this cache")
        return found


def probe_sample(
    level: str,
    index: int,
    seed: int,
    folder: Path,
    *,
    scenes: SceneCache | None = None,
    others: bool = False,
    kind: str | None = None,
) -> Sample:
    """Generate one probe and return it as a sample.

    With ``scenes``, the probe is not drawn: its scene is registered there and drawn view by view as the loop
    zooms (what training uses). Without, its image is written to ``folder`` as a JPEG for any loop to read.
    ``others``: the meta also describes every other sign (what a trainer teaches about each region; dozens of
    signs on a hard probe, so off where samples are written to trajectories). ``kind``: a question kind of
    ``synth.KINDS`` or ``synth.SEARCH_KINDS`` instead of the one the index draws.
    """
    from glimpse.probes.synth import make_probe

    probe = make_probe(level, index, seed=seed, kind=kind, render=scenes is None)
    rec = probe.record
    if scenes is not None:
        path: Path | str = scenes.add(rec["doc_id"], probe.scene)
    else:
        path = folder / f"{rec['doc_id']}.jpg"
        probe.image.save(path, quality=PROBE_JPEG_QUALITY)
    meta = {
        "level": level,
        "category": rec["kind"],
        "candidates": rec["candidates"],
        "size": rec["size"],
    }
    if others:
        meta["others"] = probe.others
    return Sample(
        id=rec["doc_id"],
        images=[str(path)],
        question=rec["problem"].replace("<image>", "").strip(),
        answer=rec["solution"],
        target_boxes=[list(b) for b in rec["boxes"]],
        meta=meta,
    )


def card_sample(index: int, seed: int, folder: Path) -> Sample:
    """A cheap reading example: one sign, legible, on a small patch of scene.

    The sign is drawn with the probes' own code (font, border, marker, dots, corner mark, red dot) at a random
    font size, on a canvas 1.3–2.5 times its size with the probes' background, as a nested zoom would show it; the
    question is the probes' question for that sign (``which_marked`` for a numbered sign with a red dot), and the
    answer needs no zoom. ``meta["candidates"]`` holds the sign (the whole card's one candidate, the target) with
    its contents, as a probe's does.
    """
    from PIL import ImageDraw

    from glimpse.probes import questions, synth

    rng = random.Random(f"glimpse-card/{seed}/{index}")
    kind = rng.choice(("read_code", "read_code", "marker_color", "marker_shape", "count", "which_marked"))
    font_px = rng.randint(10, 28)
    content = {"marker_color": "marker", "marker_shape": "marker", "count": "dots"}.get(kind, "code")
    text = None
    if kind == "which_marked":
        text = str(rng.randint(10, 99))
    elif content == "code":
        text = synth.random_code(rng, rng.choice((3, 4)), set())
    # sized for its text, as a probe's signs are: a two-digit number's sign is half as wide as a four-character
    # code's (cards sized for four characters taught the reader a geometry no probe has; attempt 11)
    sw, sh = synth.sign_size(content, font_px, len(text) if text else 4)
    w, h = int(sw * rng.uniform(1.3, 2.5)), int(sh * rng.uniform(1.6, 3.5))
    image = synth.background(rng, w, h)
    draw = ImageDraw.Draw(image)
    x, y = rng.randint(0, w - sw), rng.randint(0, h - sh)
    border = rng.choice(list(synth.BORDER_COLORS))
    sign = synth.Sign((x, y, x + sw, y + sh), border)
    if text is not None:
        sign.code, sign.red_dot = text, kind == "which_marked"
        answer = text
    elif content == "marker":
        sign.marker = (rng.choice(list(synth.MARKER_COLORS)), rng.choice(synth.MARKER_SHAPES))
        answer = sign.marker[0] if kind == "marker_color" else sign.marker[1]
    else:
        sign.dots = rng.randint(2, 9)
        answer = str(sign.dots)
    sign.corner = rng.choice((None, None, "star", "dot"))
    synth.draw_sign(draw, sign, font_px, rng)
    choices = {"marker_color": list(synth.MARKER_COLORS), "marker_shape": list(synth.MARKER_SHAPES)}.get(kind)
    question = questions.question(kind, border, choices=choices)
    path = folder / f"card_{index}.jpg"
    image.save(path, quality=PROBE_JPEG_QUALITY)  # compressed as a probe's file is
    meta = {"level": "card", "category": kind, "candidates": [synth.describe(sign, True)], "size": [w, h]}
    return Sample(id=f"card_{index}", images=[str(path)], question=question, answer=answer, meta=meta)


# ----------------------------------------------------------------------------------------- what a sign shows
TEXT_CHARS = 4  # characters of a sign's text read one by one (codes have 3–4, sign numbers 2)
MAX_DOTS = 12


def sign_vocabulary() -> dict[str, list[str]]:
    """What can be read off one sign, per attribute: the classes (answer words where there are some; ``""``
    means "none"). A trainer's reading targets (``sign_labels``) index these lists."""
    from glimpse.probes.palette import BORDER_COLORS, CODE_ALPHABET, MARKER_COLORS, MARKER_SHAPES

    chars = sorted(set(CODE_ALPHABET) | set("0123456789"))
    vocab = {f"char{i + 1}": [*chars, ""] for i in range(TEXT_CHARS)}
    vocab["marker_color"] = [*MARKER_COLORS, ""]
    vocab["marker_shape"] = [*MARKER_SHAPES, ""]
    vocab["dots"] = [str(n) for n in range(MAX_DOTS + 1)]
    vocab["mark"] = ["", "star", "dot", "red dot", "star red dot", "dot red dot"]
    vocab["border"] = [*BORDER_COLORS, ""]
    return vocab


def sign_labels(candidate: dict[str, Any]) -> dict[str, int]:
    """A probe's or card's sign (an entry of ``meta["candidates"]``) as class indices of ``sign_vocabulary``."""
    vocab = sign_vocabulary()
    code = candidate.get("code") or ""
    marker = candidate.get("marker") or ("", "")
    labels = {f"char{i + 1}": vocab[f"char{i + 1}"].index(code[i] if i < len(code) else "") for i in range(TEXT_CHARS)}
    labels["marker_color"] = vocab["marker_color"].index(marker[0])
    labels["marker_shape"] = vocab["marker_shape"].index(marker[1])
    labels["dots"] = min(int(candidate.get("dots") or 0), MAX_DOTS)
    mark = " ".join(w for w in (candidate.get("corner") or "", "red dot" if candidate.get("red_dot") else "") if w)
    labels["mark"] = vocab["mark"].index(mark)
    labels["border"] = vocab["border"].index(candidate.get("border") or "")
    return labels
