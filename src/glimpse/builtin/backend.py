"""The ``builtin`` backend, the default model: the best policy that runs offline with nothing to download.

Two policies ship with the package: the training-free ``expert`` and the learned built-in model (the
``glimpse_vl`` checkpoint in ``glimpse/builtin/weights``, run by the ``hf`` backend; needs ``glimpse[hf]``).
The learned model is the default only where it was measured to beat the expert. Its manifest
(``weights/glimpse_ship.json``) says where: the probe levels it beats the expert on, and the measurement (which
fixes the temperature it was decoded at). This module is the one owner of the choice:

* ``builtin`` runs the learned model on a run whose every question is a single-image Glimpse probe of a level
  the manifest lists, decoded at the measured temperature (``glimpse eval`` says what it runs on through the
  ``probe_levels`` and ``temperature`` options); anything else (other levels, mixed datasets, benchmarks,
  ``glimpse ask`` on any image, sampling) runs the expert, as does an install without the weights or without
  torch and transformers. Other backends ignore those options.
* ``builtin:learned`` and ``builtin:expert`` choose explicitly.

The trajectory record names which one answered: ``expert`` or ``hf:builtin_weights``. Shipping a better
checkpoint is one step: replace the weights folder's files and its manifest (``weights/README.md``).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.errors import ConfigError
from glimpse.models.base import Backend

WEIGHTS = Path(__file__).with_name("weights")
MANIFEST = "glimpse_ship.json"
LEARNED_NAME = "hf:builtin_weights"  # what trajectories record when the learned model answered
CHOICES = ("learned", "expert")


@dataclass(frozen=True)
class Manifest:
    """Where the shipped learned model is the default, and the evidence.

    Attributes:
        probe_levels: the probe levels on which it beats the expert (and is the default).
        temperature: the sampling temperature it was measured at (0: greedy); the default only at this one.
        accuracy: per level, ``{"learned": %, "expert": %}`` as measured.
        measured: the whole measurement record (command, probes, seed, turn cap …), as written.
    """

    probe_levels: frozenset[str]
    temperature: float
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)


def read_manifest(folder: Path | None = None) -> Manifest | None:
    """The manifest of the weights in ``folder`` (default: the shipped ones); ``None`` when no weights ship.

    Raises:
        ConfigError: weights without a manifest, or a manifest that does not say which levels and how measured.
    """
    folder = WEIGHTS if folder is None else folder
    if not (folder / "config.json").exists():
        return None
    path = folder / MANIFEST
    fix = f"write {path} as weights/README.md describes ({{'probe_levels': [...], 'measured': {{...}}}})"
    if not path.exists():
        raise ConfigError(f"the built-in weights in {folder} come without {MANIFEST}: {fix}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        levels, measured = raw["probe_levels"], raw["measured"]
        temperature, accuracy = float(measured["temperature"]), measured["accuracy"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc!r}): {fix}") from None
    if not (isinstance(levels, list) and all(isinstance(level, str) for level in levels)):
        raise ConfigError(f"{path}: probe_levels must be a list of level names, got {levels!r}: {fix}")
    missing = [level for level in levels if level not in accuracy]
    if missing:
        raise ConfigError(f"{path}: probe_levels {missing} have no measured accuracy (measured.accuracy): {fix}")
    return Manifest(frozenset(levels), temperature, accuracy, measured)


def missing_packages() -> str | None:
    """The first package the learned model needs that is not installed (torch, transformers), or ``None``."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return exc.name or "torch"
    return None


def learned_available() -> bool:
    """Whether the learned model's weights ship with this install and its dependencies are importable."""
    return (WEIGHTS / "config.json").exists() and missing_packages() is None


@dataclass(frozen=True)
class Choice:
    """What ``builtin`` runs on a run, and why.

    Attributes:
        learned: the learned model (else the expert).
        reason: why, e.g. ``the learned built-in model is the default only on hard probes, where …``.
        hint: how to run the other one here, or ``""``.
    """

    learned: bool
    reason: str
    hint: str = ""

    @property
    def line(self) -> str:
        """One line for users: ``the expert (REASON; HINT)``."""
        policy = "the learned built-in model" if self.learned else "the expert"
        return f"{policy} ({self.reason}{'; ' + self.hint if self.hint else ''})"


LEVEL_ORDER = ("easy", "medium", "hard")  # the probe generator's levels, in the order users read them


def _ordered(levels: Collection[str]) -> list[str]:
    return sorted(levels, key=lambda level: (LEVEL_ORDER.index(level) if level in LEVEL_ORDER else 9, level))


def _figures(m: Manifest) -> str:
    """``46.8 % against 37.4 % on 500 probes`` (each level named when there are several)."""
    levels = _ordered(m.probe_levels)
    figures = ", ".join(
        f"{level + ' ' if len(levels) > 1 else ''}{m.accuracy[level]['learned']} % against "
        f"{m.accuracy[level]['expert']} %"
        for level in levels
    )
    return figures + (f" on {m.measured['probes']} probes" if m.measured.get("probes") else "")


def _decoding(m: Manifest) -> str:
    return "greedy" if m.temperature == 0 else f"at temperature {m.temperature:g}"


def choose(probe_levels: Collection[str] | None = None, temperature: float | None = None) -> Choice:
    """What ``builtin`` runs (see the module docstring).

    Args:
        probe_levels: the levels of the run's questions when every one is a single-image Glimpse probe;
            ``None`` when any is not, or when unknown (``glimpse ask``).
        temperature: the run's sampling temperature (``None``: the checkpoint's own).

    Raises:
        ConfigError: the shipped weights' manifest is missing or malformed.
    """
    manifest = read_manifest()
    if manifest is None:
        return Choice(False, "no learned built-in model ships with this install")
    if not manifest.probe_levels:
        return Choice(False, "the learned built-in model beats it on no probe level yet", "builtin:learned runs it")
    listed = _ordered(manifest.probe_levels)
    where = f"{' and '.join([', '.join(listed[:-1]), listed[-1]] if len(listed) > 2 else listed)} probes"
    missing = missing_packages()
    if missing:
        return Choice(
            False,
            f"the learned built-in model, the default on {where}, needs {missing}, which is not installed",
            "pip install 'glimpse[hf]'",
        )
    if not probe_levels or not set(probe_levels) <= manifest.probe_levels:
        return Choice(
            False,
            f"the learned built-in model is the default only on {where}, where it beats the expert: "
            f"{_figures(manifest)}, {_decoding(manifest)}",
            "--model builtin:learned runs it here",
        )
    if temperature != manifest.temperature:
        this = "leaves the temperature to the model" if temperature is None else f"samples at {temperature:g}"
        return Choice(
            False,
            f"the learned built-in model beats it on {where} only {_decoding(manifest)} ({_figures(manifest)}), "
            f"and this run {this}",
            f"add --temperature {manifest.temperature:g} to run it",
        )
    return Choice(True, f"on {where} it beats the expert: {_figures(manifest)}, {_decoding(manifest)}")


def _learned(options: dict[str, Any]) -> Backend:
    from glimpse.models.hf import create as hf

    backend = hf(str(WEIGHTS), **options)
    backend.name = LEARNED_NAME
    return backend


def create(
    arg: str = "",
    *,
    probe_levels: Collection[str] | None = None,
    temperature: float | None = None,
    **options: Any,
) -> Backend:
    """``builtin``: the learned model where its manifest says it beats the expert, else the expert;
    ``builtin:learned`` or ``builtin:expert``: that one.

    Raises:
        ConfigError: an unknown argument, or ``builtin:learned`` without the weights or without torch/transformers.
    """
    from glimpse.probes.expert import create as expert

    if arg not in ("", *CHOICES):
        raise ConfigError(f"builtin:{arg} is not a choice: use builtin, builtin:learned or builtin:expert")
    if arg == "learned":
        if not (WEIGHTS / "config.json").exists():
            raise ConfigError(
                f"builtin:learned: this install ships no learned built-in model ({WEIGHTS} has no config.json); "
                "reinstall glimpse, or run a checkpoint of your own with --model hf:FOLDER"
            )
        missing = missing_packages()
        if missing:
            raise ConfigError(f"builtin:learned needs {missing}, which is not installed: pip install 'glimpse[hf]'")
        return _learned(options)
    if arg == "" and choose(probe_levels, temperature).learned:
        return _learned(options)
    return expert()
