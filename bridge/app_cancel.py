"""Cancellation from the app: its ``jobs`` row says ``cancelled`` (docs/APP_CONTRACT.md, "Cancelling").

The app never tells the worker; it only sets the row's status. :class:`AppCancelWatcher` reads the
row (bridge.supabase_io, the database REST endpoint with the service key) once before a job
starts and every ``app_cancel_poll_s`` while it runs; on ``cancelled`` it calls the worker's
cancel (the same path as a Redis cancel message: the job's task is cancelled, its Triton request
with it, the GPU grant is released, and only a ``cancelled`` terminal callback is sent).

When the endpoint cannot be read the job just runs: the first failure of an outage is logged, each
one is counted (``gpu_worker_app_status_read_failures_total``). Local mode (no Supabase) has no
watcher; the Redis cancel path is the only one there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from bridge import metrics
from bridge.supabase_io import StorageFailed, SupabaseIO

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
#: The read before a job starts waits at most this long: a hung endpoint must not hold every job.
FIRST_READ_TIMEOUT_S = 2.0


class AppCancelWatcher:
    """Watches the app's ``jobs`` rows of running jobs; a no-op without Supabase."""

    def __init__(self, io: SupabaseIO | None, interval_s: float, *, read_timeout_s: float = 10.0) -> None:
        self.io = io
        self.interval_s = interval_s
        self.read_timeout_s = read_timeout_s
        self.failures = 0
        self._unreachable = False  # in an outage: logged once, until a read succeeds again

    async def status(self, job_id: str, timeout_s: float | None = None) -> str | None:
        """The row's status, or None (no row, no Supabase, or the read failed: then the job runs)."""
        if self.io is None:
            return None
        try:
            async with asyncio.timeout(timeout_s or self.read_timeout_s):
                status = await self.io.job_status(job_id)
        except (httpx.HTTPError, StorageFailed, TimeoutError, ValueError) as exc:
            self.failures += 1
            metrics.inc_app_status_read_failure()
            if not self._unreachable:
                self._unreachable = True
                log.warning("the app's jobs table cannot be read (%s); jobs run without its cancel checks "
                            "until it answers again", type(exc).__name__ if isinstance(exc, TimeoutError) else exc)
            return None
        if self._unreachable:
            self._unreachable = False
            log.info("the app's jobs table answers again; cancel checks resumed")
        return status

    @asynccontextmanager
    async def watching(self, job: Any, on_cancel: Callable[[str], Awaitable[None]]) -> AsyncIterator[None]:
        """Around a job's run: read once now, then every ``interval_s``; ``on_cancel(job_id)`` on
        ``cancelled``. Text jobs (the chat queue, not the app's jobs table) are not watched."""
        if self.io is None or job.type.output == "text":
            yield
            return
        if await self.status(job.id, FIRST_READ_TIMEOUT_S) == CANCELLED:
            log.info("job %s: cancelled in the app before it started", job.id)
            await on_cancel(job.id)
        poller = asyncio.create_task(self._poll(job.id, on_cancel), name=f"app-cancel:{job.id}")
        try:
            yield
        finally:
            poller.cancel()

    async def _poll(self, job_id: str, on_cancel: Callable[[str], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if await self.status(job_id) == CANCELLED:
                log.info("job %s: cancelled in the app; stopping it", job_id)
                await on_cancel(job_id)
                return
