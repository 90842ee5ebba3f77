"""One run of ``glimpse ui``: the agent loop in a task, and the events a page follows while it runs.

Events form an append-only log per run, so a page that connects late or reconnects (server-sent events resend
``Last-Event-ID``) replays it from where it left off; the text pieces of a finished turn are dropped from it (the
turn's event holds the whole text). Their types:

* ``start``: the question, the image's size, the run's settings (never the API key), the number of samples;
* ``text``: a piece of a reply as the model writes it (``sample``, ``turn``, ``text``, ``restart``);
* ``turn``: a finished turn, with the trajectory so far (the record the viewer draws);
* ``done``: the final trajectories, the vote, how the run ended (``finished`` or ``stopped``), the saved file.

Stopping cancels the task: the request in flight is cancelled (a streamed reply's connection closes), every
unfinished trajectory ends with ``cancelled``, and the run is saved like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.agent import AgentLoop
from glimpse.answers import majority_vote
from glimpse.models.base import TextDelta
from glimpse.trajectory import Sample, Trajectory, Turn, save_jsonl

log = logging.getLogger(__name__)


@dataclass
class LiveRun:
    """A run in progress or finished, and its event log.

    Attributes:
        id: the run's name (also its file name in the runs folder).
        sample: the question and image.
        samples: trajectories in the run.
        settings: the resolved settings shown to the page and saved beside the record (no secrets).
        out: the runs folder; the record goes to ``out/<id>.jsonl``, its summary to ``out/<id>.json``.
    """

    id: str
    sample: Sample
    samples: int
    settings: dict[str, Any]
    out: Path
    events: list[dict[str, Any] | None] = field(default_factory=list)
    status: str = "running"
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.time)
    _seen: dict[int, Trajectory] = field(default_factory=dict)
    _pieces: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    def publish(self, event: dict[str, Any]) -> None:
        """Append an event and wake the pages following the run."""
        event["at"] = time.time()
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, start: int = 0):
        """The events from number ``start`` on, as they come, until the run is done."""
        i = start
        while True:
            changed = self._changed
            while i < len(self.events):
                event = self.events[i]
                if event is not None:
                    yield i, event
                i += 1
            if self.status != "running":
                return
            await changed.wait()

    def start(self, loop: AgentLoop, *, width: int, height: int, close: Any = None) -> None:
        """Start the run's task on the running event loop."""
        self.publish(
            {
                "type": "start",
                "id": self.id,
                "question": self.sample.question,
                "width": width,
                "height": height,
                "samples": self.samples,
                "settings": self.settings,
            }
        )
        self.task = asyncio.create_task(self._run(loop, close))

    def stop(self) -> bool:
        """Cancel the run; ``False`` if it had already ended."""
        if self.task is None or self.task.done():
            return False
        if not self._stopping:  # once: a second Stop while the run closes and saves changes nothing
            self._stopping = True
            self.task.cancel()
        return True

    def made_image(self, sample: int, index: int) -> str | None:
        """The file of observation ``index`` of a sample, when the code tool made it (as the loop recorded it)."""
        traj = self._seen.get(sample)
        for turn in traj.turns if traj is not None else []:
            for made in turn.made:
                if made.observation_index == index:
                    return made.path
        return None

    # ----------------------------------------------------------------------------------------------------
    def _on_text(self, traj: Trajectory, delta: TextDelta) -> None:
        self._seen[traj.sample_index] = traj
        self._pieces.setdefault((traj.sample_index, len(traj.turns)), []).append(len(self.events))
        self.publish(
            {
                "type": "text",
                "sample": traj.sample_index,
                "turn": len(traj.turns),
                "text": delta.text,
                "restart": delta.restart,
            }
        )

    def _on_turn(self, traj: Trajectory, turn: Turn) -> None:
        self._seen[traj.sample_index] = traj
        # The finished turn holds its whole text: a page that replays the run later skips the pieces.
        for i in self._pieces.pop((traj.sample_index, turn.index), []):
            self.events[i] = None
        self.publish({"type": "turn", "sample": traj.sample_index, "trajectory": _record(traj)})

    async def _run(self, loop: AgentLoop, close: Any) -> None:
        """Run, then close the loop, save and say ``done``; whatever fails or is stopped on the way, the run ends
        with a final status and event (a page following it never waits forever)."""
        stopped, trajectories = False, None
        try:
            try:
                trajectories = await loop.run(
                    self.sample, samples=self.samples, on_turn=self._on_turn, on_text=self._on_text
                )
            except asyncio.CancelledError:
                stopped = True
                trajectories = [self._cancelled(i, loop) for i in range(self.samples)]
            finally:
                if close is not None:
                    with contextlib.suppress(asyncio.CancelledError):  # a Stop while closing: save all the same
                        await asyncio.shield(close())
            answer = majority_vote([t.answer for t in trajectories]).answer
            # a second Stop while saving does not cut the files short
            status = "stopped" if stopped else "finished"
            await asyncio.shield(asyncio.to_thread(self._save, trajectories, answer, status))
        except asyncio.CancelledError:  # stopped again while closing or saving: stopped all the same
            stopped = True
        except Exception as exc:  # our bug, a backend that raised something unexpected, a save that failed
            log.exception("run %s failed", self.id)
            error = f"{type(exc).__name__}: {exc}"
            if trajectories is None and self._seen:  # the turns it took before it failed go to the history too
                partial = [self._cancelled(i, loop, reason="error", error=error) for i in range(self.samples)]
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._save, partial, None, "failed")
            self.status = "failed"
            self.publish({"type": "failed", "error": error})
            return
        if trajectories is None:
            trajectories = [self._cancelled(i, loop) for i in range(self.samples)]
        vote = majority_vote([t.answer for t in trajectories])
        self.status = "stopped" if stopped else "finished"
        self.publish(
            {
                "type": "done",
                "status": self.status,
                "trajectories": [_record(t) for t in trajectories],
                "vote": {
                    "answer": vote.answer,
                    "counts": vote.counts,
                    "agree": max(vote.counts.values(), default=0),  # (a page cannot pick it: "12" sorts first)
                    "answered": vote.answered,
                    "total": vote.total,
                },
                "saved": str(self.out / f"{self.id}.jsonl"),
            }
        )

    def _cancelled(
        self, index: int, loop: AgentLoop, *, reason: str = "cancelled", error: str | None = None
    ) -> Trajectory:
        """Sample ``index``'s trajectory as the stop (or a failure) left it (empty if it had not started a turn)."""
        traj = self._seen.get(index)
        if traj is None:
            traj = Trajectory(
                id=f"{self.sample.id}#{index}",
                sample=self.sample,
                sample_index=index,
                settings=loop.settings,
                started_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(self.started)),
            )
        if traj.stop_reason is None:
            traj.stop_reason, traj.error = reason, error
            traj.wall_s = round(time.time() - self.started, 4)
        return traj

    def _save(self, trajectories: list[Trajectory], answer: str | None, status: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_jsonl(trajectories, self.out / f"{self.id}.jsonl")
        summary = {
            "id": self.id,
            "question": self.sample.question,
            "image": self.sample.images[0],
            "answer": answer,
            "status": status,
            "stop_reasons": [t.stop_reason for t in trajectories],
            "started": self.started,
            "settings": self.settings,
        }
        (self.out / f"{self.id}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _record(traj: Trajectory) -> dict[str, Any]:
    return traj.model_dump(mode="json", exclude={"prompt", "token_view"})
