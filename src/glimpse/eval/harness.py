"""The evaluation harness behind ``glimpse eval``: concurrent, resumable, reproducible.

A run evaluates every (question, repeat, turn cap) *unit* of a dataset and writes into its folder:

* ``config.json``: the resolved settings (no secrets), dataset name, size and source, seeds, backend, and
  package versions; a resumed run must match the settings that change results;
* ``trajectories.jsonl``: one scored trajectory per unit, appended as each finishes;
* ``summary.json`` and ``summary.md``: the metrics of ``glimpse.eval.metrics`` per turn cap;
* ``sweep.csv`` and ``sweep.png`` when several turn caps were asked for.

**Resuming.** Running the same command again (same ``--out``) reads the results file, drops a line cut short
by a crash and any duplicate, drops units whose backend failed (``--redo-errors``, on by default), rewrites
the file compacted, and runs only what is missing. So a run killed at any point (even ``kill -9``) completes
with nothing lost and nothing twice. Questions whose input cannot be read (a corrupt row, an image that does
not load) are recorded as input errors (score ``input_error``) and counted; they are never retried.

**Backend failures.** A unit whose backend failed after retries is recorded (score ``backend_error``) and
counted apart from accuracy; ``EvalRun.backend_errors`` over the whole results file (a resume that completes
them brings it to 0) is what ``glimpse eval`` compares with ``--max-backend-errors`` to exit with code 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from glimpse.agent import AgentLoop, LoopOptions
from glimpse.api import backend_from_config
from glimpse.config import EvalConfig, loop_setting_names, public_dict
from glimpse.errors import ConfigError, GlimpseError
from glimpse.eval.datasets import Dataset, load_dataset
from glimpse.eval.judge import LLMJudge
from glimpse.eval.metrics import backend_failed, summarize, truncate
from glimpse.eval.options import MODES, present
from glimpse.eval.policies import POLICIES, policy_backend
from glimpse.eval.scoring import score
from glimpse.images import DEFAULT_CACHE_BYTES, ImageCache, PixelLimits
from glimpse.models import DEFAULT_MODEL, Backend, load_backend
from glimpse.paths import write_atomically
from glimpse.trajectory import Sample, Score, Trajectory, iter_jsonl

log = logging.getLogger(__name__)

RESULTS, CONFIG, SUMMARY, TABLE, SWEEP_CSV, SWEEP_PNG = (
    "trajectories.jsonl",
    "config.json",
    "summary.json",
    "summary.md",
    "sweep.csv",
    "sweep.png",
)
# Settings that change results: a resumed run must agree on them.
RESULT_SETTINGS = (
    "data",
    "model",
    "options",
    "seed",
    "max_new_tokens",
    "sweep",
    "judge",
    "counterfactual",
    *loop_setting_names(results_only=True),
)


@dataclass(frozen=True)
class Unit:
    """One trajectory to run: a question as presented in repeat ``repeat``, under turn cap ``cap``."""

    sample: Sample
    repeat: int
    cap: int

    @property
    def key(self) -> str:
        return unit_key(self.sample.id, self.repeat, self.cap)


def unit_key(sample_id: str, repeat: int, cap: int) -> str:
    return f"{sample_id}\t{repeat}\t{cap}"


def parse_caps(text: str) -> list[int]:
    try:
        caps = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"max_turns={text!r}: give a number or comma-separated numbers such as 4,8,16,32") from None
    if not caps or caps[0] < 1:
        raise ConfigError(f"max_turns={text!r}: turn caps must be positive")
    return caps


def default_out(cfg: EvalConfig) -> Path:
    def slug(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")[:60]

    return Path("runs") / f"{slug(cfg.data or '')}--{slug(cfg.model or '')}"


class ResultStore:
    """The results file: one JSON line per unit, appended and flushed as units finish."""

    def __init__(self, path: Path):
        self.path = path
        self.done: set[str] = set()

    def open(self, drop: Callable[[dict[str, Any]], bool]) -> int:
        """Read what is done, compacting the file; returns how many lines were dropped.

        A line that does not parse (cut short by a crash), a duplicate unit, or a unit ``drop`` rejects is left
        out, and the file is rewritten atomically with what remains.
        """
        if not self.path.exists():
            return 0
        kept, dropped, unended = [], 0, False
        with self.path.open("rb") as fh:
            for raw in fh:
                try:
                    record = json.loads(raw)
                    key = unit_key(record["sample"]["id"], record["sample_index"], record["settings"]["max_turns"])
                except (ValueError, KeyError, TypeError):
                    dropped += 1
                    continue
                if key in self.done or drop(record):
                    dropped += 1
                    continue
                self.done.add(key)
                unended = not raw.endswith(b"\n")  # whole but cut before its newline: the next append would join it
                kept.append(raw if not unended else raw + b"\n")
        if dropped or unended:
            write_atomically(self.path, b"".join(kept))
        return dropped

    def append(self, traj: Trajectory) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(traj.model_dump_json() + "\n")
            fh.flush()
        self.done.add(unit_key(traj.sample.id, traj.sample_index, traj.settings.max_turns))

    def replace(self, trajectories: list[Trajectory]) -> None:
        """Rewrite the records of these units (re-scored) in place, atomically; the others stay as they are."""
        new = {unit_key(t.sample.id, t.sample_index, t.settings.max_turns): t for t in trajectories}
        lines = []
        for t in self.load():
            t = new.get(unit_key(t.sample.id, t.sample_index, t.settings.max_turns), t)
            lines.append(t.model_dump_json() + "\n")
        write_atomically(self.path, "".join(lines))

    def load(self) -> list[Trajectory]:
        if not self.path.exists():
            return []
        return list(iter_jsonl(self.path))  # lines end at "\n" only: a reply may hold U+2028 written raw


@dataclass
class EvalRun:
    """What an evaluation produced.

    Attributes:
        ran: units run by this call; ``skipped``: units found done in the results file; ``asked``: questions.
        attempted: units in the results file whose input could be read (run, or failed in the backend).
        backend_errors: of those, units whose backend failed after retries (counted apart from accuracy).
    """

    out: Path
    dataset: Dataset
    summaries: dict[int, dict[str, Any]]
    ran: int
    skipped: int
    elapsed_s: float
    attempted: int = 0
    backend_errors: int = 0
    asked: int = 0  # questions asked (``--limit`` may ask fewer than the dataset holds)

    @property
    def backend_error_share(self) -> float:
        """The share of attempted units whose backend failed, in [0, 1]."""
        return self.backend_errors / self.attempted if self.attempted else 0.0


def _versions() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("glimpse", "pillow", "httpx", "pydantic", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[pkg] = metadata.version(pkg)
    try:
        here = Path(__file__).resolve().parent
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _recorded_options(out: Path) -> str | None:
    """The option order a run in ``out`` was made with, for ``--options auto`` to resume it as it was (runs made
    before ``auto`` existed recorded ``shuffle`` for every dataset)."""
    path = out / CONFIG
    if not (path.exists() and (out / RESULTS).exists()):
        return None
    mode = json.loads(path.read_text(encoding="utf-8")).get("config", {}).get("options")
    return mode if mode in MODES else None


def _check_config(out: Path, cfg: EvalConfig, dataset: Dataset) -> None:
    """Write ``config.json``, or check that an existing one agrees on the settings that change results."""
    path = out / CONFIG
    record = {
        "config": public_dict(cfg),
        "dataset": {"name": dataset.name, "questions": len(dataset), "source": dataset.source},
        "versions": _versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if path.exists() and (out / RESULTS).exists():
        old = json.loads(path.read_text(encoding="utf-8")).get("config", {})
        differs = [
            f"{k}: {old.get(k)!r} then, {getattr(cfg, k)!r} now"
            for k in RESULT_SETTINGS
            if old.get(k) != getattr(cfg, k)
        ]
        if differs:
            raise ConfigError(
                f"{out} holds results made with other settings ({'; '.join(differs)}); resume with the same "
                "settings, choose another --out, or pass --fresh to start over"
            )
        record["started_at"] = json.loads(path.read_text(encoding="utf-8")).get("started_at", record["started_at"])
        record["resumed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def probe_levels(samples: list[Sample]) -> frozenset[str] | None:
    """The levels of a run's questions when every one is a single-image Glimpse probe (``probes:LEVEL``, or a
    probes ``val.json`` loaded as ``minio3:``); ``None`` when any question is not one."""
    levels = set()
    for s in samples:
        if not str(s.meta.get("data_source", "")).startswith("glimpse_probe") or len(s.images) != 1:
            return None
        if not s.meta.get("level"):
            return None
        levels.add(str(s.meta["level"]))
    return frozenset(levels) or None


def _backend(cfg: EvalConfig, samples: list[Sample]) -> Backend | None:
    if cfg.model in POLICIES:
        return None
    # What the run is on and how it samples, for a backend that chooses by them (``builtin``); others ignore them.
    return backend_from_config(
        cfg,
        max_concurrency=cfg.concurrency,
        max_batch=cfg.max_batch,
        probe_levels=probe_levels(samples),
        temperature=cfg.temperature,
    )


def _loop(cfg: EvalConfig, backend: Backend | None, cap: int, cache: ImageCache) -> AgentLoop:
    placeholder = backend or _PolicyPlaceholder(cfg.model or "")
    options = LoopOptions.of(
        cfg, max_turns=cap, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, counterfactual=cfg.counterfactual
    )
    return AgentLoop(placeholder, options, image_cache=cache)


class _PolicyPlaceholder:
    """Stands in for the loop's backend when every question brings its own policy backend."""

    def __init__(self, name: str):
        self.name = name

    async def generate(self, messages: Any, params: Any) -> Any:
        raise GlimpseError(f"policy {self.name!r} has no backend of its own; it is built per question")


def _input_error(unit: Unit, loop: AgentLoop) -> Trajectory:
    reason = str(unit.sample.meta.get("input_error"))
    return Trajectory(
        id=f"{unit.sample.id}#{unit.repeat}",
        sample=unit.sample,
        sample_index=unit.repeat,
        settings=loop.settings,
        stop_reason="error",
        error=f"input error: {reason}",
        score=Score(correct=None, method="input_error", detail=reason),
    )


async def run_eval(
    cfg: EvalConfig,
    *,
    backend: Backend | None = None,
    on_progress: Callable[[int, int, Trajectory], None] | None = None,
    on_start: Callable[[int, int, Dataset], None] | None = None,
) -> EvalRun:
    """Run (or resume) an evaluation; see the module docstring.

    Args:
        cfg: the settings.
        backend: a backend object to evaluate instead of the one ``cfg.model`` names (``cfg.model`` then only
            labels the run).
        on_progress: called after each unit with (finished so far, to run, the trajectory).
        on_start: called once with (units to run, units already done, the dataset).
    """
    if not cfg.data:
        raise ConfigError("choose a dataset with --data, e.g. probes:hard:200 or vstar:/data/vstar_bench")
    if cfg.k < 1:
        raise ConfigError(f"k must be at least 1, got {cfg.k}")
    if not 0 <= cfg.max_backend_errors <= 100:
        raise ConfigError(f"max_backend_errors={cfg.max_backend_errors} is a share in %: give 0 to 100")
    caps = parse_caps(cfg.max_turns)
    if not cfg.model:  # no --model: the built-in default, named in the run's config and summary
        cfg = dataclasses.replace(cfg, model=DEFAULT_MODEL)
    dataset = load_dataset(cfg.data)
    samples = dataset.samples[: cfg.limit] if cfg.limit is not None else dataset.samples
    owned = backend is None
    backend = _backend(cfg, samples) if owned else backend
    native = LoopOptions.of(cfg).native(backend)  # recorded resolved, so a resume compares like with like
    resolved = ("coords", "resize_factor", "min_pixels", "max_pixels")
    cfg = dataclasses.replace(cfg, **{name: getattr(native, name) for name in resolved})
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.fresh:
        for name in (RESULTS, SUMMARY, TABLE, SWEEP_CSV, SWEEP_PNG):
            (out / name).unlink(missing_ok=True)
    if cfg.options == "auto":  # recorded resolved, so a resume compares like with like
        cfg = dataclasses.replace(cfg, options=_recorded_options(out) or dataset.options)
    _check_config(out, cfg, dataset)

    store = ResultStore(out / RESULTS)
    store.open(drop=lambda r: cfg.redo_errors and r.get("stop_reason") == "error" and r.get("image") is not None)
    run_caps = caps if cfg.sweep == "run" else [caps[-1]]
    units = [
        Unit(present(s, r, mode=cfg.options, seed=cfg.seed), r, cap)
        for s in samples
        for r in range(cfg.k)
        for cap in run_caps
    ]
    wanted = {u.key for u in units}
    pending = [u for u in units if u.key not in store.done]
    if on_start is not None:
        on_start(len(pending), len(units) - len(pending), dataset)

    # An original is asked for again only by another unit on the same file (a repeat, another cap, another question
    # on that image); with none, keeping it decoded after its trajectory fills the budget with images no unit uses.
    paths = [path for u in pending for path in u.sample.images]
    cache = ImageCache(DEFAULT_CACHE_BYTES if len(set(paths)) < len(paths) else 0)
    loops = {cap: _loop(cfg, backend, cap, cache) for cap in run_caps}
    judge = None
    if cfg.judge:
        judge_backend = load_backend(
            cfg.judge, base_url=cfg.judge_base_url, api_key=cfg.api_key, max_retries=cfg.max_retries
        )
        judge = LLMJudge(judge_backend, cache_path=out / "judge_cache.jsonl")
        # this run's answers the judge failed to decide before: asked again (without running the model again)
        undecided = [
            t
            for t in store.load()
            if t.score
            and t.score.method == "judge_error"
            and unit_key(t.sample.id, t.sample_index, t.settings.max_turns) in wanted
        ]
        if undecided:
            log.info("asking the judge again about %d answers it failed to decide before", len(undecided))
            rejudge = asyncio.Semaphore(cfg.concurrency)

            async def again(t: Trajectory) -> None:
                async with rejudge:
                    t.score = await score(t.answer, t.sample, judge)

            await asyncio.gather(*(again(t) for t in undecided))
            store.replace(undecided)
    limits = PixelLimits(cfg.min_pixels, cfg.max_pixels, cfg.resize_factor)
    gate = asyncio.Semaphore(cfg.concurrency)
    finished = 0
    started = time.perf_counter()

    async def one(unit: Unit) -> None:
        nonlocal finished
        loop = loops[unit.cap]
        async with gate:
            if unit.sample.meta.get("input_error"):
                traj = _input_error(unit, loop)
            else:
                own = None
                if backend is None:
                    own = policy_backend(
                        cfg.model or "",
                        unit.sample,
                        protocol=cfg.protocol,
                        coords=cfg.coords,
                        limits=limits,
                        seed=cfg.seed,
                    )
                (traj,) = await loop.run(unit.sample, first_index=unit.repeat, backend=own)
                if traj.image is None:  # the image did not load: an input error, like a missing row
                    traj.score = Score(correct=None, method="input_error", detail=traj.error)
                elif traj.stop_reason == "error":
                    traj.score = Score(correct=None, method="backend_error", detail=traj.error)
                else:
                    traj.score = await score(traj.answer, traj.sample, judge)
        store.append(traj)
        finished += 1
        if on_progress is not None:
            on_progress(finished, len(pending), traj)

    try:
        await asyncio.gather(*(one(u) for u in pending))
    finally:
        for b in (backend if owned else None, getattr(judge, "backend", None)):
            if b is not None and hasattr(b, "aclose"):
                await b.aclose()

    # only the units this run asks for: a resume with a smaller --k, --limit or other caps reports those alone
    done = [t for t in store.load() if unit_key(t.sample.id, t.sample_index, t.settings.max_turns) in wanted]
    summaries = write_summaries(out, done, caps, cfg, dataset.name)
    attempted = [t for t in done if t.image is not None and not t.sample.meta.get("input_error")]
    return EvalRun(
        out=out,
        dataset=dataset,
        summaries=summaries,
        ran=len(pending),
        skipped=len(units) - len(pending),
        elapsed_s=time.perf_counter() - started,
        attempted=len(attempted),
        backend_errors=sum(backend_failed(t) for t in attempted),
        asked=len(samples),
    )


def trajectories_for_cap(trajectories: list[Trajectory], cap: int, sweep: str, run_cap: int) -> list[Trajectory]:
    """The trajectories that stand for turn cap ``cap``: run at it, or cut down from ``run_cap``."""
    if sweep == "run" or cap == run_cap:
        return [t for t in trajectories if t.settings.max_turns == cap]
    return [truncate(t, cap) for t in trajectories if t.settings.max_turns == run_cap]


def write_summaries(
    out: Path, trajectories: list[Trajectory], caps: list[int], cfg: EvalConfig, name: str
) -> dict[int, dict[str, Any]]:
    """Compute the metrics for every cap and write summary.json, summary.md and, for sweeps, the CSV and plot."""
    from glimpse.eval.report import markdown_summary, write_sweep

    summaries = {
        cap: summarize(trajectories_for_cap(trajectories, cap, cfg.sweep, caps[-1]), cfg.faithfulness) for cap in caps
    }
    payload = {
        "dataset": name,
        "model": cfg.model,
        "k": cfg.k,
        "sweep": cfg.sweep,
        "caps": {str(c): s for c, s in summaries.items()},
    }
    (out / SUMMARY).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out / TABLE).write_text(markdown_summary(name, cfg.model or "", cfg.k, summaries), encoding="utf-8")
    if len(caps) > 1:
        write_sweep(out / SWEEP_CSV, out / SWEEP_PNG, summaries, title=f"{cfg.model} on {name}")
    return summaries
