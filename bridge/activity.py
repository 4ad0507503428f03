"""What this process is doing now, in memory, for the operator's page (``docs/API.md``, ``/ui``).

The worker tells it which jobs it runs and at which stage, the residency manager's observer which
loads and unloads happen, the chat routes how long each turn took. Nothing here is persisted or
shared between workers: Redis keeps the jobs' own records (status, progress, assets); this keeps
what only this process knows (a job's stage, the order jobs ended in here, recent model
operations). Pure bookkeeping: no I/O, bounded memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.residency_report import Observer, ResidencyEvent

#: Stages a running job is shown in (``loading model`` is derived from residency when shown).
Stage = str
RECENT_JOBS = 20
RECENT_MODEL_OPS = 20
CHAT_WINDOW_S = 60.0


@dataclass
class JobActivity:
    """One job this worker runs now."""

    job_id: str
    job_type: str
    model: str
    queue: str
    started: float = field(default_factory=time.time)
    stage: Stage = "waiting for GPU"


class Activity:
    """Running jobs and their stages, jobs ended here, model operations, chat turns.

    :attr:`changed` is set on every change; the page's event stream waits on it (besides its
    regular tick) so a stage change or a model load shows without delay.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.running: dict[str, JobActivity] = {}
        self.finished: deque[dict[str, Any]] = deque(maxlen=RECENT_JOBS)
        self.model_ops: deque[dict[str, Any]] = deque(maxlen=RECENT_MODEL_OPS)
        self._chat: deque[tuple[float, float, bool]] = deque(maxlen=1000)  # (ended at, seconds, ok)
        self._changed: asyncio.Event | None = None

    # ------------------------------------------------------------------ notifications
    @property
    def changed(self) -> asyncio.Event:
        if self._changed is None:  # made on first use: inside the event loop that waits on it
            self._changed = asyncio.Event()
        return self._changed

    def _touch(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # ------------------------------------------------------------------ jobs
    def begin(self, job_id: str, job_type: str, model: str, queue: str) -> None:
        self.running[job_id] = JobActivity(job_id, job_type, model, queue, started=self._clock())
        self._touch()

    def stage(self, job_id: str, stage: Stage) -> None:
        job = self.running.get(job_id)
        if job is not None and job.stage != stage:
            job.stage = stage
            self._touch()

    def end(self, job_id: str, *, requeued: bool = False) -> None:
        """The job left this worker: ended (listed with the jobs that ended here; its outcome is
        read from its record in Redis when shown), or ``requeued`` (it will run again: not listed)."""
        job = self.running.pop(job_id, None)
        if job is None:
            return
        if requeued:
            self._touch()
            return
        self.finished.appendleft({"id": job.job_id, "type": job.job_type, "model": job.model, "queue": job.queue,
                                  "started": job.started, "ended": self._clock()})
        self._touch()

    # ------------------------------------------------------------------ residency
    def observer(self, inner: Observer | None = None) -> Observer:
        """A residency observer that records every load and unload, then calls ``inner``."""

        def observe(event: ResidencyEvent) -> None:
            if event.phase == "start":
                self.model_ops.appendleft({"op": event.op, "model": event.model, "phase": "started",
                                           "at": self._clock(), "seconds": None, "error": None})
            else:
                self.model_ops.appendleft({"op": event.op, "model": event.model,
                                           "phase": "done" if event.ok else "failed", "at": self._clock(),
                                           "seconds": round(event.seconds, 2), "error": event.error})
            self._touch()
            if inner is not None:
                inner(event)

        return observe

    # ------------------------------------------------------------------ chat
    def chat_turn(self, seconds: float, ok: bool = True) -> None:
        self._chat.append((self._clock(), seconds, ok))
        self._touch()

    def chat_stats(self) -> dict[str, Any]:
        """Turns ended in the last minute, their mean and worst latency, and failures."""
        since = self._clock() - CHAT_WINDOW_S
        recent = [(s, ok) for at, s, ok in self._chat if at >= since]
        seconds = [s for s, _ in recent]
        return {
            "turns_per_minute": len(recent),
            "mean_s": round(sum(seconds) / len(seconds), 3) if seconds else None,
            "max_s": round(max(seconds), 3) if seconds else None,
            "failed": sum(1 for _, ok in recent if not ok),
            "total": len(self._chat),
        }
