"""The HTTP API that ``python -m bridge serve`` serves (FastAPI; ``API_HOST``:``API_PORT``).

:func:`create_app` builds it for a :class:`bridge.runtime.Runtime`. Routes (``docs/API.md``):

- old contract (docs/APP_CONTRACT.md §5): ``POST /chat``, ``/generate``, ``/enhance`` (:mod:`bridge.api_chat`),
  ``GET /health``, ``/worker/info``, ``/memory/status``, ``POST /memory/load?which=``,
  ``/memory/unload?which=``, and the readiness route ``GET /ready`` (here);
- OpenAI-compatible: ``POST /v1/chat/completions``, ``GET /v1/models`` (:mod:`bridge.api_chat`);
- jobs: ``POST /jobs``, ``GET /jobs/{id}``, ``GET /jobs/{id}/events``, ``POST /jobs/{id}/cancel``
  (:mod:`bridge.api_jobs`);
- ``GET /metrics``: Prometheus text (:mod:`bridge.metrics`);
- the rest of the old API: ``POST /chat/unrestricted``, ``/enhance/legacy``, ``GET /enhancement/info``,
  ``/chat/health``, ``/model/info``, ``/status``, ``/memory/report`` (:mod:`bridge.api_legacy`),
  ``POST /admin``, ``/emergency/operation``, ``GET /debug/env`` (secrets redacted; :mod:`bridge.api_admin`);
- scene detection: ``POST /scene/detect``, ``/scene/generate`` (:mod:`bridge.api_scene`);
- the operator's page: ``GET /ui`` and its ``/ui/...`` routes (:mod:`bridge.api_ui`);
- the OpenAPI document and interactive docs: ``GET /openapi.json``, ``/docs``, ``/redoc``
  (``API_DOCS=0`` turns them off; :mod:`bridge.api_docs`).

Every path but ``/health`` and ``/ready`` (and the routes ``API_OPEN_ROUTES`` opens, and the
operator page's own login, page, script and style) requires ``Authorization: Bearer <key>`` with
one of the keys of ``WORKER_API_KEY``; the page's ``/ui/...`` routes also take its session cookie.
The checks, the per-address limits and the key-less development mode are :mod:`bridge.api_auth`'s.
No answer carries an environment value, a key, a token, a stack trace, a file path or the words of
an exception; those go to the log (docs/API.md, "Errors").
"""

from __future__ import annotations

import logging
import time
from importlib import metadata as package_metadata
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge import metrics
from bridge.api_auth import (  # noqa: F401 - ApiConfigError re-exported
    ApiConfigError,
    ApiGuard,
    RateLimiter,
    check_config,
    key_check,
)
from bridge.api_admin import router as admin_router
from bridge.api_chat import legacy_router, openai_router
from bridge.api_common import (
    ApiError,
    error_response,
    field_name,
    is_legacy,
    probe,
    public_failure,
    runtime_of,
    unavailable,
    under_models_dir,
)
from bridge.api_jobs import router as jobs_router
from bridge.api_legacy import router as legacy_ops_router
from bridge.api_docs import docs_urls, install_openapi
from bridge.api_limits import BodyLimit, StreamSlots
from bridge.api_scene import router as scene_router
from bridge.api_types import ApiRuntime
from bridge.api_ui import Sessions, ui_authorized
from bridge.api_ui import router as ui_router
from bridge.jobs import JOB_TYPES, QUEUES
from bridge.memory_ops import QUICK_S

log = logging.getLogger(__name__)

#: ``which=`` of the memory routes → the models it means.
WHICH: dict[str, tuple[str, ...]] = {
    "sdxl": ("sdxl",),
    "wan": ("wan",),
    "instruct": ("qwen_instruct",),
    "base": ("qwen_base",),
    "all": ("sdxl", "qwen_instruct", "qwen_base", "wan"),
}
Which = Literal["sdxl", "wan", "instruct", "base", "all"]


def _version() -> str:
    try:
        return package_metadata.version("gpu-worker")
    except package_metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


# ----------------------------------------------------------------------------- errors
def _install_error_handlers(app: FastAPI) -> None:
    """Every error as JSON in the route's shape (see :mod:`bridge.api_common`); never a traceback."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, type=exc.type, param=exc.param, fields=exc.fields,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"field": field_name(err["loc"]), "message": str(err["msg"]).removeprefix("Value error, ")}
                  for err in exc.errors()]
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
        status = 400 if is_legacy(request) else 422
        return error_response(request, status, message, param=fields[0]["field"] if fields else None, fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), type="http_error",
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal error; the worker's log has the details", type="server_error")


# ----------------------------------------------------------------------------- operations
ops_router = APIRouter()


def _model_states(runtime: ApiRuntime) -> dict[str, str]:
    return {name: model.state for name, model in runtime.residency.report().models.items()}


def _resident(states: dict[str, str]) -> list[str]:
    return sorted(name for name, state in states.items() if state == "ready")


@ops_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness (no key needed; the app's health checks read any non-200 as offline): 200 while
    the worker can still take work, i.e. Triton answers (chat works, and jobs once Redis is back);
    ``status`` is ``ok``, or ``degraded`` with ``problems`` saying what does not work. 503 only
    when Triton does not answer (nothing can run). ``model_loaded``: some model is resident;
    ``chat_model_loaded``: Qwen Instruct is. Load balancers use ``/ready``."""
    runtime = runtime_of(request)
    triton_live = bool(await probe(runtime.triton.is_live()))
    redis_ok = await probe(runtime.queue.queue_depths()) is not None
    states = _model_states(runtime)
    resident = _resident(states)
    problems = []
    if not triton_live:
        problems.append("triton is unreachable: no generation or chat can run")
    if not redis_ok:
        problems.append("redis is unreachable: no job is taken or reported; chat still answers")
    missing = under_models_dir(runtime.availability.report(), runtime.settings.models_dir)
    problems.extend(f"{item['model']} weights are missing: {item['fix']}" for item in missing)
    body = {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "model_loaded": bool(resident),
        "chat_model_loaded": "qwen_instruct" in resident,
        "models_loaded": resident,
        "models": states,
        "triton": "live" if triton_live else "unreachable",
        "redis": "ok" if redis_ok else "unreachable",
        "uptime": round(time.monotonic() - request.app.state.started, 1),
        "version": VERSION,
        "missing_models": missing,  # weights not on the volume (bridge/availability.py)
    }
    return JSONResponse(body, status_code=200 if triton_live else 503)


@ops_router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness for a load balancer (no key needed): 200 when Redis and Triton answer and every
    model the embedded server was told to load at start (``TRITON_STARTUP_MODELS``) has been
    resident; else 503 with ``Retry-After`` and ``waiting_for`` naming what is missing."""
    runtime = runtime_of(request)
    waiting = []
    if not await probe(runtime.triton.is_live()):
        waiting.append("triton")
    if await probe(runtime.queue.queue_depths()) is None:
        waiting.append("redis")
    # The embedded server's start-up models load in the background once the API is up; those
    # whose weights are missing are reported by /health, not waited for.
    startup = ([name for name in runtime.settings.triton_startup_models if name in runtime.availability.present]
               if runtime.triton_server is not None else [])
    seen: set[str] = request.app.state.startup_models_seen
    seen.update(name for name, state in _model_states(runtime).items() if state == "ready")
    waiting.extend(f"model {name}" for name in startup if name not in seen)
    body = {"ready": not waiting, "waiting_for": waiting, "version": VERSION}
    if waiting:
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse(body)


@ops_router.get("/worker/info")
async def worker_info(request: Request) -> dict[str, Any]:
    """Who this worker is and what it serves: id, version, models, queues (no settings values)."""
    runtime = runtime_of(request)
    report = runtime.residency.report()
    depths = await probe(runtime.queue.queue_depths())
    return {
        "success": True,
        "worker_id": runtime.settings.worker_id,
        "version": VERSION,
        "uptime": round(time.monotonic() - request.app.state.started, 1),
        "mode": "local" if runtime.settings.local_mode else "supabase",
        "jobs_enabled": bool(runtime.with_jobs),
        "models": {name: {"state": m.state, "policy": m.policy, "vram_gb": m.vram_gb}
                   for name, m in report.models.items()},
        "chat_models": ["qwen_instruct", "qwen_base"],
        "queues": {name: (depths or {}).get(name) for name in QUEUES},
        "job_types": sorted(JOB_TYPES),
    }


def _memory(runtime: ApiRuntime) -> dict[str, Any]:
    report = runtime.residency.report()
    resident = _resident({name: m.state for name, m in report.models.items()})
    return {
        "unit": "GB",
        "total_vram": report.gpu_total_gb if report.gpu_total_gb is not None else report.budget_gb,
        "allocated_vram": round(report.accounted_gb, 3),
        "available_vram": round(max(0.0, report.budget_gb - report.accounted_gb), 3),
        "model_loaded": bool(resident),
        "models_loaded": resident,
        "budget_gb": report.budget_gb,
        "gpu": {"total_gb": report.gpu_total_gb, "free_gb": report.gpu_free_gb, "used_gb": report.gpu_used_gb},
        "models": {name: {**m.model_dump(), "last_error": public_failure(m.last_error)}
                   for name, m in report.models.items()},
        "loads": report.loads,
        "unloads": report.unloads,
        "load_failures": report.load_failures,
    }


@ops_router.get("/memory/status")
async def memory_status(request: Request) -> dict[str, Any]:
    """VRAM budget and use (GB; table estimates, plus NVML readings on a GPU) and model states."""
    runtime = runtime_of(request)
    return {"success": True, **_memory(runtime), "operations": runtime.memory_ops.recent()}


@ops_router.post("/memory/load")
async def memory_load(request: Request, which: Which = Query(...), wait: bool = Query(False)) -> JSONResponse:
    """Load the model(s) ``which`` names, evicting others per policy, in the background: 202 at
    once (RunPod's proxy cuts requests at 100 s), progress in ``/memory/status``'s ``operations``;
    the result itself when it comes within a moment or with ``wait=true`` (503 when it cannot be
    done). Missing weights are looked for again first: 409 naming what is missing."""
    runtime = runtime_of(request)
    names = WHICH[which]
    await runtime.availability.recheck(names)
    missing = [runtime.availability.missing[n] for n in names if n in runtime.availability.missing]
    if missing:  # the details: /health's missing_models
        fixes = " | ".join(f"{found.model}: {found.fix}" for found in missing)
        raise ApiError(409, under_models_dir(f"weights missing: {fixes}", runtime.settings.models_dir),
                       type="weights_missing", param="which")
    operation = runtime.memory_ops.start("load", which, list(names), runtime.residency.ensure(names, retry_failed=True))
    return await _memory_answer(runtime, operation, wait, f"loaded {', '.join(names)}")


@ops_router.post("/memory/unload")
async def memory_unload(request: Request, which: Which = Query(...), wait: bool = Query(False)) -> JSONResponse:
    """Unload the model(s) ``which`` names once their requests in flight end; answered like
    ``/memory/load`` (202 while it runs)."""
    runtime = runtime_of(request)

    async def unload_each() -> list[str]:
        return [name for name in WHICH[which] if await runtime.residency.unload(name)]

    operation = runtime.memory_ops.start("unload", which, list(WHICH[which]), unload_each())
    return await _memory_answer(runtime, operation, wait, None)


async def _memory_answer(runtime: ApiRuntime, operation: Any, wait: bool, done: str | None) -> JSONResponse:
    body: dict[str, Any] = {"success": True, "which": operation.which, "models": operation.models,
                            "operation": operation.id, "job_id": operation.job_id,
                            "events": f"/jobs/{operation.job_id}/events"}
    if not await runtime.memory_ops.wait(operation, None if wait else QUICK_S):
        body.update(status="running", message=f"{operation.op} started; follow it in GET /memory/status (operations)")
        return JSONResponse(body, status_code=202)
    if operation.state == "failed":
        raise unavailable(operation.error or f"{operation.op} failed")
    if operation.op == "unload":
        unloaded = operation.result
        body.update(unloaded=unloaded, message=f"unloaded {', '.join(unloaded)}" if unloaded else "nothing to unload")
    else:
        body["message"] = done
    body.update(status="done", memory=_memory(runtime))
    return JSONResponse(body)


@ops_router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    """The bridge's Prometheus metrics (queue depths refreshed on each scrape). Behind the key
    like everything else: Prometheus sends it with ``authorization: {credentials: ...}``."""
    runtime = runtime_of(request)
    depths = await probe(runtime.queue.queue_depths())
    for name, depth in (depths or {}).items():
        metrics.set_queue_depth(name, depth)
    for name, model in runtime.residency.report().models.items():
        # Resident VRAM: measured on a GPU, else what the model table accounts to a resident model.
        held = model.measured_gb if model.measured_gb is not None else (model.vram_gb if model.state == "ready" else 0.0)
        metrics.set_model_vram(name, held * 1e9)
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


# ----------------------------------------------------------------------------- the app
def create_app(runtime: ApiRuntime) -> FastAPI:
    """The API for ``runtime``; :class:`ApiConfigError` when its access settings are refused
    (:func:`bridge.api_auth.check_config`: no key beyond localhost, a short key, a route that
    cannot be opened)."""
    access = check_config(runtime.settings)
    for note in access.notes:
        log.warning("%s", note)
    app = FastAPI(title="gpu-worker", version=VERSION, **docs_urls(runtime.settings.api_docs))
    install_openapi(app, access.open_routes)
    app.state.runtime = runtime
    app.state.started = time.monotonic()
    app.state.startup_models_seen = set()  # /ready: start-up models that have been resident once
    app.state.api_key_check = key_check(access)  # the operator's page logs in with it (bridge/api_ui.py)
    app.state.login_limit = RateLimiter(access.failures_per_min)  # wrong keys typed into the page's login
    app.state.ui_sessions = Sessions()
    app.state.event_slots = StreamSlots(runtime.settings.event_streams_max)
    # Added first, so it runs inside the key check: an unauthenticated body is never read.
    app.add_middleware(BodyLimit, max_bytes=runtime.settings.max_request_bytes)
    app.add_middleware(ApiGuard, config=access, also_allowed=ui_authorized)
    _install_error_handlers(app)
    for router in (ops_router, legacy_router, openai_router, jobs_router, legacy_ops_router, admin_router, scene_router,
                   ui_router):
        app.include_router(router)
    return app
