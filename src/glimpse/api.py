"""Entry points for Python users; the CLI calls the same functions.

>>> from glimpse import ask
>>> result = ask("photo.jpg", "What is written on the small sign?", model="openai:gpt-4.1")
>>> result.answer, result.trajectories[0].stop_reason
>>> ask(["left.jpg", "right.jpg"], "Which photo shows the red sign?")  # several images: image_1, image_2 …

Inside a running event loop (a notebook with async cells, a server), use ``await ask_async(...)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glimpse.agent import AgentLoop, LoopOptions, OnReplyText, OnTurn
from glimpse.answers import Vote, majority_vote
from glimpse.config import AskConfig, BackendSettings, resolve
from glimpse.effort import effort_budget
from glimpse.errors import ConfigError
from glimpse.images import ImageCache
from glimpse.models import DEFAULT_MODEL, Backend, load_backend
from glimpse.trajectory import Sample, Trajectory


@dataclass
class AskResult:
    """The trajectories of one question and their vote."""

    trajectories: list[Trajectory]
    vote: Vote

    @property
    def answer(self) -> str | None:
        return self.vote.answer


def backend_from_config(config: BackendSettings, **options: Any) -> Backend:
    """The backend a config names (no model: the built-in default, ``DEFAULT_MODEL``), with every backend setting
    of ``BackendSettings`` and the command's own ``options`` (each backend ignores what it has no use for).

    Raises:
        ConfigError: the backend cannot be created.
    """
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(BackendSettings) if f.name != "model"}
    if isinstance(config, AskConfig):
        options.setdefault("max_concurrency", config.max_concurrency)
    return load_backend(config.model or DEFAULT_MODEL, **settings, **options)


def loop_from_config(
    config: AskConfig, backend: Backend | None = None, image_cache: ImageCache | None = None
) -> AgentLoop:
    """An agent loop with the config's limits (the effort preset filled in)."""
    budget = effort_budget(config.effort, config.max_turns, config.max_new_tokens)
    options = LoopOptions.of(
        config,
        max_turns=budget.max_turns,
        max_new_tokens=budget.max_new_tokens,
        seed=config.seed,
        return_token_ids=config.token_ids,
    )
    return AgentLoop(backend or backend_from_config(config), options, image_cache=image_cache)


ImageInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def question_sample(image: ImageInput, question: str) -> Sample:
    """The sample of one question about one image, or several (shown as ``image_1``, ``image_2`` … in order).

    Raises:
        ConfigError: no image was given.
    """
    paths = [os.fspath(image)] if isinstance(image, (str, os.PathLike)) else [os.fspath(p) for p in image]
    if not paths:
        raise ConfigError("give at least one image")
    name = "+".join(Path(p).stem for p in paths)
    return Sample(id=name or "image", images=paths, question=question)


async def ask_async(
    image: ImageInput,
    question: str,
    config: AskConfig,
    *,
    backend: Backend | None = None,
    on_turn: OnTurn | None = None,
    on_text: OnReplyText | None = None,
) -> AskResult:
    """Ask one question about one image or several; see ``ask`` (``on_text``: see ``AgentLoop.run``)."""
    sample = question_sample(image, question)
    loop = loop_from_config(config, backend)
    try:
        trajectories = await loop.run(sample, samples=config.samples, on_turn=on_turn, on_text=on_text)
    finally:
        if backend is None and hasattr(loop.backend, "aclose"):
            await loop.backend.aclose()
    return AskResult(trajectories, majority_vote([t.answer for t in trajectories]))


def ask(
    image: ImageInput,
    question: str,
    *,
    model: str | None = None,
    backend: Backend | None = None,
    on_turn: OnTurn | None = None,
    **settings: Any,
) -> AskResult:
    """Ask one question about one image (or several) and let the model zoom until it answers.

    Args:
        image: path of the image, or a list of paths: the model sees them in order as ``image_1``,
            ``image_2`` … (sharing one image's pixel budget) and may zoom into any.
        question: the question.
        model: backend spec such as ``openai:gpt-4.1`` (not needed when ``backend`` is given).
        backend: a backend object to use instead of ``model``.
        on_turn: called after every turn with the trajectory so far and the new turn.
        **settings: any field of ``AskConfig`` (``effort``, ``max_turns``, ``samples``, ``base_url`` …).

    Returns:
        The ``samples`` trajectories and their majority vote.
    """
    config = resolve(AskConfig, flags={"model": model if backend is None else model or "given", **settings})
    return asyncio.run(ask_async(image, question, config, backend=backend, on_turn=on_turn))
