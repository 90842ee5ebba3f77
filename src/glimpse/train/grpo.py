"""The engine-agnostic core of RL with over-turn masking: group advantages, masks, dynamic sampling, the loss.

Every RL engine Glimpse runs on (its own single-machine loop, ``glimpse.train.rl``; verl through the plugin,
``glimpse.train.verl``) uses these functions, so the recipe means one thing everywhere:

* **Group advantages** (GRPO): the samples of one prompt form a group; each trajectory's advantage is
  ``(r − mean(r)) / (std(r) + ε)`` over its group (the sample standard deviation, ``n − 1``, as verl's GRPO
  estimator computes it and so Mini-o3; the verl plugin uses that estimator itself).
* **Over-turn masking** (Mini-o3): a trajectory that a cap stopped while the model was still calling the tool
  (``Trajectory.over_turn``) keeps its reward (0) in its group's mean and standard deviation, but none of its
  tokens carry loss. Without the mask such trajectories get a negative advantage and teach the policy to answer
  early.
* **Dynamic sampling** (DAPO): a group whose rewards are all equal has zero advantage everywhere and teaches
  nothing; it is dropped and another prompt is drawn until the batch is full.
* **Token-level loss** (DAPO): the clipped surrogate ``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)`` is summed over
  every sampled token of the batch and divided by their number, so long trajectories weigh by their tokens;
  prompt and observation tokens (mask 0) carry none.

The reward is the evaluation's rule scorer (``glimpse.eval.scoring.score_rules``, which ``glimpse eval`` applies
before any judge): accuracy, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from glimpse.eval.scoring import score_rules
from glimpse.trajectory import Trajectory

EPS = 1e-6


def group_advantages(rewards: Sequence[float], eps: float = EPS) -> list[float]:
    """``(r − mean) / (std + eps)`` over one group, ``std`` the sample standard deviation (``torch.std``, as verl);
    every member (over-turn ones too) counts in the statistics. A group of one teaches nothing: advantage 0."""
    n = len(rewards)
    if n < 2:
        return [0.0] * n
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + eps) for r in rewards]


def keeps_loss(over_turn: bool, mask_over_turn: bool = True) -> bool:
    """Whether a trajectory's sampled tokens carry loss: all do, except over-turn ones when masking is on."""
    return not (over_turn and mask_over_turn)


def informative(rewards: Sequence[float]) -> bool:
    """Dynamic sampling's test: a group teaches something only if its rewards are not all equal."""
    return len(set(rewards)) > 1


@dataclass
class Rollout:
    """One trajectory of a group, ready for the loss.

    Attributes:
        trajectory: the record (scored).
        reward: its reward.
        advantage: its group-normalised advantage.
        trained: whether its tokens carry loss (false for masked over-turn trajectories, and for trajectories
            whose token view is missing or broken, which cannot be trained on faithfully).
    """

    trajectory: Trajectory
    reward: float
    advantage: float
    trained: bool


def score_group(group: Sequence[Trajectory], *, mask_over_turn: bool = True, eps: float = EPS) -> list[Rollout]:
    """Score a group with the rule scorer, and give each member its reward, advantage and loss flag."""
    for traj in group:
        if traj.score is None:
            traj.score = score_rules(traj.answer, traj.sample)
    rewards = [traj.score.value if traj.score else 0.0 for traj in group]
    advantages = group_advantages(rewards, eps)
    out = []
    for traj, r, a in zip(group, rewards, advantages, strict=True):
        view = traj.token_view
        usable = view is not None and view.aligned and any(view.mask)
        out.append(Rollout(traj, r, a, usable and keeps_loss(traj.over_turn, mask_over_turn)))
    return out


def policy_loss(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
) -> tuple[Any, dict[str, float]]:
    """The clipped surrogate, token-level.

    Args:
        logp: ``[B, T]`` log-probabilities of the sampled tokens under the policy being trained.
        old_logp: ``[B, T]`` the same under the policy that sampled them (detached).
        advantages: ``[B]`` one advantage per trajectory, broadcast over its tokens.
        mask: ``[B, T]`` 1 for tokens that carry loss (sampled tokens of trained trajectories), else 0.
        clip_low, clip_high: the ratio is clipped to ``[1 − clip_low, 1 + clip_high]`` (Mini-o3: 0.2 / 0.3).

    Returns:
        The loss (a scalar tensor; zero with no gradient-carrying token when the mask is empty) and statistics:
        ``clip_frac`` (share of tokens whose clip bound, taking their gradient away), ``ratio_mean``, ``tokens``.
    """
    import torch

    mask = mask.to(logp.dtype)
    tokens = mask.sum()
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if float(tokens) == 0:
        return (per_token * mask).sum(), {"clip_frac": 0.0, "ratio_mean": 1.0, "tokens": 0.0}
    loss = (per_token * mask).sum() / tokens
    with torch.no_grad():
        # clipping binds only where it takes the gradient away: above the range with a positive advantage,
        # below it with a negative one (elsewhere the unclipped, worse value is kept)
        was_clipped = (((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))).to(logp.dtype)
        stats = {
            "clip_frac": float((was_clipped * mask).sum() / tokens),
            "ratio_mean": float((ratio * mask).sum() / tokens),
            "tokens": float(tokens),
        }
    return loss, stats


def token_entropy(logits: Any, mask: Any) -> float:
    """Mean entropy (nats) of the policy's next-token distribution over the masked positions."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
        m = mask.to(ent.dtype)
        n = float(m.sum())
        return float((ent * m).sum() / n) if n else 0.0
