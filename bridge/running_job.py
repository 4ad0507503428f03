"""One job a worker took, as one object: what the job lifecycle (``bridge/worker.py``) and its GPU
part (``bridge/generation.py``) know of it (docs/ARCHITECTURE.md, "One job's state in the worker")."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import dataclass, field

from bridge.dispatcher import JobFailed, Waiting
from bridge.jobs import Job
from bridge.queue import Begin, Delivery
from bridge.reporting import ProgressThrottle


@dataclass(eq=False)
class RunningJob:
    """Everything of one job this worker took, from the take to its end (or back to its queue).

    :meth:`Worker.run_job` makes it and closes it in one place; the lifecycle fills it in as it
    goes: the job once parsed, the claim's answer (``begin``) with the spool stat and the gate's
    verdict found while it was on its way, a request started early (``head``), whether the job
    has started, its cancel, the progress callback and the spool fsync in flight."""

    delivery: Delivery
    task: asyncio.Task
    job: Job | None = None  # None until parsed
    begin: Begin | None = None  # the claim's answer
    spooled: bool = False  # the spool holds a result from before a crash
    refusal: JobFailed | None = None  # the safety gate's, found while the claim was on its way
    head: HeadStart | None = None  # its request, started while the claim was on its way
    # Past the point of no return: holding the GPU, or reporting its end. Shutdown lets these
    # finish within the grace period; the others go straight back to their queue.
    started: bool = False
    cancelled: bool = False  # the app asked to cancel it
    progress_send: asyncio.Task | None = None  # its progress callback in flight
    spool_sync: asyncio.Task | None = None  # its spool entry's fsync

    @property
    def job_id(self) -> str | None:
        return self.job.id if self.job is not None else self.delivery.job_id

    def send_progress(self, throttle: ProgressThrottle, fraction: float) -> None:
        """Send progress in the background: a slow callback must not hold up the GPU. While one
        send is in flight newer progress is skipped (the throttle would drop it anyway)."""
        if self.progress_send is None or self.progress_send.done():
            self.progress_send = asyncio.create_task(throttle.update(round(fraction * 100)))

    async def quiet_progress(self) -> None:
        """Before a terminal callback: let a progress callback on its way land first (it gives up
        within its own short deadline), so nothing arrives after the terminal one."""
        pending, self.progress_send = self.progress_send, None
        if pending is not None:
            with suppress(Exception):
                await pending


@dataclass
class HeadStart:
    """A job's request started while its claim was on its way (:meth:`bridge.generation.Generation.start_early`)."""

    waiting: Waiting  # its GPU grant
    started: float  # time.monotonic() when the request started
    request: asyncio.Task = field(init=False)
    throttle: ProgressThrottle | None = None  # set once the job is ours: its progress goes there
    adopted: bool = False  # the job's generation took the request and the grant over
