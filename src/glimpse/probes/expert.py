"""The ``expert`` backend: a training-free policy that searches with the protocol, by image analysis and OCR.

It sees only what a model sees (the downscaled view, then each zoom it asked for) and writes ordinary protocol
replies, so it runs through the same agent loop, harness and viewer as a model. It is a baseline in every
table, a teacher for cold-start data, and the fallback the README's main job uses while no learned model
beats it.

How it works, each turn recomputed from the conversation (the policy keeps no state of its own):

1. **Proposals** in the view. Signs are light, low-saturation rectangles with a coloured border: connected
   regions of near-white pixels, kept if the ring around them has the border colour the question names (any
   light region if it names none), in reading order. On a photo with no such regions it falls back to
   tiles of the image, most detailed first (edge density), for text-reading questions.
2. **A zoom per proposal**, a window twice the region's size (at least 1/16 of the image side), from the
   original.
3. **Reading the zoom**: the sign is found again in the observation; inside it, dark ink components are split
   into the corner mark (star or dot, told apart by how much of its box it fills), dots (counted), and text
   (read with Tesseract, run as a subprocess on an upscaled binarised crop); coloured pixels give a marker's
   colour, and its filled outline's profile its shape; red pixels in the bottom-right corner, the red dot.
4. The answer once the sign(s) the question needs are found; if every proposal is checked without a match, the
   best guess so far, said plainly in the thought.

Questions about several images (``image_1``, ``image_2`` …, the images of the first user message): proposals
are made in each view and zoomed into by that image's name. For ``which_image`` the likeliest proposals of
every image come first, and the answer is the image where the starred sign is read; for ``split_code`` each
image is searched in turn until its target sign is read, and the answer joins the parts; any other question is
searched image after image. Which proposal each observation shows is replayed from the readings, so the policy
still keeps no state.

Tesseract (``apt-get install tesseract-ocr``; its English model ships with the package) is needed for codes
and numbers; without it the expert still answers colour, shape and count questions, and says why it cannot
read.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from glimpse.images import components
from glimpse.models.base import GenerateParams, ImagePart, Message
from glimpse.models.scripted import ScriptedBackend
from glimpse.probes.palette import BORDER_COLORS, MARKER_COLORS
from glimpse.probes.questions import Question, parse_question, reading_order
from glimpse.protocol import make_protocol, script_turn

SIGN_FILL = np.array((248, 248, 244), np.int16)
# Characters Tesseract may read: the probes' code alphabet (no look-alike pairs) plus the other digits.
CODE_CHARSET = "ACEFHJKLMNPRTUVWXY0123456789"
INK_MAX = 90  # darker than this on every channel: ink
_CODE = re.compile(r"[A-Z0-9]{2,6}")


# --------------------------------------------------------------------------------------------------- pixels
def _ring(a: np.ndarray, box: tuple[int, int, int, int], pad: int) -> np.ndarray:
    """Pixels in a band ``pad`` wide just outside a box."""
    x0, y0, x1, y1 = box
    h, w = a.shape[:2]
    outer = a[max(0, y0 - pad) : min(h, y1 + pad), max(0, x0 - pad) : min(w, x1 + pad)].reshape(-1, 3)
    inner = a[y0:y1, x0:x1].reshape(-1, 3)
    # The band is the outer box minus the inner one; as a multiset: remove inner pixels by count.
    if outer.shape[0] <= inner.shape[0]:
        return outer
    keep = np.ones(outer.shape[0], bool)
    ox0, oy0 = max(0, x0 - pad), max(0, y0 - pad)
    ow = min(w, x1 + pad) - ox0
    ys, xs = np.divmod(np.arange(outer.shape[0]), ow)
    keep &= ~((xs + ox0 >= x0) & (xs + ox0 < x1) & (ys + oy0 >= y0) & (ys + oy0 < y1))
    return outer[keep]


@dataclass
class Region:
    """A proposal: a light region of the view (pixels of the view) and the colour of the band around it."""

    box: tuple[int, int, int, int]
    scores: dict[str, float]  # per border colour, how well the band around the region matches it (1 = fully)

    def distance(self, name: str) -> float:
        return 1.0 - self.scores[name]

    def matches(self, name: str, slack: float = 0.03) -> bool:
        """The named colour matches the band best, or nearly so."""
        return self.scores[name] >= max(self.scores.values()) - slack


def _border_scores(band: np.ndarray) -> dict[str, float]:
    """How well the pixels just outside a light region match each border colour.

    A one-pixel border in a downscaled view is blended with the white fill: a pixel is ``W + a (B - W)``, so
    its difference from white points the way the border colour's does, whatever ``a``. The score of a colour
    is the mean cosine between the two, over the pixels that differ from white.
    """
    d = band.astype(np.float32) - SIGN_FILL
    norm = np.linalg.norm(d, axis=1)
    d = d[norm > 25] / norm[norm > 25, None]
    if not len(d):
        return dict.fromkeys(BORDER_COLORS, 0.0)
    out = {}
    for name, rgb in BORDER_COLORS.items():
        ref = np.array(rgb, np.float32) - SIGN_FILL
        out[name] = float(np.mean(d @ (ref / np.linalg.norm(ref))))
    return out


def _merge(boxes: list[tuple[int, int, int, int, int]], gap: int) -> list[tuple[int, int, int, int]]:
    """Union boxes that touch or lie within ``gap`` pixels (a sign's fill is cut into pieces by its text)."""
    out = [list(b[:4]) for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                a, b = out[i], out[j]
                if a[0] - gap <= b[2] and b[0] - gap <= a[2] and a[1] - gap <= b[3] and b[1] - gap <= a[3]:
                    out[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return [tuple(b) for b in out]  # type: ignore[misc]


def light_regions(image: Image.Image, min_area: int = 6) -> list[Region]:
    """Near-white, low-saturation regions (pieces within 2 pixels merged) and the colour of the band around."""
    a = np.asarray(image.convert("RGB"), np.int16)
    mask = np.all(np.abs(a - SIGN_FILL) <= 14, axis=-1)
    pieces = [c for c in components(mask, 2) if c[4] >= 0.4 * (c[2] - c[0]) * (c[3] - c[1])]
    out = []
    for x0, y0, x1, y1 in _merge(pieces, 2):
        if (x1 - x0) * (y1 - y0) < min_area:
            continue
        band = _ring(a, (x0, y0, x1, y1), 1)
        if band.size == 0:
            continue
        out.append(Region((int(x0), int(y0), int(x1), int(y1)), _border_scores(band)))
    return out


# ------------------------------------------------------------------------------------------------------ reading
def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


def ocr(image: Image.Image, charset: str) -> str:
    """One line of text read by Tesseract (upscaled, binarised); '' if Tesseract is missing or reads nothing."""
    if not tesseract_available():
        return ""
    gray = image.convert("L")
    scale = max(1, round(48 / max(1, gray.height)))
    gray = gray.resize((gray.width * scale, gray.height * scale), Image.Resampling.LANCZOS)
    binary = gray.point(lambda v: 0 if v < 128 else 255)
    framed = Image.new("L", (binary.width + 40, binary.height + 40), 255)
    framed.paste(binary, (20, 20))
    import io

    buf = io.BytesIO()
    framed.save(buf, format="PNG")
    try:
        proc = subprocess.run(
            ["tesseract", "stdin", "stdout", "--psm", "7", "-c", f"tessedit_char_whitelist={charset}"],
            input=buf.getvalue(),
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return re.sub(r"\s+", "", proc.stdout.decode("utf-8", "replace"))


@dataclass
class SignReading:
    """What a zoomed sign shows."""

    corner: str | None = None  # "star", "dot" or None
    text: str = ""
    dots: int = 0
    marker_color: str | None = None
    marker_shape: str | None = None
    red_dot: bool = False
    border: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.corner:
            parts.append(f"a {self.corner} in its corner")
        if self.text:
            parts.append(f"the text {self.text}")
        if self.marker_color:
            parts.append(f"a {self.marker_color} {self.marker_shape or 'marker'}")
        if self.dots:
            parts.append(f"{self.dots} dots")
        if self.red_dot:
            parts.append("a red dot")
        what = ", ".join(parts) or "nothing I can make out"
        return f"a sign with a {self.border} border: {what}" if self.border else what


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a mask by one pixel (closes the gaps of a thin, anti-aliased outline)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _marker_after_text(rest: list[Any], outlines: list[Any]) -> Any:
    """The ink part that is a black marker right of a code (``find_marker``'s signs), or None: the largest outline
    part, right of every other part, at least two of them, and taller than the characters (a marker is about 1.2
    font sizes high, a capital 0.7: a wide last character such as W is not taken for one)."""
    if not outlines or len(rest) < 3:
        return None
    p = max(outlines, key=lambda p: p[4])
    others = [q for q in rest if q is not p]
    heights = sorted(q[3] - q[1] for q in others)
    if all(q[2] < p[0] for q in others) and (p[3] - p[1]) >= 1.2 * heights[len(heights) // 2]:
        return p
    return None


def _ocr_parts(
    inner: np.ndarray, sat: np.ndarray, corner: list[Any], parts: list[Any], right: int, charset: str
) -> str:
    """Read the text made of ink ``parts``, cut left of column ``right`` (a marker's), without the corner mark
    and coloured marks (a red dot, a marker: not text)."""
    clean = inner.copy()
    clean[sat > 30] = 255
    for p in corner:
        clean[p[1] : p[3], p[0] : p[2]] = 255
    left = min(p[0] for p in parts)
    return ocr(Image.fromarray(clean[:, max(0, left - 3) : max(left + 1, right - 1)].astype(np.uint8)), charset)


def _hue_name(pixels: np.ndarray) -> str:
    """The marker colour nearest in hue (and, for black, in brightness) to the median of these pixels."""
    import colorsys

    rgb = np.median(pixels, axis=0) / 255.0
    h, _, v = colorsys.rgb_to_hsv(*rgb)
    if v < 0.3:
        return "black"
    best, gap = "red", 9.0
    for name, ref in MARKER_COLORS.items():
        if name == "black":
            continue
        rh, _, _ = colorsys.rgb_to_hsv(*(np.array(ref) / 255.0))
        d = min(abs(h - rh), 1 - abs(h - rh))
        if d < gap:
            best, gap = name, d
    return best


def _shape_of(mask: np.ndarray) -> str:
    """The shape of a marker outline: fill its inside, then compare fill ratio and width profile."""
    filled = _fill(mask)
    if filled.mean() < 0.3 and not _fill(_dilate(mask)).mean() < 0.3:  # a gap in a thin outline let the fill in
        filled = _fill(_dilate(mask))
    h, w = filled.shape
    ratio = filled.mean()
    widths = filled.sum(axis=1) / max(1, w)
    quarter, top, bottom = widths[h // 4], widths[: max(1, h // 6)].mean(), widths[-max(1, h // 6) :].mean()
    if ratio > 0.9:
        return "square"
    if bottom > top + 0.3:  # wide base, narrow tip
        return "triangle"
    if ratio < 0.62:
        return "cross" if quarter < 0.4 else "diamond"
    return "circle" if quarter > 0.81 else "hexagon"


def _fill(mask: np.ndarray) -> np.ndarray:
    """The mask with every hole filled (what cannot be reached from outside)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), bool)
    padded[1:-1, 1:-1] = mask
    outside = np.zeros_like(padded)
    queue = deque([(0, 0)])
    outside[0, 0] = True
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= ny < h + 2 and 0 <= nx < w + 2 and not outside[ny, nx] and not padded[ny, nx]:
                outside[ny, nx] = True
                queue.append((ny, nx))
    return ~outside[1:-1, 1:-1]


def read_sign(
    image: Image.Image, charset: str, corner_mark: bool = False
) -> tuple[SignReading, tuple[int, int, int, int] | None]:
    """Find the largest sign in a zoomed view and read what it shows (``corner_mark``: look for a mark in its
    top-left corner first, as on the look-alike candidates of medium and hard probes)."""
    a = np.asarray(image.convert("RGB"), np.int16)
    regions = light_regions(image, min_area=40)
    if not regions:
        return SignReading(notes=["no sign in this view"]), None
    sign = max(regions, key=lambda r: (r.box[2] - r.box[0]) * (r.box[3] - r.box[1]))
    x0, y0, x1, y1 = sign.box
    inner = a[y0:y1, x0:x1]
    band = _ring(a, sign.box, 3)
    band_sat = band.max(axis=1) - band.min(axis=1)
    border = np.median(band[band_sat >= np.quantile(band_sat, 0.7)], 0)
    reading = SignReading(border=min(BORDER_COLORS, key=lambda n: float(np.sum((border - BORDER_COLORS[n]) ** 2))))
    ink = np.all(inner < INK_MAX, axis=-1)
    sh, sw = ink.shape
    parts = components(ink, 2)
    unit = max(2.0, sh / 12)
    corner = [p for p in parts if corner_mark and p[2] <= sw * 0.3 and p[3] <= sh * 0.45]  # top-left mark
    rest = [p for p in parts if p not in corner]
    if corner:
        mark = max(corner, key=lambda p: p[4])
        fill = mark[4] / max(1, (mark[2] - mark[0]) * (mark[3] - mark[1]))
        reading.corner = "star" if fill < 0.62 else "dot"
    # Saturated pixels inside the sign: a marker, or the red dot of which_marked.
    sat = inner.max(axis=-1) - inner.min(axis=-1)
    coloured = sat > 30
    red = coloured & (inner[..., 0] > inner[..., 1] + 60) & (inner[..., 0] > inner[..., 2] + 60)
    if red[int(sh * 0.55) :, int(sw * 0.7) :].sum() >= max(2, unit):
        reading.red_dot = True
        coloured[int(sh * 0.55) :, int(sw * 0.7) :] = False
    dark_outline = [p for p in rest if (p[2] - p[0]) > sh * 0.35 and (p[3] - p[1]) > sh * 0.35]
    black = _marker_after_text(rest, dark_outline)
    if coloured.sum() > unit * unit * 0.5:
        ys, xs = np.nonzero(coloured)
        reading.marker_color = _hue_name(inner[ys, xs][sat[ys, xs] >= 0.7 * sat[ys, xs].max()])
        reading.marker_shape = _shape_of(coloured[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
        marker = max(components(coloured, 2), key=lambda p: p[4])  # its left edge, not a stray tinted pixel's
        text = [p for p in rest if p[2] < marker[0]]  # a code left of the marker (find_marker's signs)
        if len(text) >= 2:
            reading.text = _ocr_parts(inner, sat, corner, text, marker[0], charset)
    elif dark_outline and len(rest) <= 2:  # a black marker drawn in ink
        p = max(dark_outline, key=lambda p: p[4])
        reading.marker_color = "black"
        reading.marker_shape = _shape_of(ink[p[1] : p[3], p[0] : p[2]])
    elif black is not None:  # a black marker right of a code
        reading.marker_color = "black"
        reading.marker_shape = _shape_of(ink[black[1] : black[3], black[0] : black[2]])
        reading.text = _ocr_parts(inner, sat, corner, [p for p in rest if p is not black], black[0], charset)
    else:
        sizes = [p[4] for p in rest]
        if (
            len(rest) >= 2
            and max(sizes) <= 2.5 * min(sizes)
            and all(abs((p[2] - p[0]) - (p[3] - p[1])) <= max(2, 0.4 * (p[3] - p[1])) for p in rest)
        ):
            reading.dots = len(rest)
        elif rest:
            reading.text = _ocr_parts(inner, sat, corner, rest, sw + 1, charset)  # to the sign's right edge
            if not reading.text and not tesseract_available():
                reading.notes.append("Tesseract is not installed, so I cannot read text")
    return reading, sign.box


# ------------------------------------------------------------------------------------------------------- policy
class ExpertPolicy:
    """The policy behind the ``expert`` backend (see the module docstring)."""

    def __init__(self, charset: str = CODE_CHARSET) -> None:
        self.charset = charset
        # It speaks the dialect it is addressed in: function calling when the request offers tools, else tags.
        self.dialects = {name: make_protocol(name, "relative") for name in ("tags", "tools")}

    def __call__(self, messages: list[Message], params: GenerateParams) -> str | dict[str, Any]:
        images = [p for m in messages if m.role != "assistant" and not isinstance(m.content, str) for p in m.content]
        images = [p for p in images if isinstance(p, ImagePart)]
        first = next(m for m in messages if m.role == "user")
        question = first.text()
        q = parse_question(question)
        originals = sum(isinstance(p, ImagePart) for p in first.parts())
        if originals > 1:
            return self._several(q, images[:originals], images[originals:], params, refused=_refused(messages))
        view = images[0].pil()
        proposals = self._proposals(view, q)
        readings = []
        charset = "0123456789" if q.kind == "which_marked" else self.charset
        for k, obs in enumerate(images[1:]):
            reading, _ = read_sign(obs.pil(), charset, q.starred)
            readings.append((proposals[k] if k < len(proposals) else None, reading))
        speaker = self.dialects["tools" if params.tools else "tags"]
        answer, why = self._decide(q, readings, view.width)
        if answer is not None:
            seen = f"The last one shows {readings[-1][1].describe()}. " if readings else ""
            return script_turn(speaker.write_answer(answer, f"{seen}{why}"))
        k = len(readings)
        if k >= len(proposals) or _refused(messages):
            guess = self._guess(q, readings)
            thought = f"I checked {k} candidate{'s' if k != 1 else ''} and none settles it; my best guess is {guess}."
            return script_turn(speaker.write_answer(guess, thought))
        box = self._window(proposals[k], view.width, view.height)
        seen = f"The last one shows {readings[-1][1].describe()}. " if readings else ""
        lead = (
            f"{seen}Checking candidate {k + 1} of {len(proposals)}"
            + (f" (a light sign with a {q.border} border)" if q.border else "")
            + "."
        )
        return script_turn(speaker.write_zoom(box, "original_image", lead, call_id=f"call_{k}"))

    def _several(
        self,
        q: Question,
        originals: list[ImagePart],
        observations: list[ImagePart],
        params: GenerateParams,
        *,
        refused: bool = False,
    ) -> str | dict[str, Any]:
        """A turn on a question about several images (see the module docstring)."""
        views = [part.pil() for part in originals]
        proposals = [self._proposals(view, q, likely_only=True) for view in views]
        rest = [[box for box in self._proposals(view, q) if box not in proposals[k]] for k, view in enumerate(views)]
        found: dict[int, SignReading] = {}  # image → its target's reading
        checked: list[tuple[int, tuple[int, int, int, int]]] = []
        readings: list[SignReading] = []
        for obs in observations:  # replay which proposal each observation shows
            step = self._next_check(q, proposals, rest, found, checked)
            if step is None:
                break
            reading, _ = read_sign(obs.pil(), self.charset, q.starred)
            checked.append(step)
            readings.append(reading)
            if self._is_target(q, reading):
                found.setdefault(step[0], reading)
        speaker = self.dialects["tools" if params.tools else "tags"]
        seen = f"The last one shows {readings[-1].describe()}. " if readings else ""
        answer = self._several_answer(q, found, len(views))
        if answer is not None:
            return script_turn(speaker.write_answer(answer[0], f"{seen}{answer[1]}"))
        step = None if refused else self._next_check(q, proposals, rest, found, checked)
        if step is None:
            guess = "image_1" if q.kind == "which_image" else "".join(r.text for r in found.values()) or "unknown"
            thought = (
                f"I checked {len(checked)} candidates in {len(views)} images and none settles it; my best guess "
                f"is {guess}."
            )
            return script_turn(speaker.write_answer(guess, thought))
        k, box = step
        view = views[k]
        lead = f"{seen}Checking a candidate in image_{k + 1}" + (
            f" (a light sign with a {q.border} border)." if q.border else "."
        )
        call_id = f"call_{len(checked)}"
        return script_turn(
            speaker.write_zoom(self._window(box, view.width, view.height), f"image_{k + 1}", lead, call_id=call_id)
        )

    @staticmethod
    def _next_check(
        q: Question,
        likely: list[list[tuple[int, int, int, int]]],
        rest: list[list[tuple[int, int, int, int]]],
        found: dict[int, SignReading],
        checked: list[tuple[int, tuple[int, int, int, int]]],
    ) -> tuple[int, tuple[int, int, int, int]] | None:
        """The next (image, proposal) to zoom into, or ``None`` when every useful one is checked."""
        images = range(len(likely))
        if q.kind == "split_code":  # image after image, each until its part is read
            order = [(k, b) for k in images if k not in found for b in likely[k] + rest[k]]
        elif q.kind == "which_image":  # the likeliest of every image first
            order = [(k, b) for k in images for b in likely[k]] + [(k, b) for k in images for b in rest[k]]
        else:
            order = [(k, b) for k in images for b in likely[k] + rest[k]]
        done = set(checked)
        return next((step for step in order if step not in done), None)

    @staticmethod
    def _is_target(q: Question, r: SignReading) -> bool:
        if (q.starred and r.corner != "star") or (q.border and r.border != q.border):
            return False
        return q.kind == "which_image" or bool(r.text)

    @staticmethod
    def _several_answer(q: Question, found: dict[int, SignReading], images: int) -> tuple[str, str] | None:
        if q.kind == "which_image" and found:
            k = min(found)
            return f"image_{k + 1}", f"The sign with the star is in image_{k + 1}."
        if q.kind == "split_code" and len(found) == images:
            parts = [found[k].text for k in range(images)]
            return "".join(parts), f"The parts read {' and '.join(parts)}; together {''.join(parts)}."
        if q.kind == "read" and found:
            text = found[min(found)].text
            return text, f"The sign reads {text}."
        return None

    def _proposals(
        self, view: Image.Image, q: Question, *, likely_only: bool = False
    ) -> list[tuple[int, int, int, int]]:
        """Regions worth a zoom, likeliest first (``likely_only``: only those whose border looks like the one
        the question names; with no border named, all)."""
        regions = light_regions(view)
        regions = [r for r in regions if (r.box[2] - r.box[0]) >= 3 and (r.box[3] - r.box[1]) >= 2]
        if not regions:  # a photo: tiles, most detailed first
            return _detailed_tiles(view)
        if not q.border:
            return [regions[i].box for i in reading_order([r.box for r in regions], view.height)]
        # Colours of a one-pixel border in the downscaled view are unreliable: check the likeliest first, then
        # the others, and let each zoom confirm the border.
        likely = sorted((r for r in regions if r.matches(q.border)), key=lambda r: r.distance(q.border))
        rest = sorted((r for r in regions if not r.matches(q.border)), key=lambda r: r.distance(q.border))
        return [r.box for r in (likely if likely_only else likely + rest)]

    @staticmethod
    def _window(box: tuple[int, int, int, int], width: int, height: int) -> list[float]:
        x0, y0, x1, y1 = box
        side_w = min(max(2.6 * (x1 - x0), width / 50), width)  # a region as large as the view: the whole view
        side_h = min(max(2.6 * (y1 - y0), height / 50), height)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = min(max(cx - side_w / 2, 0), width - side_w)
        top = min(max(cy - side_h / 2, 0), height - side_h)
        return [round(v, 4) for v in (left / width, top / height, (left + side_w) / width, (top + side_h) / height)]

    def _decide(self, q: Question, readings: list[Any], width: int) -> tuple[str | None, str]:
        for _, r in readings:
            if (q.starred and r.corner != "star") or (q.border and r.border != q.border):
                continue
            if q.kind == "which_marked" and r.red_dot and r.text:
                return re.sub(r"\D", "", r.text) or r.text, f"This sign has the red dot; its number is {r.text}."
            if q.kind == "marker_color" and r.marker_color:
                return r.marker_color, f"The marker on this sign is {r.marker_color}."
            if q.kind == "marker_shape" and r.marker_shape:
                return r.marker_shape, f"The marker on this sign is a {r.marker_shape}."
            if q.kind == "count" and r.dots:
                return str(r.dots), f"I count {r.dots} dots on this sign."
            if q.kind == "read" and r.text:
                return r.text, f"The sign reads {r.text}."
            if q.kind == "find_code" and r.text and q.codes and r.text.startswith(q.codes[0]):
                return r.text, f"This sign's code starts with {q.codes[0]}: it reads {r.text}."
            if q.kind == "find_marker" and r.text and q.codes and r.text.startswith(q.codes[0]) and r.marker_color:
                why = f"This sign's code, {r.text}, starts with {q.codes[0]}: its marker is {r.marker_color}."
                return r.marker_color, why
        if q.kind == "relative_position":
            where = {}
            for box, r in readings:
                for code in q.codes:
                    if box is not None and r.text and _similar(r.text, code) and r.border in (None, q.border):
                        where.setdefault(code, (box[0] + box[2]) / 2)
            if len(where) == 2:
                a, b = q.codes
                side = "left" if where[a] < where[b] else "right"
                return side, f"{a} is at x≈{where[a]:.0f} and {b} at x≈{where[b]:.0f} in the view: {a} is {side}."
        return None, ""

    @staticmethod
    def _guess(q: Question, readings: list[Any]) -> str:
        texts = [r.text for _, r in readings if r.text]
        if q.kind in ("marker_color", "find_marker"):
            return next((r.marker_color for _, r in readings if r.marker_color), "red")
        if q.kind == "marker_shape":
            return next((r.marker_shape for _, r in readings if r.marker_shape), "circle")
        if q.kind == "count":
            return str(next((r.dots for _, r in readings if r.dots), 5))
        if q.kind == "relative_position":
            return "left"
        return texts[0] if texts else "unknown"


def _refused(messages: list[Message]) -> bool:
    """Whether the loop turned the last zoom down (the reply to it holds no image): then answer, not ask again."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    return last is not None and not any(
        isinstance(p, ImagePart) for m in messages[last + 1 :] if not isinstance(m.content, str) for p in m.content
    )


def _similar(read: str, code: str) -> bool:
    return read == code or (len(read) == len(code) and sum(a != b for a, b in zip(read, code, strict=True)) <= 1)


def _detailed_tiles(view: Image.Image, n: int = 4) -> list[tuple[int, int, int, int]]:
    """The n tiles of a 4 × 4 grid with the most edges (where text and detail are), as boxes of the view."""
    gray = np.asarray(view.convert("L"), np.float32)
    edges = np.abs(np.diff(gray, axis=1))[:-1, :] + np.abs(np.diff(gray, axis=0))[:, :-1]
    h, w = edges.shape
    tiles = []
    for r in range(4):
        for c in range(4):
            box = (c * w // 4, r * h // 4, (c + 1) * w // 4, (r + 1) * h // 4)
            tiles.append((float(edges[box[1] : box[3], box[0] : box[2]].mean()), box))
    return [b for _, b in sorted(tiles, reverse=True)[:n]]


def create(arg: str = "", **_options: Any) -> ScriptedBackend:
    """``expert`` (no argument): the training-free policy."""
    backend = ScriptedBackend(ExpertPolicy(), name="expert", record=0)
    backend.default_coords = "relative"  # type: ignore[attr-defined]
    backend.fixed_coords = "relative"  # type: ignore[attr-defined]  # it writes relative boxes, whatever is asked
    return backend
