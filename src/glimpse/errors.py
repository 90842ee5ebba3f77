"""Exceptions raised by Glimpse.

Two kinds of failure are kept apart on purpose:

* **Model mistakes** (a bad box, unparsable JSON, an unknown source) are *not* exceptions. They become
  error observations that the model reads on its next turn, and they are counted in the trajectory.
* **Our bugs, bad configuration and bad inputs** raise one of the exceptions below. Each message names the
  offending value and says how to fix it.
"""

from __future__ import annotations


class GlimpseError(Exception):
    """Base class of every exception Glimpse raises on purpose."""


class ConfigError(GlimpseError, ValueError):
    """A setting or argument has a value Glimpse cannot work with."""


class ImageInputError(GlimpseError):
    """An input image is missing, unreadable, too large or of a shape the resize rule refuses."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class BackendError(GlimpseError):
    """A model backend failed (after retries, where retrying made sense)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ContextLengthError(BackendError):
    """The server refused a request because the conversation no longer fits the model's context."""


class ScriptExhaustedError(BackendError):
    """The scripted backend was asked for a turn its script does not have."""
