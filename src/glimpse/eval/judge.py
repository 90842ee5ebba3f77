"""An LLM judge for open answers the rules cannot decide, on any OpenAI-compatible endpoint.

The judge sees the question, the reference answer and the candidate answer (never the image), with Glimpse's
own prompt, and must reply CORRECT or INCORRECT. Verdicts are cached on disk (one JSON line each, keyed by the
judge model, the prompt version and the three texts), so a resumed or repeated evaluation asks only once. A
request that fails after the backend's retries, or a reply that is neither word, is recorded as a judge
failure (``correct=None``, method ``judge_error``): never silently scored as wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from glimpse.errors import BackendError
from glimpse.models.base import Backend, GenerateParams, Message
from glimpse.trajectory import Score

PROMPT_VERSION = "glimpse-judge-1"
SYSTEM = (
    "You grade answers to questions about images. You see the question, a reference answer and a candidate "
    "answer, but not the image. Decide whether the candidate gives the same answer as the reference. Ignore "
    "differences of wording, case, punctuation, articles and formatting that do not change the meaning. A "
    "candidate that hedges between several answers, or adds a detail that contradicts the reference, is wrong."
)
USER = (
    "Question: {question}\nReference answer: {gold}\nCandidate answer: {prediction}\n\n"
    "Reply with one word: CORRECT or INCORRECT."
)


class LLMJudge:
    """Ask a model whether a candidate answer matches the reference.

    Args:
        backend: the judge model (any backend; usually ``openai:…``).
        cache_path: JSON-lines file of cached verdicts (created if missing); ``None`` disables the cache.
        max_new_tokens: room for the verdict (reasoning models may need more).
    """

    def __init__(self, backend: Backend, cache_path: str | os.PathLike[str] | None = None, max_new_tokens: int = 16):
        self.backend = backend
        self.max_new_tokens = max_new_tokens
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.cache: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.calls = 0
        if self.cache_path is not None and self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8").split("\n"):  # not at U+2028
                try:
                    row = json.loads(line)
                    self.cache[row["key"]] = bool(row["correct"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash; it will simply be asked again

    def _key(self, question: str, gold: str, prediction: str) -> str:
        name = getattr(self.backend, "name", type(self.backend).__name__)
        text = json.dumps([name, PROMPT_VERSION, question, gold, prediction])
        return hashlib.sha256(text.encode()).hexdigest()

    async def verdict(self, question: str, gold: str, prediction: str) -> Score:
        key = self._key(question, gold, prediction)
        if key in self.cache:
            return Score(correct=self.cache[key], method="judge", extracted=prediction.strip()[:200], detail="cached")
        messages = [
            Message("system", SYSTEM),
            Message("user", USER.format(question=question, gold=gold, prediction=prediction)),
        ]
        self.calls += 1
        try:
            (reply,) = (
                await self.backend.generate(
                    messages, GenerateParams(max_new_tokens=self.max_new_tokens, temperature=0.0, top_p=None)
                )
            )[:1]
        except BackendError as exc:
            return Score(correct=None, method="judge_error", detail=f"the judge failed: {exc}")
        except ValueError:
            return Score(correct=None, method="judge_error", detail="the judge returned no completion")
        word = reply.text.strip().strip(".*").upper()
        if word.startswith("INCORRECT"):
            correct = False
        elif word.startswith("CORRECT"):
            correct = True
        else:
            return Score(correct=None, method="judge_error", detail=f"unreadable verdict {reply.text[:80]!r}")
        self.cache[key] = correct
        if self.cache_path is not None:
            with self._lock:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "correct": correct}) + "\n")
        return Score(
            correct=correct, method="judge", extracted=prediction.strip()[:200], detail=reply.text.strip()[:80]
        )
