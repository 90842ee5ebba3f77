"""Typed, flat configurations of the entry points, and the command-line flags derived from them.

Each entry point has one dataclass; every field has a default and a one-line help. The CLI turns each field
into a flag (``max_turns`` → ``--max-turns``); a YAML or TOML file given with ``--config`` may set the same
keys and nothing else. Precedence: field default < config file < flag. The resolved config is written next
to every output, without secrets.

This module imports nothing heavy, so ``glimpse --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.errors import ConfigError


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    result: bool = True,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """A config field with its help text, allowed values (``choices``, or a number from ``low`` to ``high``),
    whether it must never be written to disk, and (loop settings) whether it changes an evaluation's results
    (those must match when a run resumes)."""
    metadata = {"help": help, "choices": choices, "secret": secret, "result": result, "low": low, "high": high}
    return field(default=default, metadata=metadata)


COORDS_HELP = (
    "box coordinates: relative [0,1], pixels of the shown image, or 0-1000 "
    "(default: an hf model's native one: pixels for Qwen2.5-VL, thousand for Qwen2-VL, relative for Qwen3-VL; "
    "else relative)"
)
FACTOR_HELP = "image sides are multiples of this (default: an hf model's own, 28 for Qwen2/2.5-VL, 32 for Qwen3-VL)"
DEVICE_HELP = "hf backend: cpu, cuda, cuda:N or auto"
DTYPE_HELP = "hf backend: float32, bfloat16, float16, or auto (bfloat16 on CUDA, float32 on CPU)"
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAIN_DTYPE_HELP = (
    "weights' dtype: float32, or bfloat16 / float16 for a LoRA run's frozen base (full fine-tuning in half precision "
    "loses AdamW's small updates, so it is refused); auto: float32, a LoRA base on CUDA bfloat16"
)


@dataclass
class BackendSettings:
    """How to reach the model: the backend settings that ``glimpse ask`` and ``glimpse eval`` share."""

    model: str | None = opt(
        None,
        "model backend: openai:NAME (any OpenAI-compatible server), hf:FOLDER (a local Qwen-VL checkpoint), "
        "scripted:FILE.json, expert, or builtin (the default: the learned built-in model where it beats the expert, "
        "else expert; builtin:learned or builtin:expert chooses)",
    )
    base_url: str | None = opt(
        None,
        "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; several comma-separated URLs are "
        "load-balanced client-side (else $GLIMPSE_BASE_URL, $OPENAI_BASE_URL)",
    )
    api_key: str | None = opt(None, "API key (else $GLIMPSE_API_KEY, $OPENAI_API_KEY); never saved", secret=True)
    timeout: float = opt(
        600.0, "seconds to wait for one whole reply (for a streamed one: between two of its bytes)", low=0.001
    )
    max_retries: int = opt(6, "retries of a failed request (429, 5xx, timeouts, dropped connections)")
    image_format: str = opt("jpeg", "how images are sent: jpeg (quality 95) or png", choices=("jpeg", "png"))
    device: str = opt("cpu", DEVICE_HELP)
    dtype: str = opt("auto", DTYPE_HELP, choices=DTYPES)
    reasoning_effort: str | None = opt(
        None, "OpenAI reasoning models' own effort setting", choices=("low", "medium", "high")
    )


@dataclass
class LoopSettings:
    """The agent loop's settings, each defined once here.

    ``AskConfig`` and ``EvalConfig`` inherit them as flags; ``glimpse.agent.LoopOptions`` (what ``AgentLoop`` is
    built from) inherits them and adds the settings each command sets its own way (turn cap, token budget, seed).
    A new loop setting is one field here and its use in the loop. Fields whose value changes an evaluation's
    results must match when a run resumes, except those marked ``result=False``.
    """

    protocol: str = opt(
        "tags", "tags: Mini-o3's <grounding> tags; tools: native function calling", choices=("tags", "tools")
    )
    coords: str | None = opt(None, COORDS_HELP, choices=("relative", "pixels", "thousand"))
    prompt_file: str | None = opt(None, "YAML/TOML/text file with the prompts a checkpoint was trained with")
    max_context_tokens: int = opt(32768, "the model's context window; the loop stops before overflowing it")
    max_images: int | None = opt(None, "most images in the conversation, the original included (default: no cap)")
    min_pixels: int | None = opt(
        None, "smallest area an image is shown at (default: the model's own; otherwise Mini-o3's 40,000)"
    )
    max_pixels: int | None = opt(
        None, "largest area an image is shown at (default: the model's own; otherwise Mini-o3's 2,000,000)"
    )
    resize_factor: int | None = opt(None, FACTOR_HELP)
    keep_images: int | None = opt(None, "keep only the last K zoom images in the context (default: all)")
    code: bool = opt(False, "offer the Python code tool (a sandboxed session per trajectory)")
    sandbox: str = opt(
        "auto",
        "code tool isolation: bwrap (namespaces), process (limits only), or auto",
        choices=("auto", "bwrap", "process"),
        result=False,
    )
    code_timeout_s: float = opt(30.0, "wall-clock seconds one code call may take")
    temperature: float | None = opt(1.0, "sampling temperature ('none': the server's default)")
    top_p: float | None = opt(1.0, "nucleus sampling ('none': the server's default)")


def loop_setting_names(*, results_only: bool = False) -> tuple[str, ...]:
    """The names of ``LoopSettings``' fields (only those that change results, with ``results_only``)."""
    return tuple(f.name for f in dataclasses.fields(LoopSettings) if not results_only or f.metadata["result"])


@dataclass
class AskConfig(LoopSettings, BackendSettings):
    """Settings of ``glimpse ask`` (and of ``glimpse.ask`` in Python)."""

    effort: str = opt(
        "medium", "turn and token budget preset: low 4 turns, medium 12, high 32", choices=("low", "medium", "high")
    )
    max_turns: int | None = opt(None, "most assistant turns (overrides --effort)")
    max_new_tokens: int | None = opt(None, "most tokens per reply (overrides --effort)")
    samples: int = opt(1, "trajectories per question, run in parallel and reconciled by --vote", low=1)
    vote: str = opt("majority", "how several samples are reconciled", choices=("majority",))
    seed: int | None = opt(None, "sampling seed; sample i uses seed + i")
    token_ids: bool = opt(False, "ask the server for token ids and record the token view (vLLM)")
    max_concurrency: int = opt(64, "most requests in flight at once", low=1)
    save: str | None = opt(None, "append the trajectories to this JSONL file")
    json: bool = opt(False, "print the trajectories as JSON lines on stdout instead of the live view")
    quiet: bool = opt(False, "print only the answer")


@dataclass
class EvalConfig(LoopSettings, BackendSettings):
    """Settings of ``glimpse eval``."""

    model: str | None = opt(
        None,
        "backend (openai:NAME, hf:FOLDER, scripted:FILE, expert, builtin) or a reference policy: oracle, direct "
        "(default: builtin, the learned built-in model on the probe levels where it beats the expert, at "
        "--temperature 0, else expert)",
    )
    data: str | None = opt(
        None,
        "dataset spec: probes:hard[:N[:SEED]], visualprobe:hard:BASE, vstar:DIR, hrbench:FILE.parquet|.tsv, "
        "mme-realworld[-lite]:DIR, treebench:FILE.tsv, o3bench:DIR, minio3:FILE.json",
    )
    out: str | None = opt(None, "run folder; the same folder resumes a run (default: runs/<data>--<model>)")
    fresh: bool = opt(False, "delete the run folder's earlier results instead of resuming")
    k: int = opt(1, "repeats per question (Avg@k, pass@k, majority@k); each has its own option order and seed", low=1)
    max_turns: str = opt("12", "turn cap, or comma-separated caps for a sweep, e.g. 4,8,16,32")
    sweep: str = opt(
        "derive",
        "derive: run the largest cap once and cut each trajectory to the smaller caps (valid whenever the prompt "
        "does not mention the cap: the first turns are drawn the same way whatever the cap); run: run every cap",
        choices=("derive", "run"),
    )
    limit: int | None = opt(None, "evaluate only the first N questions", low=1)
    options: str = opt(
        "auto",
        "multiple-choice option order per repeat: shuffle (seeded), cyclic, fixed, or auto: the dataset's own "
        "protocol (fixed for HR-Bench, whose rows already rotate the answer through the positions; shuffle "
        "elsewhere)",
        choices=("auto", "shuffle", "cyclic", "fixed"),
    )
    seed: int = opt(0, "seed of option shuffles and sampling (repeat r samples with seed + r)")
    concurrency: int = opt(32, "questions in flight at once", low=1)
    max_new_tokens: int = opt(4096, "most tokens per reply")
    max_batch: int = opt(8, "hf backend: most requests generated together")
    judge: str | None = opt(None, "LLM judge for open answers the rules cannot decide, e.g. openai:gpt-4o-mini")
    judge_base_url: str | None = opt(None, "the judge's endpoint (default: the same as --base-url's environment)")
    faithfulness: float = opt(
        0.5, "share of a target box a zoom must cover for the answer to count as found there", low=0, high=1
    )
    redo_errors: bool = opt(True, "on resume, run again the questions whose backend failed")
    max_backend_errors: float = opt(
        0.0,
        "largest share of units, in %, whose backend may fail after retries before glimpse eval exits with "
        "code 4 (0: any failure does)",
    )
    counterfactual: str | None = opt(
        None,
        "also run every question with each zoom's crop replaced by black (or noise) of the same size, paired with "
        "the normal run (in OUT/counterfactual-KIND/), and report how much accuracy depended on the crops",
        choices=("black", "noise"),
    )


@dataclass
class SynthConfig:
    """Settings of ``glimpse synth``."""

    level: str = opt("all", "easy, medium, hard, or all three", choices=("easy", "medium", "hard", "all"))
    n: int = opt(100, "probes per level")
    seed: int = opt(0, "generation seed (probe i of a level and seed is always the same)")
    out: str = opt("probes", "output folder; each level goes to OUT/<level>/ (val.json + data/)")
    kind: str | None = opt(
        None,
        "only this question kind (default: the single-image kinds in turn, find_code and find_marker aside); "
        "which_image and "
        "split_code are two-image probes",
        choices=(
            "read_code",
            "marker_color",
            "marker_shape",
            "which_marked",
            "count",
            "relative_position",
            "find_code",
            "find_marker",
            "which_image",
            "split_code",
        ),
    )
    workers: int | None = opt(None, "processes (default: the number of cores, at most 8)")
    quality: int = opt(95, "JPEG quality of the images", low=1, high=100)


@dataclass
class ViewConfig:
    """Settings of ``glimpse view``."""

    compare: str | None = opt(None, "a second run (folder or .jsonl) to show side by side with the first")
    out: str | None = opt(None, "report folder (default: RUN/report, or FILE-report beside a trajectories file)")
    serve: bool = opt(False, "serve the report over HTTP after building it")
    host: str = opt("127.0.0.1", "interface to serve on (loopback by default)")
    port: int = opt(8765, "port to serve on (0: any free port)", low=0, high=65535)
    workers: int | None = opt(None, "processes preparing images (default: the number of cores, at most 8)")


@dataclass
class ServeConfig:
    """Settings of ``glimpse serve``."""

    model: str | None = opt(None, "backend to serve: hf:FOLDER (a local Qwen-VL checkpoint) or scripted:FILE.json")
    host: str = opt("127.0.0.1", "interface to listen on (loopback by default)")
    port: int = opt(8000, "port to listen on", low=0, high=65535)
    name: str | None = opt(None, "model name reported by the server (default: the backend's name)")
    latency: float = opt(0.0, "simulated seconds per completion request", low=0)
    jitter: float = opt(0.0, "extra random latency, uniform in [0, jitter] seconds", low=0)
    fail_every: int = opt(0, "answer every N-th completion request with HTTP 503 (fault injection; 0 = never)", low=0)
    max_body_mb: int = opt(128, "largest request body accepted, in MB")
    max_images: int = opt(64, "most images in one request")
    max_n: int = opt(64, "largest n (samples per request)")
    max_new_tokens: int = opt(32768, "largest max_completion_tokens accepted")
    device: str = opt("cpu", DEVICE_HELP)
    dtype: str = opt("auto", DTYPE_HELP, choices=DTYPES)
    max_batch: int = opt(8, "hf backend: most requests generated together")


@dataclass
class UIConfig(AskConfig):
    """Settings of ``glimpse ui``: those of ``glimpse ask`` (the form's defaults; the same --config file works),
    and where and how the app is served."""

    host: str = opt("127.0.0.1", "interface to listen on (loopback by default; elsewhere it warns and refuses paths)")
    port: int = opt(8770, "port to listen on", low=0, high=65535)
    runs: str = opt("glimpse-runs", "folder where every run is saved as a trajectory record (the history)")
    allow: str | None = opt(
        None, "comma-separated folders whose files a run may read by path (default: the current folder)"
    )
    max_upload_mb: int = opt(64, "largest image upload accepted, in MB")


@dataclass
class ColdStartConfig:
    """Settings of ``glimpse coldstart``."""

    method: str = opt(
        "programmatic",
        "programmatic: a teacher that knows each probe writes the searches; fewshot: a model prompted with "
        "Glimpse's exemplars generates them, and only correct ones are kept",
        choices=("programmatic", "fewshot"),
    )
    data: str = opt("probes:hard:200", "questions: probes:LEVEL[:N[:SEED]] (programmatic needs probes), or any --data")
    out: str = opt("coldstart", "output folder: trajectories.jsonl, stats.json, and the exports")
    seed: int = opt(0, "seed of the teacher's choices (programmatic) or of sampling (fewshot)")
    export: str = opt("llamafactory,trl,verl", "formats written after generation (comma-separated; 'none' for none)")
    protocol: str = opt("tags", "tags or tools (native function calling)", choices=("tags", "tools"))
    coords: str | None = opt(None, COORDS_HELP, choices=("relative", "pixels", "thousand"))
    max_turns: int = opt(16, "most turns of one trajectory")
    min_pixels: int = opt(40_000, "smallest area an image is shown at")
    max_pixels: int = opt(2_000_000, "largest area an image is shown at")
    resize_factor: int | None = opt(None, FACTOR_HELP)
    concurrency: int = opt(8, "trajectories generated at once", low=1)
    model: str | None = opt(None, "fewshot: the generator, openai:NAME, hf:FOLDER or scripted:FILE")
    base_url: str | None = opt(None, "fewshot: the generator's endpoint(s)")
    api_key: str | None = opt(None, "fewshot: API key (else $GLIMPSE_API_KEY, $OPENAI_API_KEY)", secret=True)
    exemplars: str | None = opt(None, "fewshot: a YAML file of exemplars (default: Glimpse's own)")
    attempts: int = opt(1, "fewshot: tries per question")
    max_new_tokens: int = opt(2048, "fewshot: most tokens per reply")
    temperature: float | None = opt(1.0, "fewshot: sampling temperature")
    device: str = opt("cpu", DEVICE_HELP)
    dtype: str = opt("auto", DTYPE_HELP, choices=DTYPES)


@dataclass
class SFTConfig:
    """Settings of ``glimpse train sft``."""

    model: str | None = opt(None, "checkpoint to train: a folder (or Hub id) of Qwen2-VL, Qwen2.5-VL or Qwen3-VL")
    data: str | None = opt(None, "trajectories.jsonl, or a glimpse coldstart folder")
    out: str = opt("sft", "output folder: config, log, checkpoints, and the trained model in OUT/model")
    fresh: bool = opt(False, "delete OUT first instead of resuming from its newest checkpoint")
    image_root: str | None = opt(None, "folder relative image paths in the trajectories are resolved against")
    lora: bool = opt(False, "train LoRA adapters (peft) on the language model instead of all its weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    freeze_vision: bool = opt(
        True,
        "keep the vision tower frozen (Mini-o3 recipe; in the built-in model its region encoder, reader, region heads)",
    )
    freeze_projector: bool = opt(True, "keep the vision-language projector (merger) frozen (Mini-o3 recipe)")
    lr: float = opt(1e-5, "peak learning rate (Mini-o3: 1e-5 full fine-tuning; LoRA usually 1e-4)")
    epochs: int = opt(3, "passes over the data")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --epochs)")
    batch_size: int = opt(1, "trajectories per forward pass")
    grad_accum: int = opt(4, "forward passes per optimizer step")
    schedule: str = opt("cosine", "learning-rate decay after warm-up", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.1, "share of the steps spent warming up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    max_length: int = opt(32768, "longest conversation in tokens; longer ones are skipped, never cut")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    seed: int = opt(0, "seed of the data order and initialisation of adapters")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (CUDA when available)")
    dtype: str = opt("auto", TRAIN_DTYPE_HELP, choices=DTYPES)
    save_every: int = opt(500, "save a resumable checkpoint every N steps (0: only the final model)")
    keep_checkpoints: int = opt(2, "checkpoints kept (older ones are deleted)")
    log_every: int = opt(10, "print a progress line every N steps")


@dataclass
class RLConfig:
    """Settings of ``glimpse train rl`` (GRPO with over-turn masking; defaults follow Mini-o3 where they fit a CPU)."""

    model: str | None = opt(None, "checkpoint to start from (the cold-start SFT model): a folder or Hub id")
    data: str = opt(
        "stream:hard+medium",
        "prompts: stream:LEVEL[+LEVEL...][:SEED[:KIND]] (fresh probes made on the fly, nothing stored; seed 1 by "
        "default, never the eval's 0; KIND: one question kind) or any glimpse eval dataset spec "
        "(probes:hard:500:3, visualprobe:hard:DIR …)",
    )
    out: str = opt("rl", "output folder: config, log, checkpoints, and the trained model in OUT/model")
    fresh: bool = opt(False, "delete OUT first instead of resuming from its newest checkpoint")
    steps: int = opt(100, "RL steps (each: sample a batch of groups, then update)", low=1)
    prompts: int = opt(4, "prompts (groups) per step (Mini-o3: 256)", low=1)
    group: int = opt(8, "samples per prompt (Mini-o3: 16)", low=2)
    mini_batches: int = opt(1, "optimizer updates per step, each on a share of the groups (Mini-o3: 8)")
    mask_over_turn: bool = opt(True, "over-turn masking: capped trajectories count in group statistics, carry no loss")
    dynamic_sampling: bool = opt(True, "drop groups whose rewards are all equal and draw more prompts")
    max_draws: int = opt(4, "dynamic sampling draws at most this many times --prompts prompts per step")
    lr: float = opt(1e-6, "learning rate, constant after warm-up (Mini-o3: 1e-6 for 7B; small models want more)")
    warmup_steps: int = opt(0, "steps of linear warm-up")
    clip_low: float = opt(0.2, "ratio clip below 1 (Mini-o3: 0.2)")
    clip_high: float = opt(0.3, "ratio clip above 1 (Mini-o3: 0.3)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping")
    max_turns: int = opt(6, "turn cap while training (Mini-o3: 6)")
    max_new_tokens: int = opt(1024, "most tokens per reply")
    temperature: float = opt(1.0, "sampling temperature of rollouts", low=0)
    protocol: str = opt("tags", "tags or tools (native function calling)", choices=("tags", "tools"))
    coords: str | None = opt(None, COORDS_HELP, choices=("relative", "pixels", "thousand"))
    prompt_file: str | None = opt(None, "prompts the checkpoint was trained with (default: the checkpoint's own)")
    min_pixels: int | None = opt(None, "smallest area an image is shown at (default: the model's own, else 40,000)")
    max_pixels: int | None = opt(None, "largest area an image is shown at (default: the model's own, else 2,000,000)")
    lora: bool = opt(False, "train LoRA adapters (peft) on the language model instead of all its weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    freeze_vision: bool = opt(
        True, "keep the vision tower frozen (the built-in model: its region encoder, reader and region heads)"
    )
    freeze_projector: bool = opt(True, "keep the vision-language projector frozen")
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    max_batch: int = opt(32, "most rollout requests generated together")
    seed: int = opt(0, "seed of sampling and of the prompt order")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (CUDA when available)")
    dtype: str = opt("auto", TRAIN_DTYPE_HELP, choices=DTYPES)
    threads: int | None = opt(None, "torch CPU threads (default: torch's own)")
    save_every: int = opt(10, "save a resumable checkpoint every N steps (0: only the final model)")
    keep_checkpoints: int = opt(2, "checkpoints kept (older ones are deleted)")
    save_rollouts: bool = opt(False, "write every step's trajectories to OUT/rollouts.jsonl (for glimpse view)")


@dataclass
class ReproConfig:
    """Settings of ``glimpse repro turn-scaling`` (see ``glimpse.train.repro``)."""

    model: str | None = opt(None, "the cold-start checkpoint every arm starts from (e.g. the built-in model's folder)")
    out: str = opt("repro-turn-scaling", "output folder: one folder per arm, and the report")
    arms: str = opt(
        "sft,full,no-mask,no-coldstart,no-hard",
        "arms to run now, comma-separated (sft: the checkpoint itself, evaluated only); finished ones are reused",
    )
    steps: int = opt(40, "RL steps per arm", low=1)
    prompts: int = opt(4, "prompts per RL step", low=1)
    group: int = opt(8, "samples per prompt", low=2)
    max_draws: int = opt(2, "dynamic sampling draws at most this many times --prompts prompts per step")
    lr: float = opt(2e-5, "RL learning rate")
    train_turns: int = opt(6, "turn cap while training (Mini-o3: 6)")
    train_levels: str = opt(
        "hard+medium+easy",
        "probe levels the RL arms train on, cycled, joined with '+' (repeat one to weigh it more; hard alone makes "
        "the training cap bind most); no-hard drops hard",
    )
    max_new_tokens: int = opt(256, "most tokens per reply")
    eval_n: int = opt(100, "fresh hard probes (seed 0) every arm is evaluated on", low=1)
    caps: str = opt("4,6,8,16,32", "test-time turn caps")
    eval_temperature: float = opt(0.0, "sampling temperature of the evaluation (0: greedy)")
    eval_concurrency: int = opt(16, "evaluation questions in flight (and generated together)", low=1)
    seed: int = opt(0, "seed of sampling and prompt order")
    threads: int | None = opt(None, "torch CPU threads (default: torch's own)")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto")
    save_every: int = opt(10, "RL checkpoint every N steps (a stopped arm resumes from it)")
    fold_cap: int = opt(
        0, "also evaluate each arm at this turn cap with --keep-images (context folding beyond --caps; 0: off)"
    )
    keep_images: int = opt(4, "zoom images the --fold-cap evaluation keeps in the context (older ones become notes)")
    kind: str = opt(
        "",
        "probes of this question kind only, in training and evaluation (e.g. relative_position: among a hard "
        "probe's 8-12 look-alikes only a long search finds both named signs); empty: every kind",
    )


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """The base type of a config field and whether it may be ``None``."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _coerce(cls: type, key: str, value: Any) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    base, nullable = field_type(cls, key)
    if value is None or (isinstance(value, str) and value.lower() == "none" and nullable):
        if not nullable:
            raise ConfigError(f"{key} cannot be empty")
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            value = bool(value)
        elif base in (int, float):
            if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)  # 2.5 turns from a config file is a mistake, not 2
            value = base(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {base.__name__}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if base in (int, float) and not (math.isfinite(value) and (low is None or value >= low)):
        raise ConfigError(f"{key}={value!r} must be {'at least ' + format(low, 'g') if low is not None else 'finite'}")
    if high is not None and value > high:
        raise ConfigError(f"{key}={value!r} must be at most {high:g}")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict.

    Raises:
        ConfigError: missing, unparsable, or not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # both parsers raise their own error types
        raise ConfigError(f"config file {p} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of setting names to values")
    return data


def resolve(cls: type, file: str | Path | None = None, flags: dict[str, Any] | None = None) -> Any:
    """Build a config: field defaults, then the file's keys, then flags that were given (not ``None``).

    Raises:
        ConfigError: unknown keys or values of the wrong type or outside the allowed choices.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        data = load_config_file(file)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown settings in {file}: {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        values.update({k: _coerce(cls, k, v) for k, v in data.items()})
    for key, value in (flags or {}).items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = _coerce(cls, key, value)
    return cls(**values)


def public_dict(config: Any) -> dict[str, Any]:
    """The config as a dict, without secret fields."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(type(config)) if not f.metadata.get("secret")}


def write_resolved(config: Any, path: str | Path) -> None:
    """Write the resolved config (no secrets) as JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(public_dict(config), indent=2) + "\n", encoding="utf-8")


@dataclass
class BuiltinConfig:
    """Settings of ``glimpse train builtin``."""

    out: str = opt("builtin-run", "output folder: config, log.jsonl, result.json and the model in OUT/model")
    size: str = opt(
        "base", "architecture size: base (about 4 M parameters) or tiny (for tests)", choices=("base", "tiny")
    )
    minutes: float = opt(60.0, "training time budget; the learning rate follows elapsed time", low=0.01)
    batch: int = opt(8, "trajectories per step", low=1)
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    warmup: int = opt(100, "warm-up steps")
    workers: int = opt(1, "processes generating probes and trajectories while the model trains")
    threads: int = opt(2, "torch threads of the training process")
    seed: int = opt(0, "seed of the initial weights and of the probe stream")
    save_every_min: float = opt(5.0, "minutes between saves of OUT/model")
    device: str = opt(
        "auto", "where the model trains: cpu, cuda, or auto (cuda when there is one)", choices=("auto", "cpu", "cuda")
    )
    only: str = opt(
        "curriculum",
        "train on one kind of example alone instead of the curriculum (a skill checked alone): card "
        "(reading a legible sign), easy (finding a salient sign, then reading it), medium or hard",
        choices=("curriculum", "card", "easy", "medium", "hard"),
    )
    replay: int = opt(
        1,
        "most gradient steps per fresh batch: the first on the fresh batch (its held-out accuracy is logged), the "
        "rest on batches drawn from the last 2,048 examples, each only while fewer than a batch of fresh examples "
        "wait: the trainer's idle time when the example makers cannot keep up (first moves on a CPU, a GPU)",
    )
    init: str = opt("", "start from this built-in checkpoint (a folder) instead of a fresh model")
    read_minutes: float = opt(
        0.0,
        "first train the reader alone for this many of the minutes, on reading cards' panels (no search, no "
        "decoder: hundreds a minute), so reading is learned before answers need it",
    )
    first_minutes: float = opt(
        0.0,
        "after the reader (and the question head), train on first moves alone for this many of the minutes: a "
        "probe's first view and the teacher's first zoom, the search not run (every example teaches where to look; "
        "in whole searches a share --check of first looks is untrained), then whole searches for the rest",
    )
    read_batch: int = opt(32, "panels per step while the reader trains alone")
    read_weight: float = opt(
        1.0, "weight of the reader's own loss (what the teacher knows each zoomed panel shows) beside the replies'"
    )
    reader_lr: float = opt(3e-4, "peak learning rate of the reader (the region-token study: 2e-3 learned nothing)")
    new_lr: float = opt(
        5e-3,
        "peak learning rate of the weights the --init checkpoint does not have (parts added to an older model: "
        "they start at zero or random and must catch up with trained ones)",
    )
    ground_weight: float = opt(
        1.0, "weight of the grounding loss (the question's words matched to the teacher's first zoom's region)"
    )
    region_weight: float = opt(
        1.0, "weight of the region heads' loss (each first-view region's sign's border colour and corner mark)"
    )
    ask_steps: int = opt(
        200,
        "first train the question head alone (what sign the question asks for: its border colour and corner mark) "
        "for this many steps on questions without their images (thousands a minute); 0: only beside the searches",
    )
    ask_batch: int = opt(32, "questions per step while the question head trains alone")
    start_index: int | None = opt(
        None,
        "first probe index of the stream (default: after the probes the --init checkpoint was trained on, from "
        "its glimpse_stream.json; 1,000,000 for a fresh model)",
    )
    check: float = opt(
        0.0,
        "share of probe searches that first look at 1-3 signs that are not the target (those looks untrained, "
        "what follows them trained): teaches checking a sign and looking again",
    )
    mix: str = opt(
        "",
        "weights of card, easy, medium and hard examples for the whole run, e.g. 0.8,0.07,0.07,0.06 (reading "
        "cards are about 15 times cheaper to make than probes); empty: the curriculum",
    )
    kind: str = opt(
        "",
        "probes of this question kind only (read_code, marker_color, marker_shape, which_marked, count, "
        "relative_position, find_code, find_marker): a skill trained alone; empty: every kind, as probes draw them "
        "(find_code and find_marker aside)",
    )
    kind_share: float = opt(
        1.0, "the share of probes that are of --kind (drawn per probe); the rest are of every kind, as drawn"
    )
    scan_looks: int = opt(
        0,
        "most looks the teacher's scan of look-alikes takes before answering a left-or-right question (0: until it "
        "has seen both named signs, about 9 looks among a hard probe's 8-12; attempt 12's B10b used 4); a "
        "find_code or find_marker scan always runs to its sign",
    )
    train_only: str = opt(
        "",
        "train only these weights, the rest frozen, so what the model already does well cannot drift: 'new' (the "
        "weights the --init checkpoint does not have: a part just added, e.g. the relation) or comma-separated "
        "name prefixes (e.g. reader. for the reader alone); empty: every weight",
    )
