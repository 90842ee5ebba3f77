"""What the command line prints: each turn as it happens, the answer, and a summary.

The commands here only arrange library calls and format their results; the work happens in ``glimpse.api``,
``glimpse.agent`` and ``glimpse.serve``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from glimpse.api import AskResult, ask_async
from glimpse.cli.exits import EXIT_BACKEND, EXIT_INPUT, EXIT_NO_ANSWER, EXIT_OK
from glimpse.config import AskConfig, EvalConfig, ServeConfig, SynthConfig, UIConfig, ViewConfig, write_resolved
from glimpse.errors import ConfigError
from glimpse.models.base import TextDelta
from glimpse.trajectory import Trajectory, Turn, save_jsonl

_THOUGHT_CHARS = 240
_OUTPUT_CHARS = 160  # of a code turn's first output line in the live view


def describe_turn(traj: Trajectory, turn: Turn) -> str:
    """One line (rich markup) saying what a turn did."""
    head = f"turn {turn.index + 1}"
    if turn.kind == "zoom" and turn.crop_box_px and turn.observation_size:
        src = traj.image_name(turn.source_index or 0, turn.original_index)
        x0, y0, x1, y1 = turn.crop_box_px
        box = ", ".join(f"{v:g}" for v in turn.call.bbox_2d) if turn.call else ""
        w, h = turn.observation_size
        return (
            f"[bold cyan]{head}[/] zoom {src} [{box}] → pixels ({x0}, {y0})–({x1}, {y1}), "
            f"crop {x1 - x0}×{y1 - y0} shown at {w}×{h} as observation_{turn.observation_index} "
            f"[dim]({turn.latency_s:.2f} s)[/]"
        )
    if turn.kind == "answer":
        return f"[bold green]{head}[/] answer: [bold]{escape(turn.answer or '')}[/] [dim]({turn.latency_s:.2f} s)[/]"
    if turn.kind == "error":
        return f"[bold yellow]{head}[/] mistake ({turn.error_kind}): {escape(turn.error or '')}"
    if turn.kind == "code":
        lines = len((turn.code or "").strip().splitlines())
        said = [ln.strip() for ln in (turn.code_output or "").splitlines() if ln.strip()]
        first = next((ln for ln in said if ln not in ("Output:", "Error:")), "no output")
        if len(first) > _OUTPUT_CHARS:
            first = first[: _OUTPUT_CHARS - 1] + "…"
        made = "".join(f" · showed observation_{m.observation_index}" for m in turn.made)
        label = f"code ({_count(lines, 'line')}{', ' + turn.error_kind if turn.error_kind else ''})"
        return f"[bold blue]{head}[/] {label} → {escape(first)}{made} [dim]({turn.latency_s + turn.tool_s:.2f} s)[/]"
    return f"[bold magenta]{head}[/] no zoom and no answer"


class TurnPrinter:
    """Prints turns as the agent loop reports them; with one sample and a streaming backend, each reply token by
    token as it is written (``text``), before the line saying what the turn did."""

    def __init__(self, console: Console, samples: int):
        self.console = console
        self.samples = samples
        self.seen: set[str] = set()
        self.streamed = False

    def _header(self, traj: Trajectory) -> None:
        if not self.seen:
            originals = traj.originals()
            for k, ref in enumerate(originals):
                name = f"{traj.image_name(0, k)} " if len(originals) > 1 else ""
                w, h = ref.shown_size
                self.console.print(
                    f"[dim]{name}{escape(ref.path)}: {ref.width}×{ref.height} pixels, shown at {w}×{h}[/]"
                )
        self.seen.add(traj.id)

    def text(self, traj: Trajectory, delta: TextDelta) -> None:
        """A piece of the reply being written (given only with one sample: several would interleave)."""
        self._header(traj)
        if not self.streamed or delta.restart:
            if delta.restart:
                self.console.print(" [dim](the reply restarts: its stream dropped and was retried)[/]")
            self.console.print("  ", end="")
            self.streamed = True
        self.console.print(delta.text, end="", style="dim italic", markup=False, highlight=False)

    def __call__(self, traj: Trajectory, turn: Turn) -> None:
        prefix = f"[dim]\\[{traj.sample_index}][/] " if self.samples > 1 else ""
        self._header(traj)
        if self.streamed:  # the reply is on screen already
            self.console.print()
            self.streamed = False
        elif turn.thought:
            thought = " ".join(turn.thought.split())
            if len(thought) > _THOUGHT_CHARS:
                thought = thought[: _THOUGHT_CHARS - 1] + "…"
            self.console.print(f"{prefix}[dim italic]  {escape(thought)}[/]")
        self.console.print(prefix + describe_turn(traj, turn))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def exit_code(trajectories: list[Trajectory], answer: str | None) -> int:
    """0 answered; 3 no image could be read; 4 every trajectory failed in the backend; else 1."""
    if answer is not None:
        return EXIT_OK
    if trajectories and all(t.stop_reason == "error" for t in trajectories):
        return EXIT_INPUT if all(t.image is None for t in trajectories) else EXIT_BACKEND
    return EXIT_NO_ANSWER


def summary(result: AskResult, console: Console) -> None:
    trajs = result.trajectories
    if len(trajs) == 1:
        t = trajs[0]
        if t.stop_reason == "error":  # said on stderr by report_failures
            return
        m = t.metrics
        facts = (
            f"stop: {t.stop_reason}{' (over-turn)' if t.over_turn else ''} · {_count(m['turns'], 'turn')} · "
            f"{_count(m['zooms'], 'zoom')} · {_count(m['tool_errors'], 'mistake')} · "
            f"{t.usage.prompt_tokens:,} prompt + {t.usage.completion_tokens:,} generated tokens · {t.wall_s:.2f} s"
        )
    else:
        for t in trajs:
            said = escape(t.answer) if t.answer is not None else f"[dim]no answer ({t.stop_reason})[/]"
            console.print(f"  [dim]\\[{t.sample_index}][/] {said} [dim]· {len(t.turns)} turns[/]")
        v = result.vote
        facts = f"majority of {v.total}: {v.counts.get(v.key, 0)} agree · {v.answered} answered"
    if result.answer is None:
        console.print(f"[bold red]No answer.[/] [dim]{facts}[/]")
    else:
        console.print(f"[bold green]Answer:[/] [bold]{escape(result.answer)}[/]  [dim]{facts}[/]")


def default_model_label(probe_levels: Any = None, temperature: float | None = None) -> str:
    """What ``builtin`` (the model when no --model is given) runs, and why, in one line.

    Args:
        probe_levels: the levels of an eval run whose every question is a Glimpse probe
            (``glimpse.eval.harness.probe_levels``); ``None`` for anything else (``glimpse ask``).
        temperature: the run's sampling temperature.
    """
    from glimpse.builtin.backend import choose

    return f"builtin: {choose(probe_levels, temperature).line}"


def _model_label(model: str | None) -> str:
    """``glimpse ask``'s model as typed, or for ``builtin`` what it runs and why."""
    return default_model_label() if model in (None, "", "builtin") else model


def report_failures(trajectories: list[Trajectory], errors: Console) -> None:
    """Say on stderr why trajectories failed (an unreadable image, a backend down): always, even with --quiet
    or --json, which silence progress, never errors."""
    for message in dict.fromkeys(t.error for t in trajectories if t.stop_reason == "error" and t.error):
        errors.print(f"[bold red]error:[/] {escape(message)}")


async def _ask_scored(
    image: str | list[str],
    question: str,
    cfg: AskConfig,
    printer: TurnPrinter | None,
    gold: str | None,
    target_boxes: list[list[int]] | None,
    seen: dict[int, Trajectory],
) -> AskResult:
    """Ask, then, when the gold answer is known (the demo's probe), record it in each trajectory's sample and
    score the answer with the evaluation's scorer. The gold is added after the run: the model never sees it.
    ``seen`` holds each sample's trajectory as of its latest turn (what an interrupted run can still save)."""

    def on_turn(traj: Trajectory, turn: Turn) -> None:
        seen[traj.sample_index] = traj
        if printer is not None:
            printer(traj, turn)

    # One sample's reply is printed as it streams; several would interleave, so they are not streamed at all.
    on_text = printer.text if printer is not None and cfg.samples == 1 else None
    result = await ask_async(image, question, cfg, on_turn=on_turn, on_text=on_text)
    if gold is None:
        return result
    from glimpse.eval.scoring import score

    for t in result.trajectories:
        t.sample = t.sample.model_copy(update={"answer": gold, "target_boxes": target_boxes})
        if t.stop_reason != "error":
            t.score = await score(t.answer, t.sample)
    return result


def run_ask(
    cfg: AskConfig,
    image: str | list[str],
    question: str,
    *,
    overwrite: bool = False,
    gold: str | None = None,
    target_boxes: list[list[int]] | None = None,
) -> int:
    """``glimpse ask``: run, print, save (``image``: one path, or several in the order they are shown). Returns the
    exit code.

    Progress and the answer go to stdout (stderr with ``--json``, whose stdout holds only records); errors go
    to stderr always. ``gold`` and ``target_boxes`` (the demo's) are recorded in the saved trajectories.
    """
    console = Console(stderr=cfg.json or cfg.quiet, highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    if not cfg.quiet:
        console.print(
            f"[bold]glimpse ask[/] · {escape(_model_label(cfg.model))} · effort {cfg.effort} · {cfg.protocol} protocol"
        )
    printer = None if cfg.quiet else TurnPrinter(console, cfg.samples)
    seen: dict[int, Trajectory] = {}
    try:
        result = asyncio.run(_ask_scored(image, question, cfg, printer, gold, target_boxes, seen))
    except KeyboardInterrupt:  # Ctrl-C: the loop marked what it stopped "cancelled"; keep what was done
        if cfg.save and seen:
            partial = [seen[i] for i in sorted(seen)]
            for t in partial:
                t.stop_reason = t.stop_reason or "cancelled"
            save_jsonl(partial, cfg.save, append=not overwrite)
            errors.print(f"interrupted: {len(partial)} unfinished trajectories saved to {escape(cfg.save)}")
        raise
    report_failures(result.trajectories, errors)
    if cfg.save:
        save_jsonl(result.trajectories, cfg.save, append=not overwrite)
        ran = result.trajectories[0].settings if result.trajectories else None
        # the defaults, named: the model it chose, the cap the effort level set
        used = dataclasses.replace(cfg, model=cfg.model or ran.model, max_turns=ran.max_turns) if ran else cfg
        write_resolved(used, Path(cfg.save).with_suffix(".config.json"))
    if cfg.json:
        for t in result.trajectories:
            sys.stdout.write(t.model_dump_json() + "\n")
    elif cfg.quiet:
        print(result.answer if result.answer is not None else "")
    else:
        summary(result, console)
        if cfg.save:
            console.print(f"[dim]saved to {escape(cfg.save)}[/]")
    return exit_code(result.trajectories, result.answer)


def run_demo(out: str, *, quiet: bool = False, scripted: bool = False) -> int:
    """``glimpse demo``: a live search of a generated probe by the best built-in policy (``scripted``: the
    replayed search of the runtime demo instead)."""
    if scripted:
        return _run_scripted_demo(out, quiet=quiet)
    from glimpse.builtin.backend import choose
    from glimpse.demo import make_probe_demo

    console = Console(highlight=False, soft_wrap=True)
    demo = make_probe_demo(out)
    if not quiet:
        console.print(
            f"[bold]Glimpse demo[/]: a generated {demo.size[0]}×{demo.size[1]} scene with "
            f"{demo.candidates} look-alike signs; only zooming tells them apart (the decisive detail is at most "
            f"{demo.shown_px:.0f} pixels tall in the 2-megapixel view the model first gets).\n"
            f"[yellow]The model here is Glimpse's training-free expert policy[/] (image analysis and "
            f"{'Tesseract OCR' if demo.ocr else 'no OCR: Tesseract is not installed, so the question needs none'}),"
            f" running the same loop, protocol and record as any model ({escape(choose().reason)}); on fresh "
            "probes both policies' accuracy is in the README's tables.\n"
        )
    cfg = AskConfig(model="expert", save=str(Path(out) / "trajectory.jsonl"), quiet=quiet, max_turns=8)
    code = run_ask(
        cfg, str(demo.image), demo.question, overwrite=True, gold=demo.answer, target_boxes=demo.target_boxes
    )
    if not quiet:
        console.print(f"[dim]gold answer: {demo.answer} · scene: {demo.image}[/]")
        console.print(f"[dim]see every turn, box and crop: glimpse view {Path(out) / 'trajectory.jsonl'}[/]")
    return code


def _run_scripted_demo(out: str, *, quiet: bool = False) -> int:
    from glimpse.demo import make_demo, shown_text_height

    demo = make_demo(out)
    console = Console(highlight=False, soft_wrap=True)
    if not quiet:
        console.print(
            f"[bold]Glimpse demo[/]: a generated {demo.size[0]}×{demo.size[1]} scene with a small sign. The model "
            f"first sees it at about 2 megapixels, where the sign's code is {shown_text_height(demo):.0f} pixels tall "
            "and unreadable, so it has to zoom.\n[yellow]The model in this demo is scripted[/]: its turns were "
            "written in advance from the scene's known geometry, to show the runtime (nested zooms, an invalid box "
            "answered with an error observation, the trajectory record). Use [bold]glimpse ask IMAGE QUESTION "
            "--model openai:NAME --base-url URL[/] for a real model.\n"
        )
    cfg = AskConfig(model=f"scripted:{demo.script}", save=str(Path(out) / "trajectory.jsonl"), quiet=quiet)
    code = run_ask(
        cfg, str(demo.image), demo.question, overwrite=True, gold=demo.answer, target_boxes=[demo.target_box]
    )
    if not quiet:
        console.print(f"[dim]gold answer: {demo.answer} · scene: {demo.image}[/]")
        console.print(f"[dim]see every turn, box and crop: glimpse view {Path(out) / 'trajectory.jsonl'}[/]")
    return code


def check_listen(host: str, port: int) -> None:
    """Raise a ``ConfigError`` now if nothing can listen on ``host:port`` (taken, or not this machine's address),
    rather than after the server has said where it serves."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose --port)") from None


def run_serve(cfg: ServeConfig) -> int:
    """``glimpse serve``: build the backend and serve it until interrupted."""
    from glimpse.models import load_backend
    from glimpse.serve import serve

    if not cfg.model:
        raise ConfigError("choose a backend to serve with --model, e.g. hf:FOLDER or scripted:FILE.json")
    check_listen(cfg.host, cfg.port)
    backend = load_backend(cfg.model, record=0, device=cfg.device, dtype=cfg.dtype, max_batch=cfg.max_batch)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {cfg.host}, not loopback: anyone who can reach it can use it")
    console.print(f"serving {escape(cfg.name or backend.name)} at http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)")
    serve(
        backend,
        host=cfg.host,
        port=cfg.port,
        model_name=cfg.name,
        latency=cfg.latency,
        jitter=cfg.jitter,
        fail_every=cfg.fail_every,
        max_body_bytes=cfg.max_body_mb * 1024 * 1024,
        max_images=cfg.max_images,
        max_n=cfg.max_n,
        max_new_tokens=cfg.max_new_tokens,
    )
    return EXIT_OK


def run_ui(cfg: UIConfig) -> int:
    """``glimpse ui``: serve the web app until interrupted (a non-loopback address is warned about by the app)."""
    from glimpse.ui import serve_ui

    check_listen(cfg.host, cfg.port)
    if Path(cfg.runs).exists() and not Path(cfg.runs).is_dir():
        raise ConfigError(f"--runs {cfg.runs} is a file: give a folder for the saved runs")
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    console.print(
        f"glimpse ui at http://{host}:{cfg.port}/ · runs saved in {escape(str(Path(cfg.runs).resolve()))} "
        "(Ctrl-C stops)"
    )
    serve_ui(cfg)
    return EXIT_OK


def run_synth(cfg: SynthConfig) -> int:
    """``glimpse synth``: generate probes and say where they are."""
    import time

    from glimpse.probes.synth import LEVELS, write_probes

    console = Console(highlight=False, soft_wrap=True)
    levels = list(LEVELS) if cfg.level == "all" else [cfg.level]
    for level in levels:
        started = time.perf_counter()
        path = write_probes(
            Path(cfg.out) / level, level, cfg.n, seed=cfg.seed, kind=cfg.kind, workers=cfg.workers, quality=cfg.quality
        )
        seconds = time.perf_counter() - started
        console.print(f"[bold]{level}[/]: {cfg.n} probes in {seconds:.1f} s ({cfg.n / seconds:.1f}/s) → {path}")
    console.print(
        f"[dim]evaluate with: glimpse eval --data minio3:{Path(cfg.out) / levels[0] / 'val.json'} --model oracle[/]"
    )
    return EXIT_OK


def _eval_table(run: Any) -> Any:
    from rich.table import Table

    from glimpse.eval.report import accuracy_cell, pct, ran_cell, ran_only, turns_cell

    asked = f"{run.asked} of {len(run.dataset)}" if run.asked != len(run.dataset) else str(run.asked)
    table = Table(title=f"{run.dataset.name}: {asked} questions", title_justify="left")
    for col in (
        "turn cap",
        "units ran",
        "Avg@k",
        "pass@k",
        "maj@k",
        "chance",
        "turns",
        "over-turn",
        "tool err",
        "faithful",
        "input err",
        "backend err",
    ):
        table.add_column(col, justify="right")
    for cap, s in sorted(run.summaries.items()):
        a, f = s["accuracy"], s["faithfulness"]["covered_rate"]
        table.add_row(
            str(cap),
            ran_cell(s),
            accuracy_cell(s, a["avg"]),
            accuracy_cell(s, a["pass"]),
            accuracy_cell(s, a["majority"]),
            pct(s["chance"]),
            turns_cell(s),
            pct(ran_only(s, "over_turn_rate")),
            pct(ran_only(s, "tool_error_rate")),
            pct(f),
            str(s["input_errors"]),
            str(s["backend_errors"]),
        )
    return table


def _print_table(console: Console, table: Any) -> None:
    """Print ``table`` whole where the output is not a terminal (a log, a pipe): rich's 80 columns there would cut
    the figures down to an ellipsis. A terminal keeps its own width."""
    from rich.measure import Measurement

    if console.is_terminal:
        console.print(table)
        return
    width = console.width
    console.width = max(width, Measurement.get(console, console.options.update_width(1_000), table).maximum)
    try:
        console.print(table)
    finally:
        console.width = width


def run_eval_command(cfg: EvalConfig) -> int:
    """``glimpse eval``: run with a progress bar, then print the summary and where the files are."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from glimpse.eval.harness import run_eval

    console = Console(highlight=False, soft_wrap=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    state = {"task": None, "correct": 0, "scored": 0, "failed": 0}

    def on_start(todo: int, done: int, dataset: Any) -> None:
        if cfg.model in (None, "", "builtin") and not state.get("said"):  # which policy builtin runs here, and why
            from glimpse.eval.harness import probe_levels

            samples = dataset.samples[: cfg.limit] if cfg.limit is not None else dataset.samples
            console.print(default_model_label(probe_levels(samples), cfg.temperature))
            state["said"] = True
        for note in dataset.notes:
            console.print(f"[yellow]note:[/] {note}")
        if done:
            console.print(f"resuming: {done} units already done, {todo} to run")
        state["task"] = progress.add_task(f"{cfg.model or 'builtin'} on {dataset.name}", total=todo, status="")

    def on_progress(finished: int, total: int, traj: Trajectory) -> None:
        from glimpse.eval.metrics import backend_failed

        if traj.score and traj.score.correct is not None:
            state["scored"] += 1
            state["correct"] += bool(traj.score.correct)
        state["failed"] += backend_failed(traj)
        acc = f"{100 * state['correct'] / state['scored']:.1f} %" if state["scored"] else "–"
        failed = f" · {state['failed']} backend errors" if state["failed"] else ""
        progress.update(state["task"], completed=finished, status=f"accuracy so far {acc}{failed}")

    if cfg.counterfactual:
        from glimpse.eval.counterfactual import run_counterfactual
        from glimpse.eval.report import pct

        with progress:
            paired = asyncio.run(run_counterfactual(cfg, on_progress=on_progress, on_start=on_start))
        _print_table(console, _eval_table(paired.normal))
        cap, s = max(paired.pairs.items())
        console.print(
            f"counterfactual ({paired.kind} crops), turn cap {cap}, {s['n']} paired units: accuracy "
            f"{pct(s['normal'])} % with the crops, {pct(s['counterfactual'])} % without their content "
            f"(drop {pct(s['drop'])} points; right only without: {pct(s['right_only_without'])} %) · {paired.report}"
        )
        run = paired.normal
        run.backend_errors += paired.counterfactual.backend_errors
        run.attempted += paired.counterfactual.attempted
    else:
        with progress:
            try:
                run = asyncio.run(run_eval(cfg, on_progress=on_progress, on_start=on_start))
            except KeyboardInterrupt:
                progress.stop()
                Console(stderr=True, highlight=False).print(
                    "interrupted: the finished questions are kept; run the same command again to resume"
                )
                raise
        _print_table(console, _eval_table(run))
    files = "summary.md, summary.json, trajectories.jsonl" + (", sweep.png" if len(run.summaries) > 1 else "")
    console.print(
        f"[dim]{run.ran} units run, {run.skipped} already done, {run.elapsed_s:.1f} s · {run.out}/: {files}[/]"
    )
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    unmatched = max((s.get("score_methods", {}).get("no_match", 0) for s in run.summaries.values()), default=0)
    if unmatched and not cfg.judge:
        errors.print(
            f"[yellow]warning:[/] {unmatched} open answers matched no rule (not the gold answer, a synonym, a number "
            "or a listed choice) and were scored wrong (score method no_match); benchmarks with free-form answers "
            "are scored by an LLM judge: pass --judge MODEL to decide them"
        )
    undecided = max((s.get("judge_errors", 0) for s in run.summaries.values()), default=0)
    if undecided:
        errors.print(
            f"[yellow]warning:[/] the judge failed to decide {undecided} answers (score method judge_error); they "
            "are left out of the accuracies above. Run the same command again to ask the judge again"
        )
    return eval_exit_code(run, cfg.max_backend_errors, errors)


def eval_exit_code(run: Any, max_backend_errors: float, errors: Console) -> int:
    """0, or 4 when more than ``max_backend_errors`` % of the units failed in the backend after retries (said on
    stderr with the counts and how to retry them; failures within the limit are said too)."""
    if not run.backend_errors:
        return EXIT_OK
    share = 100 * run.backend_error_share
    counts = (
        f"{run.backend_errors} of {run.attempted} units ({share:.1f} %) failed in the backend after retries; "
        f"the accuracies above are over the {run.attempted - run.backend_errors} that ran. Run the same command "
        "again to retry them"
    )
    if share > max_backend_errors:
        errors.print(f"[bold red]error:[/] {counts} (--max-backend-errors {max_backend_errors:g} %)")
        return EXIT_BACKEND
    errors.print(f"[yellow]warning:[/] {counts} (within --max-backend-errors {max_backend_errors:g} %)")
    return EXIT_OK


def run_view(cfg: ViewConfig, run: str) -> int:
    """``glimpse view``: build the report, say where it is, and serve it if asked."""
    import time

    from glimpse.view import build_report
    from glimpse.view.server import make_server

    console = Console(highlight=False, soft_wrap=True)
    started = time.perf_counter()
    folder = build_report(run, cfg.out, compare=cfg.compare, workers=cfg.workers)
    console.print(f"report written in {time.perf_counter() - started:.1f} s: {folder.resolve() / 'index.html'}")
    if not cfg.serve:
        console.print(f"[dim]open it in a browser, or serve it: glimpse view {run} --serve[/]")
        return EXIT_OK
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] serving on {cfg.host}, not loopback: anyone who can reach it can read it")
    check_listen(cfg.host, cfg.port)
    server = make_server(folder, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    console.print(f"serving at http://{host}:{port}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK
