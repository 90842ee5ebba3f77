"""Build the report of a run: a folder of HTML, CSS, JavaScript, data and images that works opened from disk.

Layout of the report folder::

    index.html app.js style.css       the viewer (no CDN, no build step)
    data/run.js                       each run's config, summary and name
    data/index.js                     one small row per trajectory (filters, sorting, pages)
    data/traj/N.js                    trajectory N in full, loaded when its page opens
    img/orig/<hash>.<ext>             each distinct original once, full resolution (linked when possible)
    img/thumb/<hash>.jpg              list thumbnails (256 px)
    img/sweep-<i>.png                 the sweep plot of run i, when there is one

A question about several images shows each original with its own zooms and gold boxes.

Originals that a browser shows as they are (JPEG, PNG, WebP, GIF without EXIF rotation) are hard-linked, or
copied across file systems; others (EXIF-rotated, CMYK, 16-bit, TIFF …) are re-encoded in the orientation the
model saw. Crops are not written: the viewer cuts them from the original on a canvas, from each trajectory's
geometry, so a run of 10,000 trajectories costs one image per distinct original.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from glimpse.errors import ConfigError, ImageInputError
from glimpse.eval.metrics import summarize
from glimpse.images import apply_pixel_limit_override, read_image
from glimpse.trajectory import Trajectory, iter_jsonl

THUMB_PX = 256
_BROWSER_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
_EXIF_ORIENTATION = 0x0112
_QUESTION_CHARS = 240  # of the question, the answer and the gold answer in the list (a trajectory's page has all)
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Run:
    """A run's trajectories and what was written beside them."""

    name: str
    source: Path
    trajectories: list[Trajectory]
    config: dict[str, Any]
    summary: dict[str, Any]
    sweep_png: Path | None
    started_at: str | None


def load_run(path: str | os.PathLike[str]) -> Run:
    """A run folder of ``glimpse eval`` (or any JSON-lines file of trajectories, such as ``glimpse ask --save``).

    Raises:
        ConfigError: nothing to read at ``path``.
    """
    p = Path(path)
    if p.is_dir():
        results = p / "trajectories.jsonl"
        if not results.exists():
            raise ConfigError(f"{p} has no trajectories.jsonl: give a glimpse eval run folder or a .jsonl file")
        folder = p
    elif p.is_file():
        results, folder = p, p.parent
    else:
        raise ConfigError(f"{p} does not exist: give a glimpse eval run folder or a .jsonl file of trajectories")
    trajectories = list(iter_jsonl(results))
    config_file = folder / "config.json" if p.is_dir() else None
    meta = json.loads(config_file.read_text(encoding="utf-8")) if config_file and config_file.exists() else {}
    summary_file = folder / "summary.json" if p.is_dir() else None
    if summary_file and summary_file.exists():
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    else:
        caps = sorted({t.settings.max_turns for t in trajectories})
        summary = {"caps": {str(c): summarize([t for t in trajectories if t.settings.max_turns == c]) for c in caps}}
    sweep = folder / "sweep.png" if p.is_dir() else None
    name = meta.get("config", {}).get("model") or (trajectories[0].settings.model if trajectories else p.stem)
    dataset = meta.get("dataset", {}).get("name")
    return Run(
        name=f"{name} on {dataset}" if dataset else str(name),
        source=p,
        trajectories=trajectories,
        config=meta.get("config", {}),
        summary=summary,
        sweep_png=sweep if sweep and sweep.exists() else None,
        started_at=meta.get("started_at"),
    )


def _resolve(path: str, bases: Iterable[Path]) -> Path | None:
    p = Path(path)
    if p.is_absolute():
        return p if p.exists() else None
    for base in bases:
        if (base / p).exists():
            return base / p
    return None


def export_image(job: tuple[str, str, str]) -> tuple[str, str | None, str | None]:
    """Put one original into the report: ``(sha256, original file name, thumbnail file name)``.

    Runs in worker processes. Returns ``None`` names for an image that can no longer be read.
    """
    source, sha, out = job
    if not _SHA256.fullmatch(sha):  # it names the report's files: nothing else may reach the file system
        return sha, None, None
    folder = Path(out)
    thumb = folder / "thumb" / f"{sha[:16]}.jpg"
    apply_pixel_limit_override()
    try:
        with Image.open(source) as img:
            fmt, rotated = img.format, img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
            plain = fmt in _BROWSER_FORMATS and not rotated and img.mode in ("RGB", "RGBA", "L", "P", "LA", "1")
            ext = _BROWSER_FORMATS.get(fmt or "", ".png") if plain else ".png"
            target = folder / "orig" / f"{sha[:16]}{ext}"
            if not target.exists():
                if plain:
                    try:
                        os.link(source, target)
                    except OSError:
                        shutil.copyfile(source, target)
                else:
                    read_image(source).image.save(target, compress_level=3)
            if not thumb.exists():
                if fmt == "JPEG" and not rotated:
                    img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))  # decode at reduced scale: fast on 8K JPEGs
                    small = img.convert("RGB")
                else:
                    small = read_image(source).image
                small.thumbnail((THUMB_PX, THUMB_PX))
                small.save(thumb, quality=80)
    except (OSError, ValueError, ImageInputError, Image.DecompressionBombError):
        return sha, None, None
    return sha, target.name, thumb.name


def _json(value: Any) -> str:
    """JSON that is also safe JavaScript (the line separators U+2028/U+2029 escaped)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _js(variable: str, value: Any) -> str:
    return f"{variable} = {_json(value)};\n"


def _made_images(t: Trajectory, folder: Path) -> dict[str, str]:
    """Copy the images the trajectory's code made into the report; observation index → file."""
    out = {}
    for turn in t.turns:
        for made in turn.made:
            if not _SHA256.fullmatch(made.sha256):
                continue
            target = folder / "img" / "made" / f"{made.sha256[:16]}.png"
            if not target.exists() and _is_png(made.path):  # a record may name any file: only a PNG is copied
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(made.path, target)
            if target.exists():
                out[str(made.observation_index)] = f"img/made/{target.name}"
    return out


def _is_png(path: str) -> bool:
    """Whether ``path`` is a regular file that Pillow reads as a PNG (what the code tool keeps)."""
    try:
        if not Path(path).is_file():
            return False
        with Image.open(path) as img:
            return img.format == "PNG"
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _row(i: int, t: Trajectory, thumb: str | None) -> dict[str, Any]:
    q = t.sample.meta.get("stem") or t.sample.question
    return {
        "i": i,
        "id": t.id,
        "sid": t.sample.id,
        "r": t.sample_index,
        "cap": t.settings.max_turns,
        "level": t.sample.meta.get("level"),
        "cat": t.sample.meta.get("category"),
        "ok": t.score.correct if t.score else None,
        "m": t.score.method if t.score else None,
        "ot": t.over_turn,
        "te": t.metrics["tool_errors"],
        "nt": len(t.turns),
        "lat": round(t.wall_s, 2),
        "stop": t.stop_reason,
        "q": q[:_QUESTION_CHARS],
        "a": t.answer[:_QUESTION_CHARS] if t.answer else t.answer,
        "g": t.sample.answer[:_QUESTION_CHARS] if t.sample.answer else t.sample.answer,
        "thumb": f"img/thumb/{thumb}" if thumb else None,
        "b": None,
        "b_ok": None,
    }


def build_report(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    compare: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> Path:
    """Write the report of a run (and, with ``compare``, of a second run on the same questions, side by side).

    Returns:
        The report folder (``<run>/report`` by default); open its ``index.html``.
    """
    runs = [load_run(source)] + ([load_run(compare)] if compare is not None else [])
    first = runs[0]
    folder = (
        Path(out)
        if out is not None
        else first.source / "report"
        if first.source.is_dir()
        else first.source.parent / f"{first.source.stem}-report"  # two files in one folder: two reports
    )
    for sub in ("data/traj", "img/orig", "img/thumb"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    assets = resources.files("glimpse.view") / "static"
    for name in ("index.html", "app.js", "style.css"):
        (folder / name).write_bytes((assets / name).read_bytes())

    # 1. Each distinct original once: linked or re-encoded, and a thumbnail.
    jobs: dict[str, tuple[str, str, str]] = {}
    for run in runs:
        bases = [Path.cwd(), run.source if run.source.is_dir() else run.source.parent]
        for t in run.trajectories:
            for ref in t.originals():
                if ref.sha256 not in jobs:
                    found = _resolve(ref.path, bases)
                    if found is not None:
                        jobs[ref.sha256] = (str(found), ref.sha256, str(folder / "img"))
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 4:
        with ProcessPoolExecutor(workers) as pool:
            exported = list(pool.map(export_image, jobs.values(), chunksize=8))
    else:
        exported = [export_image(job) for job in jobs.values()]
    files = {sha: (orig, thumb) for sha, orig, thumb in exported}

    # 2. The data: trajectories one file each, the index, the runs.
    index: list[dict[str, Any]] = []
    offset = 0
    numbers: list[dict[tuple[str, int, int], int]] = []
    for run in runs:
        mapping = {}
        for j, t in enumerate(run.trajectories):
            n = offset + j
            mapping[(t.sample.id, t.sample_index, t.settings.max_turns)] = n
            orig, thumb = files.get(t.image.sha256, (None, None)) if t.image else (None, None)
            record = t.model_dump(mode="json")
            srcs = [files.get(ref.sha256, (None, None))[0] for ref in t.originals()]
            record["view"] = {
                "src": f"img/orig/{orig}" if orig else None,
                "srcs": [f"img/orig/{name}" if name else None for name in srcs],
                "made": _made_images(t, folder),
            }
            (folder / "data" / "traj" / f"{n}.js").write_text(
                f"GLIMPSE.loaded({n}, {_json(record)});\n", encoding="utf-8"
            )
            if run is first:
                index.append(_row(n, t, thumb))
        numbers.append(mapping)
        offset += len(run.trajectories)
    if len(runs) > 1:
        by_key = {(r["sid"], r["r"], r["cap"]): r for r in index}
        second = runs[1]
        for t in second.trajectories:
            key = (t.sample.id, t.sample_index, t.settings.max_turns)
            if key not in by_key:  # compare across turn caps when the caps differ
                key = next((k for k in by_key if k[:2] == key[:2]), key)
            if key in by_key:
                by_key[key]["b"] = numbers[1][(t.sample.id, t.sample_index, t.settings.max_turns)]
                by_key[key]["b_ok"] = t.score.correct if t.score else None
    runs_data = []
    for i, run in enumerate(runs):
        sweep = None
        if run.sweep_png is not None:
            shutil.copyfile(run.sweep_png, folder / "img" / f"sweep-{i}.png")
            sweep = f"img/sweep-{i}.png"
        runs_data.append(
            {
                "name": run.name,
                "source": str(run.source),
                "config": run.config,
                "summary": run.summary,
                "sweep": sweep,
                "count": len(run.trajectories),
                "started_at": run.started_at,
            }
        )
    (folder / "data" / "run.js").write_text(
        "window.GLIMPSE = window.GLIMPSE || {};\n" + _js("GLIMPSE.runs", runs_data), encoding="utf-8"
    )
    (folder / "data" / "index.js").write_text(_js("GLIMPSE.index", index), encoding="utf-8")
    return folder
