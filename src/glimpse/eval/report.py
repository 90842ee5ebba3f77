"""Writing an evaluation's summary: a Markdown table, the sweep CSV, and the accuracy-vs-turn-cap plot.

The plot (matplotlib, imported only here) draws Avg@k against the turn cap on a log₂ axis, one line overall and
one per level when the samples have levels: Mini-o3's test-time scaling figure, for any model.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

from glimpse.errors import ConfigError

log = logging.getLogger(__name__)


def pct(v: float | None) -> str:
    """A share as a percentage with one decimal, "–" for None."""
    return "–" if v is None else f"{100 * v:.1f}"


def accuracy_cell(summary: dict[str, Any], value: float | None) -> str:
    """An accuracy as shown: a percentage, "not scored" when units ran but none had a gold answer, "–" when
    none ran (every unit's backend failed, or there were none)."""
    if value is None and summary.get("ran") and not summary.get("scored"):
        return "not scored"
    return pct(value)


def ran_cell(summary: dict[str, Any]) -> str:
    """How many units the accuracy is over, of those attempted ("19 of 80" when backends failed)."""
    ran, attempted = summary.get("ran", summary["trajectories"]), summary["trajectories"]
    return str(ran) if ran == attempted else f"{ran} of {attempted}"


def ran_only(summary: dict[str, Any], key: str) -> float | None:
    """A per-trajectory figure, or ``None`` when no unit ran (the summary then holds a vacuous 0)."""
    return None if summary.get("ran", 1) == 0 else summary[key]


def turns_cell(summary: dict[str, Any]) -> str:
    turns = ran_only(summary, "turns_mean")
    return "–" if turns is None else f"{turns:.2f}"


def markdown_summary(dataset: str, model: str, k: int, summaries: dict[int, dict[str, Any]]) -> str:
    """The summary of every cap as Markdown."""
    lines = [
        f"# {model} on {dataset}",
        "",
        f"k = {k} repeats per question. Accuracies in %, over the units that ran: a unit whose backend failed "
        "after retries is counted under backend errors, not as wrong.",
        "",
    ]
    lines += [
        "| turn cap | questions | units ran | Avg@k | pass@k | majority@k | chance | mean turns | over-turn | "
        "tool errors | faithful | input errors | backend errors | judge errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cap, s in sorted(summaries.items()):
        acc = s["accuracy"]
        lines.append(
            f"| {cap} | {s['questions']} | {ran_cell(s)} | {accuracy_cell(s, acc['avg'])} | "
            f"{accuracy_cell(s, acc['pass'])} | {accuracy_cell(s, acc['majority'])} | "
            f"{pct(s['chance'])} | {turns_cell(s)} | {pct(ran_only(s, 'over_turn_rate'))} | "
            f"{pct(ran_only(s, 'tool_error_rate'))} | "
            f"{pct(s['faithfulness']['covered_rate'])} | {s['input_errors']} | {s['backend_errors']} | "
            f"{s['judge_errors']} |"
        )
    cap, s = max(summaries.items())
    for field, groups in s["by"].items():
        lines += [
            "",
            f"## By {field} (turn cap {cap})",
            "",
            f"| {field} | n | Avg@k | pass@k | majority@k | backend errors |",
            "|---|---|---|---|---|---|",
        ]
        for value, g in groups.items():
            lines.append(
                f"| {value} | {g['n']} | {pct(g['avg'])} | {pct(g['pass'])} | {pct(g['majority'])} | "
                f"{g.get('backend_errors', 0)} |"
            )
    lines += [
        "",
        f"## Turns and stops (turn cap {cap})",
        "",
        f"- turns: {s['turns_histogram']}",
        f"- stop reasons: {s['stop_reasons']}",
        f"- mistakes by kind: {s['errors_by_kind']}",
        f"- scoring methods: {s['score_methods']}",
        f"- tokens per trajectory: {s['prompt_tokens_mean']:.0f} prompt, {s['completion_tokens_mean']:.0f} generated",
        f"- seconds per trajectory: {s['latency_s_mean']:.2f}",
        f"- faithfulness: {s['faithfulness']['checked']} correct answers with known targets; covered "
        f"{pct(s['faithfulness']['covered_rate'])} % (coverage ≥ {s['faithfulness']['threshold']}), "
        f"mean best IoU {s['faithfulness']['best_iou_mean'] or 0:.2f}",
    ]
    for name, f in s["faithfulness"].get("by_image", {}).items():  # questions about several images
        lines.append(
            f"  - targets in {name}: {f['checked']} correct answers; covered by a zoom into {name} "
            f"{pct(f['covered_rate'])} %, mean best IoU {f['best_iou_mean'] or 0:.2f}"
        )
    if "search" in s:  # summaries written before these metrics existed lack them
        q = s["search"]
        lines.append(
            f"- search: {q['distinct_answers']} distinct answers, {q['distinct_first_zooms']} distinct first zooms, "
            f"zoomed in {pct(q['zoomed_rate'])} %, first zoom (capped at a quarter of the image) on a target "
            f"in {pct(q['first_zoom_hit_rate'])} % of {q['first_zoom_checked']}"
        )
    lines.append("")
    return "\n".join(lines)


def _pyplot(what: str) -> Any:
    """matplotlib's pyplot on the file-only backend; a ConfigError naming ``what`` when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(f"writing {what} needs matplotlib: pip install 'glimpse[plot]'") from None
    return plt


def write_sweep(csv_path: Path, png_path: Path, summaries: dict[int, dict[str, Any]], title: str) -> bool:
    """The sweep table (CSV) and plot (PNG); returns whether the plot was drawn (it needs matplotlib)."""
    caps = sorted(summaries)
    levels = sorted({lv for s in summaries.values() for lv in s["by"].get("level", {})})
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "turn_cap",
                "avg_at_k",
                "pass_at_k",
                "majority_at_k",
                "mean_turns",
                "over_turn_rate",
                *[f"avg_at_k_{lv}" for lv in levels],
            ]
        )
        for cap in caps:
            s = summaries[cap]
            row = [
                cap,
                s["accuracy"]["avg"],
                s["accuracy"]["pass"],
                s["accuracy"]["majority"],
                ran_only(s, "turns_mean"),
                ran_only(s, "over_turn_rate"),
                *[s["by"].get("level", {}).get(lv, {}).get("avg") for lv in levels],
            ]
            writer.writerow(["" if v is None else v for v in row])  # no accuracy where no unit ran
    lines = {"all": [(c, summaries[c]["accuracy"]["avg"]) for c in caps]}
    if len(levels) > 1:
        for lv in levels:
            lines[lv] = [(c, summaries[c]["by"].get("level", {}).get(lv, {}).get("avg")) for c in caps]
    try:
        plot_lines(png_path, lines, title=title, ylabel="Avg@k (%)")
    except ConfigError as exc:
        log.warning("%s; %s written without a plot", exc, csv_path.name)
        return False
    return True


def plot_lines(path: Path, lines: dict[str, list[tuple[int, float | None]]], *, title: str, ylabel: str) -> None:
    """Accuracy against turn cap, one line per entry, log₂ x axis; a cap without an accuracy (``None``: no unit
    ran) is left out of its line."""
    plt = _pyplot("the sweep plot")
    lines = {label: [(x, y) for x, y in points if y is not None] for label, points in lines.items()}  # none ran
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, points in lines.items():
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, [100 * y for y in ys], marker="o", linewidth=2.2 if label == "all" else 1.4, label=label)
    caps = sorted({x for pts in lines.values() for x, _ in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(caps, [str(c) for c in caps])
    ax.set_xlabel("turn cap")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    if any(lines.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# z of a two-sided 95 % normal interval: NormalDist().inv_cdf(0.975)
Z95 = 1.959963984540054


class Interval(NamedTuple):
    low: float
    high: float


def wilson(correct: int, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of a proportion (95 % by default): ``correct`` right answers of ``n`` questions.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or ``n`` correct, which matters
    for the small accuracies and probe counts of a CPU run.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson needs 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    p, q = correct / n, z * z / n
    centre = (p + q / 2) / (1 + q)
    half = z / (1 + q) * math.sqrt(p * (1 - p) / n + q / (4 * n))
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def sign_test(a: int, b: int) -> float:
    """The exact two-sided sign test (McNemar's, for two arms scored on the same questions): ``a`` questions only
    the first got right, ``b`` only the second; the chance of a split at least this uneven if both were as good."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def plot_panels(
    path: Path,
    panels: dict[str, dict[str, list[tuple[float, float]]]],
    *,
    title: str,
    xlabel: str,
    ylims: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Panels side by side, one per entry (its y label → lines, each label → (x, y) points), with the legend in
    the first and optional y ranges by y label: e.g. training curves per step, one line per run."""
    plt = _pyplot("the plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=120, squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels.items(), strict=True):
        for label, points in lines.items():
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, linewidth=1.4, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ylabel in (ylims or {}):
            ax.set_ylim(*ylims[ylabel])
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
