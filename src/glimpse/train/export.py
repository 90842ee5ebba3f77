"""Cold-start SFT data for LLaMA-Factory, TRL and verl, made from trajectories, with one shared image folder.

``export`` reads a ``trajectories.jsonl`` one trajectory at a time and writes, under ``out_dir``::

    images/                        every image as the model was shown it, written once, shared by all formats
    llamafactory/data.json         ShareGPT rows (``conversations`` with from/value, ``images``)
    llamafactory/dataset_info.json the dataset entry LLaMA-Factory looks up by name
    llamafactory/train_args.yaml   the image pixel limits to train with, so LLaMA-Factory does not resize
    trl/data.jsonl                 TRL's vision format: ``messages`` with image and text parts, ``images``
    verl/data.parquet              verl ``MultiTurnSFTDataset`` rows: ``<image>`` placeholders, images inline
    manifest.json                  counts, skipped trajectories, pixel limits, the source file and its SHA-256

``validate_llamafactory``, ``validate_trl`` and ``validate_verl`` read the files back and check the rules the
tools enforce (or silently rely on); ``validate`` runs those of an export folder.

Choices, and why:

* **Images** are ``render_image`` output: the original resized to the run's pixel limits and every crop, so
  each side is a multiple of the resize factor and the area lies within the limits. PNG by default: the model
  saw exact pixels. An image used by several trajectories (the original, for the ``k`` samples of a question)
  is written once, named after the first trajectory that showed it.
* **Paths** are relative to the folder of the data file (``../images/NAME.png``). LLaMA-Factory joins them to
  ``media_dir``, which defaults to ``dataset_dir``: point ``dataset_dir`` at ``llamafactory/``. TRL rows carry
  the same paths for the caller to open; verl rows carry the PNG bytes themselves.
* **Resizing.** The trainers must leave the images alone. LLaMA-Factory downscales anything above its
  ``image_max_pixels`` (default 768×768), so ``train_args.yaml`` sets ``image_max_pixels`` and
  ``image_min_pixels`` to the run's limits. verl images carry ``min_pixels``/``max_pixels``, under which
  ``qwen_vl_utils`` resizes a shown image to itself. Both hold only for a model with the run's resize factor
  (28: Qwen2/2.5-VL; 32: Qwen3-VL); an export refuses trajectories made with different limits.
* **Placeholders.** LLaMA-Factory and verl read ``<image>`` (and ``<video>``; LLaMA-Factory also ``<audio>``)
  anywhere in the text as a media slot, and neither has an escape. A trajectory whose own text contains one
  is skipped (reason ``placeholder_in_text``) rather than altered: changed text would teach the model words it
  never wrote.
* **LLaMA-Factory alternation.** Human/observation turns must sit at odd positions and gpt/function_call at even
  ones. Consecutive non-assistant messages are joined (with a newline) into one turn: an ``observation`` when
  the run starts with a tool message (the answer to a function call, shown inside ``<tool_response>``), else a
  ``human`` turn. In the ``tools`` protocol the zoomed image, which follows the tool's note in a user message,
  so lands inside the observation.
* **Function calls.** LLaMA-Factory: a ``function_call`` turn holds the reply text then
  ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``; its formatter keeps the text and re-renders the call
  for the template. TRL: the transformers form ``{"type": "function", "function": {"name", "arguments": {…}}}``.
  verl: the same with ``arguments`` kept a JSON string, because parquet would merge the argument sets of
  different tools into one struct and fill the missing keys with nulls (Qwen3-VL's template writes string
  arguments as they are). The same merging rules out verl's ``tools`` column for runs that offered the python
  tool by function calling: such an export raises.
* **Observations are user turns** in TRL and verl, as the record has them (TRL does not fill image parts of
  tool messages; the protocols never put images there).
* **What is exported**: what it is given, less trajectories that did not stop with an answer (skipped and
  counted). A trajectory without a ``prompt`` (recorded by an older Glimpse) cannot be rebuilt and raises.

Not covered: the loss mask, which each trainer sets. LLaMA-Factory trains every gpt and function_call turn,
verl every assistant message; TRL trains all tokens unless ``assistant_only_loss=True`` (which TRL 1.16 allows
for vision models with transformers 5.18 or newer). Qwen2.5-VL's own chat template has no tool-call branch, so
TRL and verl drop the function calls of ``tools``-protocol data for that model unless given a template that
renders them; LLaMA-Factory's ``qwen2_vl`` template renders them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from glimpse.errors import ConfigError, GlimpseError
from glimpse.geometry import Coords
from glimpse.images import ImageCache, PixelLimits, encode_image, smart_resize
from glimpse.protocol.tools import code_tool_schema, zoom_tool_schema
from glimpse.train.common import ImageKey
from glimpse.trajectory import Trajectory, conversation, iter_jsonl, render_image

FORMATS = ("llamafactory", "trl", "verl")
IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg"}
IMAGE = "<image>"
# Strings LLaMA-Factory (its IMAGE/VIDEO/AUDIO_PLACEHOLDER defaults) or verl's MultiTurnSFTDataset read as media.
PLACEHOLDERS = (IMAGE, "<video>", "<audio>")
DATA_FILES = {"llamafactory": "llamafactory/data.json", "trl": "trl/data.jsonl", "verl": "verl/data.parquet"}
# LLaMA-Factory's ShareGPT role names, as written in dataset_info.json.
LF_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
# verl rows per parquet row group; images are inline, so a group stays within tens of megabytes.
_VERL_ROWS_PER_GROUP = 32


@dataclass
class ExportResult:
    """What ``export`` wrote.

    Attributes:
        out_dir: the export folder.
        files: data file of each format written.
        exported: trajectories written (the same ones in every format).
        images: image files written.
        skipped: trajectory ids left out, by reason (``stop_reason:<reason>``, ``placeholder_in_text``,
            ``duplicate_id``).
        limits: the pixel limits of the exported trajectories (``None`` if none was exported).
    """

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    exported: int = 0
    images: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    limits: PixelLimits | None = None


class Checked(NamedTuple):
    """What a validator read: rows and image references."""

    rows: int
    images: int


# ----------------------------------------------------------------------------------------------------- export
def export(
    trajectories: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = FORMATS,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    image_format: str = "png",
    name: str = "glimpse",
) -> ExportResult:
    """Write SFT data for ``formats`` from a trajectories file (see the module docstring for the layout).

    Args:
        trajectories: a JSON-lines file of trajectories (``trajectories.jsonl`` of a cold-start run).
        out_dir: the export folder; the data files of an earlier export there are replaced (its images stay).
        formats: any of ``llamafactory``, ``trl``, ``verl``.
        base_dir: resolve relative original-image paths against this folder (default: the working directory).
        image_format: ``png`` (lossless, the default) or ``jpeg`` (quality 95; smaller, no longer the exact
            pixels the model saw).
        name: the dataset's name in LLaMA-Factory's ``dataset_info.json``.

    Raises:
        ConfigError: an unknown format or image format.
        GlimpseError: a trajectory without a prompt, an image that changed since it was recorded, trajectories
            with different pixel limits, or (verl) the python tool offered by function calling.
    """
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"formats must be some of {', '.join(FORMATS)}; got {list(formats) or 'none'}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    source = Path(trajectories)
    out = Path(out_dir)
    images = _ImageStore(out / "images", image_format, base_dir)
    writers: dict[str, _Writer] = {}
    result = ExportResult(out_dir=out)
    protocols: Counter[str] = Counter()
    seen: set[str] = set()
    try:
        for fmt in formats:
            writers[fmt] = _WRITERS[fmt](out / DATA_FILES[fmt], name)
        for number, traj in enumerate(iter_jsonl(source), 1):
            if not traj.prompt:
                raise GlimpseError(
                    f"{source}: trajectory {number} ({traj.id}) has no prompt: it was recorded by an older Glimpse, "
                    "and its conversation cannot be rebuilt. Record it again to export it."
                )
            reason = _skip_reason(traj, seen)
            seen.add(traj.id)
            if reason:
                result.skipped.setdefault(reason, []).append(traj.id)
                continue
            limits = traj.settings.limits
            if result.limits is None:
                result.limits = limits
            elif limits != result.limits:
                raise GlimpseError(
                    f"{source}: trajectory {traj.id} was made with {limits}, earlier ones with {result.limits}; "
                    "a model has one resize factor and LLaMA-Factory one pair of pixel limits: export them apart"
                )
            row = _Row.of(traj, images)
            for writer in writers.values():
                writer.add(row)
            protocols[traj.settings.protocol] += 1
            result.exported += 1
        for fmt, writer in writers.items():
            result.files[fmt] = writer.finish(result.limits)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    result.images = images.count
    _write_manifest(out, source, result, protocols, image_format, name)
    return result


def _skip_reason(traj: Trajectory, seen: set[str]) -> str | None:
    if traj.stop_reason != "answer":
        return f"stop_reason:{traj.stop_reason}"
    if traj.id in seen:
        return "duplicate_id"
    for message in conversation(traj):
        if any(p in text for text in _texts(message) for p in PLACEHOLDERS):
            return "placeholder_in_text"
    return None


def _texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content") or ""
    if isinstance(content, str):
        return [content]
    return [p.get("text", "") for p in content if p.get("type") == "text"]


def _write_manifest(
    out: Path, source: Path, result: ExportResult, protocols: Counter[str], image_format: str, name: str
) -> None:
    limits = result.limits
    manifest = {
        "source": str(source),
        "source_sha256": _sha256(source),
        "formats": list(result.files),
        "files": {f: str(p.relative_to(out)) for f, p in result.files.items()},
        "trajectories": result.exported,
        "images": result.images,
        "image_format": image_format,
        "protocols": dict(sorted(protocols.items())),
        "skipped": {r: {"count": len(ids), "ids": ids} for r, ids in sorted(result.skipped.items())},
        "pixel_limits": None
        if limits is None
        else {"min_pixels": limits.min_pixels, "max_pixels": limits.max_pixels, "factor": limits.factor},
        "llamafactory_dataset": name,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ images and rows
class _ImageStore:
    """Writes each distinct shown image once; an image is named by the first trajectory that showed it."""

    def __init__(self, folder: Path, image_format: str, base_dir: str | os.PathLike[str] | None):
        self.folder = folder
        self.image_format = image_format
        self.base_dir = base_dir
        self.cache = ImageCache()
        self.names: dict[tuple[Any, ...], str] = {}
        self.count = 0

    def files(self, traj: Trajectory, keys: list[ImageKey]) -> list[str]:
        """File names of images ``keys`` of ``traj``, rendering and writing each the first time it is seen."""
        shown = traj.observations()
        originals = [o for o in shown if o.index == 0]
        observations = {o.index: o for o in shown if o.index}
        refs = traj.originals()
        names = []
        for key in keys:
            observation = (
                (originals[key.original] if key.original < len(originals) else None)
                if key.index == 0
                else observations.get(key.index)
            )
            if observation is None:
                raise GlimpseError(f"trajectory {traj.id} shows image {key}, which its record does not hold")
            # The same file (an original, or one made by code), box and shown size: the same pixels. The size
            # matters: originals shown together share one pixel budget, so one file can be shown at two sizes.
            seen: tuple[Any, ...] = (
                (observation.sha256,)
                if observation.path is not None
                else (refs[observation.original_index].sha256, tuple(observation.box_px or ()))
            )
            seen += (tuple(observation.shown_size),)
            if key.index and traj.settings.counterfactual:  # a counterfactual view is drawn per trajectory
                seen += (traj.id,)
            if seen not in self.names:
                self.names[seen] = self._write(traj, key)
            names.append(self.names[seen])
        return names

    def _write(self, traj: Trajectory, key: ImageKey) -> str:
        image = render_image(traj, key.index, original=key.original, cache=self.cache, base_dir=self.base_dir)
        # The hash keeps apart ids that differ only in the characters replaced.
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", traj.id).strip("_")[:80]
        digest = hashlib.sha1(traj.id.encode()).hexdigest()[:8]
        which = f"image{key.original + 1}" if key.index == 0 and key.original else str(key.index)
        name = f"{stem}-{digest}_{which}{IMAGE_FORMATS[self.image_format]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_bytes(encode_image(image, self.image_format))
        self.count += 1
        return name


@dataclass
class _Row:
    """One trajectory ready for the writers: its conversation and the file of each image, in placeholder order."""

    id: str
    messages: list[dict[str, Any]]
    images: list[str]
    tools: list[dict[str, Any]] | None
    limits: PixelLimits
    folder: Path

    @classmethod
    def of(cls, traj: Trajectory, store: _ImageStore) -> _Row:
        messages = []
        for message in conversation(traj):
            content = message.get("content") or ""
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            messages.append({**message, "content": [p for p in parts if p.get("type") == "image" or p.get("text")]})
        order = [
            ImageKey(int(p["index"]), int(p.get("original", 0)))
            for m in messages
            for p in m["content"]
            if p["type"] == "image"
        ]
        files = store.files(traj, order)
        return cls(traj.id, messages, files, _tool_schemas(traj), traj.settings.limits, store.folder)


def _tool_schemas(traj: Trajectory) -> list[dict[str, Any]] | None:
    """The function schemas the run offered, for the ``tools`` protocol (the same ones the protocol sends)."""
    if traj.settings.protocol != "tools":
        return None
    schemas = [zoom_tool_schema(Coords(traj.settings.coords))]
    if "python" in traj.settings.tools:
        schemas.append(code_tool_schema())
    return schemas


def _placeholder_text(parts: list[dict[str, Any]]) -> str:
    return "".join(IMAGE if p["type"] == "image" else p["text"] for p in parts)


def _arguments(raw: Any) -> Any:
    """A call's arguments as an object; text that is not JSON (a model's mistake) stays text."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


# -------------------------------------------------------------------------------------------------- writers
class _Writer:
    """Writes one format to a temporary file, renamed into place by ``finish``."""

    def __init__(self, path: Path, name: str):
        self.path = path
        self.name = name
        self.tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)

    def relative(self, row: _Row, file: str) -> str:
        return os.path.relpath(row.folder / file, self.path.parent)

    def add(self, row: _Row) -> None:
        raise NotImplementedError

    def finish(self, limits: PixelLimits | None) -> Path:
        raise NotImplementedError

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


class _LlamaFactoryWriter(_Writer):
    def __init__(self, path: Path, name: str):
        super().__init__(path, name)
        self.fh = self.tmp.open("w", encoding="utf-8")
        self.fh.write("[")
        self.rows = 0
        self.with_tools = False

    def add(self, row: _Row) -> None:
        turns: list[dict[str, str]] = []
        waiting: list[tuple[str, str]] = []  # consecutive non-assistant messages, merged into one turn

        def flush() -> None:
            if waiting:
                role = LF_TAGS["observation_tag"] if waiting[0][0] == "tool" else LF_TAGS["user_tag"]
                turns.append({"from": role, "value": "\n".join(text for _, text in waiting)})
                waiting.clear()

        for i, message in enumerate(row.messages):
            text = _placeholder_text(message["content"])
            if message["role"] == "system" and i == 0:
                turns.append({"from": LF_TAGS["system_tag"], "value": text})
            elif message["role"] == "assistant":
                flush()
                if message.get("tool_calls"):
                    turns.append({"from": LF_TAGS["function_tag"], "value": text + _tool_call_block(message)})
                else:
                    turns.append({"from": LF_TAGS["assistant_tag"], "value": text})
            else:
                waiting.append((message["role"], text))
        flush()
        record: dict[str, Any] = {
            "id": row.id,
            "conversations": turns,
            "images": [self.relative(row, f) for f in row.images],
        }
        if row.tools:
            record["tools"] = json.dumps(row.tools, ensure_ascii=False)
            self.with_tools = True
        self.fh.write(("," if self.rows else "") + "\n" + json.dumps(record, ensure_ascii=False))
        self.rows += 1

    def finish(self, limits: PixelLimits | None) -> Path:
        self.fh.write("\n]\n")
        self.fh.close()
        os.replace(self.tmp, self.path)
        columns = {"messages": "conversations", "images": "images"}
        if self.with_tools:
            columns["tools"] = "tools"
        entry = {"file_name": self.path.name, "formatting": "sharegpt", "columns": columns, "tags": LF_TAGS}
        info = self.path.with_name("dataset_info.json")
        info.write_text(json.dumps({self.name: entry}, indent=2) + "\n", encoding="utf-8")
        if limits is not None:
            self.path.with_name("train_args.yaml").write_text(_train_args(self.name, limits), encoding="utf-8")
        return self.path

    def abort(self) -> None:
        self.fh.close()
        super().abort()


def _tool_call_block(message: dict[str, Any]) -> str:
    calls = [{"name": c["name"], "arguments": _arguments(c["arguments"])} for c in message["tool_calls"]]
    return f"<tool_call>{json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)}</tool_call>"


def _train_args(name: str, limits: PixelLimits) -> str:
    template = {28: "qwen2_vl", 32: "qwen3_vl"}.get(limits.factor)
    return (
        "# LLaMA-Factory settings for this data, to merge into a training YAML (written by glimpse.train.export).\n"
        "# The images are stored at the size the model was shown them; these limits keep LLaMA-Factory from\n"
        f"# resizing them again (its default image_max_pixels, 768*768, would shrink them). Sides are multiples\n"
        f"# of {limits.factor}: train a model with that resize factor"
        + (f" (template: {template})" if template else "")
        + ".\n"
        "# Set dataset_dir to the folder holding this file: image paths are relative to it.\n"
        f"dataset: {name}\n"
        f"image_max_pixels: {limits.max_pixels}\n"
        f"image_min_pixels: {limits.min_pixels}\n"
    )


class _TrlWriter(_Writer):
    def __init__(self, path: Path, name: str):
        super().__init__(path, name)
        self.fh = self.tmp.open("w", encoding="utf-8")

    def add(self, row: _Row) -> None:
        messages = []
        for message in row.messages:
            if message["role"] == "tool" and any(p["type"] == "image" for p in message["content"]):
                raise GlimpseError(f"trajectory {row.id}: TRL does not fill images of tool messages")
            item: dict[str, Any] = {
                "role": message["role"],
                "content": [{"type": "image"} if p["type"] == "image" else p for p in message["content"]],
            }
            if message.get("tool_calls"):
                item["tool_calls"] = [
                    {
                        "id": c.get("id"),
                        "type": "function",
                        "function": {"name": c["name"], "arguments": _arguments(c["arguments"])},
                    }
                    for c in message["tool_calls"]
                ]
            if message.get("tool_call_id"):
                item["tool_call_id"] = message["tool_call_id"]
            messages.append(item)
        record = {"id": row.id, "messages": messages, "images": [self.relative(row, f) for f in row.images]}
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finish(self, limits: PixelLimits | None) -> Path:
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.fh.close()
        super().abort()


def require_pyarrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, or a ConfigError saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "the verl format is written with pyarrow, which is not installed: pip install 'glimpse[hf]'"
        ) from None
    return pa, pq


def _verl_schema(pa: Any) -> Any:
    call = pa.struct(
        [
            ("id", pa.string()),
            ("type", pa.string()),
            ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())])),
        ]
    )
    message = pa.struct(
        [
            ("role", pa.string()),
            ("content", pa.string()),
            ("tool_calls", pa.list_(call)),
            ("tool_call_id", pa.string()),
        ]
    )
    # bytes are what verl decodes; min/max_pixels are what qwen_vl_utils resizes to (the shown size again).
    image = pa.struct(
        [("bytes", pa.binary()), ("path", pa.string()), ("min_pixels", pa.int64()), ("max_pixels", pa.int64())]
    )
    # One tool's schema fixes the struct; the zoom tool's is the only one parquet can hold faithfully alone.
    tools = pa.array([[zoom_tool_schema(Coords.RELATIVE)]]).type
    return pa.schema(
        [("id", pa.string()), ("messages", pa.list_(message)), ("images", pa.list_(image)), ("tools", tools)]
    )


class _VerlWriter(_Writer):
    def __init__(self, path: Path, name: str):
        super().__init__(path, name)
        self.pa, self.pq = require_pyarrow()
        self.schema = _verl_schema(self.pa)
        self.out = self.pq.ParquetWriter(self.tmp, self.schema)
        self.batch: list[dict[str, Any]] = []

    def add(self, row: _Row) -> None:
        if row.tools and len(row.tools) > 1:
            raise GlimpseError(
                f"trajectory {row.id} offered {[t['function']['name'] for t in row.tools]} by function calling; "
                "verl's tools column is one parquet struct, which would give each schema the other's keys as "
                "nulls. Export this run without the verl format."
            )
        messages = []
        for message in row.messages:
            calls = message.get("tool_calls")
            messages.append(
                {
                    "role": message["role"],
                    "content": _placeholder_text(message["content"]),
                    "tool_calls": [
                        {
                            "id": c.get("id"),
                            "type": "function",
                            "function": {"name": c["name"], "arguments": _json_text(c["arguments"])},
                        }
                        for c in calls
                    ]
                    if calls
                    else None,
                    "tool_call_id": message.get("tool_call_id"),
                }
            )
        images = [
            {
                "bytes": (row.folder / f).read_bytes(),
                "path": self.relative(row, f),
                "min_pixels": row.limits.min_pixels,
                "max_pixels": row.limits.max_pixels,
            }
            for f in row.images
        ]
        self.batch.append({"id": row.id, "messages": messages, "images": images, "tools": row.tools or []})
        if len(self.batch) >= _VERL_ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.batch:
            self.out.write_table(self.pa.Table.from_pylist(self.batch, schema=self.schema))
            self.batch = []

    def finish(self, limits: PixelLimits | None) -> Path:
        self._flush()
        self.out.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.out.close()
        super().abort()


def _json_text(raw: Any) -> str:
    return raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)


_WRITERS: dict[str, type[_Writer]] = {"llamafactory": _LlamaFactoryWriter, "trl": _TrlWriter, "verl": _VerlWriter}


# ----------------------------------------------------------------------------------------------- validators
def _fail(where: str, rule: str) -> GlimpseError:
    return GlimpseError(f"{where}: {rule}")


def _export_limits(data_file: Path, limits: PixelLimits | None) -> PixelLimits:
    """The limits given, else those in the manifest of the export holding ``data_file``."""
    if limits is not None:
        return limits
    manifest = data_file.parent.parent / "manifest.json"
    try:
        found = json.loads(manifest.read_text(encoding="utf-8"))["pixel_limits"]
        return PixelLimits(found["min_pixels"], found["max_pixels"], found["factor"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest} is missing or has no pixel limits; pass limits= to the validator") from None


def _check_image(source: Path | bytes, where: str, limits: PixelLimits) -> None:
    """The image opens, and the resize rule maps its size to itself (so no trainer resizes it)."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            img.load()
            size = img.size
    except FileNotFoundError:
        raise _fail(where, f"image file {source} does not exist") from None
    except (OSError, ValueError) as exc:
        raise _fail(where, f"image does not open ({exc})") from None
    try:
        fixed = smart_resize(*size, limits)
    except ConfigError as exc:
        raise _fail(where, f"image of {size[0]}×{size[1]}: {exc}") from None
    if fixed != size:
        raise _fail(
            where,
            f"image of {size[0]}×{size[1]} is not at a shown size for {limits} (sides multiples of {limits.factor}, "
            f"area within the limits): a trainer would resize it to {fixed[0]}×{fixed[1]}",
        )


def _check_placeholders(texts: Iterable[str], images: int, where: str) -> None:
    texts = list(texts)
    found = sum(t.count(IMAGE) for t in texts)
    if found != images:
        raise _fail(where, f"{found} {IMAGE} placeholders but {images} images")
    for other in PLACEHOLDERS[1:]:
        if any(other in t for t in texts):
            raise _fail(where, f"{other} in the text would be read as a media placeholder")


def validate_llamafactory(folder: str | os.PathLike[str], limits: PixelLimits | None = None) -> Checked:
    """Check a LLaMA-Factory export folder as LLaMA-Factory reads it.

    Checks: ``dataset_info.json`` names ``data.json`` in ShareGPT form; after an optional system turn,
    human/observation turns sit at odd positions and gpt/function_call turns at even ones, ending with a gpt
    turn; assistant turns are not empty; function calls hold ``<tool_call>`` JSON with a name and arguments;
    ``<image>`` placeholders match the images, the first in the first human turn; every image opens from the
    path LLaMA-Factory resolves (against the folder) and is at a shown size.

    Args:
        folder: the ``llamafactory`` folder of an export.
        limits: pixel limits to check sizes against (default: from the export's ``manifest.json``).

    Returns:
        The rows and image references checked.

    Raises:
        GlimpseError: the first broken rule, naming the row and trajectory.
    """
    root = Path(folder)
    try:
        info = json.loads((root / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(str(root / "dataset_info.json"), f"not readable JSON ({exc})") from None
    entries = [e for e in info.values() if isinstance(e, dict) and e.get("file_name") == "data.json"]
    if len(entries) != 1 or entries[0].get("formatting") != "sharegpt":
        raise _fail(str(root / "dataset_info.json"), "needs one sharegpt entry whose file_name is data.json")
    tags = {**LF_TAGS, **entries[0].get("tags", {})}
    columns = entries[0].get("columns", {})
    limits = _export_limits(root / "data.json", limits)
    try:
        rows = json.loads((root / "data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(str(root / "data.json"), f"not readable JSON ({exc})") from None
    odd = (tags["user_tag"], tags["observation_tag"])
    even = (tags["assistant_tag"], tags["function_tag"])
    checked = 0
    for n, row in enumerate(rows):
        where = f"{root / 'data.json'} row {n} ({row.get('id', '?')})"
        turns = row.get(columns.get("messages", "conversations"))
        images = row.get(columns.get("images", "images"))
        if not isinstance(turns, list) or not isinstance(images, list):
            raise _fail(where, "needs a conversations list and an images list")
        role = [t.get(tags["role_tag"]) for t in turns]
        values = [t.get(tags["content_tag"]) for t in turns]
        if any(not isinstance(v, str) for v in values):
            raise _fail(where, "every turn's value must be text")
        start = 1 if role and role[0] == tags["system_tag"] else 0
        for i in range(start, len(turns)):
            allowed = odd if (i - start) % 2 == 0 else even
            if role[i] not in allowed:
                raise _fail(where, f"turn {i} is {role[i]!r}; LLaMA-Factory expects one of {allowed} there")
        if len(turns) == start or role[-1] != tags["assistant_tag"]:
            raise _fail(where, "the conversation must end with a gpt turn (the answer)")
        for i in range(start + 1, len(turns), 2):
            if not values[i].strip():
                raise _fail(where, f"assistant turn {i} is empty")
            if role[i] == tags["function_tag"]:
                _check_tool_call(values[i], f"{where} turn {i}")
        if "tools" in columns and row.get(columns["tools"]):
            try:
                json.loads(row[columns["tools"]])
            except (TypeError, ValueError):
                raise _fail(where, "tools must be a JSON list of function schemas") from None
        _check_placeholders(values, len(images), where)
        if images and next(i for i, v in enumerate(values) if IMAGE in v) != start:
            raise _fail(where, "the first human turn does not hold the first image")
        for path in images:
            _check_image(root / path, f"{where} image {path}", limits)
        checked += len(images)
    return Checked(len(rows), checked)


def _check_tool_call(value: str, where: str) -> None:
    match = _TOOL_CALL.search(value)
    if match is None:
        raise _fail(where, "a function_call turn needs a <tool_call>…</tool_call> block")
    try:
        calls = json.loads(match.group(1))
    except ValueError:
        raise _fail(where, "the <tool_call> block is not JSON") from None
    for call in calls if isinstance(calls, list) else [calls]:
        if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
            raise _fail(where, "each call needs a name and arguments")


def _check_order(roles: list[str], where: str) -> None:
    """System only first; a user message first after it; the answer last; no two assistant messages in a row."""
    start = 1 if roles and roles[0] == "system" else 0
    if any(r not in ("system", "user", "assistant", "tool") for r in roles):
        raise _fail(where, f"unknown role in {roles}")
    if "system" in roles[start:]:
        raise _fail(where, "a system message after the first")
    if len(roles) <= start or roles[start] != "user":
        raise _fail(where, "the first message after the system prompt must be the user's")
    if roles[-1] != "assistant":
        raise _fail(where, "the conversation must end with an assistant message (the answer)")
    for i in range(1, len(roles)):
        if roles[i] == roles[i - 1] == "assistant":
            raise _fail(where, f"assistant messages {i - 1} and {i} follow each other")


def validate_trl(path: str | os.PathLike[str], limits: PixelLimits | None = None) -> Checked:
    """Check a TRL ``data.jsonl`` as TRL's vision collator reads it.

    Checks: roles and order (system first if any, then user, ending with the assistant's answer); content is a
    list of ``{"type": "text", "text": …}`` and ``{"type": "image"}`` parts; no image part in a tool message (TRL
    does not fill those); image parts match the images, the first in the first user message; assistant messages
    have text or tool calls; every image opens (relative to the file's folder) and is at a shown size.

    Raises:
        GlimpseError: the first broken rule, naming the line and trajectory.
    """
    file = Path(path)
    limits = _export_limits(file, limits)
    rows = checked = 0
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise _fail(f"{file}:{lineno}", "not JSON") from None
            where = f"{file}:{lineno} ({row.get('id', '?')})"
            messages, images = row.get("messages"), row.get("images")
            if not isinstance(messages, list) or not isinstance(images, list):
                raise _fail(where, "needs a messages list and an images list")
            _check_order([m.get("role") for m in messages], where)
            placed = []
            for i, message in enumerate(messages):
                parts = message.get("content")
                if not isinstance(parts, list):
                    raise _fail(where, f"message {i} content must be a list of parts")
                for part in parts:
                    if part.get("type") == "image":
                        if "image" in part or message["role"] == "tool":
                            raise _fail(where, f"message {i}: an image part TRL would not fill from images")
                        placed.append(i)
                    elif part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise _fail(where, f"message {i}: a part that is neither text nor image: {part}")
                if message["role"] == "assistant" and not (
                    any(p.get("text", "").strip() for p in parts) or message.get("tool_calls")
                ):
                    raise _fail(where, f"assistant message {i} is empty")
                for call in message.get("tool_calls") or []:
                    if call.get("type") != "function" or "name" not in call.get("function", {}):
                        raise _fail(where, f"message {i}: tool calls take the form {{type: function, function}}")
            if len(placed) != len(images):
                raise _fail(where, f"{len(placed)} image parts but {len(images)} images")
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            if images and placed[0] != first_user:
                raise _fail(where, "the first user message does not hold the first image")
            for name in images:
                _check_image(file.parent / name, f"{where} image {name}", limits)
            rows, checked = rows + 1, checked + len(images)
    return Checked(rows, checked)


def validate_verl(path: str | os.PathLike[str], limits: PixelLimits | None = None) -> Checked:
    """Check a verl ``data.parquet`` as ``MultiTurnSFTDataset`` reads it.

    Checks: ``messages`` is a list of structs with string ``role`` and ``content``; ``images`` a list of structs
    with ``bytes``, ``min_pixels`` and ``max_pixels``; roles and order as for TRL; ``<image>`` placeholders match
    the images, the first in the first user message; assistant messages have text or tool calls; every image
    decodes and its entry's own pixel limits map its size to itself.

    Raises:
        GlimpseError: the first broken rule, naming the row and trajectory.
    """
    pa, pq = require_pyarrow()
    file = Path(path)
    factor = _export_limits(file, limits).factor
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as exc:
        raise _fail(str(file), f"not a readable parquet file ({exc})") from None
    _check_verl_schema(pa, table.schema, str(file))
    checked = 0
    for n, row in enumerate(table.to_pylist()):
        where = f"{file} row {n} ({row.get('id', '?')})"
        messages, images = row["messages"], row["images"]
        _check_order([m["role"] for m in messages], where)
        texts = [m["content"] or "" for m in messages]
        _check_placeholders(texts, len(images), where)
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        if images and next(i for i, t in enumerate(texts) if IMAGE in t) != first_user:
            raise _fail(where, "the first user message does not hold the first image")
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and not (texts[i].strip() or message.get("tool_calls")):
                raise _fail(where, f"assistant message {i} is empty")
        for k, image in enumerate(images):
            if not image.get("bytes"):
                raise _fail(where, f"image {k} has no bytes")
            own = PixelLimits(image["min_pixels"], image["max_pixels"], factor)
            _check_image(image["bytes"], f"{where} image {k}", own)
        checked += len(images)
    return Checked(table.num_rows, checked)


def _check_verl_schema(pa: Any, schema: Any, where: str) -> None:
    def struct_of(name: str) -> Any:
        if name not in schema.names:
            raise _fail(where, f"no {name!r} column")
        kind = schema.field(name).type
        if not pa.types.is_list(kind) or not pa.types.is_struct(kind.value_type):
            raise _fail(where, f"{name!r} must be a list of structs, not {kind}")
        return kind.value_type

    message = struct_of("messages")
    for key in ("role", "content"):
        if message.get_field_index(key) < 0 or not pa.types.is_string(message.field(key).type):
            raise _fail(where, f"messages need a string {key!r} field")
    image = struct_of("images")
    if image.get_field_index("bytes") < 0 or not pa.types.is_binary(image.field("bytes").type):
        raise _fail(where, "images need a binary 'bytes' field")
    for key in ("min_pixels", "max_pixels"):
        if image.get_field_index(key) < 0 or not pa.types.is_integer(image.field(key).type):
            raise _fail(where, f"images need an integer {key!r} field, or qwen_vl_utils resizes them")


_VALIDATORS = {"llamafactory": validate_llamafactory, "trl": validate_trl, "verl": validate_verl}


def validate(out_dir: str | os.PathLike[str]) -> dict[str, Checked]:
    """Run the validator of every format an export folder holds (as listed in its ``manifest.json``).

    Raises:
        ConfigError: the folder has no manifest.
        GlimpseError: the first broken rule.
    """
    out = Path(out_dir)
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"{out} has no readable manifest.json; is it an export folder?") from None
    checked = {}
    for fmt in manifest["formats"]:
        target = out / DATA_FILES[fmt]
        checked[fmt] = _VALIDATORS[fmt](target.parent if fmt == "llamafactory" else target)
    return checked
