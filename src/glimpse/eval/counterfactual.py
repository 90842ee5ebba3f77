"""Did the answers depend on what the crops showed? A counterfactual run, paired with the normal one.

A model can answer a visual-search question right without using what it zoomed into: a guess, a prior, the
question's wording. Faithfulness (``metrics``) checks *where* the zooms went; this checks whether the answer came
from *what they showed*, with VisualNeedle's crop-black test: the same questions are run again with every crop
the zoom tool returns replaced by a black image of the same size (``black``) or by random pixels (``noise``), and
the two runs are compared question by question.

``glimpse eval --counterfactual black`` runs (or resumes) the normal run in ``OUT`` and the counterfactual one in
``OUT/counterfactual-black/``, with the same questions, repeats, option orders and sampling seeds, so each unit
(question, repeat, turn cap) has a partner. It writes ``OUT/counterfactual-black.json`` and ``.md``: per turn cap
and per category, both accuracies, the drop, and the units answered right without the crops' content (right in
the counterfactual run: those answers did not need the crops) and right *only* without it (right there, wrong in
the normal run). Units that did not run in both (input or backend errors) are left out of the pairs and counted.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glimpse.config import EvalConfig
from glimpse.errors import ConfigError
from glimpse.eval.harness import RESULTS, EvalRun, ResultStore, parse_caps, run_eval, trajectories_for_cap
from glimpse.eval.metrics import BREAKDOWN_FIELDS
from glimpse.eval.report import pct
from glimpse.images import COUNTERFACTUALS
from glimpse.models import DEFAULT_MODEL
from glimpse.models.base import Backend
from glimpse.trajectory import Trajectory


@dataclass
class CounterfactualRun:
    """The two runs and their comparison (``pairs``: per turn cap, see ``compare``)."""

    normal: EvalRun
    counterfactual: EvalRun
    kind: str
    pairs: dict[int, dict[str, Any]]
    report: Path


def _correct(t: Trajectory) -> bool | None:
    return None if t.score is None else t.score.correct


def _stats(units: list[tuple[bool, bool]]) -> dict[str, Any]:
    n = len(units)
    if not n:
        return {"n": 0, "normal": None, "counterfactual": None, "drop": None, "right_without": None,
                "right_only_without": None, "needed_content": None}  # fmt: skip
    normal = sum(a for a, _ in units) / n
    counterfactual = sum(b for _, b in units) / n
    return {
        "n": n,
        "normal": normal,
        "counterfactual": counterfactual,
        "drop": normal - counterfactual,
        "right_without": counterfactual,
        "right_only_without": sum(b and not a for a, b in units) / n,
        "needed_content": sum(a and not b for a, b in units) / n,
    }


def compare(normal: list[Trajectory], counterfactual: list[Trajectory]) -> dict[str, Any]:
    """Pair the units of two runs at one turn cap (by trajectory id: question and repeat) and compare them."""
    theirs = {t.id: t for t in counterfactual}
    ours = {t.id for t in normal}
    units: list[tuple[bool, bool]] = []
    by: dict[str, dict[str, list[tuple[bool, bool]]]] = defaultdict(lambda: defaultdict(list))
    unpaired = 0
    for t in normal:
        other = theirs.get(t.id)
        a, b = _correct(t), None if other is None else _correct(other)
        if a is None or b is None:
            unpaired += 1
            continue
        units.append((a, b))
        for field in BREAKDOWN_FIELDS:
            value = t.sample.meta.get(field)
            if value:
                by[field][str(value)].append((a, b))
    return {
        **_stats(units),
        "unpaired": unpaired + sum(1 for t in counterfactual if t.id not in ours),
        "by": {field: {v: _stats(u) for v, u in sorted(groups.items())} for field, groups in by.items()},
    }


def markdown(kind: str, model: str, dataset: str, pairs: dict[int, dict[str, Any]]) -> str:
    """The comparison as Markdown."""
    lines = [
        f"# Counterfactual ({kind} crops): {model} on {dataset}",
        "",
        f"Each unit was run twice: with the crops the zoom tool returned, and with each crop replaced by {kind} of "
        "the same size. Accuracies in % over the units that ran in both; *right without* = right with the crops' "
        "content withheld (the answer did not need it); *right only without* = right there and wrong normally; "
        "*needed content* = right normally and wrong without it.",
        "",
        "| turn cap | paired units | normal | counterfactual | drop (points) | right without | right only without "
        "| needed content | unpaired |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cap, s in sorted(pairs.items()):
        lines.append(
            f"| {cap} | {s['n']} | {pct(s['normal'])} | {pct(s['counterfactual'])} | {pct(s['drop'])} | "
            f"{pct(s['right_without'])} | {pct(s['right_only_without'])} | {pct(s['needed_content'])} | "
            f"{s['unpaired']} |"
        )
    cap, s = max(pairs.items())
    for field, groups in s["by"].items():
        lines += [
            "",
            f"## By {field} (turn cap {cap})",
            "",
            f"| {field} | n | normal | counterfactual | drop (points) | right only without |",
            "|---|---|---|---|---|---|",
        ]
        for value, g in groups.items():
            lines.append(
                f"| {value} | {g['n']} | {pct(g['normal'])} | {pct(g['counterfactual'])} | {pct(g['drop'])} | "
                f"{pct(g['right_only_without'])} |"
            )
    return "\n".join(lines) + "\n"


async def run_counterfactual(
    cfg: EvalConfig,
    *,
    backend: Backend | None = None,
    on_progress: Callable[[int, int, Trajectory], None] | None = None,
    on_start: Callable[[int, int, Any], None] | None = None,
) -> CounterfactualRun:
    """Run (or resume) the normal and the counterfactual run of ``cfg`` and compare them (module docstring).

    Raises:
        ConfigError: no counterfactual chosen, or an unknown one.
    """
    kind = cfg.counterfactual
    if kind not in COUNTERFACTUALS:
        raise ConfigError(f"counterfactual={kind!r}: choose one of {', '.join(COUNTERFACTUALS)}")
    normal = await run_eval(
        dataclasses.replace(cfg, counterfactual=None), backend=backend, on_progress=on_progress, on_start=on_start
    )
    folder = normal.out / f"counterfactual-{kind}"
    other = await run_eval(
        dataclasses.replace(cfg, out=str(folder)), backend=backend, on_progress=on_progress, on_start=on_start
    )
    caps = parse_caps(cfg.max_turns)
    ours, theirs = ResultStore(normal.out / RESULTS).load(), ResultStore(folder / RESULTS).load()
    pairs = {
        cap: compare(
            trajectories_for_cap(ours, cap, cfg.sweep, caps[-1]), trajectories_for_cap(theirs, cap, cfg.sweep, caps[-1])
        )
        for cap in caps
    }
    report = normal.out / f"counterfactual-{kind}.md"
    model = cfg.model or DEFAULT_MODEL
    payload = {"kind": kind, "model": model, "dataset": normal.dataset.name, "caps": pairs}
    report.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    report.write_text(markdown(kind, model, normal.dataset.name, pairs), encoding="utf-8")
    return CounterfactualRun(normal, other, kind, pairs, report)
