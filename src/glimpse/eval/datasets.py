"""Loaders for the standard benchmarks, from the files users download, and for generated probes.

A dataset is named by a spec string (``glimpse eval --data SPEC``):

=====================================  ===========================================================================
spec                                   reads
=====================================  ===========================================================================
``probes:LEVEL[:N[:SEED[:KIND]]]``     N generated probes (default 100, seed 0), made once under
                                       ``$GLIMPSE_HOME/probes/``; KIND: one question kind only, e.g. the
                                       two-image ``which_image`` or ``split_code``
``minio3:PATH``                        a JSON list in Mini-o3's format (``images``, ``problem``, ``solution``,
                                       ``data_source``), e.g. a probes ``val.json`` or a converted benchmark
``visualprobe:LEVEL:BASE``             ``BASE/VisualProbe_<Level>/val.json`` (LEVEL: easy, medium, hard, train)
``vstar:DIR``                          V* Bench: per-image JSON in ``direct_attributes/`` and ``relative_position/``
                                       (with target boxes); ``vstar-jsonl:DIR`` reads ``test_questions.jsonl``
``hrbench:FILE``                       HR-Bench 4K or 8K: ``hr_bench_4k.tsv`` (VLMEvalKit TSV) or
                                       ``hr_bench_4k.parquet`` (the same table; needs pyarrow), images in base64
``mme-realworld:DIR``                  ``DIR/MME_RealWorld.json`` with its image folders under ``DIR``; or a
                                       questions JSON by name (``MME_RealWorld_CN.json``), or the base64 TSV /
                                       parquet copy (``MME-RealWorld-Base64``)
``mme-realworld-lite:DIR``             ``DIR/data/MME-RealWorld-Lite.json`` and ``DIR/data/imgs/`` (or a file,
                                       as above)
``treebench:FILE.tsv``                 TreeBench (VLMEvalKit TSV, base64 images, target boxes)
``o3bench:DIR``                        O3-Bench: ``DIR/test/metadata.jsonl`` and its images (target layouts' boxes
                                       as target boxes)
=====================================  ===========================================================================

Multiple-choice samples keep their options in the file's order with the gold *letter* in that order;
``glimpse.eval.options`` decides how each repeat presents them. Images stored inside TSV files are written
once to ``$GLIMPSE_HOME/datasets/`` (one file per distinct image) so trajectories can refer to them by path.

A missing or unreadable file raises ``ConfigError`` naming the path expected and the fix. A row that cannot be
read (bad JSON, an unknown answer format, an image that does not decode) becomes a sample marked
``meta.input_error`` with the reason: the evaluation records it as an input error and goes on.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.errors import ConfigError, GlimpseError
from glimpse.paths import glimpse_home
from glimpse.trajectory import Sample

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OPTION_LINE = re.compile(r"^\(?([A-Z])[).:]\s*(.*)$")


@dataclass
class Dataset:
    """Loaded samples with where they came from.

    Attributes:
        name: short name used in reports (``visualprobe-hard``, ``hrbench4k`` …).
        samples: the samples, in file order.
        source: the file or folder read.
        notes: warnings worth printing (e.g. a suspicious answer distribution).
        options: the option order its protocol asks for (``glimpse.eval.options``), used by ``--options auto``.
    """

    name: str
    samples: list[Sample]
    source: str
    notes: list[str] = field(default_factory=list)
    options: str = "shuffle"

    def __len__(self) -> int:
        return len(self.samples)


def _require(path: Path, what: str, hint: str = "") -> Path:
    if not path.exists():
        raise ConfigError(f"{what} not found: expected {path}" + (f". {hint}" if hint else ""))
    return path


def _read_text(path: Path) -> str:
    """A file's UTF-8 text (a byte-order mark dropped).

    Raises:
        ConfigError: the file cannot be read (a folder, no permission) or is not UTF-8 text.
    """
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason}); download it again") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}; name the benchmark's file") from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); {what}; download it again") from None


def _file_name(value: Any) -> str:
    """An image path as a row gives it; one no file system accepts (a NUL character) is the row's error."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ValueError(f"image path {str(value)[:80]!r} is not a file name")
    return value


def _why(exc: BaseException) -> str:
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)


def _bad(dataset: str, key: str, reason: str) -> Sample:
    return Sample(id=f"{dataset}/{key}", images=[], question="", meta={"input_error": reason})


def _mc_sample(
    sid: str,
    images: list[str],
    stem: str,
    options: list[str],
    gold: str,
    meta: dict[str, Any],
    boxes: list[list[int]] | None = None,
) -> Sample:
    gold = gold.strip().upper().strip("().")
    if len(gold) != 1 or gold not in LETTERS[: len(options)]:
        return Sample(
            id=sid,
            images=images,
            question=stem,
            meta={**meta, "input_error": f"gold answer {gold!r} is not one of the {len(options)} option letters"},
        )
    return Sample(id=sid, images=images, question=stem, options=options, answer=gold, target_boxes=boxes, meta=meta)


def _int_box(box: list[float]) -> list[int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]


# ----------------------------------------------------------------------------------------- Mini-o3 / VisualProbe
def load_minio3(path: str | Path, name: str | None = None) -> Dataset:
    """A JSON list in Mini-o3's format; image paths resolve against the JSON's folder, else its parent
    (VisualProbe's paths start with the dataset folder's own name)."""
    p = _require(Path(path), "Mini-o3-format JSON file")
    rows = _read_json(p, "it should hold a list of records with images, problem and solution")
    if not isinstance(rows, list):
        raise ConfigError(f"{p} must hold a JSON list of records with images, problem and solution")
    name = name or p.parent.name or p.stem
    samples: list[Sample] = []
    for i, row in enumerate(rows):
        key = str(row.get("doc_id", i)) if isinstance(row, dict) else str(i)
        if not isinstance(row, dict) or not isinstance(row.get("problem"), str) or "solution" not in row:
            samples.append(_bad(name, key, "record lacks 'problem' or 'solution'"))
            continue
        try:
            samples.append(_minio3_item(p, name, key, row))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            samples.append(_bad(name, key, f"unreadable record: {_why(exc)}"))
    dataset = Dataset(name=name, samples=samples, source=str(p))
    golds = [s.answer for s in samples if s.options]
    if len(golds) >= 10 and all(g == "A" for g in golds):
        dataset.notes.append(
            f"every multiple-choice answer in {p.name} is 'A': options were never shuffled; keep --options shuffle"
        )
    return dataset


# Record fields kept in a sample's meta: probes' answer spaces and layout, and which image each box is in.
_MINIO3_EXTRAS = (
    "choices",
    "synonyms",
    "candidate_boxes",
    "candidates",
    "seed",
    "size",
    "shown_cap_px",
    "sizes",
    "target_images",
    "candidate_images",
)


def _minio3_item(p: Path, name: str, key: str, row: dict[str, Any]) -> Sample:
    images = row.get("images") or []
    if isinstance(images, str):
        images = [images]
    resolved = [str(_image_path(p.parent, _file_name(img))) for img in images]
    question = row["problem"].replace("<image>", "").strip()
    source = str(row.get("data_source", ""))
    meta: dict[str, Any] = {"data_source": source}
    level = row.get("level") or next((lv for lv in ("easy", "medium", "hard", "train") if source.endswith(lv)), None)
    if level:
        meta["level"] = level
    if row.get("kind"):
        meta["category"] = row["kind"]
    for extra in _MINIO3_EXTRAS:
        if row.get(extra) is not None:
            meta[extra] = row[extra]
    boxes = [_int_box(b) for b in row["boxes"]] if row.get("boxes") else None
    solution = str(row["solution"])
    options, stem = _options_in_text(question)
    sid = f"{name}/{key}"
    if options and (solution.strip().strip("().").upper() in LETTERS[: len(options)] or solution in options):
        gold = solution if solution not in options else LETTERS[options.index(solution)]
        sample = _mc_sample(sid, resolved, stem, options, gold, meta, boxes)
    else:
        sample = Sample(id=sid, images=resolved, question=question, answer=solution, target_boxes=boxes, meta=meta)
    try:
        sample.targets()  # a box said to be in an image the record does not have
    except GlimpseError as exc:
        raise ValueError(str(exc)) from None
    return sample


def _image_path(folder: Path, image: str) -> Path:
    """Where an image a Mini-o3-format file names is: against the file's folder, or against its parent when the
    path starts with the folder's own name (VisualProbe's ``VisualProbe_Hard/data/…`` in ``VisualProbe_Hard/``).
    A missing image gets the path it was expected at, so the error names a path that could exist."""
    here, above = folder / image, folder.parent / image
    if here.exists() or not (above.exists() or Path(image).parts[:1] == (folder.name,)):
        return here
    return above


def _options_in_text(text: str) -> tuple[list[str], str]:
    """Split "question\\n(A) x\\n(B) y\\n[instruction]" into options and the stem."""
    lines = text.splitlines()
    options: list[str] = []
    first = None
    for i, line in enumerate(lines):
        m = _OPTION_LINE.match(line.strip())
        if m and m.group(1) == LETTERS[len(options)]:
            options.append(m.group(2).strip())
            first = i if first is None else first
        elif options:
            break
    if len(options) < 2 or first is None:
        return [], text
    return options, "\n".join(lines[:first]).strip()


def load_visualprobe(level: str, base: str | Path) -> Dataset:
    folder = {
        "easy": "VisualProbe_Easy",
        "medium": "VisualProbe_Medium",
        "hard": "VisualProbe_Hard",
        "train": "VisualProbe_train",
    }.get(level.lower())
    if folder is None:
        raise ConfigError(f"unknown VisualProbe level {level!r}; choose easy, medium, hard or train")
    file = "train.json" if level.lower() == "train" else "val.json"
    path = _require(
        Path(base) / folder / file,
        f"VisualProbe {level}",
        f"download it with: huggingface-cli download Mini-o3/{folder} --repo-type dataset "
        f"--local-dir {Path(base) / folder}",
    )
    data = load_minio3(path, name=f"visualprobe-{level.lower()}")
    for s in data.samples:
        s.meta.setdefault("level", level.lower())
    return data


# ---------------------------------------------------------------------------------------------------------- V*
def load_vstar(root: str | Path, prefer: str = "json") -> Dataset:
    """V* Bench: per-image JSON (correct option first, boxes ``[x, y, w, h]``) or ``test_questions.jsonl``."""
    base = _require(
        Path(root),
        "V* Bench folder",
        f"download it with: huggingface-cli download craigwu/vstar_bench --repo-type dataset --local-dir {root}",
    )
    folders = [base / c for c in ("direct_attributes", "relative_position")]
    if prefer == "json" and all(f.is_dir() for f in folders):
        samples = []
        for folder in folders:
            for ann in sorted(folder.glob("*.json"), key=lambda p: _natural(p.stem)):
                samples.append(_vstar_item(ann, folder.name))
        return Dataset(name="vstar", samples=samples, source=str(base))
    jsonl = _require(base / "test_questions.jsonl", "V* Bench test_questions.jsonl")
    samples = []
    for i, line in enumerate(_read_text(jsonl).split("\n")):  # JSON lines end at "\n" only (not U+2028)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            options, stem = _options_in_text(row["text"])
            qid = str(row["question_id"])
            meta = {"category": row.get("category", "")}
            image = str(base / _file_name(row["image"]))
            samples.append(_mc_sample(f"vstar/{qid}", [image], stem, options, row["label"], meta))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            samples.append(_bad("vstar", f"line{i + 1}", f"unreadable row: {_why(exc)}"))
    return Dataset(name="vstar", samples=samples, source=str(jsonl))


def _natural(stem: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem))


def _vstar_item(ann: Path, category: str) -> Sample:
    key = f"{category}/{ann.stem}"
    try:
        row = json.loads(ann.read_text(encoding="utf-8-sig"))
        options = [str(o) for o in row["options"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in row.get("bbox", [])]  # [x, y, w, h] in pixels
        if not all(isinstance(v, (int, float)) for b in boxes for v in b):
            raise ValueError(f"bbox {row['bbox']!r} is not [x, y, w, h] numbers")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OSError) as exc:
        return _bad("vstar", key, f"unreadable annotation {ann.name}: {_why(exc)}")
    image = next(
        (ann.with_suffix(ext) for ext in (".jpg", ".jpeg", ".png", ".JPG") if ann.with_suffix(ext).exists()),
        ann.with_suffix(".jpg"),
    )
    meta = {"category": category, "target_object": row.get("target_object", [])}
    # The file lists the correct option first; presentation reshuffles it.
    return _mc_sample(
        f"vstar/{key}", [str(image)], str(row["question"]), options, "A", meta, [_int_box(b) for b in boxes] or None
    )


# ------------------------------------------------------------------------------------- TSV and parquet tables
# Rows read from a parquet file at a time: HR-Bench 8K's rows hold a base64 8K image each (megabytes), so a
# small batch keeps memory flat on a 2.8 GB file.
_PARQUET_BATCH = 16
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")

Row = dict[str, Any]


def _table_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, Row | str]]:
    """(row label, row) pairs of a VLMEvalKit TSV or a parquet file of the same table (told apart by the
    file's first bytes, whatever its name); a row that does not parse comes back as an error string.

    Raises:
        ConfigError: the file is empty, not UTF-8 text (TSV) or not readable (parquet), or lacks a column.
    """
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}; name the benchmark's file") from None
    if magic == b"PAR1":
        return _parquet_rows(path, required)
    return _tsv_rows(path, required)


def _missing_columns(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise ConfigError(
            f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(header[:20]) or 'none'}): "
            "is it the benchmark's own file? Download it again"
        )


def _tsv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, Row | str]]:
    csv.field_size_limit(sys.maxsize)
    n = 1
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:  # -sig: a byte-order mark is not a column name
            reader = csv.reader(fh, delimiter="\t")
            try:
                header = next(reader)
            except StopIteration:
                raise ConfigError(f"{path} is empty; download it again") from None
            _missing_columns(path, header, required)
            for n, cells in enumerate(reader, 2):
                if len(cells) != len(header):
                    yield f"line{n}", f"row {n} has {len(cells)} cells, the header has {len(header)}"
                    continue
                yield f"line{n}", dict(zip(header, cells, strict=True))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (after line {n}: {exc.reason}), so not a TSV table; if it is a parquet "
            "file cut short, or another binary file, download the .tsv or .parquet again"
        ) from None


def _parquet_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, Row | str]]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"reading {path} needs pyarrow: pip install pyarrow (the 'hf' extra brings it: "
            "pip install 'glimpse[hf]'), or download the .tsv version of the file instead"
        ) from None
    n = 0
    try:
        table = pq.ParquetFile(path)
        _missing_columns(path, table.schema_arrow.names, required)
        for batch in table.iter_batches(batch_size=_PARQUET_BATCH):
            for row in batch.to_pylist():
                yield f"row{n}", row
                n += 1
    except (OSError, pyarrow.ArrowException) as exc:
        raise ConfigError(f"{path} is not a readable parquet file (at row {n}: {exc}); download it again") from None


def _text(value: Any) -> str:
    """A table cell as text: TSV cells are text already, parquet gives numbers, and nulls or pandas' NaN for an
    empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return "" if text.lower() == "nan" else text


class _ImageStore:
    """Writes the images of a table to files, one per distinct image."""

    def __init__(self, name: str, source: Path):
        digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
        self.folder = glimpse_home() / "datasets" / f"{name}-{digest}" / "images"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.by_index: dict[str, str] = {}

    def put(self, index: str, payload: Any) -> str:
        """The file path of this row's image.

        ``payload`` is base64 text (VLMEvalKit's TSVs, HR-Bench's parquet), raw image bytes, or a Hugging Face
        ``Image`` cell (``{"bytes": …, "path": …}``); text of 64 characters or less names another row's index.

        Raises:
            ValueError: the cell holds no image.
        """
        if isinstance(payload, dict):
            payload = payload.get("bytes")
        if isinstance(payload, str) and len(payload.strip()) <= 64:
            key = _text(payload)
            if key in self.by_index:
                self.by_index[index] = self.by_index[key]
                return self.by_index[key]
            raise ValueError(f"image refers to row {key!r}, which has no image")
        if isinstance(payload, (bytes, bytearray)):
            raw = bytes(payload)
            encoded = None if raw.startswith(_IMAGE_MAGIC) else raw
        elif isinstance(payload, str):
            raw, encoded = payload.encode(), payload.encode()
        else:
            raise ValueError(f"the image cell holds {type(payload).__name__}, not base64 text or image bytes")
        name = hashlib.sha1(raw).hexdigest()[:20]
        existing = next(iter(self.folder.glob(name + ".*")), None)
        if existing is None:
            data = raw
            if encoded is not None:
                try:
                    data = base64.b64decode(encoded, validate=False)
                except (binascii.Error, ValueError) as exc:
                    raise ValueError(f"the image is not valid base64 ({exc})") from None
            ext = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".webp" if data[8:12] == b"WEBP" else ".jpg"
            existing = self.folder / (name + ext)
            tmp = existing.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(existing)
        self.by_index[index] = str(existing)
        return str(existing)


def _row_options(row: Row) -> list[str]:
    options = []
    for letter in LETTERS:
        value = _text(row.get(letter))
        if not value:
            break
        options.append(value)
    return options


def _image_table(p: Path, name: str, sample: Callable[[Row, str, str], Sample]) -> list[Sample]:
    """The samples of a multiple-choice table with base64 images (HR-Bench, MME-RealWorld's copy): each row's
    image written once, then ``sample(row, index, image path)``; a row that cannot be read is marked."""
    store = _ImageStore(name, p)
    samples = []
    for label, row in _table_rows(p, ("question", "answer", "A", "B", "image")):
        if isinstance(row, str):
            samples.append(_bad(name, label, row))
            continue
        index = _text(row.get("index")) or label
        try:
            image = store.put(index, row["image"])
        except (KeyError, ValueError) as exc:
            samples.append(_bad(name, index, f"image: {exc}"))
            continue
        samples.append(sample(row, index, image))
    return samples


def load_hrbench(path: str | Path) -> Dataset:
    """HR-Bench 4K/8K, the TSV or the parquet file (the same table): 800 rows, 200 questions × the correct
    option in each of 4 positions."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            f"{p} is a folder: name HR-Bench's file, e.g. hrbench:{p / 'hr_bench_4k.parquet'} or "
            f"hrbench:{p / 'hr_bench_4k.tsv'}"
        )
    _require(
        p,
        "HR-Bench file",
        "download it with: huggingface-cli download DreamMr/HR-Bench --repo-type dataset "
        f"--include '{p.name}' --local-dir {p.parent}",
    )
    name = "hrbench8k" if "8k" in p.name.lower() else "hrbench4k"

    def sample(row: Row, index: str, image: str) -> Sample:
        # cycle_category is an int in some copies and a string in others
        meta = {"category": _text(row.get("category")), "cycle": _text(row.get("cycle_category"))}
        question, answer = _text(row.get("question")), _text(row.get("answer"))
        return _mc_sample(f"{name}/{index}", [image], question, _row_options(row), answer, meta)

    samples = _image_table(p, name, sample)
    # the file holds each question four times, the options rotated (cycle_category): shown as they are
    return Dataset(name=name, samples=samples, source=str(p), options="fixed")


def load_treebench(path: str | Path) -> Dataset:
    """TreeBench TSV: 405 questions with 2-11 options and target boxes (``target_instances``)."""
    p = _require(
        Path(path),
        "TreeBench TSV",
        "download it with: huggingface-cli download HaochenWang/TreeBench --repo-type dataset "
        f"--local-dir {Path(path).parent}",
    )
    store = _ImageStore("treebench", p)
    samples = []
    for label, row in _table_rows(p, ("question", "answer", "image")):
        if isinstance(row, str):
            samples.append(_bad("treebench", label, row))
            continue
        index = _text(row.get("index")) or label
        try:
            image = store.put(index, row["image"])
            options = _row_options(row) or _options_in_text("x\n" + _text(row.get("multi-choice options")))[0]
            raw = row.get("target_instances")
            listed = ast.literal_eval(raw.strip()) if isinstance(raw, str) and raw.strip() else raw
            boxes = [_int_box(b) for b in listed] if listed else None
        except (KeyError, ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:
            samples.append(_bad("treebench", index, f"unreadable row: {exc!r}"[:300]))
            continue
        meta = {"category": _text(row.get("category"))}
        samples.append(
            _mc_sample(
                f"treebench/{index}",
                [image],
                _text(row.get("question")),
                options,
                _text(row.get("answer")),
                meta,
                boxes,
            )
        )
    return Dataset(name="treebench", samples=samples, source=str(p))


# ------------------------------------------------------------------------------------------------ MME-RealWorld
def load_mme_realworld(root: str | Path, lite: bool = False) -> Dataset:
    """MME-RealWorld (full: ``MME_RealWorld.json`` + image folders) or its 1,919-question Lite set.

    ``root`` is the downloaded folder, or a file: another questions JSON of the same format
    (``MME_RealWorld_CN.json``; images beside it, or under ``imgs/`` beside it for Lite), or a table with the
    images inside as base64 (the ``MME-RealWorld-Base64`` TSV / parquet copies: ``index, image, question,
    A-E, answer, category, l2-category``).
    """
    base = Path(root)
    if base.suffix.lower() in (".tsv", ".parquet"):
        return _mme_realworld_table(base, lite)
    if base.suffix.lower() == ".json":
        path = _require(base, "MME-RealWorld questions", "name the questions JSON, or the folder that holds it")
        imgs = base.parent / "imgs"
        image_root = imgs if lite and imgs.is_dir() else base.parent
        name = "mme-realworld" + ("-lite" if lite else "") + ("-cn" if "cn" in base.stem.lower().split("_") else "")
        return _mme_realworld_json(path, image_root, name, flat=lite)
    if lite:
        path = _require(
            base / "data" / "MME-RealWorld-Lite.json",
            "MME-RealWorld-Lite questions",
            "download with: huggingface-cli download yifanzhang114/MME-RealWorld-Lite --repo-type dataset "
            f"--local-dir {base} && (cd {base} && unzip data.zip)",
        )
        image_root, name = base / "data" / "imgs", "mme-realworld-lite"
    else:
        path = _require(
            base / "MME_RealWorld.json",
            "MME-RealWorld questions",
            "download with: huggingface-cli download yifanzhang114/MME-RealWorld --repo-type dataset "
            f"--local-dir {base}, then for each X.tar.gz.part_aa: cat X.tar.gz.part_* > X.tar.gz && "
            "tar -xzf X.tar.gz",
        )
        image_root, name = base, "mme-realworld"
    return _mme_realworld_json(path, image_root, name, flat=lite)


def _mme_realworld_json(path: Path, image_root: Path, name: str, flat: bool) -> Dataset:
    """MME-RealWorld's questions JSON; images under ``image_root`` by their recorded path (``flat``: by name)."""
    rows = _read_json(path, "it should hold a list of questions (Question_id, Image, Text, …)")
    if not isinstance(rows, list):
        raise ConfigError(f"{path} must hold a JSON list of questions (Question_id, Image, Text, …); download it again")
    samples = []
    for i, row in enumerate(rows):
        key = str(row.get("Question_id", i)) if isinstance(row, dict) else str(i)
        try:
            if not isinstance(row["Answer choices"], list):
                raise TypeError(f"Answer choices is {type(row['Answer choices']).__name__}, not a list")
            options = [re.sub(r"^\([A-Z]\)\s*", "", str(c)).strip() for c in row["Answer choices"]]
            meta = {
                "task": row.get("Task", ""),
                "subtask": row.get("Subtask", ""),
                "category": str(row.get("Category", "")),
            }
            file = _file_name(row["Image"])
            image = image_root / (Path(file).name if flat else file)
            samples.append(
                _mc_sample(f"{name}/{key}", [str(image)], str(row["Text"]), options, str(row["Ground truth"]), meta)
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            samples.append(_bad(name, key, f"unreadable record: {_why(exc)}"))
    return Dataset(name=name, samples=samples, source=str(path))


def _mme_realworld_table(p: Path, lite: bool) -> Dataset:
    """MME-RealWorld as a table with base64 images (``yifanzhang114/MME-RealWorld-Base64``)."""
    _require(
        p,
        "MME-RealWorld table",
        "download it with: huggingface-cli download yifanzhang114/MME-RealWorld-Base64 --repo-type dataset "
        f"--include '{p.name}' --local-dir {p.parent}",
    )
    name = "mme-realworld" + ("-lite" if lite or "lite" in p.stem.lower() else "")

    def sample(row: Row, index: str, image: str) -> Sample:
        options = [re.sub(r"^\([A-Z]\)\s*", "", o) for o in _row_options(row)]
        meta = {"task": _text(row.get("category")), "subtask": _text(row.get("l2-category"))}
        question, answer = _text(row.get("question")), _text(row.get("answer"))
        return _mc_sample(f"{name}/{index}", [image], question, options, answer, meta)

    samples = _image_table(p, name, sample)
    return Dataset(name=name, samples=samples, source=str(p))


# ----------------------------------------------------------------------------------------------------- O3-Bench
def load_o3bench(root: str | Path) -> Dataset:
    """O3-Bench (InSight-o3): ``test/metadata.jsonl`` with images under ``test/``, 345 multiple-choice questions
    on charts and maps; the boxes of each question's ``target_layouts`` become its target boxes.

    ``root`` is the downloaded folder (holding ``test/``), the ``test`` folder, or the JSONL file itself.
    """
    base = Path(root)
    if base.suffix == ".jsonl":
        path = base
    elif (base / "metadata.jsonl").exists():  # the test folder itself
        path = base / "metadata.jsonl"
    else:
        path = base / "test" / "metadata.jsonl"
    _require(
        path,
        "O3-Bench metadata.jsonl",
        f"download it with: huggingface-cli download m-Just/O3-Bench --repo-type dataset --local-dir {base}",
    )
    samples = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):  # JSON lines end at "\n" only (not U+2028)
        if line.strip():
            samples.append(_o3bench_item(path, n, line))
    if not samples:
        raise ConfigError(f"{path} holds no questions; download it again")
    return Dataset(name="o3bench", samples=samples, source=str(path))


def _o3bench_item(path: Path, n: int, line: str) -> Sample:
    key = f"line{n}"
    try:
        try:
            row = json.loads(line)
        except RecursionError:
            raise ValueError("the line nests too deeply to be a record") from None
        if not isinstance(row, dict):
            raise ValueError("the line is not a JSON object")
        image = _file_name(row.get("file_name") or row.get("image"))  # the official evaluator accepts either
        question, answer = row["question"], row["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError("question and answer must be strings")
        boxes = _o3bench_boxes(row)
    except (ValueError, KeyError, TypeError) as exc:
        return _bad("o3bench", key, f"{path.name} line {n} is unreadable: {_why(exc)}")
    meta: dict[str, Any] = {
        "category": str(row.get("subset") or row.get("category") or ""),
        "target_layouts": list(row.get("target_layouts") or []),
    }
    sid, images = f"o3bench/{n - 1}", [str(path.parent / image)]
    raw_options = row.get("options")
    if not raw_options:  # the official evaluator's open-answer path
        return Sample(id=sid, images=images, question=question, answer=answer, target_boxes=boxes, meta=meta)
    if not isinstance(raw_options, str):
        return _bad("o3bench", key, f"{path.name} line {n}: options must be one string 'A. …\\nB. …'")
    options, _ = _options_in_text("x\n" + raw_options)
    if not options:
        return _bad("o3bench", key, f"{path.name} line {n}: options {raw_options[:60]!r} are not 'A. …' lines")
    letter = re.match(r"^\(?([A-Z])\b", answer.strip())
    return _mc_sample(sid, images, question, options, letter.group(1) if letter else answer, meta, boxes)


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            raise ValueError(f"{text[:60]!r} is neither JSON nor a Python literal") from None


def _o3bench_boxes(row: dict[str, Any]) -> list[list[int]] | None:
    """The target layouts' boxes in original pixels.

    ``layout_infos[id]["bbox"]`` is absolute pixel ``[xmin, ymin, xmax, ymax]`` (floats): InSight-o3's
    ``notebooks/visualize_o3_bench.ipynb`` (m-Just/InSight-o3) annotates it so and draws it as
    ``Rectangle((bbox[0], bbox[1]), bbox[2] - bbox[0], bbox[3] - bbox[1])``. Keys are string ids, while
    ``target_layouts`` holds ints.
    """
    targets, infos = row.get("target_layouts") or [], row.get("layout_infos") or {}
    # copies saved through pandas can hold these as their text (JSON, or a Python literal)
    targets, infos = (_literal(v) if isinstance(v, str) else v for v in (targets, infos))
    if not targets:
        return None
    if not isinstance(targets, list) or not isinstance(infos, dict):
        raise ValueError("target_layouts must be a list of ids and layout_infos an object keyed by id")
    width, height = row.get("img_width"), row.get("img_height")
    boxes = []
    for lid in targets:
        info = infos.get(str(lid)) or next(
            (v for v in infos.values() if isinstance(v, dict) and v.get("layout_id") == lid), None
        )
        if not isinstance(info, dict) or "bbox" not in info:
            raise ValueError(f"target layout {lid} is not in layout_infos")
        box = info["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"layout {lid}'s bbox {box!r} is not four numbers [xmin, ymin, xmax, ymax]")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in box) or min(x0, y0) < 0 or x1 <= x0 or y1 <= y0:
            raise ValueError(f"layout {lid}'s bbox {box!r} is not pixel [xmin, ymin, xmax, ymax] with xmin < xmax")
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            if x0 >= width or y0 >= height:
                raise ValueError(f"layout {lid}'s bbox {box!r} lies outside the {width}×{height} image")
            x1, y1 = min(x1, float(width)), min(y1, float(height))  # annotation rounding can pass the edge
        boxes.append(_int_box([x0, y0, x1, y1]))
    return boxes


# ----------------------------------------------------------------------------------------------------- probes
def load_probes(level: str, n: int = 100, seed: int = 0, kind: str | None = None) -> Dataset:
    """``n`` generated probes of a level (of one ``kind`` only, when given), generated once into
    ``$GLIMPSE_HOME/probes/``."""
    from glimpse.probes.synth import GENERATOR_VERSION, LEVELS, check_kind, write_probes

    if level not in LEVELS:
        raise ConfigError(f"unknown probe level {level!r}; choose one of {', '.join(LEVELS)}")
    if kind is not None:
        check_kind(kind, f"probes:{level}:{n}:{seed}:{kind}")
    folder = glimpse_home() / "probes" / (f"{level}-s{seed}-n{n}-v{GENERATOR_VERSION}" + (f"-{kind}" if kind else ""))
    path = folder / "val.json"
    if not path.exists():
        write_probes(folder, level, n, seed=seed, kind=kind)
    data = load_minio3(path, name=f"probes-{level}")
    return data


LOADERS = (
    "probes",
    "minio3",
    "visualprobe",
    "vstar",
    "vstar-jsonl",
    "hrbench",
    "mme-realworld",
    "mme-realworld-lite",
    "treebench",
    "o3bench",
)


def load_dataset(spec: str) -> Dataset:
    """Load a dataset by spec (see the module docstring); questions that share an id are renamed apart.

    Raises:
        ConfigError: unknown name, malformed spec, or a missing file.
    """
    return _unique_ids(_load(spec))


def _load(spec: str) -> Dataset:
    name, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    if name == "probes":
        if not parts:
            raise ConfigError(
                "probes needs a level: probes:easy, probes:medium:500, probes:hard:500:7 or probes:easy:50:0:split_code"
            )
        if len(parts) > 4:
            raise ConfigError(f"probes spec {spec!r}: at most LEVEL:N:SEED:KIND, got {len(parts)} fields")
        try:
            n = int(parts[1]) if len(parts) > 1 else 100
            seed = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise ConfigError(f"probes spec {spec!r}: N and SEED must be integers") from None
        return load_probes(parts[0], n, seed, parts[3] if len(parts) > 3 else None)
    if name == "visualprobe":
        if len(parts) < 2:
            raise ConfigError("visualprobe needs a level and a base folder: visualprobe:hard:/data/minio3")
        return load_visualprobe(parts[0], ":".join(parts[1:]))
    if not rest:
        if name not in LOADERS:
            hint = f"; for a JSON file in Mini-o3's format: minio3:{spec}" if spec.endswith(".json") else ""
            raise ConfigError(f"unknown dataset {spec!r}: a spec is KIND:…, KIND one of {', '.join(LOADERS)}{hint}")
        raise ConfigError(f"dataset {spec!r} needs a path after '{name}:'")
    simple = {
        "minio3": load_minio3,
        "vstar": load_vstar,
        "vstar-jsonl": lambda r: load_vstar(r, prefer="jsonl"),
        "hrbench": load_hrbench,
        "treebench": load_treebench,
        "mme-realworld": load_mme_realworld,
        "mme-realworld-lite": lambda r: load_mme_realworld(r, lite=True),
        "o3bench": load_o3bench,
    }
    if name not in simple:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}")
    return simple[name](rest)


def _unique_ids(dataset: Dataset) -> Dataset:
    """Samples that share an id get ``#2``, ``#3``… after it, with a note: results are kept by id, so a shared
    one would make a resumed run take one question for another."""
    seen: Counter[str] = Counter()
    renamed = []
    for i, sample in enumerate(dataset.samples):
        seen[sample.id] += 1
        if seen[sample.id] > 1:
            new = f"{sample.id}#{seen[sample.id]}"
            while new in seen:
                new += "'"
            seen[new] += 1
            dataset.samples[i] = sample.model_copy(update={"id": new})
            renamed.append(new)
    if renamed:
        dataset.notes.append(
            f"{len(renamed)} questions share an id with an earlier one in the file and were renamed "
            f"({', '.join(renamed[:3])}{'…' if len(renamed) > 3 else ''})"
        )
    return dataset
