"""The teacher of the built-in model: searches a student that sees only the views can follow.

The teacher knows everything about a probe (where each sign is, which is the target); the student sees the
shown view's region tokens. So the teacher zooms by pointing at a region token exactly as the student must: for
each sign it needs (the target; both signs of a ``relative_position`` question), the proposal on the first view
that best covers the sign and whose zoom window shows all of it, written with the student's own spelling
(``processing.zoom_window``); then the answer. It goes straight to the target: on medium and hard probes the
student can see the star that marks it in the first view, and on easy ones the border colour the question
names, so checking look-alikes in some fixed order would teach turns the student has no reason to take.
A probe whose target no proposal covers is skipped (and counted): the student could not point at it either.

**Scanning** (``scans``): the questions the student cannot go straight to ask which of several look-alikes
reads a code the question names (``relative_position``; ``find_code`` and ``find_marker``, by the code's start),
among more than two
signs of the border it names: the codes are too small to read in the first view. There the teacher looks at those
signs from left to right, as a student can (their border colour shows), until it has seen every one it needs
(or, with ``scan_looks``, that many of them), then answers. Every look is trained: it is the search the student
should make. Among 8-12 look-alikes a whole ``relative_position`` scan takes about 9 looks (100 hard probes of
seed 0), more than the recipe's 6-turn cap allows: a search the cap cuts, which is what over-turn masking is for
(the README's reproduction section); a ``find_code`` or ``find_marker`` scan stops at its one sign, about
half-way.

**Checking** (``wrong > 0``): the student's first zoom is not always right, and a search that answers from the
wrong sign is lost. So some scripts first look at ``wrong`` signs that are not the target: look-alike candidates
where the probe has them (the confusion a student that half-sees the star makes), other proposals elsewhere;
then the target, then the answer. The trainer leaves the wrong looks untrained (their labels masked: they are
the student's mistakes, not the teacher's advice) and trains what follows them: having read a sign that is not
the one asked for (a dot where the star should be, the wrong border colour), look again, elsewhere.
"""

from __future__ import annotations

import random
from typing import Any

from PIL import Image

from glimpse.builtin.processing import STEPS, zoom_text, zoom_window
from glimpse.builtin.proposer import TILES, regions
from glimpse.images import PixelLimits, fit
from glimpse.train.common import IGNORE
from glimpse.trajectory import Sample

COVER = 0.3  # a proposal points at a sign when it covers at least this share of the sign's box
# A region shows a sign (and is taught what the sign's border and corner show) when it covers this share of
# the sign's box and is at most this many times the sign's area (its crop is mostly that sign).
SHOWS_COVER, SHOWS_AREA = 0.6, 4.0
REGION_ATTRIBUTES = ("border", "mark")  # what the region heads learn of the sign a region shows
# the kinds whose look-alikes are told apart only by reading them, and the fewest look-alikes a scan is for (an easy
# left-or-right probe's two are both named; an easy find_code probe's two differ only in their codes)
SCANNED = {"relative_position": 3, "find_code": 2, "find_marker": 2}
FIND_KINDS = ("find_code", "find_marker")  # one sign named by its code's start: its scan is never cut
READ_MATCH = 0.4  # a panel read is a sign when their boxes overlap at least this much (intersection over union)


Box = tuple[float, float, float, float]


def _overlap(a: Box, b: Box) -> float:
    """The area two boxes share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _in_view(sample: Sample, view: Image.Image, box: list[float]) -> Box:
    """A box in the sample's original pixels, in pixels of ``view`` (the original as the loop shows it)."""
    width, height = sample.meta["size"]
    sx, sy = view.width / width, view.height / height
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def pointed_region(view: Image.Image, box: tuple[float, float, float, float]) -> list[int] | None:
    """The zoom window (grid values) of the proposal on ``view`` that best covers ``box`` (view pixels), or None."""
    best, key = None, 0.0
    area = (box[2] - box[0]) * (box[3] - box[1])
    for i, b in enumerate(regions(view)):
        if i < TILES[0] * TILES[1]:
            continue
        win = zoom_window(b, view.width, view.height)
        x0, y0 = win[0] * view.width / STEPS, win[1] * view.height / STEPS
        x1, y1 = win[2] * view.width / STEPS, win[3] * view.height / STEPS
        if not (x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]):
            continue
        inter = _overlap(b, box)
        if inter < COVER * area:
            continue
        iou = inter / ((b[2] - b[0]) * (b[3] - b[1]) + area - inter)
        if iou > key:
            best, key = win, iou
    return best


def scans(sample: Sample) -> bool:
    """Whether the teacher scans this probe's look-alikes (see the module docstring): a question about signs named
    by code among at least ``SCANNED[kind]`` look-alikes."""
    meta = sample.meta
    return len(meta.get("candidates") or []) >= SCANNED.get(meta.get("category"), float("inf"))


def teacher_turns(
    sample: Sample,
    view: Image.Image,
    *,
    wrong: int = 0,
    rng: random.Random | None = None,
    scan_looks: int = 0,
) -> list[str] | None:
    """The teacher's replies for a probe whose first view (as the loop shows it) is ``view``; None when a sign
    it needs is not among the proposals. A card (no search needed) is answered at once. ``wrong``: first look at
    up to this many signs that are not the target (chosen with ``rng``); the replies start with those looks
    (``len(replies) - len(teacher_turns(sample, view))`` of them: fewer when the view offers fewer); a scan
    (``scans``) takes none, and stops after ``scan_looks`` looks (0: once every named sign was seen; a ``find_code``
    or ``find_marker`` scan is never cut: its answer is what the last look reads)."""
    answer = f"<answer>{sample.answer}</answer>"
    if sample.meta.get("level") == "card":
        return [answer]
    if scans(sample):
        return scan_turns(sample, view, answer, 0 if sample.meta.get("category") in FIND_KINDS else scan_looks)
    turns = []
    targets = sorted((c for c in sample.meta["candidates"] if c["target"]), key=lambda c: c["box"][0])
    for c in targets:
        window = pointed_region(view, _in_view(sample, view, c["box"]))
        if window is None:
            return None
        turns.append(f"<grounding>{zoom_text(window, 0)}</grounding>")
    if wrong > 0:
        alikes = [_in_view(sample, view, c["box"]) for c in sample.meta["candidates"] if not c["target"]]
        targets_px = [_in_view(sample, view, c["box"]) for c in targets]
        looks = wrong_looks(view, targets_px, alikes, wrong, rng or random.Random(0))
        turns = [f"<grounding>{zoom_text(w, 0)}</grounding>" for w in looks] + turns
    return [*turns, answer]


def scan_turns(sample: Sample, view: Image.Image, answer: str, looks: int = 0) -> list[str] | None:
    """The look-alikes from left to right until every sign the question names is seen (or after ``looks`` looks
    when positive), then ``answer``; None when a named sign is not among the proposals (a look-alike that is not
    is passed over)."""
    turns: list[str] = []
    left = sum(c["target"] for c in sample.meta["candidates"])
    for c in sorted(sample.meta["candidates"], key=lambda c: c["box"][0] + c["box"][2]):
        window = pointed_region(view, _in_view(sample, view, c["box"]))
        if window is None:
            if c["target"]:
                return None
            continue
        turns.append(f"<grounding>{zoom_text(window, 0)}</grounding>")
        left -= c["target"]
        if not left or len(turns) == looks:
            break
    return [*turns, answer]


def wrong_looks(
    view: Image.Image, targets: list[Box], alikes: list[Box], n: int, rng: random.Random
) -> list[list[int]]:
    """Up to ``n`` zoom windows on ``view`` that show none of ``targets`` (boxes in view pixels): the look-alike
    candidates' (``alikes``) first, in random order, then other proposals'."""

    def clear(win: list[int]) -> bool:  # the window shows no part of a target's centre
        x0, y0 = win[0] * view.width / STEPS, win[1] * view.height / STEPS
        x1, y1 = win[2] * view.width / STEPS, win[3] * view.height / STEPS
        return all(not (x0 <= (t[0] + t[2]) / 2 <= x1 and y0 <= (t[1] + t[3]) / 2 <= y1) for t in targets)

    alikes = list(alikes)
    rng.shuffle(alikes)
    looks: list[list[int]] = []
    for b in alikes:
        win = pointed_region(view, b)
        if win is not None and clear(win) and win not in looks:
            looks.append(win)
        if len(looks) == n:
            return looks
    others = [b for i, b in enumerate(regions(view)) if i >= TILES[0] * TILES[1]]
    rng.shuffle(others)
    for b in others:
        win = zoom_window(b, view.width, view.height)
        if clear(win) and win not in looks:
            looks.append(win)
        if len(looks) == n:
            break
    return looks


def asked_labels(candidates: list[dict[str, Any]]) -> dict[str, int]:
    """What a probe's question asks for: per attribute of ``REGION_ATTRIBUTES``, the class index the (first)
    target shows (``RegionHeads.ask``'s labels)."""
    from glimpse.probes.stream import sign_labels

    labels = sign_labels(next(c for c in candidates if c["target"]))
    return {name: labels[name] for name in REGION_ATTRIBUTES}


def region_targets(sample: Sample, view: Image.Image) -> dict[str, list[int]] | None:
    """What the teacher knows each region of a probe's first view (``view``, as the loop shows it) shows: per
    attribute of ``REGION_ATTRIBUTES``, one class index (``probes.stream.sign_labels``) per region of
    ``regions(view)``, ``IGNORE`` where the region shows no sign it knows (the tiles; background; clutter). Needs the
    meta's ``others`` (``probe_sample(..., others=True)``); None for a sample without them (a card)."""
    from glimpse.probes.stream import sign_labels

    if "others" not in sample.meta:
        return None
    signs = [
        (_in_view(sample, view, c["box"]), sign_labels(c)) for c in [*sample.meta["candidates"], *sample.meta["others"]]
    ]
    out: dict[str, list[int]] = {name: [] for name in REGION_ATTRIBUTES}
    for i, b in enumerate(regions(view)):
        best, key = None, 0.0
        area = (b[2] - b[0]) * (b[3] - b[1])
        for box, labels in signs if i >= TILES[0] * TILES[1] else []:
            sign_area = (box[2] - box[0]) * (box[3] - box[1])
            cover = _overlap(b, box) / sign_area
            if cover >= SHOWS_COVER and area <= SHOWS_AREA * sign_area and cover > key:
                best, key = labels, cover
        for name in REGION_ATTRIBUTES:
            out[name].append(best[name] if best is not None else IGNORE)
    return out


def grid_turns(sample: Sample, limits: PixelLimits | None = None) -> list[str]:
    """The teacher's replies for a sample whose image is a file, seen at ``limits`` (default: the built-in model's
    native limits); for tests and for RL's cold start. Raises if no proposal covers the target."""
    from glimpse.builtin.model import MAX_PIXELS, MIN_PIXELS

    limits = limits or PixelLimits(MIN_PIXELS, MAX_PIXELS, 32)
    with Image.open(sample.images[0]) as image:
        view = fit(image.convert("RGB"), limits)
    turns = teacher_turns(sample, view)
    if turns is None:
        raise ValueError(f"{sample.id}: no proposal on its first view covers the target; pick another sample")
    return turns


def reading_targets(sample: Sample, observations: list[Any], panels: list[tuple[float, ...]]) -> list[Any]:
    """What the teacher knows each shown image's panel shows: per image (``observations``, in the order the
    model saw them, each with its box in original pixels; ``panels``, the relative box of the panel the reader
    read in it), the class indices of the sign it is (``probes.stream.sign_labels``), or None when the panel is
    no sign (a probe's first view, a panel between signs). A card's sign is read on its first view."""
    from glimpse.probes.stream import sign_labels

    out: list[Any] = []
    for obs, (rx0, ry0, rx1, ry1) in zip(observations, panels, strict=True):
        if obs.box_px is None or (obs.index == 0 and sample.meta.get("level") != "card"):
            out.append(None)
            continue
        x0, y0, x1, y1 = obs.box_px
        w, h = x1 - x0, y1 - y0
        panel = (x0 + rx0 * w, y0 + ry0 * h, x0 + rx1 * w, y0 + ry1 * h)
        best, best_iou = None, READ_MATCH
        for c in sample.meta["candidates"]:
            b = c["box"]
            inter = _overlap(panel, b)
            union = (panel[2] - panel[0]) * (panel[3] - panel[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if union > 0 and inter / union >= best_iou:
                best, best_iou = c, inter / union
        out.append(sign_labels(best) if best is not None else None)
    return out
