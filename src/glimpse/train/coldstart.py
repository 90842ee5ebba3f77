"""Cold-start data: multi-turn trajectories that show good visual search, made two ways, in the open.

**Programmatic, from probes** (``programmatic``). Each probe knows where every look-alike sign is and what it
shows, so a teacher can write a search the way a careful model would, and the agent loop runs it for real
(real crops, real observations): the trajectory is what a model trained on it will see. Patterns:

* ``direct``: the target stands out; zoom to it, read, answer;
* ``search``: depth-first over the look-alike candidates in reading order, saying what each one shows, until
  the target turns up (then a closer zoom if needed);
* ``backtrack``: a first zoom into a wrong area, noticed and abandoned, then the search;
* ``nested``: zoom into a group of candidates, then into each within that observation;
* ``verify``: after reading, one closer zoom to check before answering.

Thoughts are short, varied, and truthful to what has been seen so far: before a zoom the teacher only says
what the downscaled view shows (small signs with a coloured border), after it only what that crop shows.

**Few-shot, from any model** (``few_shot``): Glimpse's own exemplars (``exemplars.yaml``, written for this
project) are added to the system prompt, any backend generates turn by turn through the agent loop, and only
trajectories whose final answer the shared scorer marks correct are kept, with acceptance statistics.

Both write trajectories (the canonical record) to ``trajectories.jsonl`` and statistics to ``stats.json``;
``glimpse.train.export`` turns them into LLaMA-Factory, TRL and verl data.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glimpse.agent import AgentLoop, LoopOptions
from glimpse.errors import ConfigError
from glimpse.eval.scoring import score
from glimpse.geometry import Box, Coords, from_relative
from glimpse.images import PixelLimits, oriented_size, smart_resize
from glimpse.models.base import Backend
from glimpse.models.scripted import ScriptedBackend
from glimpse.probes.questions import reading_order
from glimpse.protocol import make_protocol, script_turn
from glimpse.protocol.prompts import DEFAULT_PROMPTS
from glimpse.tools.zoom import MIN_BOX_SIDE
from glimpse.trajectory import Sample, Trajectory, save_jsonl

EXEMPLARS = Path(__file__).with_name("exemplars.yaml")
PATTERNS = ("direct", "search", "backtrack", "nested", "verify")
# Why the teacher takes one-image probes only: it says what each look-alike shows, which two-image probes do
# not record.
_ONE_IMAGE = (
    "the programmatic teacher searches one-image probes (two-image probes do not record what each look-alike "
    "sign shows, so its thoughts could not be truthful); make cold-start data for them with --method fewshot"
)
# Zoom window around a sign: this many times its size, at least this many original pixels a side.
_WINDOW_SCALE, _WINDOW_MIN = 3.0, 96


@dataclass
class ColdStartStats:
    """What a cold-start run produced."""

    tried: int = 0
    kept: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    patterns: Counter[str] = field(default_factory=Counter)
    turns: Counter[int] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tried": self.tried,
            "kept": self.kept,
            "acceptance": self.kept / self.tried if self.tried else 0.0,
            "rejected": dict(self.reasons.most_common()),
            "patterns": dict(self.patterns.most_common()),
            "turns": dict(sorted(self.turns.items())),
        }


# ------------------------------------------------------------------------------------------------- the teacher
class _Writer:
    """Boxes in the protocol's coordinates, relative to the image a zoom is taken from."""

    def __init__(self, width: int, height: int, coords: Coords, limits: PixelLimits):
        self.width, self.height, self.coords, self.limits = width, height, coords, limits

    def window(self, box: list[int], scale: float = _WINDOW_SCALE, minimum: int = _WINDOW_MIN) -> Box:
        x0, y0, x1, y1 = box
        w, h = max(minimum, (x1 - x0) * scale), max(minimum, (y1 - y0) * scale)
        w, h = min(w, self.width), min(h, self.height)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = int(min(max(cx - w / 2, 0), self.width - w))
        top = int(min(max(cy - h / 2, 0), self.height - h))
        return Box(left, top, left + int(w), top + int(h))

    def call(self, box: Box, source: Box | None, source_name: str) -> dict[str, Any]:
        """The zoom call for ``box`` (original pixels) written relative to ``source`` (original pixels)."""
        src = source or Box.full(self.width, self.height)
        rel = tuple(
            min(1.0, max(0.0, v))
            for v in (
                (box.x0 - src.x0) / src.width,
                (box.y0 - src.y0) / src.height,
                (box.x1 - src.x0) / src.width,
                (box.y1 - src.y0) / src.height,
            )
        )
        shown = smart_resize(src.width, src.height, self.limits)
        if self.coords is Coords.RELATIVE:
            written: list[Any] = [round(v, 3) for v in rel]
        else:
            written = from_relative(rel, self.coords, *shown)  # type: ignore[arg-type]
        return {"bbox_2d": written, "source": source_name}


def _place(box: list[int], width: int, height: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    row = "top" if cy < 0.33 else "bottom" if cy > 0.67 else "middle"
    col = "left" if cx < 0.33 else "right" if cx > 0.67 else "centre"
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}" if row != "middle" else f"middle {col}"


def _shows(c: dict[str, Any], kind: str) -> str:
    """What a zoom onto candidate ``c`` reveals, in words."""
    bits = []
    if c.get("corner") == "dot":
        bits.append("a dot (not a star) in its top-left corner")
    elif c.get("corner") == "star":
        bits.append("a small star in its top-left corner")
    if kind == "which_marked":
        bits.append(f"the number {c['code']}" + (" and a small red dot" if c.get("red_dot") else ", no red dot"))
    elif kind in ("marker_color", "marker_shape") and c.get("marker"):
        colour, shape = c["marker"]
        bits.append(f"a {colour} {shape} outline" if kind == "marker_color" else f"an outlined {shape} in {colour}")
    elif kind == "count" and c.get("dots"):
        bits.append(f"{c['dots']} black dots")
    elif c.get("code") and kind == "find_marker":
        colour, shape = c["marker"]
        bits.append(f"the code {c['code']} and a {colour} {shape} outline")
    elif c.get("code") and kind in ("read_code", "relative_position", "find_code"):
        bits.append(f"the code {c['code']}")
    return " and ".join(bits) if bits else "nothing that answers the question"


# What the teacher concludes once it has seen what a question of each kind needs.
_CONCLUSIONS = {
    "read_code": "The sign reads {answer}.",
    "marker_color": "Its marker is drawn in {answer}.",
    "marker_shape": "Its marker is a {answer}.",
    "count": "I count {answer} dots on it.",
    "which_marked": "The sign with the red dot shows {answer}.",
    "find_code": "This is the sign whose code starts that way: it reads {answer}.",
    "find_marker": "This is the sign whose code starts that way: its marker is drawn in {answer}.",
    "relative_position": "Comparing where the two signs are, the first one is to the {answer} of the second.",
}


def _conclusion(kind: str, answer: str) -> str:
    return _CONCLUSIONS.get(kind, _CONCLUSIONS["relative_position"]).format(answer=answer)


def teacher_turns(
    sample: Sample,
    rng: random.Random,
    *,
    coords: str = "relative",
    protocol: str = "tags",
    limits: PixelLimits | None = None,
    pattern: str | None = None,
) -> tuple[list[Any], str]:
    """A scripted search of one probe, and the pattern it follows.

    Raises:
        ValueError: the sample carries no candidates (it is not a Glimpse probe), or has several images.
    """
    if len(sample.images) > 1:
        raise ValueError(f"{sample.id}: {_ONE_IMAGE}")
    limits = limits or PixelLimits()
    candidates = sample.meta.get("candidates")
    if not candidates or not sample.images:
        raise ValueError(f"{sample.id} has no candidate details; cold-start data is made from Glimpse probes")
    width, height = sample.meta.get("size") or oriented_size(sample.images[0])
    kind = str(sample.meta.get("category", "read_code"))
    level = str(sample.meta.get("level", "medium"))
    writer = _Writer(width, height, Coords(coords), limits)
    answer = sample.answer or ""
    targets = [c for c in candidates if c["target"]]
    if pattern is None:
        weights = {"easy": (4, 1, 2, 0, 3)}.get(level, (0, 5, 2, 2, 1))
        pattern = rng.choices(PATTERNS, weights=weights)[0]
        if len(candidates) > 1 and pattern == "direct":
            pattern = "search"
    border = candidates[0]["border"]
    order = [candidates[i] for i in reading_order([c["box"] for c in candidates], height)]
    if pattern == "direct" and len(candidates) == 1:
        order = targets
    turns: list[tuple[str, dict[str, Any]]] = []  # (thought, call)
    seen: list[str] = []
    many = len(candidates) > 1
    opening = rng.choice(
        [
            f"The full view is large and detailed; I can see {'several' if many else 'a'} "
            f"small sign{'s' if many else ''} with a {border} border but cannot read "
            f"{'them' if many else 'it'} at this size.",
            f"There {'are' if many else 'is'} {'several small signs' if many else 'one small sign'} "
            f"with a {border} border. The details are far too small here.",
            f"I need a closer look: the {border}-bordered sign{'s are' if many else ' is'} only specks in this view.",
        ]
    )
    found: list[dict[str, Any]] = []
    need = len(targets)
    if pattern == "backtrack":
        decoy = _decoy(candidates, writer, rng)
        turns.append(
            (
                opening + f" Something near the {_place(decoy.as_list(), width, height)} might be one; "
                "trying there first.",
                writer.call(decoy, None, "original_image"),
            )
        )
        opening = rng.choice(
            [
                "No sign in this area: it was only clutter. Back to the full image.",
                "Nothing with that border here; I was wrong about this spot. Going back to the original.",
            ]
        )
    region: Box | None = None
    if pattern == "nested" and many:
        group = sorted(
            candidates, key=lambda c: abs(c["box"][0] - targets[0]["box"][0]) + abs(c["box"][1] - targets[0]["box"][1])
        )[:3]
        x0 = min(c["box"][0] for c in group)
        y0 = min(c["box"][1] for c in group)
        x1 = max(c["box"][2] for c in group)
        y1 = max(c["box"][3] for c in group)
        region = writer.window([x0, y0, x1, y1], scale=1.3)
        turns.append(
            (
                opening + " Several of them sit close together; I will look at that group first.",
                writer.call(region, None, "original_image"),
            )
        )
        opening = f"This view holds {len(group)} of the signs. I will check them one by one."
        order = sorted(group, key=lambda c: c["box"][0]) + [c for c in order if c not in group]
    for i, c in enumerate(order):
        inside = region is not None and region.coverage_of(Box.from_list(c["box"])) == 1.0
        source, name = (region, "observation_1") if inside else (None, "original_image")
        lead = (
            opening
            if i == 0
            else rng.choice(
                ["Next one.", "Moving on to the next sign.", "Checking another.", "On to the next candidate."]
            )
        )
        where = f" at the {_place(c['box'], width, height)}" if not inside else ""
        turns.append(
            (
                f"{seen[-1]} {lead} Zooming into the sign{where}.".strip()
                if seen
                else f"{lead} Zooming into the sign{where}.",
                writer.call(writer.window(c["box"]), source, name),
            )
        )
        shows = _shows(c, kind)
        if c["target"]:
            found.append(c)
            seen.append(
                rng.choice([f"This sign has {shows}.", f"Here: {shows}."]) + (" That is the one." if need == 1 else "")
            )
            if len(found) == need:
                break
        else:
            seen.append(rng.choice([f"This one has {shows}.", f"It shows {shows}.", f"Not it: {shows}."]))
    verify = pattern == "verify" or (kind in ("count", "marker_shape", "marker_color") and rng.random() < 0.5)
    tight = writer.window(found[-1]["box"], scale=1.25, minimum=2 * MIN_BOX_SIDE) if found else None
    if verify and tight is not None and tight != writer.window(found[-1]["box"]):  # a closer view, not the same
        turns.append(
            (f"{seen[-1]} Let me zoom closer to be sure of the detail.", writer.call(tight, None, "original_image"))
        )
        seen.append(rng.choice(["The closer view confirms it.", "Closer up it is the same: confirmed."]))
        if pattern != "verify":
            pattern += "+verify"
    final = " ".join(x for x in (seen[-1] if seen else "", _conclusion(kind, answer)) if x)
    speaker = make_protocol(protocol, coords)
    out: list[Any] = [
        script_turn(speaker.write_zoom(call["bbox_2d"], call["source"], thought, call_id=f"call_{k}"))
        for k, (thought, call) in enumerate(turns)
    ]
    out.append(script_turn(speaker.write_answer(answer, final)))
    return out, pattern


def _decoy(candidates: list[dict[str, Any]], writer: _Writer, rng: random.Random) -> Box:
    """A window with no candidate in it, for the backtracking pattern."""
    boxes = [Box.from_list(c["box"]) for c in candidates]
    for _ in range(100):
        w = h = max(_WINDOW_MIN * 2, int(min(writer.width, writer.height) * 0.15))
        x, y = rng.randrange(0, writer.width - w), rng.randrange(0, writer.height - h)
        window = Box(x, y, x + w, y + h)
        if all(window.intersection(b) == 0 for b in boxes):
            return window
    return Box(0, 0, _WINDOW_MIN * 2, _WINDOW_MIN * 2)


# ------------------------------------------------------------------------------------------------------ running
async def _keep(loop: AgentLoop, sample: Sample, backend: Backend, repeat: int = 0) -> tuple[Trajectory, str | None]:
    (traj,) = await loop.run(sample, first_index=repeat, backend=backend)
    traj.score = await score(traj.answer, traj.sample)
    if traj.stop_reason != "answer":
        return traj, traj.stop_reason or "error"
    if not traj.score.correct:
        return traj, "wrong_answer"
    if traj.metrics["tool_errors"]:
        return traj, "tool_errors"
    return traj, None


async def programmatic(
    samples: list[Sample],
    out: str | Path,
    *,
    seed: int = 0,
    coords: str = "relative",
    protocol: str = "tags",
    max_turns: int = 24,
    concurrency: int = 4,
    limits: PixelLimits | None = None,
) -> ColdStartStats:
    """Run the teacher on probes; keep the trajectories that end with the right answer and no mistakes.

    Raises:
        ConfigError: a sample has several images (see ``teacher_turns``).
    """
    several = [s.id for s in samples if len(s.images) > 1]
    if several:
        raise ConfigError(f"{len(several)} samples (e.g. {several[0]}) have several images: {_ONE_IMAGE}")
    limits = limits or PixelLimits()
    options = LoopOptions(
        protocol=protocol,
        coords=coords,
        max_turns=max_turns,
        min_pixels=limits.min_pixels,
        max_pixels=limits.max_pixels,
        resize_factor=limits.factor,
    )
    loop = AgentLoop(ScriptedBackend([["<answer>unused</answer>"]], name="teacher"), options)
    rng = random.Random(f"glimpse-coldstart/{seed}")
    stats = ColdStartStats()
    kept: list[Trajectory] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(sample: Sample, turn_rng: random.Random) -> None:
        async with gate:
            script, pattern = teacher_turns(sample, turn_rng, coords=coords, protocol=protocol, limits=limits)
            traj, reason = await _keep(loop, sample, ScriptedBackend([script], name="teacher", record=0))
        stats.tried += 1
        if reason is None:
            stats.kept += 1
            stats.patterns[pattern] += 1
            stats.turns[len(traj.turns)] += 1
            traj.sample.meta["pattern"] = pattern
            kept.append(traj)
        else:
            stats.reasons[reason] += 1

    await asyncio.gather(*(one(s, random.Random(rng.random())) for s in samples))
    _write(out, kept, stats, {"method": "programmatic", "seed": seed, "coords": coords, "protocol": protocol})
    return stats


def exemplar_prompt(path: str | Path = EXEMPLARS, protocol: str = "tags") -> str:
    """The default system prompt with the exemplars appended."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    blocks = ["", "Here are examples of careful searches (the zoomed views are described in brackets):"]
    for n, ex in enumerate(data["exemplars"], 1):
        lines = [f"Example {n}. Question: {ex['question']}"]
        for step in ex["turns"]:
            lines.append(f"You: {step['reply']}")
            if step.get("observation"):
                lines.append(f"[{step['observation']}]")
        blocks.append("\n".join(lines))
    return DEFAULT_PROMPTS[protocol].system + "\n\n".join(blocks)


async def few_shot(
    backend: Backend,
    samples: list[Sample],
    out: str | Path,
    *,
    attempts: int = 1,
    exemplars: str | Path = EXEMPLARS,
    protocol: str = "tags",
    coords: str | None = None,
    max_turns: int = 12,
    concurrency: int = 8,
    max_new_tokens: int = 2048,
    limits: PixelLimits | None = None,
    temperature: float | None = 1.0,
    seed: int | None = None,
) -> ColdStartStats:
    """Prompt any model with the exemplars, run it turn by turn, and keep its correct trajectories.

    ``coords`` ``None`` uses the backend's native box convention (see ``AgentLoop``).
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    prompt_file = folder / "fewshot_prompt.yaml"
    prompt_file.write_text(yaml.safe_dump({"system": exemplar_prompt(exemplars, protocol)}), encoding="utf-8")
    options = LoopOptions(
        protocol=protocol,
        coords=coords,
        prompt_file=str(prompt_file),
        max_turns=max_turns,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        min_pixels=limits.min_pixels if limits else None,
        max_pixels=limits.max_pixels if limits else None,
        resize_factor=limits.factor if limits else None,
    )
    loop = AgentLoop(backend, options)
    stats = ColdStartStats()
    kept: list[Trajectory] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(sample: Sample, repeat: int) -> None:
        async with gate:
            traj, reason = await _keep(loop, sample, backend, repeat)
        stats.tried += 1
        if reason is None:
            stats.kept += 1
            stats.turns[len(traj.turns)] += 1
            kept.append(traj)
        else:
            stats.reasons[reason] += 1

    await asyncio.gather(*(one(s, r) for s in samples for r in range(attempts)))
    _write(
        out,
        kept,
        stats,
        {
            "method": "few_shot",
            "model": getattr(backend, "name", "?"),
            "attempts": attempts,
            "exemplars": str(exemplars),
        },
    )
    return stats


def _write(out: str | Path, kept: list[Trajectory], stats: ColdStartStats, info: dict[str, Any]) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    kept.sort(key=lambda t: t.id)
    save_jsonl(kept, folder / "trajectories.jsonl")
    (folder / "stats.json").write_text(json.dumps({**info, **stats.as_dict()}, indent=2) + "\n", encoding="utf-8")
