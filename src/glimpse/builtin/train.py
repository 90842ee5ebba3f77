"""Training the built-in model from scratch on probes streamed from the generator (``glimpse train builtin``).

Worker processes make examples while the model trains, and nothing is stored: a probe (``glimpse.probes.stream``)
is drawn only where its trajectory looks; the teacher (``glimpse.builtin.teacher``) writes the search a student
that sees only region tokens can make; the real agent loop runs that script (real crops, the model's own pixel
limits and prompts); the trajectory is tokenised exactly as SFT does (labels on the model's replies only). A
curriculum mixes cheap reading cards (one legible sign, no search) with easy probes first, then medium and hard.
Stages, each optional but the last: the reader alone on cards' panels (``--read-minutes``), the question head alone
on questions without images (``--ask-steps``), first moves alone (``--first-minutes``: a probe's first view and the
teacher's first zoom, the loop stopped before the zoom runs), then whole searches.

Because each example is fresh, the model's accuracy on a batch *before* it trains on it is a held-out
measurement. The log records it per skill (``skills``): the first zoom (all of its pointer tokens right: the
region chosen), later zooms, the answer as a whole (all its tokens right) per question kind and level, and the
format tokens; ``bench/builtin_skills.py`` turns a log into learning curves.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing as mp
import queue
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from glimpse.builtin.processing import READ_ROWS
from glimpse.builtin.teacher import grid_turns  # noqa: F401 (re-exported: RL's tests and cold start use it)
from glimpse.config import BuiltinConfig, write_resolved
from glimpse.errors import ConfigError
from glimpse.images import ImageCache, fit
from glimpse.train.common import IGNORE

# Mixture per curriculum stage: (fraction of the run at which it starts, weights of card / easy / medium / hard).
# Cards (one legible sign, cheap to make) teach reading; easy probes teach finding the sign the question names;
# medium and hard teach finding the starred sign among look-alikes.
LEVELS = ("card", "easy", "medium", "hard")
REPLAY_MEMORY = 2048  # examples kept for replay steps (--replay), and at most this many bytes of their pixel rows
# (a whole search's three images are about 6 MB of rows: 2,048 of them held 12 GB of shared memory in run S3)
REPLAY_BYTES = 1 << 30
STREAM_FILE = "glimpse_stream.json"  # in a checkpoint: the seed and next probe index per level it was trained to
NOT_COPIED = ("glimpse_ship.json", "README.md")  # an --init folder's files that describe it, not the new model
FIRST_INDEX = 1_000_000  # a fresh model's stream starts here: evaluation sets take indices from 0
CURRICULUM = (
    (0.0, (0.4, 0.3, 0.2, 0.1)),
    (0.3, (0.2, 0.3, 0.3, 0.2)),
)


class ExampleMaker:
    """Makes tokenised training examples: a card or a probe, the teacher's script run through the real agent loop,
    encoded as SFT encodes it.

    Args:
        model_dir: the model being trained (its processor, pixel limits and prompt file).
        seed: the probes' seed.
        folder: scratch folder for the files a loop reads (cards).
        check: share of probe searches that first look at signs that are not the target
            (``teacher.teacher_turns``); those replies are left untrained.
        kind: probes of this question kind only (``synth.KINDS``, ``synth.SEARCH_KINDS``); empty: the kind each
            index draws.
        kind_share: the share of probes that are of ``kind`` (drawn per probe); the rest are as the index draws.
        scan_looks: most looks of a teacher's scan (``teacher.scan_turns``); 0: until both named signs are seen.
    """

    def __init__(
        self,
        model_dir: str | Path,
        seed: int,
        folder: Path,
        check: float = 0.0,
        kind: str = "",
        kind_share: float = 1.0,
        scan_looks: int = 0,
    ):
        from glimpse.hf.processor import load_processor
        from glimpse.images import PixelLimits
        from glimpse.probes.stream import PROBE_JPEG_QUALITY, SceneCache
        from glimpse.train.common import ASSISTANT_HEADER, END

        self.model_dir, self.seed, self.folder, self.check = Path(model_dir), seed, folder, check
        self.kind, self.kind_share, self.scan_looks = kind or None, kind_share, scan_looks
        self.processor = load_processor(model_dir)
        config = json.loads((self.model_dir / "config.json").read_text())
        self.limits = PixelLimits(config["min_pixels"], config["max_pixels"], config["cell"])
        self.header = self.processor.tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end = self.processor.tokenizer.convert_tokens_to_ids(END)
        self.files = ImageCache(max_bytes=256 << 20)
        self.scenes = SceneCache(quality=PROBE_JPEG_QUALITY)  # zooms show what the probes' files show

    def __call__(self, level: str, index: int, first: bool = False) -> tuple[Any, str | None]:
        """((example, kind, reading targets per image, wrong looks, region targets), None), or (None, why it was
        skipped). Region targets (``region_loss``): per region attribute, one class per region row of the
        example's images (what the teacher knows a probe's first view's regions show; ``IGNORE`` elsewhere and
        on cards). Level ``read``: a card's panel alone, ((reading rows, kind, [targets]), None), for training the
        reader by itself. ``first``: the first move alone (a probe's first view and the teacher's first zoom, no
        wrong looks, the loop stopped before the zoom runs): a search's first reply at a fraction of its cost."""
        from glimpse.agent import AgentLoop
        from glimpse.builtin.model import PROMPT_FILE
        from glimpse.builtin.processing import KIND, READING, REL, reading_rows
        from glimpse.builtin.teacher import asked_labels, reading_targets, region_targets, scans, teacher_turns
        from glimpse.models.scripted import ScriptedBackend
        from glimpse.probes.stream import card_sample, probe_sample, sign_labels
        from glimpse.train.common import encode

        if level == "read":
            sample = card_sample(index, self.seed, self.folder)
            try:
                with Image.open(sample.images[0]) as image:
                    rows, _ = reading_rows(fit(image.convert("RGB"), self.limits))
            finally:
                Path(sample.images[0]).unlink(missing_ok=True)
            return (rows, sample.meta["category"], [sign_labels(sample.meta["candidates"][0])]), None
        if level == "card":
            sample = card_sample(index, self.seed, self.folder)
            cache = self.files
        else:
            draw = random.Random(f"glimpse-kind/{self.seed}/{level}/{index}").random()
            kind = self.kind if draw < self.kind_share else None
            sample = probe_sample(level, index, self.seed, self.folder, scenes=self.scenes, others=True, kind=kind)
            cache = self.scenes
        try:
            view = fit(cache.get(sample.images[0]).image, self.limits)  # type: ignore[arg-type]
            rng = random.Random(f"glimpse-check/{self.seed}/{level}/{index}")
            looks = rng.choices((1, 2, 3), (6, 3, 1))[0] if level != "card" and rng.random() < self.check else 0
            first = first and level != "card"  # a card is answered at once: it stays whole
            looks = 0 if scans(sample) or first else looks  # a scan's looks are all advice, none masked
            script = teacher_turns(sample, view, wrong=looks, rng=rng, scan_looks=self.scan_looks)
            if script is None:
                return None, f"{sample.id}: no proposal covers the target"
            script = script[:1] if first else script
            # the replies before the targets' zooms and the answer are the wrong looks (fewer than asked for
            # when the view offers fewer)
            wrong = len(script) - 1 - sum(c["target"] for c in sample.meta["candidates"]) if looks else 0
            loop = AgentLoop(
                ScriptedBackend([script], name="teacher", record=0),
                coords="relative",
                prompt_file=str(self.model_dir / PROMPT_FILE),
                max_turns=1 if first else 16,  # at the cap the zoom is written, not run
                min_pixels=self.limits.min_pixels,
                max_pixels=self.limits.max_pixels,
                resize_factor=self.limits.factor,
                image_cache=cache,
            )
            (traj,) = asyncio.run(loop.run(sample))
            if traj.stop_reason != ("max_turns" if first else "answer") or traj.metrics["tool_errors"]:
                return None, f"{sample.id}: {traj.stop_reason} {traj.error or ''}"
            example = encode(traj, self.processor, self.header, self.end, cache=cache)
            example.labels = mask_replies(example.labels, wrong)
            rows = example.pixel_values.numpy()
            panels = [tuple(rows[r][REL]) for r in range(len(rows)) if rows[r][KIND] == READING][::READ_ROWS]
            seen = [o for o in traj.observations() if o.path is None]
            if len(seen) != len(panels):
                raise RuntimeError(f"{sample.id}: {len(panels)} images encoded but {len(seen)} in the trajectory")
            known = region_targets(sample, view)
            regions: dict[str, Any] = _region_rows(rows, example.image_grid_thw, known, sample.id)
            if level != "card":  # what the question asks for: the (first) target's border and corner mark
                regions["asked"] = asked_labels(sample.meta["candidates"])
            reading = reading_targets(sample, seen, panels)
            return (example, sample.meta["category"], reading, wrong, regions), None
        finally:
            self.scenes.discard(sample.images[0])
            for f in self.folder.iterdir():
                f.unlink()
            self.files.clear()


def _region_rows(rows: np.ndarray, grid: Any, first: dict[str, list[int]] | None, name: str) -> dict[str, list[int]]:
    """Region targets of the first view's regions (``first``; None: none known) spread over every region row of
    an example (its ``rows`` of images of ``grid``): the first image's, then ``IGNORE`` for the rest."""
    from glimpse.builtin.processing import KIND, READING
    from glimpse.builtin.teacher import REGION_ATTRIBUTES

    if first is None:
        return {k: [IGNORE] * int((rows[:, KIND] != READING).sum()) for k in REGION_ATTRIBUTES}
    size = int(grid[0][2])
    shown = int((rows[:size, KIND] != READING).sum())
    total = int((rows[:, KIND] != READING).sum())
    if any(len(v) != shown for v in first.values()):
        raise RuntimeError(f"{name}: {shown} region rows in the first image but targets for another count")
    return {k: v + [IGNORE] * (total - shown) for k, v in first.items()}


def region_loss(
    logits: dict[str, Any] | None, targets: list[dict[str, list[int]]], stats: dict[str, list[int]] | None = None
) -> Any:
    """The region heads' loss (``RegionHeads``): cross-entropy of each attribute on the region rows whose sign the
    teacher knows (``targets``: per example in batch order, its region rows' classes), averaged over attributes;
    None when nothing is known. Right/wrong (before the step: held out) go to ``stats`` as ``region/NAME``."""
    import torch

    if not logits:
        return None
    losses = []
    for name, out in logits.items():
        want = [c for t in targets for c in t[name]]
        want_t = torch.tensor(want, device=out.device)
        if len(want) != out.shape[0]:
            raise RuntimeError(f"{out.shape[0]} region rows but {len(want)} region targets")
        known = want_t != IGNORE
        if not bool(known.any()):
            continue
        losses.append(torch.nn.functional.cross_entropy(out.float(), want_t, ignore_index=IGNORE))
        if stats is not None:
            right = (out.detach().argmax(-1) == want_t)[known].tolist()
            stats.setdefault(f"region/{name}", []).extend(int(r) for r in right)
    return torch.stack(losses).mean() if losses else None


def asked_loss(model: Any, state: Any, targets: list[dict[str, Any]], stats: dict[str, list[int]] | None = None) -> Any:
    """What the question asks for (``RegionHeads.ask``, from each row's question words on the pointer's
    ``state``), cross-entropy against what the teacher knows of the target (``targets[b]["asked"]``), averaged;
    None when no row has both. Right/wrong (before the step) go to ``stats`` as ``asked/NAME``."""
    import torch

    losses = []
    for b, t in enumerate(targets):
        words = state.words[b] if b < len(state.words) else None
        if "asked" not in t or not words:
            continue
        said = model.model.embed_tokens(torch.tensor(words, device=model.device))
        losses += _asked_terms(model, said, t["asked"], stats, "asked")
    return torch.stack(losses).mean() if losses else None


def _asked_terms(
    model: Any, said: Any, asked: dict[str, int], stats: dict[str, list[int]] | None, tag: str
) -> list[Any]:
    """The question head on one question's word embeddings ``said``: per attribute, its cross-entropy against the
    ``asked`` class; right/wrong to ``stats`` as ``TAG/NAME``."""
    import torch

    out = []
    for name, logits in model.region_heads.ask(said).items():
        want = torch.tensor([asked[name]], device=logits.device)
        out.append(torch.nn.functional.cross_entropy(logits.float()[None], want))
        if stats is not None:
            stats.setdefault(f"{tag}/{name}", []).append(int(int(logits.argmax()) == asked[name]))
    return out


class QuestionMaker:
    """Probes' questions alone, as the model reads them, with what each asks for: the question head's training
    examples (``RegionHeads.ask``). A probe drawn without its image costs a few milliseconds, so the head can learn
    from thousands of questions before the searches start.

    The words are the ones the model's grounding reads (``question_words``): the prompt the loop writes with the
    model's prompt file, through the chat template, up to the first image.
    """

    def __init__(self, model_dir: str | Path, processor: Any, turn_start: int | None, image_token: int | None):
        from glimpse.builtin.model import PROMPT_FILE
        from glimpse.protocol import make_protocol

        self.protocol = make_protocol(coords="relative", prompt_file=Path(model_dir) / PROMPT_FILE)
        self.processor, self.turn_start, self.image_token = processor, turn_start, image_token
        self.image = Image.new("RGB", (28, 28))  # a stand-in: only the words before the image are kept

    def words(self, question: str) -> list[int]:
        """The token ids of ``question``'s words, as the grounding reads them from the first prompt."""
        from glimpse.builtin.model import question_words
        from glimpse.models.base import ImagePart, TextPart

        messages = []
        for m in self.protocol.start(ImagePart(image=self.image), question):
            content = [
                {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in m.parts()
            ]
            messages.append({"role": m.role, "content": content})
        text = self.processor.apply_chat_template(messages, tokenize=False)
        ids = self.processor.tokenizer.encode(text, add_special_tokens=False)
        words, at_image = question_words(ids, self.turn_start, self.image_token, [])
        if not at_image:
            raise RuntimeError("the prompt the loop writes has no image token: the question's words end nowhere")
        return words

    def __call__(self, level: str, index: int, seed: int) -> tuple[list[int], dict[str, int]]:
        """(the question's word ids, per region attribute the class the target shows) of probe ``index``."""
        from glimpse.builtin.teacher import asked_labels
        from glimpse.probes.synth import make_probe

        record = make_probe(level, index, seed=seed, render=False).record
        question = record["problem"].replace("<image>", "").strip()  # as ``probe_sample`` hands it to the loop
        return self.words(question), asked_labels(record["candidates"])


def ask_step(
    model: Any, optimizer: Any, batch: list[tuple[list[int], dict[str, int]]], stats: dict[str, list[int]]
) -> Any:
    """One step of the question head alone on (words, asked classes) pairs; the word embeddings stay as they are.
    Right/wrong before the step go to ``stats`` as ``ask/NAME``. Returns the loss."""
    import torch

    losses = []
    for words, asked in batch:
        with torch.no_grad():
            said = model.model.embed_tokens(torch.tensor(words, device=model.device))
        losses += _asked_terms(model, said, asked, stats, "ask")
    loss = torch.stack(losses).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def mask_replies(labels: list[int], n: int) -> list[int]:
    """``labels`` with the first ``n`` replies (runs of trained tokens) untrained."""
    out, run, inside = list(labels), 0, False
    for i, label in enumerate(out):
        if label != IGNORE and not inside:
            run += 1
        inside = label != IGNORE
        if inside and run <= n:
            out[i] = IGNORE
    return out


def _worker(
    model_dir: str,
    seed: int,
    worker: int,
    jobs: Any,
    out: Any,
    check: float = 0.0,
    kind: str = "",
    kind_share: float = 1.0,
    scan_looks: int = 0,
) -> None:
    """A producer process: take (level, index, first move only) jobs, put tokenised examples (or an error text)."""
    import torch

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix=f"glimpse-builtin-{worker}-"))
    try:
        make = ExampleMaker(model_dir, seed, folder, check, kind, kind_share, scan_looks)
        parent = mp.parent_process()

        def orphaned() -> bool:  # the trainer was killed without stopping its makers: stop, whatever is queued
            return parent is not None and not parent.is_alive()

        while not orphaned():
            try:
                job = jobs.get(timeout=5)
            except queue.Empty:
                continue
            if job is None:
                return
            level, index, first = job
            try:
                ex, skipped = make(level, index, first)
                result = ("example", (level, ex, first)) if ex is not None else ("skip", skipped)
            except Exception as exc:  # a generator bug must be seen, not silently skipped
                result = ("error", f"{level}/{index}: {type(exc).__name__}: {exc}")
            while True:  # a full queue nobody reads any more must not hold the process forever
                try:
                    out.put(result, timeout=5)
                    break
                except queue.Full:
                    if orphaned():
                        return
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def trim_replay(memory: list[Any], batch: int, most: int = REPLAY_MEMORY, limit: int = REPLAY_BYTES) -> None:
    """Drop the oldest items of the replay memory (items: (level, (example, …), first)) until it holds at most
    ``most`` of them and ``limit`` bytes of pixel rows, never fewer than a ``batch``."""
    del memory[:-most]

    def size() -> int:
        return sum(int(getattr(item[1][0].pixel_values, "nbytes", 0) or 0) for item in memory)

    while len(memory) > batch and size() > limit:
        del memory[: max(1, len(memory) // 8)]


def idle(results: Any, batch: int) -> bool:
    """Whether fewer than a batch of made examples wait (the trainer would wait for the makers); True where a
    queue cannot tell its size (macOS)."""
    try:
        return results.qsize() < batch
    except NotImplementedError:
        return True


def _level(progress: float, rng: random.Random, only: str = "curriculum", mix: str = "", probes: bool = False) -> str:
    """The level of the next example; ``probes``: never a card (first moves: a card has no search)."""
    if only != "curriculum":
        return only
    if mix:
        weights = tuple(float(w) for w in mix.split(","))
    else:
        weights = next(w for start, w in reversed(CURRICULUM) if progress >= start)
    if probes:  # train_builtin refuses first moves where the weights leave only cards
        weights = (0.0, *weights[1:])
    return rng.choices(LEVELS, weights=weights)[0]


# ----------------------------------------------------------------------------------------------------- training
def skills(
    target: list[int], pred: list[int], level: str, kind: str, ids: dict[str, int], checked: int = 0
) -> dict[str, list[int]]:
    """Teacher-forced right/wrong per skill of one example (``target`` and ``pred`` aligned, -100 = untrained):
    each zoom (all its pointer tokens right: the region chosen) split into the first and later ones (the first
    trained zoom after ``checked`` untrained wrong looks: ``recover_zoom``; the reply after them starting a zoom,
    not an answer: ``look_again``), the answer (every token through ``</answer>`` right), and each reply's first
    token, the choice between answering and looking on (``stop`` where the teacher answers, ``go_on`` where it
    looks); each also per level, per question kind and per both."""
    out: dict[str, list[int]] = {}

    def add(name: str, ok: bool) -> None:
        for key in (name, f"{name}/{level}", f"{name}/{kind}", f"{name}/{level}/{kind}"):
            out.setdefault(key, []).append(int(ok))

    if checked:  # after the untrained wrong looks, the next reply must start another zoom, not an answer
        first = next((i for i, t in enumerate(target) if t != IGNORE), None)
        if first is not None:
            add("look_again", pred[first] == target[first])
    zooms = 0
    for i, token in enumerate(target):
        if token != IGNORE and (i == 0 or target[i - 1] == IGNORE):  # a reply's first token: answer now or look
            add("stop" if token == ids["answer_open"] else "go_on", pred[i] == token)
        if token == ids["box_open"]:
            ok = all(pred[k] == target[k] for k in range(i + 1, min(i + 6, len(target))))
            add(("recover_zoom" if checked else "first_zoom") if zooms == 0 else "later_zoom", ok)
            zooms += 1
        elif token == ids["answer_open"]:
            end = target.index(ids["answer_close"], i) if ids["answer_close"] in target[i:] else len(target) - 1
            add("answer", all(pred[k] == target[k] for k in range(i + 1, end + 1)))
    return out


def _number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def _print(entry: dict[str, Any]) -> None:
    accs = "  ".join(f"{k[4:]} {v:.2f}" for k, v in entry.items() if k.startswith("acc_") and k.count("/") <= 1)
    print(
        f"step {entry['step']}  {entry['examples']:,} examples  {entry['minutes']:.1f} min  "
        f"loss {entry['loss']:.3f}  held-out (teacher-forced): {accs}",
        flush=True,
    )


def reading_loss(
    logits: dict[str, Any] | None, targets: list[Any], stats: dict[str, list[int]] | None = None, tag: str = ""
) -> Any:
    """The reader's own loss: cross-entropy of each attribute over the images whose panel the teacher knows
    (``targets``, one per image in batch order, None where unknown), averaged over attributes; right/wrong per
    attribute (before the step: held out) go to ``stats`` as ``read/NAME`` (and ``read/NAME/TAG``)."""
    import torch

    if not logits or not any(t is not None for t in targets):
        return torch.zeros(())
    losses = []
    for name, out in logits.items():
        want = torch.tensor([t[name] if t is not None else -100 for t in targets], device=out.device)
        if len(want) != out.shape[0]:
            raise RuntimeError(f"{out.shape[0]} panels read but {len(want)} reading targets")
        losses.append(torch.nn.functional.cross_entropy(out.float(), want, ignore_index=-100))
        if stats is not None:
            known = want != -100
            right = (out.detach().argmax(-1) == want)[known].tolist()
            for key in (f"read/{name}", f"read/{name}/{tag}") if tag else (f"read/{name}",):
                stats.setdefault(key, []).extend(int(r) for r in right)
    if stats is not None:  # a code read exactly: every character right, on the panels that show text
        chars = [n for n in logits if n.startswith("char")]
        for j, t in enumerate(targets):
            if t is None or not chars or t[chars[0]] == logits[chars[0]].shape[-1] - 1:  # the last class: none
                continue
            ok = all(int(logits[c][j].argmax()) == t[c] for c in chars)
            for key in ("read/code", f"read/code/{tag}") if tag else ("read/code",):
                stats.setdefault(key, []).append(int(ok))
        if "dots" in logits:  # dots counted right, on the panels that show dots (the rest only say "none")
            for j, t in enumerate(targets):
                if t is not None and t["dots"] > 0:
                    ok = int(logits["dots"][j].argmax()) == t["dots"]
                    for key in ("read/count", f"read/count/{tag}") if tag else ("read/count",):
                        stats.setdefault(key, []).append(int(ok))
    return torch.stack(losses).mean()


def first_zoom(ids: list[int], labels: list[int], box_open: int, spells: Any) -> tuple[int, Any] | None:
    """Where the first trained zoom opens in a row (``ids``, ``labels``) and which of the first view's regions
    (their ``spells``) it spells, as a mask; None when no trained zoom goes into the first view."""
    import torch

    at = next((t for t, (i, y) in enumerate(zip(ids, labels, strict=True)) if i == box_open and y != IGNORE), None)
    if at is None:
        return None
    written = torch.tensor(ids[at + 1 : at + 6], device=spells.device)
    hit = (spells == written).all(1) if len(written) == spells.shape[1] else None
    return (at, hit) if hit is not None and bool(hit.any()) else None


def grounding_loss(model: Any, input_ids: Any, labels: Any, state: Any) -> Any:
    """The grounding match alone (``Grounding``) as a pointer over the first view's regions: cross-entropy of the
    region(s) the teacher's first trained zoom into the first view spells, per row that has one (None: no row
    has). A direct signal for the words-to-regions match, which the replies' loss reaches only through the
    pointer's five location tokens."""
    import torch

    losses = []
    for b, (ids, lab) in enumerate(zip(input_ids.tolist(), labels.tolist(), strict=True)):
        found = first_zoom(ids, lab, model.config.box_open_id, state.spells[b][0]) if state.keys[b] else None
        if found is None:
            continue  # no trained zoom, or the first one is into an observation
        match = state.keys[b][0][:, -1].float()
        losses.append(torch.logsumexp(match, 0) - torch.logsumexp(match[found[1]], 0))
    return torch.stack(losses).mean() if losses else None


def added_weights(model: Any, folder: Path) -> set[str]:
    """The names of ``model``'s parameters that the checkpoint in ``folder`` has no weights for (parts added to an
    older checkpoint: ``add_grounding``, ``add_region_heads``)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no .safetensors weights")
    stored: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as weights:
            stored.update(weights.keys())
    return {name for name, _ in model.named_parameters() if name not in stored}


def _adamw(groups: list[dict[str, Any]], **kwargs: Any) -> Any:
    """AdamW over the parameters of ``groups`` that train (``--train-only`` stops the rest); None if none do."""
    import torch

    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, **kwargs) if groups else None


def stream_start(cfg: BuiltinConfig) -> dict[str, int]:
    """The first probe index per level of this run: ``--start-index``, else where the ``--init`` checkpoint's
    stream stopped (its ``STREAM_FILE``), else ``FIRST_INDEX``. A continued run never trains on its starting
    point's probes again (that would make the log's held-out accuracies a memory test)."""
    kinds = LEVELS  # the reader's cards ("read") are cards: they take the cards' indices
    if cfg.start_index is not None:
        return dict.fromkeys(kinds, cfg.start_index)
    if not cfg.init:
        return dict.fromkeys(kinds, FIRST_INDEX)
    record = Path(cfg.init) / STREAM_FILE
    if not record.exists():
        raise ConfigError(
            f"{cfg.init} has no {STREAM_FILE}, so the probes it was trained on are unknown; pass --start-index "
            f"above them (runs before the record began at {FIRST_INDEX:,} and made far fewer than 1,000,000 "
            "examples per level)"
        )
    done = json.loads(record.read_text(encoding="utf-8"))
    if done.get("seed") != cfg.seed:
        return dict.fromkeys(kinds, FIRST_INDEX)  # another seed: other probes
    return {k: max(FIRST_INDEX, int(done["next"].get(k, FIRST_INDEX))) for k in kinds}


def save(model: Any, folder: Path, seed: int, counters: dict[str, int]) -> None:
    """The checkpoint, and how far its probe stream went (``STREAM_FILE``; a later ``--init`` continues after)."""
    model.save_pretrained(folder)
    (folder / STREAM_FILE).write_text(json.dumps({"seed": seed, "next": counters}) + "\n", encoding="utf-8")


def train_builtin(cfg: BuiltinConfig, *, log: Callable[[dict[str, Any]], None] = _print) -> Path:
    """Train the built-in model for ``cfg.minutes`` on streamed probes (the reader alone on cards for the first
    ``cfg.read_minutes``); write ``OUT/model``."""
    import torch

    from glimpse.builtin.model import (
        add_asked_copy,
        add_blob_counter,
        add_found,
        add_grounding,
        add_ink_colour,
        add_line_reader,
        add_reader,
        add_region_heads,
        add_relation,
        build_builtin,
        close_zooms,
        find_prefixes,
        spell_codes,
    )
    from glimpse.hf.processor import load_processor
    from glimpse.train.common import collate

    torch.set_num_threads(cfg.threads)
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out / "config.json")
    model_dir = out / "model"
    if cfg.mix and (len(cfg.mix.split(",")) != len(LEVELS) or not all(_number(w) for w in cfg.mix.split(","))):
        raise ConfigError(f"--mix takes {len(LEVELS)} weights (card, easy, medium, hard), got {cfg.mix!r}")
    if not 0 <= cfg.read_minutes < cfg.minutes:
        raise ConfigError(f"--read-minutes ({cfg.read_minutes:g}) must be at least 0 and less than --minutes")
    if not 0 <= cfg.first_minutes <= cfg.minutes - cfg.read_minutes + 1e-9:
        raise ConfigError(
            f"--first-minutes ({cfg.first_minutes:g}) must be at least 0 and at most --minutes less --read-minutes "
            f"({cfg.minutes - cfg.read_minutes:.4g})"
        )
    if cfg.first_minutes and (cfg.only == "card" or (cfg.mix and not any(float(w) for w in cfg.mix.split(",")[1:]))):
        raise ConfigError("--first-minutes trains first moves on probes, and --only/--mix asks for cards alone")
    from glimpse.probes.synth import check_kind

    if cfg.scan_looks < 0:
        raise ConfigError(f"--scan-looks ({cfg.scan_looks}) is a number of looks: 0 (until both are seen) or more")
    if not 0 < cfg.kind_share <= 1:
        raise ConfigError(f"--kind-share ({cfg.kind_share:g}) must be above 0 and at most 1")
    if cfg.kind:
        check_kind(cfg.kind, "--kind", pairs=False)
    if cfg.train_only == "new" and not cfg.init:
        raise ConfigError("--train-only new trains the weights --init lacks: pass --init (a trained checkpoint)")
    if cfg.init:
        if not (Path(cfg.init) / "config.json").exists():
            raise ConfigError(f"--init {cfg.init} is not a checkpoint folder (no config.json)")
        if Path(cfg.init).resolve() != model_dir.resolve():
            # not the shipped folder's manifest and README: they describe the starting point's measurement
            shutil.copytree(cfg.init, model_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
        # parts an older checkpoint lacks, each added so that it changes nothing until trained (unless it says so)
        migrations = (
            (add_reader, "has no reader: one is added (random weights)"),
            (add_grounding, "has no grounding: one is added (switched off until trained)"),
            (
                add_region_heads,
                "has no region heads or ring colour: they are added (they change nothing until trained)",
            ),
            (add_line_reader, "read codes off the whole panel: its reader now reads them off the line of text (fresh)"),
            (spell_codes, "copied answers by first tokens: it now spells whole words, a code one character a token"),
            (close_zooms, "left closing zooms to the LM head: the pointer now closes them and never repeats one"),
            (
                add_blob_counter,
                "counted dots from pixels alone: its reader now also counts ink blobs (silent at first)",
            ),
            (add_ink_colour, "read marker colours from pixels alone: its reader now also reads the ink's colour"),
            (add_relation, "had no relation: answers now hear where the named signs were seen (silent at first)"),
            (add_found, "had no found signal: turns now hear whether the named signs were read (silent at first)"),
            (find_prefixes, "heard only two-code questions: turns now hear whether a code a question starts was read"),
            (add_asked_copy, "chose what an answer copies from its state alone: now from the question's words too"),
        )
        for migrate, what in migrations:
            if migrate(model_dir):
                print(f"{cfg.init} {what}")
    else:
        build_builtin(model_dir, size=cfg.size, seed=cfg.seed)
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a reader added to an older checkpoint is reported as missing weights
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device)
    hf_logging.set_verbosity(verbosity)
    processor = load_processor(model_dir)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"training {'the model from ' + cfg.init if cfg.init else 'a fresh ' + cfg.size + ' built-in model'} "
        f"({params:,} parameters) on {device} for {cfg.minutes:g} min "
        f"({cfg.read_minutes:g} of them the reader alone on cards) with {cfg.workers} example makers → {out}"
    )
    tok = processor.tokenizer
    grounded = model.grounding is not None and cfg.ground_weight > 0
    model.train()
    reader_params = list(model.reader.parameters())
    reader_ids = {id(p) for p in reader_params}
    # what --init has no weights for (a migration above may have written them, fresh, into the copy)
    added = added_weights(model, Path(cfg.init)) if cfg.init else set()
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in reader_ids]  # the reader has its own rate
    new = [p for n, p in named if n in added]
    reader_new = [p for n, p in model.reader.named_parameters(prefix="reader") if n in added]
    fresh = sorted(n for n, _ in model.named_parameters() if n in added)
    if fresh:
        print(f"{len(fresh)} weights {cfg.init} does not have ({', '.join(fresh)}) train at {cfg.new_lr:g}")
    if cfg.train_only:
        prefixes = tuple(p.strip() for p in cfg.train_only.split(",") if p.strip())
        trains = {
            n
            for n, _ in model.named_parameters()
            if (n in added if cfg.train_only == "new" else n.startswith(prefixes))
        }
        if not trains:
            why = (
                f"{cfg.init} has every weight of this model already"
                if cfg.train_only == "new"
                else "it names no weight"
            )
            raise ConfigError(
                f"--train-only {cfg.train_only}: {why}, so nothing would train (prefixes: reader., found., …)"
            )
        for n, p in model.named_parameters():
            p.requires_grad_(n in trains)
        print(f"--train-only {cfg.train_only}: {len(trains)} weights train; every other one stays as it is")
    rest = [p for n, p in named if n not in added]
    new_ids = {id(p) for p in reader_new}
    reader_old = [p for p in reader_params if id(p) not in new_ids]
    groups = [
        {"params": rest, "scale": 1.0},
        {"params": reader_old, "scale": cfg.reader_lr / cfg.lr},
        {"params": new + reader_new, "scale": cfg.new_lr / cfg.lr},
    ]
    optimizer = _adamw(groups, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    reader_groups = [{"params": reader_old, "scale": 1.0}, {"params": reader_new, "scale": cfg.new_lr / cfg.reader_lr}]
    reader_optimizer = _adamw(reader_groups, lr=cfg.reader_lr, weight_decay=0.01)
    budget, read_budget, first_budget = cfg.minutes * 60, cfg.read_minutes * 60, cfg.first_minutes * 60
    if optimizer is None or (read_budget and reader_optimizer is None):
        raise ConfigError(
            f"--train-only {cfg.train_only} leaves nothing to train in the "
            f"{'search' if optimizer is None else 'reader'} stage (drop --read-minutes, or name reader weights)"
        )

    ctx = mp.get_context("spawn")
    # Jobs are unbounded (one is added per result taken, so they stay few); a bounded job queue filled before
    # the first result is taken would deadlock against the bounded result queue.
    jobs, results = ctx.Queue(), ctx.Queue(maxsize=4 * max(cfg.batch, cfg.read_batch) + 64)
    procs = [
        ctx.Process(
            target=_worker,
            args=(str(model_dir), cfg.seed, w, jobs, results, cfg.check, cfg.kind, cfg.kind_share, cfg.scan_looks),
            daemon=True,
        )
        for w in range(cfg.workers)
    ]
    for p in procs:
        p.start()
    rng = random.Random(cfg.seed)
    counters = stream_start(cfg)
    start = time.perf_counter()

    def reading_stage() -> bool:
        return time.perf_counter() - start < read_budget

    first_from = read_budget  # seconds into the run when first moves start: after the question head's stage

    def feed(n: int) -> None:
        for _ in range(n):
            elapsed = time.perf_counter() - start
            first = first_from <= elapsed < first_from + first_budget
            if reading_stage():
                level = "read"
            else:
                progress = (elapsed - read_budget) / (budget - read_budget)
                level = _level(progress, rng, cfg.only, cfg.mix, probes=first)
            stream = "card" if level == "read" else level  # one stream of cards: the reader's and the searches'
            jobs.put((level, counters[stream], first))  # never an evaluation's indices, never the --init's probes
            counters[stream] += 1

    skipped = 0

    def take(n: int, want_read: bool) -> list[tuple[str, Any]]:
        """The next ``n`` examples of the current stage (examples of the other stage still queued are dropped)."""
        nonlocal skipped
        got: list[tuple[str, Any]] = []
        while len(got) < n:
            try:
                kind, payload = results.get(timeout=600)
            except queue.Empty:
                raise RuntimeError("the example generators produced nothing for 10 minutes") from None
            feed(1)
            if kind == "example" and (payload[0] == "read") == want_read:
                got.append(payload)
            elif kind == "skip":
                skipped += 1
            elif kind == "error":
                raise RuntimeError(f"the example generator failed: {payload}")
        return got

    def update(
        batch: list[Any], stats: dict[str, list[int]] | None, levels: list[str], first: bool = False
    ) -> tuple[Any, Any, Any, Any]:
        """One gradient step on (example, kind, reading targets) items; returns the loss, the logits and labels
        it was computed on, the gradient norm. ``first``: first moves alone, which show the reader no panel it
        is taught, so it does not move (S2, attempt 17: the pointer's loss alone pulled its readings of the first
        view's panel, and sign colours read right fell from 1.00 to 0.04 over the stage)."""
        inputs = collate([b[0] for b in batch], tok.pad_token_id, model.config.image_token_id)
        inputs.pop("mm_token_type_ids", None)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        labels = inputs.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = model(**inputs, use_cache=grounded)  # the cache carries the pointer's state
        logits = output.logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
        targets = [t for b in batch for t in b[2]]
        tags = [lv for b, lv in zip(batch, levels, strict=True) for _ in b[2]]
        read = reading_loss(output.reader_logits, targets)
        if stats is not None and output.reader_logits:
            for tag in set(tags):  # right/wrong per attribute and level, before the step
                mine = [t if g == tag else None for t, g in zip(targets, tags, strict=True)]
                reading_loss({k: v.detach() for k, v in output.reader_logits.items()}, mine, stats, tag)
        total = loss + cfg.read_weight * read.to(loss.device)
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        ground = grounding_loss(model, inputs["input_ids"], labels, cache.glimpse_pointer) if grounded else None
        if ground is not None:
            total = total + cfg.ground_weight * ground
        regions = region_loss(output.region_logits, [b[4] for b in batch], stats) if cfg.region_weight > 0 else None
        if regions is not None:
            total = total + cfg.region_weight * regions
        asked = None
        if grounded and model.region_heads is not None and cfg.region_weight > 0:
            asked = asked_loss(model, cache.glimpse_pointer, [b[4] for b in batch], stats)
        if asked is not None:
            total = total + cfg.region_weight * asked
        if not bool(torch.isfinite(total)):
            raise RuntimeError(f"the loss is not finite (replies {float(loss)}, reader {float(read)}): a bug, not data")
        if not total.requires_grad:  # --train-only, and nothing in this batch reaches the weights that train
            return total, logits.detach(), target, torch.zeros(())
        optimizer.zero_grad()
        total.backward()
        if first:
            for p in reader_params:
                p.grad = None  # AdamW leaves a weight without a gradient as it is (no decay either)
        grad = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        return total, logits.detach(), target, grad

    def set_lr(opt: Any, peak: float, step: int, elapsed: float, span: float) -> float:
        lr = peak * min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / span)))
        for g in opt.param_groups:
            g["lr"] = lr * g.get("scale", 1.0)
        return lr

    memory: list[Any] = []
    feed(2 * max(cfg.batch, cfg.read_batch if read_budget else 0) + 2 * cfg.workers)
    step, seen, last_save = 0, 0, time.perf_counter()
    ids = {
        "box_open": model.config.box_open_id,
        "answer_open": tok.convert_tokens_to_ids("<answer>"),
        "answer_close": tok.convert_tokens_to_ids("</answer>"),
    }
    logf = (out / "log.jsonl").open("a")

    def progress(stage: str, loss: Any, lr: float, elapsed: float | None = None) -> dict[str, Any]:
        """A log entry's common part, after the step; ``elapsed``: seconds when it began (default: now)."""
        elapsed = time.perf_counter() - start if elapsed is None else elapsed
        return {
            "stage": stage,
            "step": step,
            "examples": seen,
            "minutes": round(elapsed / 60, 2),
            "loss": round(float(loss.detach()), 4),
            "lr": lr,
        }

    def record(entry: dict[str, Any], stats: dict[str, list[int]]) -> None:
        entry.update({f"acc_{k}": round(sum(v) / len(v), 3) for k, v in stats.items() if v})
        logf.write(json.dumps(entry) + "\n")
        logf.flush()
        if step % 10 == 0:
            log(entry)

    try:
        # each stage takes at least one step, however slow the machine
        while reading_stage() or (read_budget and step == 0):  # the reader alone, on cards' panels: cheap
            items = take(cfg.read_batch, True)
            rows = torch.from_numpy(np.concatenate([p[1][0] for p in items])).to(device)
            targets = [t for p in items for t in p[1][2]]
            lr = set_lr(reader_optimizer, cfg.reader_lr, step, time.perf_counter() - start, read_budget)
            _, logits = model.reader(rows, model.model.embed_tokens)
            stats: dict[str, list[int]] = {}
            for kind in {p[1][1] for p in items}:
                mine = [t if p[1][1] == kind else None for p in items for t in p[1][2]]
                reading_loss({k: v.detach() for k, v in logits.items()}, mine, stats, kind)
            loss = reading_loss(logits, targets)
            reader_optimizer.zero_grad()
            loss.backward()
            reader_optimizer.step()
            step += 1
            seen += len(items)
            record({**progress("read", loss, lr), "skipped": skipped}, stats)
        if (
            cfg.ask_steps
            and not cfg.train_only
            and grounded
            and model.region_heads is not None
            and cfg.region_weight > 0
        ):
            # the question head alone on questions without images (attempt 7: beside the searches, the asked
            # border colour stayed at chance for 122 steps; alone it is learned in a few hundred questions)
            maker = QuestionMaker(model_dir, processor, model.config.turn_start_id, model.config.image_token_id)
            head = model.region_heads
            ask_params = [*head.attend.parameters(), *head.asked.parameters()]
            ask_optimizer = torch.optim.AdamW(ask_params, lr=cfg.new_lr, weight_decay=0.01)
            ask_start = time.perf_counter()
            for _ in range(cfg.ask_steps):
                questions = []
                for _ in range(cfg.ask_batch):  # the searches' streams move on: every example stays fresh
                    level = rng.choice(LEVELS[1:])
                    questions.append(maker(level, counters[level], cfg.seed))
                    counters[level] += 1
                stats = {}
                loss = ask_step(model, ask_optimizer, questions, stats)
                step += 1
                seen += len(questions)
                record(progress("ask", loss, cfg.new_lr), stats)
            print(f"question head: {cfg.ask_steps} steps in {(time.perf_counter() - ask_start) / 60:.1f} min")
        read_steps = step
        first_from = max(read_budget, time.perf_counter() - start)
        if read_steps:
            save(model, model_dir, cfg.seed, counters)
            last_save = time.perf_counter()
        while time.perf_counter() - start < budget or step == read_steps:
            items = take(cfg.batch, False)
            levels = [p[0] for p in items]
            batch = [p[1] for p in items]
            elapsed = time.perf_counter() - start
            lr = set_lr(optimizer, cfg.lr, step - read_steps, elapsed - read_budget, budget - read_budget)
            stats = {}
            firsts = all(p[2] for p in items)  # first moves alone (--first-minutes)
            loss, logits, target, grad = update(batch, stats, levels, firsts)
            for _ in range(cfg.replay - 1 if memory else 0):
                if not idle(results, cfg.batch):
                    break  # a fresh batch is waiting: replay only fills the trainer's idle time
                replayed = rng.sample(memory, min(len(memory), cfg.batch))
                update([m[1] for m in replayed], None, [m[0] for m in replayed], all(m[2] for m in replayed))
            if cfg.replay > 1:  # examples are large (pixel rows): kept only when replayed
                if memory and memory[-1][2] and not firsts:
                    memory.clear()  # whole searches began: replay them, not the first moves before them
                memory.extend(items)
                trim_replay(memory, cfg.batch)
            step += 1
            seen += len(batch)
            # Accuracy on this batch before training on it: fresh examples, so a held-out measurement.
            with torch.no_grad():
                pred = logits.argmax(-1)
                for row, (level, (_, kind, _, checked, _)) in enumerate(zip(levels, batch, strict=True)):
                    for key, v in skills(target[row].tolist(), pred[row].tolist(), level, kind, ids, checked).items():
                        stats.setdefault(key, []).extend(v)
            record(
                {
                    **progress("first" if firsts else "search", loss, lr, elapsed),
                    "grad": round(float(grad), 3),
                    "levels": {lv: levels.count(lv) for lv in set(levels)},
                    "skipped": skipped,
                },
                stats,
            )
            if time.perf_counter() - last_save > cfg.save_every_min * 60:
                save(model, model_dir, cfg.seed, counters)
                last_save = time.perf_counter()
        save(model, model_dir, cfg.seed, counters)  # before stopping the makers, which may be mid-example
    finally:
        for _ in procs:
            jobs.put(None)
        deadline = time.perf_counter() + 5
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.perf_counter()))
            if p.is_alive():
                p.terminate()
        logf.close()
    result = {"steps": step, "examples": seen, "skipped": skipped, "minutes": budget / 60}
    (out / "result.json").write_text(json.dumps(result) + "\n")
    print(f"model → {model_dir}  (use it with --model hf:{model_dir})")
    return model_dir
