"""Metrics of an evaluation, computed from scored trajectories alone.

Per turn cap:

* **Avg@k**: mean over questions of the share of its k repeats that are correct; **pass@k**: share of
  questions with at least one correct repeat; **majority@k**: share whose majority-vote answer is correct.
  Accuracy is over the units that **ran**, with the counts beside it: a unit whose backend failed after
  retries (stop reason ``error`` on a readable image) is counted in ``backend_errors`` and left out, never
  scored wrong; a question none of whose repeats ran is left out (``questions_failed``); when nothing ran, or
  nothing that ran has a gold answer (``scored`` is 0), the accuracies are ``None``. Questions whose input
  could not be read are left out too and counted as ``input_errors``; a repeat the judge failed to decide is
  left out of the accuracies too (neither right nor wrong) and counted as ``judge_errors`` (a resume with the
  judge asks it again).
* The same accuracies per level, category, task, subtask and HR-Bench cycle, when samples carry them, each
  with its question count ``n`` and its ``backend_errors``.
* Turns: mean and histogram; over-turn rate; tool-error rate (mistakes per tool call); tokens and latency
  per trajectory, over the units that ran; stop reasons of every unit (backend failures as ``error``).
* **Faithfulness**: among correct answers to questions with known target boxes, the share whose zooms
  actually covered every target (some zoom box holding at least ``threshold`` of the target's area), and
  the mean best IoU of a zoom with a target. A target counts only zooms into its own image; when questions
  have several images, ``by_image`` gives the same figures for the targets in each (``image_1`` …).
* **Chance**: the expected Avg@k of guessing uniformly from each question's answer space.

``truncate`` cuts a trajectory run with a large cap down to a smaller one, for derived sweeps.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from typing import Any

from glimpse.answers import normalize_answer
from glimpse.eval.options import LETTERS
from glimpse.eval.policies import chance
from glimpse.geometry import Box
from glimpse.trajectory import Score, Trajectory, Turn

# Sample fields results are broken down by, when present: probe level, category, MME-RealWorld's task and subtask,
# HR-Bench's answer-position cycle.
BREAKDOWN_FIELDS = ("level", "category", "task", "subtask", "cycle")


def truncate(traj: Trajectory, cap: int) -> Trajectory:
    """The trajectory as a run with the smaller turn cap ``cap`` would have ended.

    Up to the cap both runs take the same turns; one that ended within ``cap`` turns ends the same way, and one
    that went on is stopped at ``cap`` with ``max_turns`` (over-turn if the last kept turn called the tool), that
    last call written but not run. A backend that failed asking for turn ``cap + 1`` would never have been asked
    under the smaller cap, so that unit ran there; the image cap or a full context after turn ``cap`` would not
    have been reached either.
    """
    if cap > traj.settings.max_turns:
        raise ValueError(f"cannot extend a trajectory run with cap {traj.settings.max_turns} to cap {cap}")
    settings = traj.settings.model_copy(update={"max_turns": cap})
    if len(traj.turns) < cap or (len(traj.turns) == cap and traj.stop_reason not in _LATER_STOPS):
        return traj.model_copy(update={"settings": settings})
    # the cap's last turn: its call was written, never run (no crop, no observation, no code output)
    turns = [*traj.turns[: cap - 1], _unrun(traj.turns[cap - 1])]
    return traj.model_copy(
        update={
            "turns": turns,
            "settings": settings,
            "answer": None,
            "error": None,
            "stop_reason": "max_turns",
            "over_turn": turns[-1].tool_attempt,
            "score": Score(correct=False, method="no_answer"),
            "wall_s": round(sum(t.latency_s + t.tool_s for t in turns), 4),
            "token_view": None,
        }
    )


# Stops a loop reaches only after the cap's last turn ran: a backend failing on turn cap + 1, the image cap, the
# context filling up (checked before the next turn) — at cap ``cap`` the loop stops with ``max_turns`` first.
_LATER_STOPS = ("error", "max_images", "context_full")


def _unrun(turn: Turn) -> Turn:
    """A turn as the loop records it when the turn cap stops it before the tool runs."""
    update: dict[str, Any] = {
        "source_index": None,
        "original_index": 0,
        "crop_box_px": None,
        "observation_index": None,
        "observation_size": None,
        "injected": [],
        "made": [],
        "code_output": None,
        "tool_s": 0.0,
    }
    if turn.kind == "error" and turn.call is not None:  # the tool refused the zoom; the cap comes before the tool
        update |= {"kind": "zoom", "error": None, "error_kind": None}
    if turn.kind == "code":  # the loop records the code, and its failure, only when it runs it
        update |= {"code": None, "error": None, "error_kind": None}
    return turn.model_copy(update=update)


def found_targets(traj: Trajectory, threshold: float, image: int | None = None) -> tuple[bool, float] | None:
    """(every target covered by some zoom into its image, mean best IoU), or ``None`` without target boxes
    (in ``image``, 0-based, when given)."""
    targets = [(k, Box.from_list(b)) for k, b in traj.sample.targets() if image is None or k == image]
    if not targets:
        return None
    zooms = [(t.original_index, Box.from_list(t.crop_box_px)) for t in traj.turns if t.crop_box_px]
    mine = [[z for k, z in zooms if k == target_image] for target_image, _ in targets]
    covered = all(any(z.coverage_of(b) >= threshold for z in zs) for zs, (_, b) in zip(mine, targets, strict=True))
    best_iou = statistics.fmean(
        max((z.iou(b) for z in zs), default=0.0) for zs, (_, b) in zip(mine, targets, strict=True)
    )
    return covered, best_iou


def _faithfulness(correct: list[Trajectory], threshold: float, image: int | None = None) -> dict[str, Any]:
    found = [f for f in (found_targets(t, threshold, image) for t in correct) if f is not None]
    return {
        "checked": len(found),
        "covered_rate": statistics.fmean(c for c, _ in found) if found else None,
        "best_iou_mean": statistics.fmean(i for _, i in found) if found else None,
    }


def first_zoom_hit(traj: Trajectory) -> bool | None:
    """Whether the first zoom's window, capped at a quarter of its image's area, holds the centre of a target
    (``None`` without a target box or a zoom). Any of the question's targets counts: where a question names two
    objects (left or right of each other, V*'s relative position, a code split across two images), either is a
    right first look. The cap keeps a policy from scoring by zooming wide."""
    targets = traj.sample.targets()
    first = next((t for t in traj.turns if t.crop_box_px), None)
    originals = traj.originals()
    if not targets or first is None or first.crop_box_px is None or not originals:
        return None
    x0, y0, x1, y1 = first.crop_box_px
    image = originals[first.original_index]
    shrink = min(1.0, (image.width * image.height / 4 / max(1.0, (x1 - x0) * (y1 - y0))) ** 0.5)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * shrink / 2, (y1 - y0) * shrink / 2
    centres = [((t[0] + t[2]) / 2, (t[1] + t[3]) / 2) for k, t in targets if k == first.original_index]
    return any(cx - hw <= tx <= cx + hw and cy - hh <= ty <= cy + hh for tx, ty in centres)


def search_behaviour(trajectories: list[Trajectory]) -> dict[str, Any]:
    """Signs of a collapsed policy: how many distinct answers and first zooms it gives, how often it zooms at
    all, and how often its first zoom lands on the target."""
    firsts = []
    for t in trajectories:
        turn = next((z for z in t.turns if z.crop_box_px), None)
        originals = t.originals()
        if turn is not None and turn.crop_box_px is not None and turn.original_index < len(originals):
            box, ref = turn.crop_box_px, originals[turn.original_index]
            w, h = ref.width, ref.height
            first = (round(box[0] / w, 2), round(box[1] / h, 2), round(box[2] / w, 2), round(box[3] / h, 2))
            firsts.append((turn.original_index, *first))
    hits = [h for h in map(first_zoom_hit, trajectories) if h is not None]
    return {
        "distinct_answers": len({normalize_answer(t.answer) for t in trajectories if t.answer}),
        "distinct_first_zooms": len(set(firsts)),
        "zoomed_rate": len(firsts) / len(trajectories) if trajectories else 0.0,
        "first_zoom_hit_rate": statistics.fmean(hits) if hits else None,
        "first_zoom_checked": len(hits),
    }


def _correct(traj: Trajectory) -> bool:
    return bool(traj.score and traj.score.correct)


def _accuracy(groups: dict[str, list[Trajectory]]) -> dict[str, float | None]:
    """Avg@k, pass@k and majority@k of questions → their scored repeats; ``None`` without any."""
    if not groups:
        return {"avg": None, "pass": None, "majority": None}
    avg = statistics.fmean(statistics.fmean(_correct(t) for t in ts) for ts in groups.values())
    passed = statistics.fmean(any(_correct(t) for t in ts) for ts in groups.values())
    majority = []
    for ts in groups.values():
        ts = sorted(ts, key=lambda t: t.sample_index)  # a tie goes to the earliest repeat, not the first to finish
        keys = [_vote(t) for t in ts]
        counts = Counter(k for k in keys if k)
        if not counts:
            majority.append(False)
            continue
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        winner = max(counts, key=lambda k: (counts[k], -first[k]))
        majority.append(_correct(ts[first[winner]]))
    return {"avg": avg, "pass": passed, "majority": statistics.fmean(majority)}


def _vote(traj: Trajectory) -> str | None:
    """What a repeat votes for in majority@k: the option it chose, named by its place in the dataset (repeats may
    show the options in different orders, so one letter is not one option); else the value the scorer compared
    (a number, a closed-set word, the normalised text), so "3" and "three" vote together; nothing when no answer
    could be read (an unreadable reply does not outvote readable ones)."""
    s = traj.score
    if s is not None and s.method == "no_choice":
        return None
    letter = (s.extracted or "").strip().upper() if s is not None and s.method == "choice" else ""
    if len(letter) == 1 and letter in LETTERS:
        position = LETTERS.index(letter)
        order = traj.sample.meta.get("option_order")
        original = order[position] if isinstance(order, list) and position < len(order) else position
        return f"option {original}"
    if s is not None and s.extracted and s.method in ("numeric", "closed_set", "exact"):
        return f"{s.method} {s.extracted}"
    return normalize_answer(traj.answer) or None


def _judge_failed(traj: Trajectory) -> bool:
    return bool(traj.score and traj.score.method == "judge_error")


def backend_failed(traj: Trajectory) -> bool:
    """The backend failed after retries: the unit did not run, so it is counted apart from accuracy."""
    return traj.stop_reason == "error" and traj.image is not None and not traj.sample.meta.get("input_error")


def summarize(trajectories: list[Trajectory], threshold: float = 0.5) -> dict[str, Any]:
    """All metrics of trajectories that share one turn cap (see the module docstring)."""
    valid = [t for t in trajectories if not t.sample.meta.get("input_error") and t.image is not None]
    input_errors = {t.sample.id for t in trajectories} - {t.sample.id for t in valid}
    failed = [t for t in valid if backend_failed(t)]
    ran = [t for t in valid if not backend_failed(t)]
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in ran:
        if t.sample.answer is not None and not _judge_failed(t):
            groups[t.sample.id].append(t)
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for field in BREAKDOWN_FIELDS:
        split: dict[str, dict[str, list[Trajectory]]] = defaultdict(dict)
        for sid, ts in groups.items():
            value = min(ts, key=lambda t: t.sample_index).sample.meta.get(field)  # not whichever finished first
            if value:
                split[str(value)][sid] = ts
        failures = Counter(str(t.sample.meta[field]) for t in failed if t.sample.meta.get(field))
        if split or failures:
            by[field] = {
                v: {**_accuracy(split.get(v, {})), "n": len(split.get(v, {})), "backend_errors": failures[v]}
                for v in sorted(set(split) | set(failures))
            }
    turns = [len(t.turns) for t in ran]
    calls = sum(t.metrics["tool_calls"] for t in ran)
    correct = [t for t in ran if _correct(t)]
    faithfulness = {**_faithfulness(correct, threshold), "threshold": threshold}
    most_images = max((len(t.sample.images) for t in ran), default=1)
    if most_images > 1:
        faithfulness["by_image"] = {f"image_{k + 1}": _faithfulness(correct, threshold, k) for k in range(most_images)}
    return {
        "questions": len(groups),
        "questions_failed": len({t.sample.id for t in failed} - {t.sample.id for t in ran}),
        "trajectories": len(valid),
        "ran": len(ran),
        "scored": sum(len(ts) for ts in groups.values()),
        "accuracy": _accuracy(groups),
        "chance": statistics.fmean(chance(ts[0].sample) for ts in groups.values()) if groups else None,
        "by": by,
        "turns_mean": statistics.fmean(turns) if turns else 0.0,
        "turns_histogram": dict(sorted(Counter(turns).items())),
        "stop_reasons": dict(Counter(t.stop_reason or "running" for t in valid).most_common()),
        "over_turn_rate": statistics.fmean(t.over_turn for t in ran) if ran else 0.0,
        "tool_error_rate": sum(t.metrics["tool_errors"] for t in ran) / calls if calls else 0.0,
        "errors_by_kind": dict(sum((Counter(t.metrics["errors_by_kind"]) for t in ran), Counter()).most_common()),
        "prompt_tokens_mean": statistics.fmean(t.usage.prompt_tokens for t in ran) if ran else 0.0,
        "completion_tokens_mean": statistics.fmean(t.usage.completion_tokens for t in ran) if ran else 0.0,
        "latency_s_mean": statistics.fmean(t.wall_s for t in ran) if ran else 0.0,
        "faithfulness": faithfulness,
        "search": search_behaviour(ran),
        "input_errors": len(input_errors),
        "backend_errors": len(failed),
        "backend_error_rate": len(failed) / len(valid) if valid else 0.0,
        "judge_errors": sum(_judge_failed(t) for t in ran),
        "score_methods": dict(Counter(t.score.method for t in ran if t.score).most_common()),
    }
