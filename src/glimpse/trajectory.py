"""The trajectory record: what one run of the agent loop did, in a form every later stage reads.

The agent loop writes it; evaluation scores it; the viewer draws it; SFT export and RL read it. One JSON line
per trajectory. Images are never embedded: the original is stored by path and SHA-256, and every observation
by its box in original-image pixels, so ``render_image`` recomputes exactly what the model was shown.

Several images in one question (the contract every reader follows):

* **Originals.** A sample's images are ``image_1``, ``image_2`` … in ``Sample.images`` order;
  ``original_image`` is another name of ``image_1``. The record keeps ``image_1`` where a single-image record
  keeps its original (``image``, with its shown size in ``shown_size``) and the others in ``more_images``,
  each a ``ShownImageRef``: path, SHA-256, width, height and ``shown_size``. ``Trajectory.originals()`` lists all of
  them in order, each with its shown size. A single-image record has ``more_images == []`` and reads as before.
* **Shown sizes.** The originals share one pixel budget (``glimpse.images.shared_limits``);
  ``Trajectory.original_limits()`` gives the limits each was shown with.
* **The first user message** shows every original in order, each preceded by a text part with its name
  (``"image_1:\n"``, ``"\nimage_2:\n"`` …), after a note naming them (the prompt set's ``images`` template).
  In chat form (``prompt``, ``conversation``) an original is ``{"type": "image", "index": 0, "original": k}``
  with ``k`` its 0-based position (``image_{k+1}``); a single-image prompt has one ``{"type": "image",
  "index": 0}`` and no name text, as before. A missing ``"original"`` means 0. Observations are
  ``{"type": "image", "index": N}`` (``observation_N``) whatever original they come from.
* **A turn's source** is ``source_index`` (0 = an original, N = ``observation_N``) with ``original_index``,
  the 0-based original whose pixels ``crop_box_px`` is in: the original named, or, for a zoom into an
  observation, that observation's original. ``call.source`` keeps the name as written.
* **Observations** (``Trajectory.observations()``): every original first (``index`` 0, ``original_index``
  0, 1 …), then each zoom and image made by code in creation order; a zoom's ``box_px`` is in the pixels of
  original ``original_index``.
* **Rendering.** ``render_image(trajectory, index, original=k)`` recomputes an image from the files: an
  original resized by its share of the budget, or observation ``index`` cut from its own original at full
  resolution and resized by the per-image limits (a part's ``"original"`` is passed as ``original``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, computed_field

from glimpse.errors import ConfigError, GlimpseError
from glimpse.geometry import Box
from glimpse.images import ImageCache, PixelLimits, counterfactual_view, fit, shared_limits

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# ``cancelled``: stopped from outside (Ctrl-C in glimpse ask, Stop in glimpse ui) before it ended.
StopReason = Literal["answer", "max_turns", "max_images", "context_full", "no_action", "error", "cancelled"]
# Stop reasons where a cap, not the model, ended the trajectory.
CAP_STOPS: frozenset[str] = frozenset({"max_turns", "max_images", "context_full"})
TurnKind = Literal["zoom", "code", "answer", "error", "none"]


class Sample(BaseModel):
    """One question about one image.

    Attributes:
        id: unique within its dataset.
        images: image paths, shown to the model in this order as ``image_1``, ``image_2`` … (the first is
            also ``original_image``).
        question: the question as the model should read it (options already included).
        answer: the gold answer, when known.
        options: multiple-choice options, when the question has them.
        target_boxes: gold boxes ``[x0, y0, x1, y1]`` in original-image pixels, when known (of ``image_1``,
            unless ``meta["target_images"]`` gives each box's 0-based image).
        meta: anything else the dataset carries (level, category, source …).
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    images: list[str]
    question: str
    answer: str | None = None
    options: list[str] | None = None
    target_boxes: list[list[int]] | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    def targets(self) -> list[tuple[int, list[int]]]:
        """Each gold box with the 0-based image it is in (``meta["target_images"]``, else image_1).

        Raises:
            GlimpseError: ``meta["target_images"]`` does not give one valid image per box.
        """
        boxes = self.target_boxes or []
        where = self.meta.get("target_images")
        if where is None:
            return [(0, box) for box in boxes]
        if (
            not isinstance(where, list)
            or len(where) != len(boxes)
            or not all(isinstance(k, int) and 0 <= k < len(self.images) for k in where)
        ):
            raise GlimpseError(
                f"sample {self.id}: target_images must give the 0-based image (of {len(self.images)}) of each of "
                f"its {len(boxes)} target boxes, got {where!r}"
            )
        return list(zip(where, boxes, strict=True))


class ImageRef(BaseModel):
    """An original image: path as given, SHA-256 of the file, and its size in EXIF orientation."""

    path: str
    sha256: str
    width: int
    height: int


class ShownImageRef(ImageRef):
    """An original image and the ``[width, height]`` it was shown at."""

    shown_size: list[int]


class Usage(BaseModel):
    """Token counts, as the backend reported them (``None`` parts count as 0)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class ZoomCall(BaseModel):
    """A zoom request as the model wrote it: the box in the run's coordinate convention, and its source."""

    bbox_2d: list[float]
    source: str = "original_image"


class MadeImage(BaseModel):
    """An image the model's code made: kept by content hash, since geometry cannot recompute it."""

    observation_index: int
    path: str
    sha256: str
    width: int
    height: int
    shown_size: list[int]


class Turn(BaseModel):
    """One assistant turn and what the harness did with it.

    Attributes:
        index: 0-based turn number.
        text: the model's raw text (a stop string the server cut off is put back).
        thought: the reasoning, from ``<think>`` or the server's reasoning field.
        kind: ``zoom`` (a well-formed zoom call; run unless a cap ended the loop first), ``code`` (Python run
            by the code tool), ``answer``, ``error`` (a mistake shown to the model) or ``none`` (neither a call
            nor an answer).
        call: the zoom as written, when it could be read.
        code: the Python the model ran, for ``code`` turns.
        code_output: what the model was told the code printed (and its error), for ``code`` turns.
        made: images the code showed, each a new observation.
        answer: the final answer text, for ``answer`` turns.
        source_index: index of the image zoomed into (0 = an original, N = observation_N).
        original_index: the original (0-based: 0 = image_1) whose pixels ``crop_box_px`` is in: the one
            zoomed into, or the original of the observation zoomed into.
        crop_box_px: the zoom's box in original-image pixels ``[x0, y0, x1, y1]``.
        observation_index: N of the observation_N this zoom created.
        observation_size: ``[width, height]`` the new observation was shown at.
        error: the error text shown to the model.
        error_kind: a short category of the error, counted in metrics.
        tool_attempt: the model tried to call the tool (a zoom, or a malformed call); decides ``over_turn``.
        tool_call_id: the id of the native function call, for the ``tools`` protocol.
        tool_calls: the reply's native function calls as sent back to the model (``id``, ``name``,
            ``arguments``), for the ``tools`` protocol.
        injected: the messages the harness added after this reply (observation, error or code result), in
            chat form; an image is ``{"type": "image", "index": N}`` (N = observation_N).
        finish_reason: why generation stopped (``stop``, ``length`` …).
        usage: tokens of this turn's request.
        latency_s: seconds waiting for the model.
        tool_s: seconds spent running the tool.
    """

    index: int
    text: str
    thought: str | None = None
    kind: TurnKind
    call: ZoomCall | None = None
    code: str | None = None
    code_output: str | None = None
    made: list[MadeImage] = Field(default_factory=list)
    answer: str | None = None
    source_index: int | None = None
    original_index: int = 0
    crop_box_px: list[int] | None = None
    observation_index: int | None = None
    observation_size: list[int] | None = None
    error: str | None = None
    error_kind: str | None = None
    tool_attempt: bool = False
    tool_call_id: str | None = None
    tool_calls: list[dict[str, str]] | None = None
    injected: list[dict[str, Any]] = Field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = 0.0
    tool_s: float = 0.0


class Score(BaseModel):
    """How a final answer was scored (see ``glimpse.eval.scoring``).

    Attributes:
        correct: the verdict; ``None`` when it could not be decided (a judge failed, or there is no gold).
        method: how it was decided: ``choice``, ``exact``, ``numeric``, ``closed_set``, ``judge``,
            ``no_answer``, ``no_choice``, ``no_match``, ``judge_error``, ``no_gold``, ``input_error``.
        extracted: what was compared (the option letter, the number, the normalised text).
        detail: a note: the judge's raw verdict, or why it failed.
    """

    correct: bool | None
    method: str
    extracted: str | None = None
    detail: str | None = None

    @property
    def value(self) -> float:
        """1.0 for a correct answer, else 0.0: the RL reward."""
        return 1.0 if self.correct else 0.0


class TokenView(BaseModel):
    """The whole conversation as one flat list of token ids, with ``mask`` 1 for sampled tokens.

    ``aligned`` is false when a later prompt did not extend the earlier tokens (the server re-tokenised the
    history differently, or images were dropped from the context); the view then stops at that point.
    """

    ids: list[int] = Field(default_factory=list)
    mask: list[int] = Field(default_factory=list)
    aligned: bool = True


class RunSettings(BaseModel):
    """The settings that shaped a trajectory, recorded with it."""

    model: str
    protocol: str
    coords: str
    max_turns: int
    max_images: int | None
    max_new_tokens: int
    max_context_tokens: int
    min_pixels: int
    max_pixels: int
    resize_factor: int
    min_box_side: int
    max_aspect_ratio: float
    keep_images: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    prompt: str
    tools: list[str] = Field(default_factory=lambda: ["zoom"])
    counterfactual: str | None = None  # crops shown as "black" or "noise" instead of their content

    @property
    def limits(self) -> PixelLimits:
        return PixelLimits(self.min_pixels, self.max_pixels, self.resize_factor)


class Observation(BaseModel):
    """An image in a trajectory: an original (index 0; which one: ``original_index``) or observation_N (index N).

    A zoom has ``box_px`` (pixels of original ``original_index``); an image made by code has ``path`` and
    ``sha256`` instead.
    """

    index: int
    box_px: list[int] | None
    source_index: int | None
    shown_size: list[int]
    turn_index: int | None
    path: str | None = None
    sha256: str | None = None
    original_index: int = 0

    @property
    def name(self) -> str:
        """``original_image`` (image_1), ``image_K`` for the other originals, or ``observation_N``."""
        if self.index:
            return f"observation_{self.index}"
        return "original_image" if self.original_index == 0 else f"image_{self.original_index + 1}"


class Trajectory(BaseModel):
    """One run of the agent loop on one sample.

    Attributes:
        id: ``<sample id>#<sample_index>``.
        sample: the question, images and gold answer.
        sample_index: which of the ``k`` samples of this question it is.
        image: the original (``image_1`` of a multi-image sample) as loaded (``None`` when it could not be read).
        shown_size: ``[width, height]`` the original (``image_1``) was shown at.
        more_images: the other originals, ``image_2`` onwards, each with its ``shown_size`` (empty for a
            single-image sample).
        settings: limits, protocol and sampling that produced it.
        turns: the assistant turns, in order.
        answer: the final answer, when the model gave one.
        stop_reason: why the loop stopped.
        over_turn: a cap stopped the loop while the model was still calling the tool; RL masks these.
        error: what went wrong, for ``stop_reason == "error"``.
        started_at: ISO-8601 start time (UTC).
        wall_s: seconds from start to stop.
        token_view: flat token ids and mask, when the backend returned token ids.
        score: the evaluation's verdict on the answer, once scored.
        prompt: the first messages (system prompt, image and question) in chat form, images as
            ``{"type": "image", "index": 0}``; with each turn's reply and ``injected`` messages it rebuilds
            the whole conversation (``conversation``).
    """

    schema_version: int = SCHEMA_VERSION
    id: str
    sample: Sample
    sample_index: int = 0
    image: ImageRef | None = None
    shown_size: list[int] | None = None
    more_images: list[ShownImageRef] = Field(default_factory=list)
    settings: RunSettings
    turns: list[Turn] = Field(default_factory=list)
    answer: str | None = None
    stop_reason: StopReason | None = None
    over_turn: bool = False
    error: str | None = None
    started_at: str = ""
    wall_s: float = 0.0
    token_view: TokenView | None = None
    score: Score | None = None
    prompt: list[dict[str, Any]] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def usage(self) -> Usage:
        total = Usage()
        for turn in self.turns:
            total = total + turn.usage
        return total

    @computed_field  # type: ignore[prop-decorator]
    @property
    def metrics(self) -> dict[str, Any]:
        errors = Counter(t.error_kind for t in self.turns if t.error_kind)
        attempts = sum(1 for t in self.turns if t.tool_attempt)
        return {
            "turns": len(self.turns),
            "zooms": sum(1 for t in self.turns if t.observation_index is not None),
            "tool_calls": attempts,
            "tool_errors": sum(1 for t in self.turns if t.kind == "error"),
            "code_calls": sum(1 for t in self.turns if t.kind == "code"),
            "code_errors": sum(1 for t in self.turns if t.kind == "code" and t.error_kind),
            "errors_by_kind": dict(sorted(errors.items())),
        }

    def originals(self) -> list[ShownImageRef]:
        """Every original in order (``image_1`` first), each with the size it was shown at."""
        if self.image is None or self.shown_size is None:
            return []
        return [ShownImageRef(**self.image.model_dump(), shown_size=list(self.shown_size)), *self.more_images]

    def image_name(self, index: int, original: int = 0) -> str:
        """The name the model knows an image by: ``observation_N`` (``index`` N), else ``original_image`` for
        a single original and ``image_K`` (``original`` K - 1) for several."""
        if index:
            return f"observation_{index}"
        return "original_image" if not self.more_images else f"image_{original + 1}"

    def original_limits(self) -> list[PixelLimits]:
        """The pixel limits each original was shown with (its share of the run's budget; see ``shared_limits``)."""
        return shared_limits([(o.width, o.height) for o in self.originals()], self.settings.limits)

    def observations(self) -> list[Observation]:
        """Every image of the trajectory: the originals first, then each zoom and made image in creation order."""
        out = [
            Observation(
                index=0,
                box_px=[0, 0, ref.width, ref.height],
                source_index=None,
                shown_size=list(ref.shown_size),
                turn_index=None,
                original_index=k,
            )
            for k, ref in enumerate(self.originals())
        ]
        if not out:
            return []
        for turn in self.turns:
            if turn.observation_index is not None and turn.crop_box_px and turn.observation_size:
                out.append(
                    Observation(
                        index=turn.observation_index,
                        box_px=turn.crop_box_px,
                        source_index=turn.source_index,
                        shown_size=turn.observation_size,
                        turn_index=turn.index,
                        original_index=turn.original_index,
                    )
                )
            for made in turn.made:
                out.append(
                    Observation(
                        index=made.observation_index,
                        box_px=None,
                        source_index=None,
                        shown_size=made.shown_size,
                        turn_index=turn.index,
                        path=made.path,
                        sha256=made.sha256,
                    )
                )
        return out


def conversation(trajectory: Trajectory) -> list[dict[str, Any]]:
    """The whole conversation in chat form: the prompt, then each reply and the messages injected after it.

    Text is as the model read and wrote it; images are ``{"type": "image", "index": N}`` (see
    ``render_image`` for their pixels). Images dropped from the context by ``keep_images`` are included.
    """
    out = [dict(m) for m in trajectory.prompt]
    for turn in trajectory.turns:
        reply: dict[str, Any] = {"role": "assistant", "content": turn.text}
        if turn.tool_calls:
            reply["tool_calls"] = [dict(c) for c in turn.tool_calls]
        out.append(reply)
        out.extend(dict(m) for m in turn.injected)
    return out


def render_image(
    trajectory: Trajectory,
    index: int,
    *,
    original: int = 0,
    cache: ImageCache | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    full_resolution: bool = False,
) -> Image.Image:
    """Recompute an image of a trajectory from the original files.

    Args:
        trajectory: a recorded trajectory.
        index: which image: 0 = an original, N = observation_N.
        original: for ``index`` 0, which original (0-based: 0 = image_1); an image part's ``"original"``.
            Observations know their own original.
        cache: decoded originals to reuse.
        base_dir: resolve a relative image path against this folder instead of the working directory.
        full_resolution: return the crop at original resolution instead of the size the model was shown.

    Raises:
        GlimpseError: the trajectory has no such image, or the file changed since it was recorded.
    """
    images = trajectory.observations()
    originals = trajectory.originals()
    if index == 0 and not 0 <= original < len(originals):
        raise GlimpseError(f"{trajectory.id} has {len(originals)} original images; there is no image_{original + 1}")
    observation = (
        images[original] if index == 0 else next((o for o in images[len(originals) :] if o.index == index), None)
    )
    if observation is None:
        raise GlimpseError(f"{trajectory.id} has {len(images)} images; there is no image {index}")
    if observation.path is not None:  # made by code: read back, checked against its hash
        made = (cache or ImageCache()).get(observation.path)
        if made.sha256 != observation.sha256:
            raise GlimpseError(f"{observation.path} changed since trajectory {trajectory.id} was recorded")
        return made.image if full_resolution else fit(made.image, trajectory.settings.limits)
    ref = originals[observation.original_index] if observation.original_index < len(originals) else None
    if ref is None:
        raise GlimpseError(
            f"{trajectory.id}: observation {index} is cut from image_{observation.original_index + 1}, "
            f"which the record does not hold"
        )
    path = ref.path
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    source = (cache or ImageCache()).get(path)
    if source.sha256 != ref.sha256:
        raise GlimpseError(
            f"{path} changed since trajectory {trajectory.id} was recorded "
            f"(sha256 {source.sha256[:12]}… instead of {ref.sha256[:12]}…)"
        )
    assert observation.box_px is not None
    box = Box.from_list(observation.box_px).as_tuple()
    limits = trajectory.original_limits()[observation.original_index] if index == 0 else trajectory.settings.limits
    image = source.image.crop(box) if full_resolution else fit(source.image, limits, box)
    if index and trajectory.settings.counterfactual:  # what the model was shown instead of the crop
        return counterfactual_view(image, trajectory.settings.counterfactual, f"{trajectory.id}/{index}")
    return image


def save_jsonl(trajectories: Iterable[Trajectory], path: str | os.PathLike[str], *, append: bool = False) -> None:
    """Write trajectories as JSON lines (one per line), creating parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a" if append else "w", encoding="utf-8") as fh:
        for traj in trajectories:
            fh.write(traj.model_dump_json() + "\n")


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[Trajectory]:
    """Read trajectories from a JSON-lines file, one at a time. A last line without its newline that does not
    parse (a run killed while writing it) is skipped with a warning, as a resumed evaluation drops it.

    Raises:
        ConfigError: the file is missing, not text, or a line is not a valid trajectory (the message gives the
            line number and the first problem).
    """
    try:
        fh = Path(path).open(encoding="utf-8")  # noqa: SIM115 (closed by the with below, after the checks)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a trajectories file (JSON lines)") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield Trajectory.model_validate_json(line)
                except ValueError as exc:
                    if not line.endswith("\n"):
                        log.warning(
                            "%s:%d: the last line was cut short (a run stopped while writing it); skipped", path, lineno
                        )
                        continue
                    raise ConfigError(f"{path}:{lineno}: not a valid trajectory: {_first_problem(exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file of trajectories (JSON lines)") from None


def _first_problem(exc: ValueError) -> str:
    """A validation error in one line: the first problem, and how many there are."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return str(exc).splitlines()[0]
    first = errors[0]
    where = ".".join(str(x) for x in first.get("loc", ())) or "the line"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', '')}{more}"


def load_jsonl(path: str | os.PathLike[str]) -> list[Trajectory]:
    """Read all trajectories of a JSON-lines file."""
    return list(iter_jsonl(path))


def dumps(trajectory: Trajectory, indent: int | None = 2) -> str:
    """Pretty JSON of one trajectory (for ``--json`` output)."""
    return json.dumps(trajectory.model_dump(mode="json"), indent=indent)
