"""What ``glimpse coldstart``, ``glimpse export``, ``glimpse train sft`` and ``glimpse train rl`` print; the work is in
this package."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from glimpse.cli.exits import EXIT_OK
from glimpse.config import ColdStartConfig, RLConfig, SFTConfig, write_resolved
from glimpse.errors import ConfigError
from glimpse.images import PixelLimits
from glimpse.train.coldstart import ColdStartStats

if TYPE_CHECKING:
    from glimpse.train.export import ExportResult

FORMATS = ("llamafactory", "trl", "verl")


def parse_formats(spec: str) -> list[str]:
    """``llamafactory,trl`` → the formats; ``none`` → none.

    Raises:
        ConfigError: an unknown format.
    """
    if spec.strip().lower() in ("", "none"):
        return []
    formats = [f.strip().lower() for f in spec.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown export format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return formats


def run_coldstart(cfg: ColdStartConfig) -> int:
    """``glimpse coldstart``: make trajectories, print the acceptance statistics, export them."""
    from glimpse.eval.datasets import load_dataset
    from glimpse.train import coldstart

    console = Console(highlight=False, soft_wrap=True)
    formats = parse_formats(cfg.export)
    dataset = load_dataset(cfg.data)
    limits_args = (cfg.min_pixels, cfg.max_pixels)
    out = Path(cfg.out)
    write_resolved(cfg, out / "config.json")
    started = time.perf_counter()
    if cfg.method == "programmatic":
        limits = PixelLimits(*limits_args, cfg.resize_factor or PixelLimits().factor)
        stats = asyncio.run(
            coldstart.programmatic(
                dataset.samples,
                out,
                seed=cfg.seed,
                coords=cfg.coords or "relative",
                protocol=cfg.protocol,
                max_turns=cfg.max_turns,
                concurrency=cfg.concurrency,
                limits=limits,
            )
        )
    else:
        stats = asyncio.run(_few_shot(cfg, dataset.samples, limits_args))
    seconds = time.perf_counter() - started
    _print_stats(console, stats, seconds)
    path = out / "trajectories.jsonl"
    console.print(f"trajectories → {path}")
    if formats and stats.kept:
        from glimpse.train.export import export

        _print_export(console, export(path, out, formats=formats))
    console.print(
        f"[dim]view them with: glimpse view {path}\ntrain on them with: glimpse train sft --data {out} "
        "--model FOLDER[/]"
    )
    return EXIT_OK


async def _few_shot(cfg: ColdStartConfig, samples: list, limits_args: tuple[int, int]) -> ColdStartStats:
    from glimpse.models import load_backend, native_profile
    from glimpse.train import coldstart

    if not cfg.model:
        raise ConfigError("the fewshot method needs a generator: --model openai:NAME, hf:FOLDER or scripted:FILE")
    backend = load_backend(
        cfg.model,
        base_url=cfg.base_url,
        api_key=cfg.api_key,
        max_concurrency=cfg.concurrency,
        device=cfg.device,
        dtype=cfg.dtype,
    )
    factor = cfg.resize_factor or native_profile(backend).resize_factor
    try:
        return await coldstart.few_shot(
            backend,
            samples,
            cfg.out,
            attempts=cfg.attempts,
            exemplars=cfg.exemplars or coldstart.EXEMPLARS,
            protocol=cfg.protocol,
            coords=cfg.coords,
            max_turns=cfg.max_turns,
            concurrency=cfg.concurrency,
            max_new_tokens=cfg.max_new_tokens,
            limits=PixelLimits(*limits_args, factor),
            temperature=cfg.temperature,
            seed=cfg.seed,
        )
    finally:
        if hasattr(backend, "aclose"):
            await backend.aclose()


def _print_stats(console: Console, stats: ColdStartStats, seconds: float) -> None:
    d = stats.as_dict()
    console.print(
        f"[bold]kept {d['kept']} of {d['tried']}[/] trajectories ({100 * d['acceptance']:.1f}%) in {seconds:.1f} s"
    )
    if d["rejected"]:
        console.print("rejected: " + ", ".join(f"{k} {v}" for k, v in d["rejected"].items()))
    if d["patterns"]:
        console.print("patterns: " + ", ".join(f"{k} {v}" for k, v in d["patterns"].items()))
    if d["turns"]:
        console.print("turns: " + ", ".join(f"{k}: {v}" for k, v in d["turns"].items()))


def run_export(data: str, out: str | None, formats: str) -> int:
    """``glimpse export``: write a trajectories file in the training tools' formats."""
    from glimpse.train.export import export

    source = Path(data)
    path = source / "trajectories.jsonl" if source.is_dir() else source
    target = Path(out) if out else path.parent
    chosen = parse_formats(formats)
    if not chosen:
        raise ConfigError("choose at least one format: llamafactory, trl, verl")
    _print_export(Console(highlight=False, soft_wrap=True), export(path, target, formats=chosen))
    return EXIT_OK


def _print_export(console: Console, result: ExportResult) -> None:
    limits = result.limits
    pixels = f" at {limits.min_pixels:,}–{limits.max_pixels:,} pixels, factor {limits.factor}" if limits else ""
    console.print(f"exported {result.exported} trajectories, {result.images} images{pixels}")
    for fmt, path in result.files.items():
        console.print(f"  {fmt}: {path}")
    for reason, ids in result.skipped.items():
        console.print(f"  [yellow]skipped {len(ids)}[/] ({reason}), e.g. {ids[0]}")
    if "llamafactory" in result.files:
        console.print(
            f"  [dim]LLaMA-Factory: dataset_dir {result.files['llamafactory'].parent}, dataset glimpse; "
            f"pixel limits in {result.files['llamafactory'].parent / 'train_args.yaml'}[/]"
        )


def run_sft(cfg: SFTConfig) -> int:
    """``glimpse train sft``: train with a progress bar, then say where the model is."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from glimpse.train.sft import StepLog, train

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"training {escape(str(cfg.model))} on {escape(str(cfg.data))} → {escape(cfg.out)}")
    with Progress(
        TextColumn("[bold]sft[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[speed]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("sft", total=None, loss="–", speed="")

        def on_step(entry: StepLog) -> None:
            progress.update(
                task,
                total=entry.total,
                completed=entry.step,
                loss=f"{entry.loss:.4f}",
                speed=f"{entry.tokens_per_s:,.0f} tok/s",
            )
            if cfg.log_every and (entry.step % cfg.log_every == 0 or entry.step == entry.total):
                progress.console.print(
                    f"step {entry.step}/{entry.total}  epoch {entry.epoch + 1}  loss {entry.loss:.4f}  "
                    f"lr {entry.lr:.2e}  grad {entry.grad_norm:.3f}  {entry.tokens_per_s:,.0f} tok/s",
                    highlight=False,
                )

        result = train(cfg, on_step=on_step)
    r = result.as_dict()
    if result.resumed_from:
        console.print(f"resumed from step {result.resumed_from}")
    console.print(
        f"[bold]done[/]: {r['steps']} steps, {r['examples']} trajectories, "
        f"{r['trainable_params']:,} of {r['total_params']:,} parameters trained, "
        f"{r['tokens_per_s']:,.0f} tokens/s ({r['trained_tokens_per_s']:,.0f} trained tokens/s)"
    )
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} trajectories longer than --max-length[/]")
    console.print(f"model → {result.out / 'model'}  (use it with --model hf:{result.out / 'model'})")
    return EXIT_OK


def run_rl(cfg: RLConfig) -> int:
    """``glimpse train rl``: one line per step, then where the model is."""
    from glimpse.train.rl import StepStats, Trainer

    console = Console(highlight=False, soft_wrap=True)
    mask = "over-turn masking" if cfg.mask_over_turn else "no over-turn masking"
    console.print(
        f"RL on {escape(str(cfg.model))}: {cfg.steps} steps of {cfg.prompts} prompts × {cfg.group} samples from "
        f"{escape(cfg.data)}, cap {cfg.max_turns} turns, {mask} → {escape(cfg.out)}"
    )
    trainer = Trainer(cfg)
    if trainer.step:
        console.print(f"resumed from step {trainer.step}")

    def on_step(s: StepStats) -> None:
        console.print(
            f"step {s.step}/{cfg.steps}  reward {s.reward:.3f}  turns {s.turns:.2f}  over-turn {s.over_turn:.0%}  "
            f"tool errors {s.tool_errors:.0%}  entropy {s.entropy:.3f}  groups {s.groups_kept}/{s.groups_drawn}  "
            f"trained {s.trained}  loss {s.loss:+.4f}  {s.seconds:.1f}s"
        )

    trainer.on_step = on_step
    model = trainer.run()
    console.print(f"[bold]done[/]: model → {escape(str(model))}  (use it with --model hf:{escape(str(model))})")
    return EXIT_OK


def run_verl_data(spec: str, out: str, image_paths: bool) -> int:
    """``glimpse train verl-data``: convert, then say how to train on it."""
    from glimpse.eval.datasets import load_dataset
    from glimpse.train.verl import data

    console = Console(highlight=False, soft_wrap=True)
    dataset = load_dataset(spec)
    count = data.write(dataset.samples, out, dataset.name, image_paths)
    size = Path(out).stat().st_size
    console.print(f"wrote {count:,} rows of {escape(dataset.name)} to {escape(out)} ({size / 1e6:,.1f} MB)")
    console.print(
        escape(
            f"train on it with the verl plugin: MODEL=<checkpoint> TRAIN={out} bash examples/verl/single_node_lora.sh "
            "(or mini_o3_qwen25vl7b.sh on a Ray cluster), where pip install 'glimpse[verl]' is done"
        )
    )
    return 0
