"""Procedurally generated visual-search probes with known answers (``glimpse synth``).

Each probe is a high-resolution scene full of clutter and look-alike signs, and a question about a detail that
is **not legible in the downscaled full view** the model first receives: at the default 2,000,000-pixel limit,
the cap height of every text and the size of every mark that decides the answer is at most ``SHOWN_MAX_PX``
(4 px), while in the original it is at least ``MIN_CAP_PX`` (7 px), so zooming into the target makes it
readable. Tests check the property on every generated level.

Question kinds, each with an exact answer:

* ``read_code``: the short code on a sign;
* ``marker_color`` / ``marker_shape``: the colour / shape of a small outlined marker on a sign;
* ``which_marked``: which of several numbered look-alike signs carries a small red dot (answer: its number);
* ``count``: how many small dots are on a sign;
* ``relative_position``: whether one sign (named by its code) is left or right of another.

A search kind (``SEARCH_KINDS``; made only when asked for by name, so the mixed cycle of ``KINDS`` is unchanged):

* ``find_code``: the whole code of the one look-alike whose code starts with the two characters the question
  gives. Nothing in the full view tells the look-alikes apart, so a search reads them one by one (on hard about
  half of 8-12 before it finds the sign), and the answer is a code, so a guess almost never pays (unlike
  ``relative_position``'s left or right).
* ``find_marker``: the same search (every look-alike carries a code and, right of it, a small outlined marker),
  but the answer is the colour of that sign's marker, one of six. The look-alikes' marker colours are drawn
  independently of the target's, so an answer from any sign read on the way (or a guess) is right about one time
  in six: a search still pays, and a quick answer sometimes does too (between ``find_code``'s never and
  ``relative_position``'s half the time).

Two-image kinds (``PAIR_KINDS``; made only when asked for by name): two scenes of the level, shown together as
``image_1`` and ``image_2``, each with its look-alike signs of one border colour:

* ``which_image``: which image holds the sign with a small star in its top-left corner (the look-alikes in
  both images have a dot there, on every level; answer ``image_1`` or ``image_2``);
* ``split_code``: a code split across the two images: the first part on the target sign of image_1, the
  second on that of image_2 (singled out as the level singles out a target); the answer is both together.

Their records add ``target_images`` (the 0-based image of each target box), ``candidate_images`` and
``sizes`` (of each image); the boxes are in their own image's pixels. They carry no per-sign ``candidates``
details or single ``size``, so the single-image readers of those (cold-start data, the demo) refuse them.

Levels (long side of the scene; candidates = signs that look the same in the full view, so only zooming into
each tells them apart; other signs and clutter are distractors):

==========  ============  ==========  ===========  ========  ======================================
level       long side     candidates  other signs  clutter   how the target is singled out
==========  ============  ==========  ===========  ========  ======================================
easy        3,300-4,096*  1 (2 for    12           60        a border colour no other sign has
                          which /
                          position)
medium      4,096-6,144   3-4         24           120       a small star in the top-left corner
                                                             (a dot on the other candidates)
hard        6,144-8,192   8-12        40           200       as medium; candidates spread over the
                                                             whole scene
==========  ============  ==========  ===========  ========  ======================================

(*) A canvas whose aspect ratio would leave the smallest legible font above 4 px in the full view is enlarged
until it is not (up to about 4,000 × 2,000 on easy).

On hard, the corner star is about 2 px in the full view, so a search has to check candidates one by one: with
10 candidates in random order a correct search takes 5.5 checks on average before it can read the answer.
Every probe records its target boxes (faithfulness scoring), the candidates' boxes and what each shows, and the
legibility figures (what the other signs show is on the ``Probe``, ``others``, for trainers). Records use
VisualProbe's JSON fields (``images``, ``problem``, ``solution``, ``data_source``) plus these. Generation is
deterministic given (level, seed, index).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from glimpse.errors import ConfigError
from glimpse.images import PixelLimits, encode_image, smart_resize
from glimpse.probes import questions
from glimpse.probes.palette import BORDER_COLORS, CODE_ALPHABET, MARKER_COLORS, MARKER_SHAPES

# The legibility rule: decisive detail at most this tall in the default full view, at least MIN_CAP_PX in the
# original (below about 7 px the default font is not readable even when zoomed).
SHOWN_MAX_PX = 4.0
MIN_CAP_PX = 7
# Cap height of Pillow's default font, as a share of its size; size 10 is the smallest with a 7-px cap height.
_CAP_RATIO = 0.72
_MIN_FONT_PX = 10

# Bumped whenever the generator's output changes, so cached probes are never stale.
GENERATOR_VERSION = 2
KINDS = ("read_code", "marker_color", "marker_shape", "which_marked", "count", "relative_position")
PAIR_KINDS = ("which_image", "split_code")
SEARCH_KINDS = ("find_code", "find_marker")
PREFIX_LEN = 2  # the characters of a code a ``find_code`` or ``find_marker`` question gives
# kinds whose look-alikes (at least two; two on easy) carry no corner marks: what they show tells them apart
SHOWN_APART = ("which_marked", "relative_position", "find_code", "find_marker")


def check_kind(kind: str, what: str, pairs: bool = True) -> str:
    """``kind`` when it is a probe question kind (``KINDS``, ``SEARCH_KINDS``, and ``PAIR_KINDS`` when ``pairs``),
    else a ``ConfigError`` that starts with ``what`` (the option or spec it came from) and lists the kinds."""
    kinds = KINDS + SEARCH_KINDS + PAIR_KINDS if pairs else KINDS + SEARCH_KINDS
    if kind not in kinds:
        only = "" if pairs else " (single-image kinds only)"
        raise ConfigError(f"{what}: unknown probe question kind {kind!r}{only}; choose one of {', '.join(kinds)}")
    return kind


ASPECTS = ((16, 9), (4, 3), (3, 2), (2, 1), (1, 1), (3, 4))


@dataclass(frozen=True)
class Level:
    """The numbers that define a level (see the module docstring)."""

    long_side: tuple[int, int]
    candidates: tuple[int, int]
    other_signs: int
    clutter: int


LEVELS = {
    "easy": Level(long_side=(3300, 4096), candidates=(1, 1), other_signs=12, clutter=60),
    "medium": Level(long_side=(4096, 6144), candidates=(3, 4), other_signs=24, clutter=120),
    "hard": Level(long_side=(6144, 8192), candidates=(8, 12), other_signs=40, clutter=200),
}


@dataclass
class Probe:
    """A generated scene and its record (``image`` is ``None`` when made with ``render=False``); a two-image
    probe's second scene is in ``more_images`` and ``more_scenes``. ``others``: what every sign that is not a
    candidate shows (as ``describe`` writes it), for trainers; not in the record (dozens of signs per probe)."""

    image: Image.Image | None
    record: dict[str, Any]
    scene: Scene | None = None
    more_images: list[Image.Image] = field(default_factory=list)
    more_scenes: list[Scene] = field(default_factory=list)
    others: list[dict[str, Any]] = field(default_factory=list)


# How much finer than it is shown a region is drawn before the final resize (``Scene.view``): at 3× the
# shown resolution the resize averages each shown pixel over about 9 drawn ones, which tests check is close to
# the full-resolution scene resized.
VIEW_OVERSAMPLE = 3.0


@dataclass
class _Op:
    """One recorded drawing call: the ``ImageDraw`` method, its arguments, and its bounding box (for culling)."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    bbox: tuple[float, float, float, float]


class _Recorder:
    """Stands in for ``ImageDraw.Draw``: records the calls the scene makes, in order, to replay them later."""

    def __init__(self) -> None:
        self.ops: list[_Op] = []

    def _add(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], pts: list[tuple[float, float]]) -> None:
        pad = kwargs.get("width") or 1
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        self.ops.append(_Op(name, args, kwargs, (min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad)))

    def rectangle(self, xy: Any, **kw: Any) -> None:
        self._add("rectangle", (xy,), kw, [(xy[0], xy[1]), (xy[2], xy[3])])

    def ellipse(self, xy: Any, **kw: Any) -> None:
        self._add("ellipse", (xy,), kw, [(xy[0], xy[1]), (xy[2], xy[3])])

    def line(self, xy: Any, **kw: Any) -> None:
        self._add("line", (xy,), kw, [(xy[0], xy[1]), (xy[2], xy[3])])

    def polygon(self, xy: Any, **kw: Any) -> None:
        self._add("polygon", (xy,), kw, list(xy))

    def text(self, xy: Any, text: str, **kw: Any) -> None:
        x0, y0, x1, y1 = kw["font"].getbbox(text)
        self._add("text", (xy, text), kw, [(xy[0] + x0, xy[1] + y0), (xy[0] + x1, xy[1] + y1)])


@dataclass
class Scene:
    """A probe's scene as drawing instructions, so any region can be drawn without drawing the rest.

    ``render()`` draws the whole canvas exactly as ``make_probe`` does (the same calls in the same order);
    ``view(box, size)`` gives what resizing ``box`` of the full-resolution scene to ``size`` gives (bicubic, as the
    zoom tool does), drawing only the region and at most ``VIEW_OVERSAMPLE`` times finer than it is shown. That is
    what makes training examples cheap: a trajectory shows a few hundred thousand pixels of a 10–50-megapixel
    scene.
    """

    width: int
    height: int
    background_seed: int
    ops: list[_Op]

    def render(self, region: tuple[int, int, int, int] | None = None, scale: float = 1.0) -> Image.Image:
        """The pixels of ``region`` (full-resolution pixels; default the whole canvas) drawn at ``scale``."""
        region = region or (0, 0, self.width, self.height)
        x0, y0, x1, y1 = region
        image = _background_region(self.background_seed, self.width, self.height, region, scale)
        draw = ImageDraw.Draw(image)
        whole = region == (0, 0, self.width, self.height) and scale == 1.0
        for op in self.ops:
            b = op.bbox
            if not whole and (b[2] < x0 or b[0] > x1 or b[3] < y0 or b[1] > y1):
                continue
            args, kwargs = op.args, op.kwargs
            if not whole:
                args, kwargs = _moved(op, x0, y0, scale)
            getattr(draw, op.name)(*args, **kwargs)
        return image

    def view(self, box: tuple[int, int, int, int], size: tuple[int, int], quality: int | None = None) -> Image.Image:
        """``box`` of the full-resolution scene resized to ``size`` (bicubic), drawing only what it needs. With
        ``quality``, pixels drawn at full resolution (a zoom's) first go through a JPEG at that quality, as a probe's
        file's do (its 4:2:0 chroma halves a thin coloured line's colour); a view drawn smaller is left as drawn."""
        x0, y0, x1, y1 = box
        shown = size[0] / (x1 - x0)
        r = min(1.0, VIEW_OVERSAMPLE * shown)
        margin = math.ceil(2 / min(shown, 1.0)) + 4  # the bicubic kernel's reach, in full-resolution pixels
        region = (max(0, x0 - margin), max(0, y0 - margin), min(self.width, x1 + margin), min(self.height, y1 + margin))
        canvas = self.render(region, r)
        if quality is not None and r == 1.0:
            canvas = jpeg(canvas, quality)
        sx, sy = canvas.width / (region[2] - region[0]), canvas.height / (region[3] - region[1])
        inner = ((x0 - region[0]) * sx, (y0 - region[1]) * sy, (x1 - region[0]) * sx, (y1 - region[1]) * sy)
        return canvas.resize(size, Image.Resampling.BICUBIC, box=inner)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """``image`` encoded as a JPEG at ``quality`` (``images.encode_image``: Pillow's defaults, as a probe's file is
    written) and decoded again."""
    with Image.open(io.BytesIO(encode_image(image.convert("RGB"), "jpeg", quality))) as read:
        return read.convert("RGB")


def _moved(op: _Op, ox: int, oy: int, r: float) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An op's arguments with its coordinates moved to a region's origin and scaled by ``r``."""

    def pt(x: float, y: float) -> tuple[float, float]:
        return (x - ox) * r, (y - oy) * r

    kwargs = dict(op.kwargs)
    if r != 1.0:
        if "width" in kwargs:
            kwargs["width"] = max(1, round(kwargs["width"] * r))
        if "font" in kwargs:
            kwargs["font"] = _font(max(1, round(kwargs["font"].size * r)))
    xy = op.args[0]
    if op.name == "polygon":
        return ([pt(*p) for p in xy],), kwargs
    if op.name == "text":
        return (pt(*xy), op.args[1]), kwargs
    return ((*pt(xy[0], xy[1]), *pt(xy[2], xy[3])),), kwargs


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _cap_height(size: int) -> int:
    _, top, _, bottom = _font(size).getbbox("HKMX")
    return bottom - top


def background(rng: random.Random, w: int, h: int) -> Image.Image:
    """A smooth random colour field with fine grain."""
    return _background_region(rng.randrange(2**32), w, h, (0, 0, w, h), 1.0)


def _background_region(seed: int, w: int, h: int, region: tuple[int, int, int, int], r: float) -> Image.Image:
    """The part ``region`` (full-resolution pixels) of the ``w × h`` background of ``seed``, drawn at scale ``r``.

    At ``r = 1`` and the whole canvas this is the probes' background pixel for pixel; at a smaller scale the
    colour field is the same function sampled more sparsely and the grain tile is shrunk with it.
    """
    nrng = np.random.default_rng(seed)
    coarse = nrng.integers(60, 200, size=(max(2, h // 256), max(2, w // 256), 3), dtype=np.uint8)
    tile = Image.fromarray(nrng.normal(128, 8, size=(256, 256)).clip(0, 255).astype(np.uint8)).convert("RGB")
    x0, y0, x1, y1 = region
    size = (max(1, round((x1 - x0) * r)), max(1, round((y1 - y0) * r)))
    sx, sy = coarse.shape[1] / w, coarse.shape[0] / h
    field = Image.fromarray(coarse)
    if region == (0, 0, w, h) and r == 1.0:
        img = field.resize((w, h), Image.Resampling.BILINEAR)
    else:
        img = field.resize(size, Image.Resampling.BILINEAR, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    period = 256
    if r != 1.0:
        period = max(1, round(256 * r))
        tile = tile.resize((period, period), Image.Resampling.BOX)
    ox, oy = round(x0 * r) % period, round(y0 * r) % period
    grain = Image.new("RGB", size)
    for y in range(-oy, size[1], period):
        for x in range(-ox, size[0], period):
            grain.paste(tile, (x, y))
    return ImageChops.add(img, grain, 1.0, -128)


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, w: int, h: int, count: int, font_px: int) -> None:
    scale = max(w, h) / 4096
    for _ in range(count):
        kind = rng.random()
        color = tuple(rng.randrange(256) for _ in range(3))
        size = int(rng.uniform(20, 420) * scale)
        x, y = rng.randrange(w), rng.randrange(h)
        if kind < 0.35:
            draw.rectangle((x, y, x + size, y + int(size * rng.uniform(0.3, 1.5))), fill=color)
        elif kind < 0.65:
            draw.ellipse((x, y, x + size, y + int(size * rng.uniform(0.5, 1.5))), fill=color)
        elif kind < 0.8:
            pts = [(x + rng.randrange(size), y + rng.randrange(size)) for _ in range(rng.randint(3, 6))]
            draw.polygon(pts, fill=color)
        elif kind < 0.9:
            draw.line(
                (x, y, x + rng.randint(-size, size), y + rng.randint(-size, size)),
                fill=color,
                width=max(1, int(rng.uniform(1, 8) * scale)),
            )
        else:  # scraps of text, so reading anything is not enough
            word = "".join(rng.choice(CODE_ALPHABET + "BDGOQSZ0258") for _ in range(rng.randint(2, 6)))
            draw.text((x, y), word, fill=color, font=_font(font_px))


class _Layout:
    """Places non-overlapping rectangles."""

    def __init__(self, w: int, h: int, rng: random.Random):
        self.w, self.h, self.rng = w, h, rng
        self.placed: list[tuple[int, int, int, int]] = []

    def place(self, cw: int, ch: int, region: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = region or (0, 0, self.w, self.h)
        margin = max(cw, ch) // 2
        for _ in range(400):
            x = self.rng.randint(x0 + margin, max(x0 + margin, x1 - cw - margin))
            y = self.rng.randint(y0 + margin, max(y0 + margin, y1 - ch - margin))
            box = (x, y, x + cw, y + ch)
            if all(not _overlap(box, other, margin) for other in self.placed):
                self.placed.append(box)
                return box
        if region is not None:
            return self.place(cw, ch)
        raise RuntimeError("could not place a sign without overlap; the scene is too crowded")


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    color: tuple[int, int, int],
    width: int,
    fill: bool = False,
) -> None:
    if shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, outline=color, width=width, fill=color if fill else None)
        return
    if shape == "cross":
        t = max(width, r * 0.35)
        for box in ((cx - r, cy - t / 2, cx + r, cy + t / 2), (cx - t / 2, cy - r, cx + t / 2, cy + r)):
            draw.rectangle(box, outline=color, width=width, fill=color if fill else None)
        return
    corners = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6, "star": 10}[shape]
    start = {"square": math.pi / 4, "triangle": -math.pi / 2, "diamond": 0.0, "hexagon": 0.0, "star": -math.pi / 2}[
        shape
    ]
    pts = []
    for i in range(corners):
        radius = r * (0.45 if shape == "star" and i % 2 else 1.0)
        angle = start + 2 * math.pi * i / corners
        pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    if fill:
        draw.polygon(pts, fill=color)
    else:
        draw.polygon(pts, outline=color, width=width)


@dataclass
class Sign:
    box: tuple[int, int, int, int]
    border: str
    code: str | None = None
    marker: tuple[str, str] | None = None
    dots: int = 0
    corner: str | None = None  # "star" or "dot": the mark that singles out a candidate
    red_dot: bool = False


def sign_size(content: str, font_px: int, text_len: int) -> tuple[int, int]:
    """The (width, height) of a sign showing ``content``: ``code``, ``code+marker`` (a code and a marker right of
    it), ``dots`` or ``marker``."""
    pad = max(3, font_px // 2)
    if content in ("code", "code+marker"):
        tw = _font(font_px).getbbox("M" * text_len)[2]
        room = int(1.6 * font_px) if content == "code+marker" else 0
        return tw + 2 * pad + font_px // 2 + room, font_px + 2 * pad
    if content == "dots":
        return 3 * font_px + 2 * pad, 2 * font_px + 2 * pad
    return int(1.6 * font_px) + 2 * pad + font_px // 2, int(1.4 * font_px) + 2 * pad


def draw_sign(draw: ImageDraw.ImageDraw, sign: Sign, font_px: int, rng: random.Random) -> None:
    x0, y0, x1, y1 = sign.box
    border = max(2, font_px // 6)
    draw.rectangle(sign.box, fill=(248, 248, 244), outline=BORDER_COLORS[sign.border], width=border)
    pad = max(3, font_px // 2)
    ink = (25, 25, 25)
    left = x0 + pad + (font_px // 2 if sign.corner else 0)
    if sign.code is not None:
        draw.text((left, y0 + pad - font_px * 0.1), sign.code, fill=ink, font=_font(font_px))
    if sign.marker is not None:
        color, shape = sign.marker
        r = font_px * 0.6
        cx = x1 - pad - 0.8 * font_px if sign.code is not None else (left + x1 - pad) / 2  # right of a code
        draw_shape(draw, shape, cx, (y0 + y1) / 2, r, MARKER_COLORS[color], max(1, font_px // 8))
    if sign.dots:
        cells = [(i, j) for i in range(3) for j in range(3)]
        rng.shuffle(cells)
        cw, chh = (x1 - pad - left) / 3, (y1 - y0 - 2 * pad) / 3
        for i, j in cells[: sign.dots]:
            cx, cy = left + (i + 0.5) * cw, y0 + pad + (j + 0.5) * chh
            d = font_px * 0.17
            draw.ellipse((cx - d, cy - d, cx + d, cy + d), fill=ink)
    if sign.corner:
        r = font_px * 0.28
        draw_shape(
            draw,
            sign.corner if sign.corner == "star" else "circle",
            x0 + border + r + 1,
            y0 + border + r + 1,
            r,
            ink,
            1,
            fill=True,
        )
    if sign.red_dot:
        r = font_px * 0.2
        cx, cy = x1 - border - r - 2, y1 - border - r - 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=MARKER_COLORS["red"])


def random_code(rng: random.Random, n: int, taken: set[str]) -> str:
    while True:
        code = "".join(rng.choice(CODE_ALPHABET) for _ in range(n))
        if code not in taken:
            taken.add(code)
            return code


def make_probe(
    level: str,
    index: int,
    seed: int = 0,
    kind: str | None = None,
    limits: PixelLimits | None = None,
    *,
    render: bool = True,
    border: str | None = None,
    starred: bool | None = None,
    salt: str = "",
) -> Probe:
    """Generate probe ``index`` of a level. The same (level, seed, index, kind) always gives the same probe.

    With ``render=False`` the image is not drawn: the probe's ``scene`` can draw any part of it on request.
    A kind of ``PAIR_KINDS`` gives a two-image probe (``make_pair_probe``).

    Args (the scenes of a two-image probe): ``border`` fixes the candidates' border colour; ``starred`` marks
    the candidates with corner marks on every level, the target with a star (``True``) or a dot like the others
    (``False``); ``salt`` makes a different scene from the same (level, seed, index).
    """
    if kind in PAIR_KINDS:
        return make_pair_probe(level, index, seed, kind, limits, render=render)
    if level not in LEVELS:
        raise ConfigError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    spec = LEVELS[level]
    rng = random.Random(f"glimpse-probe/{level}/{seed}/{index}" + (f"/{salt}" if salt else ""))
    kind = check_kind(kind or KINDS[index % len(KINDS)], "make_probe")
    limits = limits or PixelLimits()

    # 1. The canvas, and a font small enough to be illegible in the full view.
    aw, ah = rng.choice(ASPECTS)
    long_side = rng.randint(*spec.long_side)
    w, h = (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)
    scale = smart_resize(w, h, limits)[0] / w
    while _cap_height(_MIN_FONT_PX) * scale > SHOWN_MAX_PX:  # too small a canvas for the rule: enlarge it
        w, h = round(w * 1.05), round(h * 1.05)
        scale = smart_resize(w, h, limits)[0] / w
    font_px = max(_MIN_FONT_PX, min(28, math.floor(SHOWN_MAX_PX / (_CAP_RATIO * scale))))
    while _cap_height(font_px) * scale > SHOWN_MAX_PX and font_px > _MIN_FONT_PX:
        font_px -= 1
    background_seed = rng.randrange(2**32)
    draw = _Recorder()
    _clutter(draw, rng, w, h, spec.clutter, font_px)

    # 2. Candidates: the signs a search must tell apart.
    lo, hi = spec.candidates
    n_cand = rng.randint(lo, hi)
    if kind in SHOWN_APART:
        n_cand = max(n_cand, 2)
    if level == "easy" and kind in SHOWN_APART:
        n_cand = 2
    content = {"marker_color": "marker", "marker_shape": "marker", "count": "dots", "find_marker": "code+marker"}.get(
        kind, "code"
    )
    code_len = 2 if kind == "which_marked" else rng.choice((3, 4))
    cw, ch = sign_size(content, font_px, code_len)
    layout = _Layout(w, h, rng)
    cand_border = border if border is not None else rng.choice(list(BORDER_COLORS))
    cols = math.ceil(math.sqrt(n_cand * w / h))
    rows = math.ceil(n_cand / cols)
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    rng.shuffle(cells)
    taken: set[str] = set()
    candidates = []
    for c, r in cells[:n_cand]:  # spread over the scene: one candidate per cell of a grid
        region = (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)
        candidates.append(Sign(layout.place(cw, ch, region), cand_border))
    target = candidates[0]
    marked = starred is not None or (level != "easy" and kind not in SHOWN_APART)
    for sign in candidates:
        if kind == "which_marked":
            sign.code = str(rng.randint(10, 99))
            while sign.code in taken:
                sign.code = str(rng.randint(10, 99))
            taken.add(sign.code)
        elif content == "code":
            sign.code = random_code(rng, code_len, taken)
        elif content == "code+marker":  # each look-alike's colour drawn on its own: one in six shares the target's
            sign.code = random_code(rng, code_len, taken)
            sign.marker = (rng.choice(list(MARKER_COLORS)), rng.choice(MARKER_SHAPES))
        elif content == "marker":
            sign.marker = (rng.choice(list(MARKER_COLORS)), rng.choice(MARKER_SHAPES))
        else:
            sign.dots = rng.randint(2, 9)
        if marked:
            sign.corner = "star" if sign is target and starred is not False else "dot"
    if kind == "which_marked":
        target.red_dot = True
    if kind in ("find_code", "find_marker"):  # the question's prefix names the target alone among its look-alikes
        for sign in candidates[1:]:
            while sign.code[:PREFIX_LEN] == target.code[:PREFIX_LEN]:
                sign.code = random_code(rng, len(sign.code), taken)
    if kind in ("marker_color", "marker_shape", "count") and len(candidates) > 1:
        # Other candidates must not share the target's answer, or finding the target would not matter.
        for sign in candidates[1:]:
            while (
                (kind == "marker_color" and sign.marker[0] == target.marker[0])
                or (kind == "marker_shape" and sign.marker[1] == target.marker[1])
                or (kind == "count" and sign.dots == target.dots)
            ):
                sign.marker = (rng.choice(list(MARKER_COLORS)), rng.choice(MARKER_SHAPES))
                sign.dots = rng.randint(2, 9) if kind == "count" else 0

    # 3. Distractor signs in other colours (easy: the target's colour is unique).
    others_border = [b for b in BORDER_COLORS if b != cand_border]
    others = []
    for _ in range(spec.other_signs):
        other_content = rng.choice(("code", "marker", "dots"))
        ow, oh = sign_size(other_content, font_px, rng.choice((2, 3, 4)))
        sign = Sign(layout.place(ow, oh), rng.choice(others_border))
        if other_content == "code":
            sign.code = random_code(rng, rng.choice((3, 4)), taken)
        elif other_content == "marker":
            sign.marker = (rng.choice(list(MARKER_COLORS)), rng.choice(MARKER_SHAPES))
        else:
            sign.dots = rng.randint(2, 9)
        others.append(sign)
    for sign in [*others, *candidates]:
        draw_sign(draw, sign, font_px, rng)
    scene = Scene(w, h, background_seed, draw.ops)

    # 4. The question and its exact answer.
    choices: list[str] | None = None
    targets = [target]
    codes: tuple[str, ...] = ()
    if kind == "read_code":
        answer = target.code
    elif kind == "marker_color":
        choices, answer = list(MARKER_COLORS), target.marker[0]
    elif kind == "marker_shape":
        choices, answer = list(MARKER_SHAPES), target.marker[1]
    elif kind == "count":
        choices, answer = [str(n) for n in range(2, 10)], str(target.dots)
    elif kind == "which_marked":
        answer = target.code
    elif kind == "find_code":
        answer, codes = target.code, (target.code[:PREFIX_LEN],)
    elif kind == "find_marker":
        choices, answer, codes = list(MARKER_COLORS), target.marker[0], (target.code[:PREFIX_LEN],)
    else:
        other = max(candidates[1:], key=lambda s: abs((s.box[0] + s.box[2]) - (target.box[0] + target.box[2])))
        targets, codes = [target, other], (target.code, other.code)
        choices = ["left", "right"]
        answer = "left" if target.box[0] + target.box[2] < other.box[0] + other.box[2] else "right"
    question = questions.question(kind, cand_border, marked=marked, choices=choices, codes=codes)

    cap = _cap_height(font_px)
    zoom_w, zoom_h = 2 * (target.box[2] - target.box[0]), 2 * (target.box[3] - target.box[1])
    zoomed_scale = smart_resize(zoom_w, zoom_h, limits)[0] / zoom_w
    doc_id = f"probe_{level}_{seed}_{index:06d}"
    record = {
        "images": [f"data/{doc_id}.jpg"],
        "problem": "<image>\n" + question,
        "solution": answer,
        "data_source": f"glimpse_probe_{level}",
        "doc_id": doc_id,
        "boxes": [list(s.box) for s in targets],
        "candidate_boxes": [list(s.box) for s in candidates],
        "candidates": [describe(s, s in targets) for s in candidates],
        "kind": kind,
        "level": level,
        "seed": seed,
        "index": index,
        "choices": choices,
        "size": [w, h],
        "font_px": font_px,
        "cap_px": cap,
        "shown_cap_px": round(cap * scale, 2),
        "zoomed_cap_px": round(cap * zoomed_scale, 2),
    }
    others_shown = [describe(s, False) for s in others]
    return Probe(image=scene.render() if render else None, record=record, scene=scene, others=others_shown)


def make_pair_probe(
    level: str,
    index: int,
    seed: int = 0,
    kind: str | None = None,
    limits: PixelLimits | None = None,
    *,
    render: bool = True,
) -> Probe:
    """Generate two-image probe ``index`` of a level (see the module docstring); deterministic like
    ``make_probe``. Each scene is a ``read_code`` scene of the level with the same candidates' border colour."""
    if level not in LEVELS:
        raise ConfigError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    kind = kind or PAIR_KINDS[index % len(PAIR_KINDS)]
    if kind not in PAIR_KINDS:
        raise ConfigError(f"{kind!r} is not a two-image probe kind; choose one of {', '.join(PAIR_KINDS)}")
    rng = random.Random(f"glimpse-probe-pair/{kind}/{level}/{seed}/{index}")
    border = rng.choice(list(BORDER_COLORS))
    starred_at = rng.randrange(2)
    marked = kind == "which_image" or level != "easy"
    parts = [
        make_probe(
            level,
            index,
            seed,
            "read_code",
            limits,
            render=render,
            border=border,
            starred=(k == starred_at) if kind == "which_image" else None,
            salt=f"{kind}/{k + 1}",
        )
        for k in range(2)
    ]
    if kind == "which_image":
        targets = [(starred_at, parts[starred_at].record["boxes"][0])]
        choices: list[str] | None = ["image_1", "image_2"]
        answer = f"image_{starred_at + 1}"
    else:
        targets = [(k, part.record["boxes"][0]) for k, part in enumerate(parts)]
        choices = None
        answer = "".join(part.record["solution"] for part in parts)
    question = questions.question(kind, border, marked=marked)
    doc_id = f"pair_{kind}_{level}_{seed}_{index:06d}"
    candidates = [(k, box) for k, part in enumerate(parts) for box in part.record["candidate_boxes"]]
    record = {
        "images": [f"data/{doc_id}_{k}.jpg" for k in (1, 2)],
        "problem": "<image>\n<image>\n" + question,
        "solution": answer,
        "data_source": f"glimpse_probe_{level}",
        "doc_id": doc_id,
        "boxes": [box for _, box in targets],
        "target_images": [k for k, _ in targets],
        "candidate_boxes": [box for _, box in candidates],
        "candidate_images": [k for k, _ in candidates],
        "kind": kind,
        "level": level,
        "seed": seed,
        "index": index,
        "choices": choices,
        "sizes": [part.record["size"] for part in parts],
        "font_px": [part.record["font_px"] for part in parts],
        "cap_px": [part.record["cap_px"] for part in parts],
        "shown_cap_px": [part.record["shown_cap_px"] for part in parts],
        "zoomed_cap_px": [part.record["zoomed_cap_px"] for part in parts],
    }
    return Probe(
        image=parts[0].image,
        record=record,
        scene=parts[0].scene,
        more_images=[parts[1].image] if render and parts[1].image is not None else [],
        more_scenes=[parts[1].scene] if parts[1].scene is not None else [],
    )


def describe(sign: Sign, target: bool) -> dict[str, Any]:
    """What a candidate shows when zoomed into, as a record's ``candidates`` entry (cold-start reasoning and the
    built-in model's reading targets use it; reading cards describe their one sign with it too)."""
    return {
        "box": list(sign.box),
        "border": sign.border,
        "code": sign.code,
        "marker": list(sign.marker) if sign.marker else None,
        "dots": sign.dots or None,
        "corner": sign.corner,
        "red_dot": sign.red_dot,
        "target": target,
    }


def _write_one(args: tuple[str, int, int, str, str | None, int]) -> dict[str, Any]:
    out, index, seed, level, kind, quality = args
    probe = make_probe(level, index, seed, kind)
    assert probe.image is not None  # rendered
    for name, image in zip(probe.record["images"], [probe.image, *probe.more_images], strict=True):
        image.save(Path(out) / name, quality=quality)
    return probe.record


def write_probes(
    out_dir: str | os.PathLike[str],
    level: str,
    n: int,
    *,
    seed: int = 0,
    kind: str | None = None,
    workers: int | None = None,
    quality: int = 95,
    start: int = 0,
) -> Path:
    """Generate ``n`` probes of a level into ``out_dir`` (``val.json`` + ``data/``); returns the JSON path.

    Deterministic whatever the number of worker processes. Images are JPEG (quality 95 by default).
    """
    if level not in LEVELS:
        raise ConfigError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, seed, level, kind, quality) for i in range(start, start + n)]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    if workers > 1 and n > 1:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(_write_one, jobs, chunksize=max(1, n // (4 * workers))))
    else:
        records = [_write_one(job) for job in jobs]
    path = out / "val.json"
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return path
