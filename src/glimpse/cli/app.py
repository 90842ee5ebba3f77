"""The ``glimpse`` command. It parses flags, calls library functions, and prints.

Exit codes: 0 answered · 1 finished without an answer (a cap, or no action) · 2 bad usage or configuration ·
3 unreadable input image · 4 model backend failure · 130 interrupted.

Heavy modules are imported inside the commands, so ``glimpse --help`` is fast and never imports torch.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from glimpse.cli.exits import EXIT_BACKEND, EXIT_INTERRUPTED, EXIT_USAGE
from glimpse.config import (
    AskConfig,
    BuiltinConfig,
    ColdStartConfig,
    EvalConfig,
    ReproConfig,
    RLConfig,
    ServeConfig,
    SFTConfig,
    SynthConfig,
    UIConfig,
    ViewConfig,
    field_type,
    resolve,
)
from glimpse.errors import ConfigError, GlimpseError

app = typer.Typer(
    name="glimpse",
    help="Thinking with images: a model zooms into a high-resolution image, turn by turn, until it can answer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _nullable(base: type) -> Callable[[str], Any]:
    """Parser of a number flag that also accepts 'none' (leave the value to the server)."""

    def parse(value: str) -> Any:
        if isinstance(value, str) and value.lower() == "none":
            return "none"
        try:
            return base(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{value!r} is not a valid {base.__name__} (or 'none')") from None

    return parse


def _flag_parameters(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per config field, annotated so typer makes it a flag."""
    params = []
    for f in dataclasses.fields(cls):
        base, nullable = field_type(cls, f.name)
        default = f.default
        # escaped: rich reads "[default: 12]" as a markup tag and drops it
        help_text = f.metadata["help"] + ("" if default in (None, False) else f" \\[default: {default}]")
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        if base is bool:
            option = typer.Option(f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
            annotation: Any = bool | None
        elif choices:
            option = typer.Option(flag, help=help_text, show_default=False)
            annotation = enum.Enum(f"{f.name}_choices", {c: c for c in choices}, type=str) | None
        elif nullable and base in (int, float):
            option = typer.Option(
                flag,
                help=help_text,
                parser=_nullable(base),
                show_default=False,
                metavar=f"{base.__name__.upper()}|none",
            )
            annotation = str | None
        else:
            option = typer.Option(flag, help=help_text, show_default=False)
            annotation = base | None
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[annotation, option]
            )
        )
    return params


def config_command(
    name: str,
    cls: type,
    *,
    positionals: list[inspect.Parameter] | None = None,
    help: str = "",
    parent: typer.Typer | None = None,
):
    """Register ``fn(config, *positionals)`` as a command (of ``parent``, default the top level) whose flags are
    the fields of ``cls``."""

    def decorate(fn: Callable[..., int]) -> Callable[..., int]:
        leading = positionals or []
        config_flag = inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[str | None, typer.Option("--config", help="YAML or TOML file with the same keys")],
        )

        def command(**kwargs: Any) -> None:
            file = kwargs.pop("config")
            args = [kwargs.pop(p.name) for p in leading]
            flags = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in kwargs.items()}
            try:
                cfg = resolve(cls, file, flags)
            except ConfigError as exc:
                _fail(str(exc), EXIT_USAGE)
            raise typer.Exit(fn(cfg, *args))

        command.__signature__ = inspect.Signature([*leading, *_flag_parameters(cls), config_flag])  # type: ignore[attr-defined]
        command.__doc__ = help or fn.__doc__
        (parent or app).command(name, help=help or fn.__doc__)(command)
        return fn

    return decorate


def _fail(message: str, code: int) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _positional(name: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[str, typer.Argument(help=help)]
    )


# ------------------------------------------------------------------------------------------------------------
@config_command(
    "ask",
    AskConfig,
    positionals=[
        inspect.Parameter(
            "images_and_question",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[
                list[str],
                typer.Argument(
                    metavar="IMAGE... QUESTION",
                    help="image file(s), then the question (several images are shown as image_1, image_2 …)",
                ),
            ],
        )
    ],
    help="Ask a question about an image (or several); the model zooms, turn by turn, until it answers.",
)
def ask_command(cfg: AskConfig, images_and_question: list[str]) -> int:
    from glimpse.cli.commands import run_ask

    if len(images_and_question) < 2:
        _fail("give an image file and a question: glimpse ask IMAGE [IMAGE...] QUESTION", EXIT_USAGE)
    *images, question = images_and_question
    if not question.strip():
        _fail("the question is empty: glimpse ask IMAGE [IMAGE...] QUESTION", EXIT_USAGE)
    if Path(question).is_file():
        _fail(f"the last argument, {question!r}, is a file: give the question after the image(s)", EXIT_USAGE)
    urls = [i for i in images if i.lower().startswith(("http://", "https://"))]
    if urls:
        _fail(f"{urls[0]} is a URL: images are read from files; download it and give its path", EXIT_USAGE)
    return run_ask(cfg, images[0] if len(images) == 1 else images, question)


@app.command("demo")
def demo_command(
    out: Annotated[str, typer.Option(help="folder for the generated scene, script and trajectory")] = "glimpse-demo",
    quiet: Annotated[bool, typer.Option(help="print only the answer")] = False,
    scripted: Annotated[
        bool, typer.Option(help="replay a scripted search instead (shows a nested zoom and a corrected mistake)")
    ] = False,
) -> None:
    """Offline demo: the built-in policy searches a generated high-resolution scene, live, with no download."""
    from glimpse.cli.commands import run_demo

    raise typer.Exit(run_demo(out, quiet=quiet, scripted=scripted))


@config_command(
    "synth",
    SynthConfig,
    help="Generate visual-search probes with known answers (easy / medium / hard) in VisualProbe's format.",
)
def synth_command(cfg: SynthConfig) -> int:
    from glimpse.cli.commands import run_synth

    return run_synth(cfg)


@config_command(
    "eval",
    EvalConfig,
    help="Evaluate a model on a benchmark or on probes: resumable, with Avg@k, sweeps over turn caps, faithfulness.",
)
def eval_command(cfg: EvalConfig) -> int:
    from glimpse.cli.commands import run_eval_command

    return run_eval_command(cfg)


@config_command(
    "view",
    ViewConfig,
    positionals=[_positional("run", "a glimpse eval run folder, or a .jsonl file of trajectories")],
    help="Build an HTML report of a run (every turn, box and crop) that opens from disk; --serve serves it.",
)
def view_command(cfg: ViewConfig, run: str) -> int:
    from glimpse.cli.commands import run_view

    return run_view(cfg, run)


@config_command(
    "serve",
    ServeConfig,
    help="Serve a backend behind an OpenAI-compatible /v1/chat/completions endpoint (loopback by default).",
)
def serve_command(cfg: ServeConfig) -> int:
    from glimpse.cli.commands import run_serve

    return run_serve(cfg)


@config_command(
    "ui",
    UIConfig,
    help="A local web app: choose an image and a question, watch each turn as it happens (thoughts streamed, "
    "boxes and crops drawn), stop a run, reopen past runs in the viewer (loopback by default).",
)
def ui_command(cfg: UIConfig) -> int:
    from glimpse.cli.commands import run_ui

    return run_ui(cfg)


@config_command(
    "coldstart",
    ColdStartConfig,
    help="Make cold-start SFT data: multi-turn searches of probes (programmatic teacher, or any model prompted "
    "with Glimpse's exemplars), keep the correct ones, export them for LLaMA-Factory, TRL and verl.",
)
def coldstart_command(cfg: ColdStartConfig) -> int:
    from glimpse.cli.train import run_coldstart

    return run_coldstart(cfg)


@app.command("export")
def export_command(
    data: Annotated[str, typer.Argument(help="trajectories.jsonl, or a folder holding one")],
    out: Annotated[str | None, typer.Option(help="output folder (default: the data's folder)")] = None,
    formats: Annotated[str, typer.Option(help="comma-separated: llamafactory, trl, verl")] = "llamafactory,trl,verl",
) -> None:
    """Export trajectories as training data: LLaMA-Factory ShareGPT JSON, TRL messages JSONL, verl parquet."""
    from glimpse.cli.train import run_export

    raise typer.Exit(run_export(data, out, formats))


train_app = typer.Typer(
    help="Train a checkpoint: sft (supervised, on trajectories), rl (GRPO with over-turn masking), "
    "builtin (the built-in model from scratch); verl-data (RL data for the verl plugin).",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")


@config_command(
    "sft",
    SFTConfig,
    parent=train_app,
    help="Fine-tune a Qwen-VL checkpoint on trajectories, loss on the model's own turns only (full or LoRA); "
    "resumable; the result loads as hf:OUT/model.",
)
def sft_command(cfg: SFTConfig) -> int:
    from glimpse.cli.train import run_sft

    return run_sft(cfg)


@config_command(
    "builtin",
    BuiltinConfig,
    parent=train_app,
    help="Train the built-in model (region tokens and a pointer) on a CPU or a GPU, from scratch or --init, on "
    "probes streamed from the generator and searched by a teacher (nothing stored); logs held-out accuracy per skill "
    "and step; the result loads as hf:OUT/model.",
)
def builtin_command(cfg: BuiltinConfig) -> int:
    from glimpse.builtin.train import train_builtin

    train_builtin(cfg)
    return 0


@config_command(
    "rl",
    RLConfig,
    parent=train_app,
    help="Reinforce a checkpoint with GRPO and over-turn masking (Mini-o3): rollouts through the agent loop, "
    "reward = the evaluation's scorer, dynamic sampling, token-level clipped loss; resumable; logs reward, "
    "accuracy, turns, over-turn and tool-error rates and entropy per step; the result loads as hf:OUT/model.",
)
def rl_command(cfg: RLConfig) -> int:
    from glimpse.cli.train import run_rl

    return run_rl(cfg)


@train_app.command("verl-data")
def verl_data_command(
    dataset: Annotated[str, typer.Argument(help="dataset spec, as for eval: probes:hard:2000:5, minio3:FILE.json, …")],
    out: Annotated[str, typer.Option(help="parquet file to write")],
    image_paths: Annotated[
        bool, typer.Option(help="store each image's absolute path instead of its bytes (a file system all nodes share)")
    ] = False,
) -> None:
    """Write a dataset as verl RL parquet rows for the verl plugin (the question, the original image's bytes or
    path and the Glimpse sample); then run examples/verl/*.sh."""
    from glimpse.cli.train import run_verl_data

    raise typer.Exit(run_verl_data(dataset, out, image_paths))


repro_app = typer.Typer(help="Reproduce a paper's claim, measured: turn-scaling (Mini-o3).", no_args_is_help=True)
app.add_typer(repro_app, name="repro")


@config_command(
    "turn-scaling",
    ReproConfig,
    parent=repro_app,
    help="Mini-o3's claim on probes: RL with a 6-turn cap with and without over-turn masking (plus no cold-start, "
    "no hard data), each evaluated at turn caps 4-32 on fresh hard probes; arm by arm, resumable; writes "
    "OUT/turn_scaling.md, .json and .png.",
)
def turn_scaling_command(cfg: ReproConfig) -> int:
    from glimpse.train.repro import run_repro

    run_repro(cfg)
    return 0


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except ConfigError as exc:
        _print_error(str(exc))
        sys.exit(EXIT_USAGE)
    except GlimpseError as exc:
        _print_error(str(exc))
        sys.exit(EXIT_BACKEND)
    except OSError as exc:
        if exc.filename is None:  # not a path the user gave: a bug or the machine, shown whole
            raise
        _print_error(f"{exc.filename}: {exc.strerror or exc}")  # e.g. an output folder that is a file
        sys.exit(EXIT_USAGE)


def _print_error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")


if __name__ == "__main__":
    main()
