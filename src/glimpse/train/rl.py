"""``glimpse train rl``: GRPO with over-turn masking on one machine, a short loop on transformers.

Why not TRL's ``GRPOTrainer``: its multi-turn path (``tools`` / ``environment_factory``) parses JSON tool calls
with a response template and feeds tool results back as ``tool`` messages, so Mini-o3's ``<grounding>`` tags,
observations as user turns, and the built-in model's location tokens do not fit it; its ``rollout_func`` path
drops images made during the rollout from the training forward pass. Over-turn masking itself would need a
subclass. Here the rollouts are the agent loop ``glimpse ask`` runs, and the loss is ``glimpse.train.grpo``'s,
the same core the verl plugin uses.

One step:

1. **Rollouts.** Draw ``prompts`` questions; run ``group`` trajectories of each through the real ``AgentLoop``
   (the ``hf`` backend on the weights being trained, temperature 1, the training turn cap). The backend records
   each trajectory's token view: the exact ids the model sampled (mask 1) between the injected prompt and
   observation tokens (mask 0).
2. **Scoring.** The reward is the evaluation's rule scorer (1 correct, 0 otherwise). Group advantages; over-turn
   trajectories count in their group's statistics and carry no loss (unless ``--no-mask-over-turn``). With
   dynamic sampling a group whose rewards are all equal is dropped and another prompt drawn, up to
   ``max_draws × prompts`` draws.
3. **Update.** Each trained trajectory's ids and images (re-rendered from the record, exactly as shown) go
   through the model; the token-level clipped surrogate over sampled tokens; ``mini_batches`` optimizer updates
   per step (with more than one, the sampling policy's log-probabilities are computed first and the ratio clips).

Saved in OUT: ``config.json`` (the resolved settings), ``log.jsonl`` (per step: reward, accuracy, mean turns,
over-turn rate, tool-error rate, entropy, groups kept, loss, clip fraction, seconds), resumable checkpoints
``checkpoints/step-N``, ``model`` (a complete checkpoint, loadable as ``hf:OUT/model``), and with
``--save-rollouts`` every trajectory in ``rollouts.jsonl`` (images of streamed probes kept in ``OUT/probes``).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.agent import AgentLoop, LoopOptions
from glimpse.config import RLConfig, public_dict
from glimpse.errors import ConfigError, GlimpseError
from glimpse.eval.datasets import load_dataset
from glimpse.hf.processor import load_processor
from glimpse.images import ImageCache, release_freed_memory
from glimpse.models.hf import HFBackend, resolve_checkpoint
from glimpse.paths import write_atomically
from glimpse.probes.stream import probe_sample
from glimpse.probes.synth import LEVELS, check_kind
from glimpse.train.common import (
    IGNORE,
    Example,
    check_image_tokens,
    collate,
    grid_tokens,
    hf_chat,
    prepare_model,
    render_images,
    resolve_device,
    resolve_dtype,
    resume,
    save_checkpoint,
    save_final,
    trainable,
)
from glimpse.train.grpo import Rollout, informative, policy_loss, score_group, token_entropy
from glimpse.trajectory import Sample, Trajectory

# Settings a resumed run must share with the run that wrote the checkpoint.
_RESUME_KEYS = (
    "model",
    "data",
    "prompts",
    "group",
    "mini_batches",
    "mask_over_turn",
    "dynamic_sampling",
    "max_draws",
    "lr",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "clip_low",
    "clip_high",
    "max_turns",
    "max_new_tokens",
    "temperature",
    "protocol",
    "coords",
    "prompt_file",
    "min_pixels",
    "max_pixels",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "seed",
)
STREAM_SEED = 1  # streamed probes default to seed 1; the evaluation's probes use seed 0


# ----------------------------------------------------------------------------------------------------- prompts
class Prompts:
    """Question ``i`` of the run, the same on every run with the same data and seed (so a resume continues).

    ``stream:LEVEL[+LEVEL...][:SEED[:KIND]]`` makes fresh probes (cycling through the levels; of one question kind
    of ``synth.KINDS`` when ``KIND`` is given) into a scratch folder a few ahead of need, and deletes each after its
    step; any other spec is a dataset (``load_dataset``), visited in a seeded order reshuffled each pass.
    """

    def __init__(self, spec: str, seed: int, folder: Path, keep_images: bool):
        self.spec, self.folder, self.keep_images = spec, folder, keep_images
        self.levels: tuple[str, ...] = ()
        self.samples: list[Sample] = []
        if spec.startswith("stream:"):
            levels, _, rest = spec[len("stream:") :].partition(":")
            stream_seed, _, kind = rest.partition(":")
            self.levels = tuple(x for x in levels.split("+") if x)
            unknown = [x for x in self.levels if x not in LEVELS]
            if not self.levels or unknown:
                raise ConfigError(f"stream spec {spec!r}: levels are {', '.join(LEVELS)}, joined with '+'")
            self.kind = check_kind(kind, f"stream spec {spec!r}", pairs=False) if kind else None
            try:
                self.stream_seed = int(stream_seed) if stream_seed else STREAM_SEED
            except ValueError:
                raise ConfigError(f"stream spec {spec!r}: the seed must be an integer") from None
            folder.mkdir(parents=True, exist_ok=True)
            self._pool = ThreadPoolExecutor(1)
            self._pending: dict[int, Future[Sample]] = {}
        else:
            self.samples = load_dataset(spec).samples
            if not self.samples:
                raise ConfigError(f"{spec} holds no samples")
        self.seed = seed

    def get(self, i: int) -> Sample:
        if not self.levels:
            n = len(self.samples)
            order = list(range(n))
            random.Random(f"{self.seed}/{i // n}").shuffle(order)
            return self.samples[order[i % n]]
        for j in range(i, i + 4):  # make the next few while the model works
            if j not in self._pending:
                self._pending[j] = self._pool.submit(self._make, j)
        return self._pending.pop(i).result()

    def _make(self, i: int) -> Sample:

        level = self.levels[i % len(self.levels)]
        return probe_sample(level, i, self.stream_seed, self.folder, kind=self.kind)

    def done_with(self, samples: list[Sample], cache: ImageCache) -> None:
        """Forget streamed probes' decoded originals once their step is over (no later step asks for them: they
        would fill ``cache`` to its budget with dead images), and delete their files unless rollouts are kept."""
        if not self.levels:
            return
        for s in samples:
            for image in s.images:
                cache.discard(image)
                if not self.keep_images:
                    Path(image).unlink(missing_ok=True)

    def close(self) -> None:
        if self.levels:
            for f in self._pending.values():
                f.cancel()
            self._pool.shutdown(wait=True)


# -------------------------------------------------------------------------------------------------- tensors
def trajectory_inputs(rollout: Rollout, processor: Any, cache: ImageCache | None = None) -> Example:
    """The token view of a trajectory (labels on its sampled tokens) with the images it showed, processed as the
    backend processed them."""

    traj = rollout.trajectory
    view = traj.token_view
    if view is None:
        raise GlimpseError(f"{traj.id} has no token view; rollouts must be run with return_token_ids")
    _, order = hf_chat(traj)
    images = render_images(traj, order, cache=cache)
    labels = [t if m else IGNORE for t, m in zip(view.ids, view.mask, strict=True)]
    out = Example(traj.id, list(view.ids), labels)
    if images:
        enc = processor.image_processor(images=images, return_tensors="pt")
        out.pixel_values, out.image_grid_thw = enc["pixel_values"], enc["image_grid_thw"]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    merge = getattr(processor.image_processor, "merge_size", None) or 1  # the built-in model's grids are tokens
    check_image_tokens(out.input_ids, grid_tokens(out.image_grid_thw, merge), image_token, f"trajectory {traj.id}")
    return out


def _batch(
    items: list[Example], advantages: list[float], pad: int, image_token: int, device: str, dtype: Any
) -> dict[str, Any]:
    """SFT's right-padded batch on the device, with one advantage per trajectory."""
    import torch

    inputs = {k: v.to(device) for k, v in collate(items, pad, image_token).items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    labels = inputs.pop("labels")
    return {"inputs": inputs, "labels": labels, "advantages": torch.tensor(advantages, device=device)}


def sampled_logprobs(model: Any, batch: dict[str, Any], temperature: float = 1.0) -> tuple[Any, Any, Any]:
    """Log-probabilities of each next token, the loss mask (sampled tokens), and the logits, shifted by one.

    The logits are divided by the rollouts' sampling ``temperature`` (as verl does), so the ratio and the gradient
    are those of the policy that sampled; 0 (greedy) counts as 1."""
    import torch

    logits = model(**batch["inputs"]).logits[:, :-1].float()
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp, mask, logits


# ------------------------------------------------------------------------------------------------------ step
@dataclass
class StepStats:
    """What one RL step did (one line of ``log.jsonl``)."""

    step: int
    reward: float = 0.0
    accuracy: float = 0.0
    turns: float = 0.0
    over_turn: float = 0.0
    tool_errors: float = 0.0
    entropy: float = 0.0
    loss: float = 0.0
    grad_norm: float = 0.0
    clip_frac: float = 0.0
    trajectories: int = 0
    groups_drawn: int = 0
    groups_kept: int = 0
    trained: int = 0
    trained_tokens: int = 0
    untrainable: int = 0
    seconds: float = 0.0
    rollout_s: float = 0.0
    lr: float = 0.0
    stop_reasons: dict[str, int] = field(default_factory=dict)


def _describe(group: list[Trajectory], stats: StepStats) -> None:
    """Add a group's trajectories to the step's behaviour statistics (sums; averaged at the end)."""
    for t in group:
        stats.trajectories += 1
        stats.reward += t.score.value if t.score else 0.0
        stats.accuracy += 1.0 if t.score and t.score.correct else 0.0
        stats.turns += len(t.turns)
        stats.over_turn += float(t.over_turn)
        stats.tool_errors += t.metrics["tool_errors"] / max(1, len(t.turns))
        reason = t.stop_reason or "none"
        stats.stop_reasons[reason] = stats.stop_reasons.get(reason, 0) + 1


class Trainer:
    """The state of one RL run; ``run`` trains to ``cfg.steps``."""

    def __init__(self, cfg: RLConfig, *, on_step: Callable[[StepStats], None] | None = None):
        import torch

        _check(cfg)
        self.cfg, self.on_step = cfg, on_step
        self.out = Path(cfg.out)
        if cfg.fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device, lora=cfg.lora)
        self.dtype = getattr(torch, dtype)
        self.source = resolve_checkpoint(cfg.model)
        self.backend = HFBackend(self.source, device=self.device, dtype=dtype, max_batch=cfg.max_batch)
        self.model = prepare_model(self.backend.model, cfg)
        self.backend.model = self.model  # rollouts sample from the weights being trained
        self.params = trainable(self.model)
        if not self.params:
            raise ConfigError("nothing to train: every parameter is frozen")
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers import get_constant_schedule_with_warmup

        self.scheduler = get_constant_schedule_with_warmup(self.optimizer, cfg.warmup_steps)
        options = LoopOptions(
            protocol=cfg.protocol,
            coords=cfg.coords,
            prompt_file=cfg.prompt_file,
            max_turns=cfg.max_turns,
            max_new_tokens=cfg.max_new_tokens,
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
            temperature=cfg.temperature,
            top_p=1.0,
            return_token_ids=True,
        )
        # one cache of originals for the rollouts and the update, which re-renders the views from the same pixels
        self.cache = ImageCache()
        self.loop = AgentLoop(self.backend, options, image_cache=self.cache)
        settings = public_dict(cfg)
        self.step, extra = (
            (0, {})
            if cfg.fresh
            else resume(self.out, settings, self.model, self.optimizer, self.scheduler, keys=_RESUME_KEYS)
        )
        self.draws = int(extra.get("draws", 0))
        (self.out / "config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        self.scratch = self.out / "probes" if cfg.save_rollouts else Path(tempfile.mkdtemp(prefix="glimpse-rl-"))
        self.prompts = Prompts(cfg.data, cfg.seed, self.scratch, keep_images=cfg.save_rollouts)
        tok = self.backend.processor.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.image_token = self.model.config.image_token_id

    # ------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train until ``cfg.steps``; save ``OUT/model``; return its path."""

        cfg = self.cfg
        self._cut_back()
        log = (self.out / "log.jsonl").open("a", encoding="utf-8")
        rollouts = (self.out / "rollouts.jsonl").open("a", encoding="utf-8") if cfg.save_rollouts else None
        try:
            while self.step < cfg.steps:
                self.step += 1
                stats, groups = self.one_step()
                line = dict(stats.__dict__)
                if rollouts is not None:
                    for group in groups:
                        for r in group:
                            rollouts.write(r.trajectory.model_dump_json() + "\n")
                    rollouts.flush()
                    line["rollouts_end"] = rollouts.tell()  # where a resume from this step cuts the file back
                log.write(json.dumps(line) + "\n")
                log.flush()
                if self.on_step is not None:
                    self.on_step(stats)
                # The last step is saved too, so a finished run can be extended with more --steps.
                if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                    save_checkpoint(
                        self.out,
                        self.step,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        cfg.keep_checkpoints,
                        extra={"draws": self.draws},
                    )
        finally:
            log.close()
            if rollouts is not None:
                rollouts.close()
            self.prompts.close()
            if not cfg.save_rollouts:
                shutil.rmtree(self.scratch, ignore_errors=True)
        return self.save()

    def _cut_back(self) -> None:
        """Drop what the steps after the checkpoint resumed from wrote: a run stopped between two checkpoints
        repeats those steps, and their first lines would be counted twice (a line cut short by the stop too)."""
        log, rollouts = self.out / "log.jsonl", self.out / "rollouts.jsonl"
        kept, end = [], 0 if self.step == 0 else None
        if log.exists():
            before = log.read_text(encoding="utf-8")
            for text in before.split("\n"):
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.step:
                    kept.append(text)
                    end = row.get("rollouts_end", end)
            after = "".join(f"{text}\n" for text in kept)
            if after != before:  # atomically: a crash now must not lose the log
                write_atomically(log, after)
        if rollouts.exists() and isinstance(end, int):
            with rollouts.open("r+b") as f:
                f.truncate(end)

    def save(self) -> Path:

        self.model.eval()
        # The processor as the checkpoint shipped it (the backend's copy has its pixel limits widened).
        save_final(self.out, self.model, load_processor(self.source), self.cfg, source=self.source)
        return self.out / "model"

    # ------------------------------------------------------------------------------------------------
    def one_step(self) -> tuple[StepStats, list[list[Rollout]]]:
        """Rollouts (with dynamic sampling), then the update."""
        cfg = self.cfg
        stats = StepStats(self.step, lr=self.scheduler.get_last_lr()[0])
        t0 = time.perf_counter()
        self.model.eval()
        kept: list[list[Rollout]] = []
        used: list[Sample] = []
        drawn = 0
        while len(kept) < cfg.prompts and drawn < cfg.prompts * cfg.max_draws:
            want = cfg.prompts - len(kept) if cfg.dynamic_sampling else cfg.prompts
            samples = [self.prompts.get(self.draws + j) for j in range(want)]
            self.draws += want
            drawn += want
            groups = asyncio.run(self._rollouts(samples))
            used += samples
            for group in groups:
                scored = score_group(group, mask_over_turn=cfg.mask_over_turn)
                _describe(group, stats)
                if not cfg.dynamic_sampling or informative([r.reward for r in scored]):
                    kept.append(scored)
            if not cfg.dynamic_sampling:
                break
        stats.rollout_s = time.perf_counter() - t0
        stats.groups_drawn, stats.groups_kept = drawn, len(kept)
        n = max(1, stats.trajectories)
        for name in ("reward", "accuracy", "turns", "over_turn", "tool_errors"):
            setattr(stats, name, getattr(stats, name) / n)
        try:
            self.update(kept, stats)
        finally:
            self.prompts.done_with(used, self.cache)  # the update re-renders views from the originals: after it
            release_freed_memory()  # the step's originals, rollouts and tensors: gone, without holes left resident
        stats.seconds = time.perf_counter() - t0
        return stats, kept

    async def _rollouts(self, samples: list[Sample]) -> list[list[Trajectory]]:
        groups = await asyncio.gather(*(self.loop.run(s, samples=self.cfg.group) for s in samples))
        for group in groups:
            for t in group:
                if t.stop_reason == "error":
                    raise GlimpseError(f"a rollout failed ({t.id}): {t.error}")
        return list(groups)

    def update(self, groups: list[list[Rollout]], stats: StepStats) -> None:
        """``mini_batches`` optimizer updates over the trained trajectories of the kept groups."""
        import torch

        cfg = self.cfg
        rollouts = [r for g in groups for r in g]
        for r in rollouts:  # a sampled image placeholder has no image: the model's slip, not trainable as it is
            view = r.trajectory.token_view
            sampled = zip(view.ids, view.mask, strict=True) if view else ()
            if r.trained and any(m and t == self.image_token for t, m in sampled):
                r.trained = False
                stats.untrainable += 1
        trained = [r for r in rollouts if r.trained]
        stats.untrainable += sum(
            1 for r in rollouts if not (r.trajectory.token_view and r.trajectory.token_view.aligned)
        )
        stats.trained = len(trained)
        if not trained:
            return  # nothing to learn from this step (the warm-up counts updates, so it does not advance)
        self.model.train()
        items = [(trajectory_inputs(r, self.backend.processor, self.cache), r.advantage) for r in trained]
        shares = [items[i :: cfg.mini_batches] for i in range(cfg.mini_batches)]
        batches = [
            _batch([e for e, _ in s], [a for _, a in s], self.pad, self.image_token, self.device, self.dtype)
            for s in shares
            if s
        ]
        old: list[Any] = []
        if len(batches) > 1:  # the policy changes between updates: keep the sampling policy's log-probabilities
            with torch.no_grad():
                old = [sampled_logprobs(self.model, b, cfg.temperature)[0] for b in batches]
        losses, clips, entropies, norms, tokens = [], [], [], [], 0
        for k, batch in enumerate(batches):
            logp, mask, logits = sampled_logprobs(self.model, batch, cfg.temperature)
            old_logp = old[k] if old else logp.detach()
            loss, info = policy_loss(
                logp, old_logp, batch["advantages"], mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)))
            self.optimizer.step()
            losses.append(float(loss.detach()))
            clips.append(info["clip_frac"])
            entropies.append(token_entropy(logits.detach(), mask))
            tokens += int(info["tokens"])
        self.scheduler.step()
        stats.loss = sum(losses) / len(losses)
        stats.clip_frac = sum(clips) / len(clips)
        stats.entropy = sum(entropies) / len(entropies)
        stats.grad_norm = max(norms)
        stats.trained_tokens = tokens


def train_rl(cfg: RLConfig, *, on_step: Callable[[StepStats], None] | None = None) -> Path:
    """Run ``glimpse train rl``; the trained model's folder."""
    return Trainer(cfg, on_step=on_step).run()


def _check(cfg: RLConfig) -> None:
    if not cfg.model:
        raise ConfigError("choose the checkpoint to start from with --model (the cold-start SFT model's folder)")
    for name in ("steps", "prompts", "group", "mini_batches", "max_draws", "max_turns", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.group < 2:
        raise ConfigError("group must be at least 2: advantages compare the samples of one prompt")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if not (0 <= cfg.clip_low < 1 and cfg.clip_high >= 0):
        raise ConfigError(f"clip_low must be in [0, 1) and clip_high ≥ 0, got {cfg.clip_low} / {cfg.clip_high}")
