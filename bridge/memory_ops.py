"""Model loads and unloads asked for over HTTP, run in the background.

RunPod's proxy cuts a request at 100 s, and loading a 15 GB model from a network volume takes
longer, so ``POST /memory/load`` / ``/memory/unload`` start the operation here and answer 202 at
once (unless it ends within :data:`QUICK_S`: then its result, as before). ``GET /memory/status``
lists the recent operations (``operations``) with their state, duration and error; each is also
recorded like a job (``job_id``: ``GET /jobs/{job_id}`` and its events stream ``processing`` then
``completed`` or ``failed``), so a client can follow it the way it follows a job.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bridge.aio import cancel_until_done

log = logging.getLogger(__name__)

QUICK_S = 0.5
"""An operation that ends within this long is answered with its result instead of 202."""


@dataclass
class Operation:
    """One load or unload: ``running``, then ``done`` or ``failed`` (``error`` says why)."""

    id: int
    op: Literal["load", "unload"]
    which: str
    models: list[str]
    state: Literal["running", "done", "failed"] = "running"
    started_at: float = field(default_factory=time.time)
    seconds: float | None = None
    result: Any = None
    error: str | None = None
    job_id: str = field(default_factory=lambda: f"memory-{uuid.uuid4().hex[:16]}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class MemoryOps:
    """The background operations of one bridge (the last ``keep`` are remembered)."""

    def __init__(self, keep: int = 20,
                 record: Callable[..., Awaitable[Any]] | None = None) -> None:
        # record(job_id, status, error_message=..., metadata=...): the job-state record (reporting.record_state)
        self._record = record
        self._ids = itertools.count(1)
        self._ops: deque[Operation] = deque(maxlen=keep)
        self._tasks: dict[int, asyncio.Task] = {}

    def start(self, op: Literal["load", "unload"], which: str, models: list[str], work: Awaitable[Any]) -> Operation:
        """Run ``work`` in the background as a new operation."""
        operation = Operation(next(self._ids), op, which, list(models))
        self._ops.append(operation)
        self._tasks[operation.id] = asyncio.create_task(self._run(operation, work), name=f"memory-{op}-{which}")
        return operation

    async def wait(self, operation: Operation, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for ``operation`` to end; whether it did."""
        task = self._tasks.get(operation.id)
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
        return operation.state != "running"

    async def _run(self, operation: Operation, work: Awaitable[Any]) -> None:
        started = time.monotonic()
        described = {"operation": operation.op, "which": operation.which, "models": operation.models}
        await self._note(operation, "processing", metadata=described)
        try:
            operation.result = await work
            operation.state = "done"
        except Exception as exc:  # noqa: BLE001 - reported through /memory/status
            # Answered by /memory/status and /memory/load: the server's own words stay in the log.
            operation.state = "failed"
            operation.error = getattr(exc, "public", None) or f"{operation.op} failed (the worker's log says why)"
            log.error("%s %s failed: %s", operation.op, operation.which, exc)
        finally:
            operation.seconds = round(time.monotonic() - started, 3)
            self._tasks.pop(operation.id, None)
        await self._note(operation, "completed" if operation.state == "done" else "failed",
                         error_message=operation.error, metadata={**described, "seconds": operation.seconds})

    async def _note(self, operation: Operation, status: str, **fields: Any) -> None:
        """Record the operation's state like a job's; a Redis outage must not fail the operation."""
        if self._record is None:
            return
        try:
            await asyncio.wait_for(self._record(operation.job_id, status, **fields), 5.0)
        except Exception as exc:  # noqa: BLE001 - /memory/status still has it
            log.warning("memory %s %s: state not recorded (%s)", operation.op, operation.which, type(exc).__name__)

    def recent(self) -> list[dict[str, Any]]:
        """The remembered operations, newest first."""
        return [op.as_dict() for op in reversed(self._ops)]

    async def close(self) -> None:
        await cancel_until_done(self._tasks.values())
