"""Job routes of the HTTP API, for callers without the Redis queue.

- ``POST /jobs``: a job in the contract format (docs/APP_CONTRACT.md §2), validated by
  :func:`bridge.jobs.parse_job` and queued like any other (RPUSH on its type's queue), with a
  ``queued`` state recorded first. Without an ``id`` one is assigned.
- ``GET /jobs/{id}``: the state the worker keeps in Redis (status, progress, assets, error, ...).
- ``GET /jobs/{id}/events``: that state's changes as server-sent events until a terminal status
  (``Last-Event-ID`` resumes); a ``: keep-alive`` comment every few seconds while nothing happens.
  At most ``EVENT_STREAMS_MAX`` streams are open at once; one more is a 503 with ``Retry-After``.
- ``POST /jobs/{id}/cancel``: asks the worker to stop the job; it ends ``cancelled``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse

from bridge.api_common import ApiError, EventStream, runtime_of, sse
from bridge.api_types import ApiRuntime
from bridge.jobs import DeadLetter, InvalidJob, parse_job
from bridge.queue import Queue

TERMINAL = frozenset({"completed", "failed", "cancelled"})
#: How long one read of the event stream blocks before a keep-alive comment is sent.
EVENT_BLOCK_MS = 5000

router = APIRouter(prefix="/jobs")
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,128}$", description="The job id.")]


def _with_id(raw: bytes) -> bytes:
    """``raw`` with a fresh ``id`` when it is a JSON object without one (else unchanged)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw  # parse_job says what is wrong
    if isinstance(data, dict) and data.get("id") in (None, ""):
        return json.dumps({**data, "id": uuid.uuid4().hex}).encode()
    return raw


def _invalid(exc: InvalidJob) -> ApiError:
    fields = [{"field": p.split(":", 1)[0], "message": p.split(":", 1)[-1].strip()} for p in exc.problems]
    return ApiError(422, exc.message, param=fields[0]["field"] if fields else None, fields=fields)


async def _known_state(queue: Queue, job_id: str) -> dict[str, Any]:
    state = await queue.get_state(job_id)
    if state is None:
        raise ApiError(404, f"no job {job_id!r} is known (unknown id, or its record expired)", type="not_found",
                       param="id")
    return state


@router.post("", status_code=202)
async def submit_job(request: Request) -> JSONResponse:
    """Validate and queue one job; 202 with its id, type and queue."""
    body = await queue_job(runtime_of(request), await request.body())
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{body['id']}"})


async def queue_job(runtime: ApiRuntime, raw: bytes) -> dict[str, Any]:
    """What ``POST /jobs`` does with a payload: assign an id if it has none, validate it with
    :func:`parse_job` (:class:`ApiError` 400/422/409 otherwise), record it ``queued`` and push it
    on its type's queue. Returns ``{id, status, type, queue, position}``."""
    raw = _with_id(raw)
    try:
        job = parse_job(raw)
    except DeadLetter as exc:
        raise ApiError(400, exc.reason, param="body") from None
    except InvalidJob as exc:
        raise _invalid(exc) from None
    queue: Queue = runtime.queue
    if await queue.get_state(job.id) is not None:
        raise ApiError(409, f"job {job.id!r} already exists", type="conflict", param="id")
    await queue.set_state(job.id, status="queued", progress=0, type=job.requested_type, user_id=job.user_id,
                          queue=job.type.queue, source="api")
    depth = await queue.push(job.type.queue, raw)
    return {"id": job.id, "status": "queued", "type": job.requested_type, "queue": job.type.queue, "position": depth}


@router.get("/{job_id}")
async def get_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """The job's recorded state: ``status``, ``progress`` (0-100), ``assets``, ``error``, ..."""
    state = await _known_state(runtime_of(request).queue, job_id)
    return {"id": job_id, **state}


@router.get("/{job_id}/events", response_model=None)
async def job_events(request: Request, job_id: JobId) -> EventStream:
    """Server-sent events: one per state change, ``id:`` the Redis stream id; ends after the
    terminal status (``completed``, ``failed`` or ``cancelled``)."""
    queue: Queue = runtime_of(request).queue
    await _known_state(queue, job_id)
    slots = request.app.state.event_slots  # bounded like the queue's event pool: 503 past it
    slots.take()

    async def give_back() -> None:
        slots.give_back()

    return EventStream(_events(queue, job_id, request.headers.get("last-event-id") or "0"), on_close=give_back)


async def _events(queue: Queue, job_id: str, last_id: str) -> AsyncIterator[str]:
    while True:
        events = await queue.events(job_id, last_id, block_ms=EVENT_BLOCK_MS)
        if not events:
            state = await queue.get_state(job_id)
            if state is None or state.get("status") in TERMINAL:  # its events expired or were trimmed
                yield sse({"id": job_id, **(state or {"status": "unknown"})})
                return
            yield ": keep-alive\n\n"
            continue
        for event_id, event in events:
            last_id = event_id
            yield sse({"id": job_id, **event}, event_id=event_id)
            if event.get("status") in TERMINAL:
                return


@router.post("/{job_id}/cancel", status_code=202)
async def cancel_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """Ask for the job to stop (within one step when it runs); 409 when it already ended."""
    queue: Queue = runtime_of(request).queue
    state = await _known_state(queue, job_id)
    status = state.get("status")
    if status in TERMINAL:
        raise ApiError(409, f"job {job_id!r} already ended: {status}", type="conflict", param="id")
    await queue.request_cancel(job_id)
    await queue.set_state(job_id, cancel_requested=True)
    return {"id": job_id, "status": status, "cancel_requested": True}
