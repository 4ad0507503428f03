"""The operator's page: ``GET /ui`` and the routes it uses (``docs/API.md``, "Operator's page").

One HTML page with a small script and a style sheet (``bridge/ui/``, no build step). It shows,
live over one server-sent event stream (``GET /ui/events``: a :func:`snapshot` every
:data:`TICK_S` and on every change the worker, the residency manager or a chat turn reports),
the queues, the running jobs with their stage and progress, the models resident in the VRAM
budget with their loads and unloads, the jobs that ended here with their thumbnails, the dead
letters and the chat turns. It can submit a test job, cancel a job, load and unload a model:
through the same code as ``POST /jobs``, ``/jobs/{id}/cancel``, ``/memory/load`` and
``/memory/unload``.

Keys: the page asks for the API key once (``POST /ui/session``), checks it like the
``Authorization`` header, and answers with an HttpOnly, SameSite=Strict cookie holding a random
session id kept here in memory (never the key; a restart logs the page out). The cookie is good
for the ``/ui/...`` routes only (:func:`ui_authorized`); every other route still wants the header.
The page itself, its script and style and the login route carry no data and need no key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import Scope

from bridge.api_admin import _dead_letters
from bridge.api_auth import client_address, retry_after
from bridge.api_common import ApiError, EventStream, probe, public_failure, runtime_of, sse
from bridge.api_jobs import cancel_job, queue_job
from bridge.api_types import ApiRuntime
from bridge.jobs import JOB_TYPES, QUEUES, peek_id
from bridge.limits import WholeNumber

router = APIRouter(prefix="/ui")

STATIC_DIR = Path(__file__).with_name("ui")
COOKIE = "bridge_ui_session"
SESSION_TTL_S = 12 * 3600
log = logging.getLogger(__name__)

#: Seconds between two snapshots on the page's event stream when nothing reports a change.
TICK_S = 0.5
#: Seconds between keep-alive comments while the snapshot does not change.
KEEPALIVE_S = 10.0
QUEUED_SHOWN = 10
FINISHED_SHOWN = 10
SIGNED_THUMBNAIL_S = 600  # Supabase mode: a thumbnail's signed URL lives this long (re-signed before)
DEAD_LETTERS_SHOWN = 10
TERMINAL = frozenset({"completed", "failed", "cancelled"})
#: Paths of the page that carry no data: reachable without a key.
PUBLIC = frozenset({"/ui", "/ui/", "/ui/session", "/ui/static/app.js", "/ui/static/app.css"})
# The page loads only its own script and style, and images from its own routes.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


# ----------------------------------------------------------------------------- sessions
class Sessions:
    """Random session ids → expiry, in memory. The cookie holds only the id."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._expiry: dict[str, float] = {}

    def new(self) -> str:
        now = self._clock()
        self._expiry = {sid: t for sid, t in self._expiry.items() if t > now}  # drop the expired ones
        sid = secrets.token_urlsafe(32)
        self._expiry[sid] = now + self.ttl_s
        return sid

    def valid(self, sid: str | None) -> bool:
        expiry = self._expiry.get(sid or "")
        return expiry is not None and expiry > self._clock()

    def drop(self, sid: str | None) -> None:
        self._expiry.pop(sid or "", None)


def _session_id(headers: Headers) -> str | None:
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed cookie header is no session
        return None
    morsel = cookie.get(COOKIE)
    return morsel.value if morsel is not None else None


def ui_authorized(scope: Scope) -> bool:
    """For the API's key check: True for the page's public paths, and for its other ``/ui/``
    routes when the request carries a live session cookie. Anything else is left to the key."""
    path = scope["path"]
    if path in PUBLIC:
        return True
    if not path.startswith("/ui/"):
        return False
    sessions = getattr(scope["app"].state, "ui_sessions", None)
    return sessions is not None and sessions.valid(_session_id(Headers(scope=scope)))


# ----------------------------------------------------------------------------- the page
@router.get("", include_in_schema=False)
@router.get("/", include_in_schema=False)
async def page() -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def static(name: Literal["app.js", "app.css"]) -> Response:
    return FileResponse(STATIC_DIR / name, media_type=mimetypes.guess_type(name)[0], headers=SECURITY_HEADERS)


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(..., min_length=1, max_length=4096)


def _key_required(request: Request) -> bool:
    return request.app.state.api_key_check is not None


@router.get("/session")
async def session_state(request: Request) -> dict[str, Any]:
    """Whether this browser is logged in (no key configured: always)."""
    sessions: Sessions = request.app.state.ui_sessions
    required = _key_required(request)
    return {"authenticated": not required or sessions.valid(request.cookies.get(COOKIE)), "key_required": required}


@router.post("/session")
async def login(request: Request, body: Login) -> JSONResponse:
    """Check ``key`` like the ``Authorization`` header; on success set the session cookie."""
    check = request.app.state.api_key_check
    if check is not None:
        # Wrong keys typed here count like wrong Authorization headers (bridge/api_auth.py).
        limit, client = request.app.state.login_limit, client_address(request.scope)
        wait = limit.wait_s(client)
        if wait > 0:
            raise ApiError(429, "too many wrong API keys from this address; retry later", type="rate_limited",
                           headers={"Retry-After": retry_after(wait)})
        if not check(body.key):
            limit.take(client)
            raise ApiError(401, "invalid API key", type="authentication_error", param="key")
    response = JSONResponse({"authenticated": True}, headers={"Cache-Control": "no-store"})
    response.set_cookie(COOKIE, request.app.state.ui_sessions.new(), max_age=SESSION_TTL_S, path="/ui",
                        httponly=True, samesite="strict", secure=_https(request))
    return response


def _https(request: Request) -> bool:
    """Whether the browser reached us over HTTPS: directly, or through a proxy that says so
    (RunPod's; trusting the header can only make the cookie stricter)."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


@router.delete("/session")
async def logout(request: Request) -> JSONResponse:
    request.app.state.ui_sessions.drop(request.cookies.get(COOKIE))
    response = JSONResponse({"authenticated": False})
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


# ----------------------------------------------------------------------------- the snapshot
async def _oldest_wait(queue: Any, raw: bytes | None, now: float) -> float | None:
    """Seconds the next job of a queue has waited: from its ``queued`` record, if it has one."""
    job_id = peek_id(raw) if raw else None
    state = await queue.get_state(job_id) if job_id else None
    if not state or state.get("status") != "queued" or not isinstance(state.get("updated_at"), (int, float)):
        return None
    return round(max(0.0, now - state["updated_at"]), 1)


def _queued_entry(raw: bytes, queue_name: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    return {"id": peek_id(raw), "type": str(data.get("type", "?"))[:40], "queue": queue_name,
            "prompt": str(data.get("prompt", ""))[:80]}


async def _queues(runtime: ApiRuntime, now: float) -> list[dict[str, Any]]:
    queue = runtime.queue
    depths = await queue.queue_depths()
    answer = []
    for name in QUEUES:
        waiting = await queue.peek_waiting(name, QUEUED_SHOWN)
        answer.append({"name": name, "depth": depths.get(name, 0),
                       "oldest_wait_s": await _oldest_wait(queue, waiting[0] if waiting else None, now),
                       "jobs": [_queued_entry(raw, name) for raw in waiting]})
    return answer


def _stage(stage: str, model: str, residency: Any) -> str:
    """The stage shown: a job holding the GPU whose model is not resident yet is loading it."""
    if stage in ("generating", "enhancing"):
        needs = "qwen_base" if stage == "enhancing" else model
        if needs in residency.table.specs and residency.state(needs) != "ready":
            return "loading model"
    return stage


async def _running(runtime: ApiRuntime, now: float) -> list[dict[str, Any]]:
    answer = []
    for job in list(runtime.activity.running.values()):
        state = await runtime.queue.get_state(job.job_id) or {}
        answer.append({"id": job.job_id, "type": job.job_type, "model": job.model, "queue": job.queue,
                       "stage": _stage(job.stage, job.model, runtime.residency),
                       "progress": state.get("progress") or 0, "status": state.get("status"),
                       "cancel_requested": bool(state.get("cancel_requested")),
                       "running_s": round(max(0.0, now - job.started), 1)})
    return answer


def _thumbnail(runtime: ApiRuntime, assets: Any) -> str | None:
    """A URL the page can show for the job's first thumbnail. Local mode: the file under
    ``OUTPUT_DIR``, through ``/ui/files/``. Supabase mode: None here; :func:`_sign` makes a
    short-lived signed URL of the stored path (``_stored_thumbnail``)."""
    thumb = _stored_thumbnail(assets)
    if thumb is None:
        return None
    if runtime.settings.local_mode:
        return f"/ui/files/{thumb}"
    return thumb if thumb.startswith("https://") else None


def _stored_thumbnail(assets: Any) -> str | None:
    """The first asset's thumbnail path as the job recorded it (its bucket path in Supabase mode)."""
    if not isinstance(assets, list) or not assets or not isinstance(assets[0], dict):
        return None
    thumb = assets[0].get("thumbnail_url") or assets[0].get("url")
    return thumb if isinstance(thumb, str) and thumb else None


async def _sign(runtime: ApiRuntime, record: dict[str, Any]) -> None:
    """Supabase mode: point ``record["thumbnail"]`` at a signed URL of the stored thumbnail (the
    bucket is private), made again a minute before it expires; a failure leaves no picture and is
    tried again in 30 s."""
    path = record.get("stored_thumbnail")
    supabase = getattr(getattr(runtime, "worker", None), "supabase", None)
    if not path or supabase is None or time.monotonic() < record.get("signed_until", 0.0):
        return
    try:
        record["thumbnail"] = await supabase.signed_url(runtime.settings.storage_bucket, path, SIGNED_THUMBNAIL_S)
        record["signed_until"] = time.monotonic() + SIGNED_THUMBNAIL_S - 60
    except Exception as exc:  # noqa: BLE001 - the page shows the job without its picture
        log.warning("operator page: no signed URL for %s (%s)", path, type(exc).__name__)
        record["signed_until"] = time.monotonic() + 30


async def _finished(runtime: ApiRuntime, cache: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    answer = []
    for job in list(runtime.activity.finished)[:FINISHED_SHOWN]:
        record = cache.get(job["id"])
        if record is None:
            state = await runtime.queue.get_state(job["id"]) or {}
            metadata = state.get("metadata") if isinstance(state.get("metadata"), dict) else {}
            record = {"status": state.get("status") or "unknown", "error": state.get("error"),
                      "generation_s": metadata.get("generation_time"),
                      "thumbnail": _thumbnail(runtime, state.get("assets")),
                      "assets": len(state.get("assets") or [])}
            if not runtime.settings.local_mode:
                record["stored_thumbnail"] = _stored_thumbnail(state.get("assets"))
            if record["status"] in TERMINAL:
                cache[job["id"]] = record  # a terminal record does not change
        await _sign(runtime, record)
        answer.append({**job, **{k: v for k, v in record.items() if k not in ("stored_thumbnail", "signed_until")}})
    return answer


def _gpu(runtime: ApiRuntime) -> dict[str, Any]:
    report = runtime.residency.report()
    worker = getattr(runtime, "worker", None)
    granted = worker.dispatcher.running() if worker is not None and runtime.with_jobs else ()
    return {
        "budget_gb": report.budget_gb,
        "accounted_gb": round(report.accounted_gb, 2),
        "gpu_total_gb": report.gpu_total_gb,
        "gpu_used_gb": report.gpu_used_gb,
        "models": [{"name": m.name, "state": m.state, "policy": m.policy, "vram_gb": m.vram_gb,
                    "measured_gb": m.measured_gb, "in_flight": m.in_flight, "loads": m.loads, "unloads": m.unloads,
                    "last_error": public_failure(m.last_error)} for m in report.models.values()],
        "lanes": runtime.settings.gpu_lanes,
        "lanes_in_use": sum(1 for r in granted if not r.interactive),
        "interactive_in_use": sum(1 for r in granted if r.interactive),
        "waiting_for_gpu": len(worker.dispatcher.waiting()) if worker is not None and runtime.with_jobs else 0,
        "operations": [{**op, "error": public_failure(op["error"])} for op in runtime.activity.model_ops],
    }


async def snapshot(runtime: ApiRuntime, cache: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything the page shows, in one JSON-ready dict. Redis being away leaves its parts
    ``null`` (with ``redis: "unreachable"``) rather than failing the stream."""
    now = time.time()
    cache = {} if cache is None else cache
    queues, running, finished, dead = await asyncio.gather(
        probe(_queues(runtime, now)), probe(_running(runtime, now)), probe(_finished(runtime, cache)),
        probe(_dead_letters(runtime, DEAD_LETTERS_SHOWN)),
    )
    return {
        "worker_id": runtime.settings.worker_id,
        "mode": "local" if runtime.settings.local_mode else "supabase",
        "redis": "ok" if queues is not None else "unreachable",
        "queues": queues,
        "running": running,
        "finished": finished,
        "gpu": _gpu(runtime),
        "dead_letters": None if dead is None else [
            {"job_id": e["job_id"], "queue": e["queue"], "reason": e["reason"], "time": e["time"]}
            for e in dead["entries"]],
        "chat": runtime.activity.chat_stats(),
        "job_types": sorted(JOB_TYPES),
    }


@router.get("/events", response_model=None)
async def events(request: Request) -> EventStream:
    """The page's one event stream: a ``snapshot`` event whenever what it shows changed."""
    return EventStream(_snapshots(runtime_of(request)))


async def _snapshots(runtime: ApiRuntime) -> AsyncIterator[str]:
    cache: dict[str, dict[str, Any]] = {}
    changed = runtime.activity.changed
    last, last_sent = None, time.monotonic()
    # Ends when the server shuts down: uvicorn waits for open responses, and the page never closes this one.
    while not getattr(runtime.api_server, "should_exit", False):
        current = await snapshot(runtime, cache)
        text = json.dumps(current, separators=(",", ":"), default=str)
        if text != last:
            last, last_sent = text, time.monotonic()
            yield sse(text, event="snapshot")
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        try:
            await asyncio.wait_for(changed.wait(), TICK_S)
        except TimeoutError:
            pass
        changed.clear()


# ----------------------------------------------------------------------------- actions
class TestJob(BaseModel):
    """A test job from the page: the job type, a prompt, and optionally its size."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(..., min_length=1, max_length=64)
    prompt: str = Field(..., min_length=1, max_length=2000)
    width: WholeNumber | None = Field(None, ge=16, le=2048)
    height: WholeNumber | None = Field(None, ge=16, le=2048)
    steps: WholeNumber | None = Field(None, ge=1, le=100)
    frames: WholeNumber | None = Field(None, ge=1, le=241)


@router.post("/jobs", status_code=202)
async def submit(request: Request, body: TestJob) -> dict[str, Any]:
    """Queue a test job through ``POST /jobs``'s validation (``user_id`` ``operator``)."""
    config: dict[str, Any] = {}
    for name, key in (("width", "width"), ("height", "height"), ("steps", "num_inference_steps"),
                      ("frames", "frame_num")):
        if getattr(body, name) is not None:
            config[key] = getattr(body, name)
    payload = {"id": uuid.uuid4().hex, "type": body.type, "prompt": body.prompt, "user_id": "operator",
               "config": config, "metadata": {"source": "operator-page"}}
    return await queue_job(runtime_of(request), json.dumps(payload).encode())


@router.post("/jobs/{job_id}/cancel", status_code=202)
async def cancel(request: Request, job_id: str) -> dict[str, Any]:
    """``POST /jobs/{id}/cancel`` for the page."""
    if not job_id or len(job_id) > 128 or not all(c.isalnum() or c in "_-" for c in job_id):
        raise ApiError(422, "job id: letters, digits, '_' and '-' only (1-128)", param="id")
    return await cancel_job(request, job_id)


@router.post("/memory/{action}")
async def memory(request: Request, action: Literal["load", "unload"],
                 which: Literal["sdxl", "wan", "instruct", "base", "all"]) -> dict[str, Any]:
    """``POST /memory/load`` or ``/memory/unload`` for the page (the same guarded paths)."""
    from bridge.api import memory_load, memory_unload  # noqa: PLC0415 - bridge.api includes this router

    return await (memory_load if action == "load" else memory_unload)(request, which, wait=False)


@router.get("/files/{path:path}", include_in_schema=False)
async def output_file(request: Request, path: str) -> Response:
    """A result file under ``OUTPUT_DIR`` (local mode), for the thumbnails."""
    settings = runtime_of(request).settings
    if not settings.local_mode:
        raise ApiError(404, "results are in Supabase Storage, not on this machine", type="not_found")
    root = settings.output_dir.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or target.name.startswith(".") or any(
            part.startswith(".") for part in target.relative_to(root).parts) or not target.is_file():
        raise ApiError(404, "no such result file", type="not_found")
    return FileResponse(target, headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})
