"""``glimpse repro turn-scaling``: Mini-o3's central claim, reproduced on probes with the built-in model.

Train with a 6-turn cap, mask the loss of trajectories the cap cut off, and accuracy should keep rising when the
model may take up to 32 turns at test time. The command trains one RL run per *arm*, each from the same
cold-start checkpoint unless the arm says otherwise, and evaluates every arm (and the starting checkpoint) on the
same fresh hard probes at turn caps 4, 6, 8, 16 and 32:

* ``full``: over-turn masking, hard + medium + easy probes (Mini-o3's recipe);
* ``no-mask``: the same without over-turn masking (capped trajectories get reward 0 and a negative advantage);
* ``no-coldstart``: RL straight from a freshly initialised model of the same architecture (no cold-start SFT);
* ``no-hard``: masking, but only easy and medium probes;
* ``sft``: no RL at all; the starting checkpoint (a reference line, evaluated, not trained).

Everything lands in OUT: ``ARM/train`` (a ``glimpse train rl`` folder) and ``ARM/eval`` (a ``glimpse eval``
folder), both resumable, so arms can run one at a time (``--arms full``) and a rerun continues; then
``turn_scaling.md`` / ``.json`` / ``.png``: accuracy per arm and cap, mean turns, over-turn rate, and the turn
counts of correct answers. The evaluation derives the smaller caps from one run at the largest (the prompt never
mentions the cap, so the first turns are drawn the same way whatever it is).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glimpse.config import EvalConfig, ReproConfig, RLConfig, write_resolved
from glimpse.errors import ConfigError

ARMS: dict[str, dict[str, Any]] = {
    "sft": {},  # evaluated only
    "full": {"mask_over_turn": True, "data": "stream:hard+medium+easy"},
    "no-mask": {"mask_over_turn": False, "data": "stream:hard+medium+easy"},
    "no-coldstart": {"mask_over_turn": True, "data": "stream:hard+medium+easy", "fresh_init": True},
    "no-hard": {"mask_over_turn": True, "data": "stream:medium+easy"},
}


def parse_arms(spec: str) -> list[str]:
    arms = [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if not arms or unknown:
        raise ConfigError(f"unknown arm {', '.join(unknown) or spec!r}; choose from {', '.join(ARMS)}")
    return arms


def fresh_copy(source: str, target: Path, seed: int) -> Path:
    """A freshly initialised model of ``source``'s architecture, with its processor and prompts (no training)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from glimpse.hf.processor import PROMPT_FILE, load_processor

    if (target / "config.json").exists():
        return target
    processor = load_processor(source)  # first: it registers the built-in model's classes with the Auto ones
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(source))
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    if (Path(source) / PROMPT_FILE).exists():
        shutil.copyfile(Path(source) / PROMPT_FILE, target / PROMPT_FILE)
    return target


def rl_config(cfg: ReproConfig, arm: str, out: Path) -> RLConfig:
    """The ``glimpse train rl`` settings of one arm."""
    spec = ARMS[arm]
    model = str(fresh_copy(cfg.model, out / "init", cfg.seed)) if spec.get("fresh_init") else cfg.model  # type: ignore[arg-type]
    return RLConfig(
        model=model,
        data=spec["data"],
        out=str(out / "train"),
        steps=cfg.steps,
        prompts=cfg.prompts,
        group=cfg.group,
        max_draws=cfg.max_draws,
        mask_over_turn=spec["mask_over_turn"],
        lr=cfg.lr,
        max_turns=cfg.train_turns,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        threads=cfg.threads,
        device=cfg.device,
        save_every=cfg.save_every,
    )


def eval_config(cfg: ReproConfig, model: str, out: Path) -> EvalConfig:
    return EvalConfig(
        data=f"probes:hard:{cfg.eval_n}",
        model=f"hf:{model}",
        out=str(out / "eval"),
        max_turns=cfg.caps,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.eval_temperature,
        device=cfg.device,
        concurrency=cfg.eval_concurrency,
        max_batch=cfg.eval_concurrency,
        seed=cfg.seed,
    )


def run_repro(cfg: ReproConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate the chosen arms (resuming what exists), then write the report from every finished arm."""
    from glimpse.eval.harness import run_eval
    from glimpse.train.rl import train_rl

    if not cfg.model:
        raise ConfigError("choose the cold-start checkpoint with --model (e.g. the built-in model's folder)")
    arms = parse_arms(cfg.arms)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, root / f"config-{'-'.join(arms)}.json")
    for arm in arms:
        out = root / arm
        if arm == "sft":
            model = cfg.model
        else:
            rl = rl_config(cfg, arm, out)
            say(
                f"[{arm}] RL: {rl.steps} steps × {rl.prompts} prompts × {rl.group} samples, cap {rl.max_turns}, "
                f"{'masking' if rl.mask_over_turn else 'no masking'}, {rl.data}, from {rl.model}"
            )
            model = str(train_rl(rl, on_step=lambda s, a=arm: _step_line(a, s, say)))
        say(f"[{arm}] evaluating {model} on {cfg.eval_n} fresh hard probes at caps {cfg.caps}")
        asyncio.run(run_eval(eval_config(cfg, model, out)))
    report = collect(root, parse_caps(cfg.caps))
    write_report(root, report)
    say(f"report → {root / 'turn_scaling.md'}")
    return report


def _step_line(arm: str, s: Any, say: Callable[[str], None]) -> None:
    say(
        f"[{arm}] step {s.step}  reward {s.reward:.3f}  turns {s.turns:.2f}  over-turn {s.over_turn:.0%}  "
        f"groups {s.groups_kept}/{s.groups_drawn}  {s.seconds:.0f}s"
    )


def parse_caps(text: str) -> list[int]:
    from glimpse.eval.harness import parse_caps as caps

    return caps(text)


def collect(root: Path, caps: list[int]) -> dict[str, Any]:
    """Per arm with a finished evaluation: accuracy, mean turns, over-turn rate per cap, and the turn counts of
    correct answers at the largest cap."""
    from glimpse.eval.harness import RESULTS, ResultStore, trajectories_for_cap

    arms: dict[str, Any] = {}
    for arm in ARMS:
        summary = root / arm / "eval" / "summary.json"
        if not summary.exists():
            continue
        data = json.loads(summary.read_text(encoding="utf-8"))
        per_cap = {
            int(c): {
                "accuracy": s["accuracy"]["avg"],
                "turns_mean": s["turns_mean"],
                "over_turn_rate": s["over_turn_rate"],
                "chance": s["chance"],
                "questions": s["questions"],
            }
            for c, s in data["caps"].items()
        }
        top = max(per_cap)
        trajectories = ResultStore(root / arm / "eval" / RESULTS).load()
        run_cap = max((t.settings.max_turns for t in trajectories), default=top)
        correct = Counter(
            len(t.turns)
            for t in trajectories_for_cap(trajectories, top, data.get("sweep", "derive"), run_cap)
            if t.score and t.score.correct
        )
        log = root / arm / "train" / "log.jsonl"
        steps = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
        arms[arm] = {
            "caps": per_cap,
            "correct_turns": dict(sorted(correct.items())),
            "train": _train_summary(steps),
        }
    return {"caps": caps, "arms": arms}


def _train_summary(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not steps:
        return None
    tail = steps[-max(1, len(steps) // 5) :]  # the last fifth of the run

    def mean(key: str, rows: list[dict[str, Any]]) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "steps": len(steps),
        "trajectories": sum(r["trajectories"] for r in steps),
        "minutes": round(sum(r["seconds"] for r in steps) / 60, 1),
        "reward_first": round(mean("reward", steps[: len(tail)]), 3),
        "reward_last": round(mean("reward", tail), 3),
        "turns_last": round(mean("turns", tail), 2),
        "over_turn_last": round(mean("over_turn", tail), 3),
    }


def write_report(root: Path, report: dict[str, Any]) -> None:
    """turn_scaling.json, .md (table, turns of correct answers, training summary) and .png (one line per arm)."""
    from glimpse.eval.report import pct, plot_lines

    (root / "turn_scaling.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    arms, caps = report["arms"], report["caps"]
    lines = ["# Turn scaling on fresh hard probes", ""]
    if not arms:
        lines.append("No arm has finished its evaluation yet.")
    else:
        first = next(iter(arms.values()))["caps"][caps[0]]
        top = caps[-1]
        lines += [
            f"Accuracy (%) by test-time turn cap; {first['questions']} hard probes (seed 0, never trained on); "
            f"chance {100 * first['chance']:.1f} %.",
            "",
            "| arm | " + " | ".join(f"cap {c}" for c in caps) + f" | mean turns (cap {top}) | over-turn (cap {top}) |",
            "|---|" + "---|" * (len(caps) + 2),
        ]
        for arm, a in arms.items():
            cells = " | ".join(pct(a["caps"][c]["accuracy"]) for c in caps)  # "–" where no unit ran
            last = a["caps"][top]
            turns = "–" if last["turns_mean"] is None else f"{last['turns_mean']:.2f}"
            lines.append(f"| {arm} | {cells} | {turns} | {pct(last['over_turn_rate'])} % |")
        lines += ["", f"Turns taken by correct answers at cap {top} (turns: count):", ""]
        for arm, a in arms.items():
            hist = ", ".join(f"{k}: {v}" for k, v in a["correct_turns"].items()) or "none correct"
            lines.append(f"- {arm}: {hist}")
        trained = {arm: a["train"] for arm, a in arms.items() if a["train"]}
        if trained:
            lines += [
                "",
                "| arm | steps | trajectories | minutes | reward (first → last) | turns (last) | over-turn (last) |",
                "|---|---|---|---|---|---|---|",
            ]
            for arm, t in trained.items():
                lines.append(
                    f"| {arm} | {t['steps']} | {t['trajectories']} | {t['minutes']} | {t['reward_first']} → "
                    f"{t['reward_last']} | {t['turns_last']} | {100 * t['over_turn_last']:.0f} % |"
                )
        plot_lines(
            root / "turn_scaling.png",
            {arm: [(c, a["caps"][c]["accuracy"]) for c in caps] for arm, a in arms.items()},
            title="accuracy vs test-time turn cap (trained at 6), fresh hard probes",
            ylabel="accuracy (%)",
        )
        lines += ["", "![accuracy vs turn cap](turn_scaling.png)"]
    (root / "turn_scaling.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
