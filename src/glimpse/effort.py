"""o3-style reasoning effort: presets of turn and token budgets.

=========  ==========  ===============  ==========================================================
effort     max_turns   max_new_tokens   where the turn cap comes from
=========  ==========  ===============  ==========================================================
low        4           1,024            a quick look: the smallest cap of Mini-o3's scaling figure
medium     12          4,096            the cap of Mini-o3's released evaluation
high       32          8,192            the largest cap of Mini-o3's test-time scaling figure
=========  ==========  ===============  ==========================================================

8,192 new tokens per turn is the Mini-o3 recipe's limit. An explicit ``max_turns`` or ``max_new_tokens``
overrides the preset. For OpenAI reasoning models, the API's own ``reasoning_effort`` is a separate backend
option (``--reasoning-effort``).
"""

from __future__ import annotations

from dataclasses import dataclass

from glimpse.errors import ConfigError


@dataclass(frozen=True)
class Effort:
    max_turns: int
    max_new_tokens: int


EFFORTS: dict[str, Effort] = {
    "low": Effort(max_turns=4, max_new_tokens=1024),
    "medium": Effort(max_turns=12, max_new_tokens=4096),
    "high": Effort(max_turns=32, max_new_tokens=8192),
}


def effort_budget(effort: str, max_turns: int | None = None, max_new_tokens: int | None = None) -> Effort:
    """The preset's budgets, with explicit values taking precedence.

    Raises:
        ConfigError: unknown preset.
    """
    if effort not in EFFORTS:
        raise ConfigError(f"unknown effort {effort!r}; choose one of {', '.join(EFFORTS)}")
    preset = EFFORTS[effort]
    return Effort(
        max_turns=preset.max_turns if max_turns is None else max_turns,
        max_new_tokens=preset.max_new_tokens if max_new_tokens is None else max_new_tokens,
    )
