"""verl's custom reward function: Glimpse's rule scorer (``glimpse.eval.scoring``), the same as evaluation.

In a verl config::

    reward:
      custom_reward_function:
        path: pkg://glimpse.train.verl.reward      # or the file path of this module
        name: compute_score

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info)``; ``extra_info`` holds the
row's ``extra_info`` and the agent loop's ``extra_fields``. With ``GlimpseAgentLoop`` the answer is the one
the loop read (``glimpse_answer``) and the sample (options, gold) comes from the row; with another agent loop
the last ``<answer>…</answer>`` of the decoded response is scored.
"""

from __future__ import annotations

import json
import re
from typing import Any

from glimpse.eval.scoring import score_rules
from glimpse.trajectory import Sample

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None, **_: Any
) -> dict[str, Any]:
    """1.0 for a correct answer, else 0.0, with what verl logs beside it.

    Returns:
        ``score`` (the reward), ``acc`` (the same, for ``algorithm.filter_groups.metric``), ``over_turn`` and
        ``answered`` (whether there was an answer to score).
    """
    info = extra_info or {}
    stored = info.get("glimpse_sample")
    fields = json.loads(stored) if isinstance(stored, str) else dict(stored or {})
    fields.setdefault("id", str(info.get("index", data_source)))
    fields.setdefault("question", "")
    fields["images"] = []
    if ground_truth is not None and str(ground_truth) != "":
        fields["answer"] = str(ground_truth)
    sample = Sample.model_validate(fields)
    if "answered" in info:  # the Glimpse loop read the answer with its protocol
        prediction = str(info.get("glimpse_answer", "")) if info["answered"] else None
    else:
        answers = _ANSWER.findall(solution_str or "")
        prediction = answers[-1].strip() if answers else None
    value = 1.0 if score_rules(prediction, sample).correct else 0.0
    return {
        "score": value,
        "acc": value,
        "over_turn": bool(info.get("over_turn", False)),
        "answered": prediction is not None,
    }
