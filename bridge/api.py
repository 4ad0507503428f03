"""The HTTP API that ``python -m bridge serve`` serves (FastAPI; ``API_HOST``:``API_PORT``).

:func:`create_app` builds it for a :class:`bridge.runtime.Runtime`. Routes (``docs/API.md``):

- old contract (CONTRACT §5): ``POST /chat``, ``/generate``, ``/enhance`` (:mod:`bridge.api_chat`),
  ``GET /health``, ``/worker/info``, ``/memory/status``, ``POST /memory/load?which=``,
  ``/memory/unload?which=`` (here);
- OpenAI-compatible: ``POST /v1/chat/completions``, ``GET /v1/models`` (:mod:`bridge.api_chat`);
- jobs: ``POST /jobs``, ``GET /jobs/{id}``, ``GET /jobs/{id}/events``, ``POST /jobs/{id}/cancel``
  (:mod:`bridge.api_jobs`);
- ``GET /metrics``: Prometheus text (:mod:`bridge.metrics`);
- the rest of the old API: ``POST /chat/unrestricted``, ``/enhance/legacy``, ``GET /enhancement/info``,
  ``/chat/health``, ``/model/info``, ``/status``, ``/memory/report`` (:mod:`bridge.api_legacy`),
  ``POST /admin``, ``/emergency/operation``, ``GET /debug/env`` (secrets redacted; :mod:`bridge.api_admin`);
- scene detection: ``POST /scene/detect``, ``/scene/generate`` (:mod:`bridge.api_scene`).

Every path but ``/health`` requires ``Authorization: Bearer <WORKER_API_KEY>`` (compared in
constant time; 401 otherwise). Without a key the API only starts bound to a loopback address, and
then lets every request in (local development, logged as a warning). There are no docs routes, and
no answer carries an environment value, a key, a token or a stack trace.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import time
from importlib import metadata as package_metadata
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge import metrics
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
)
from bridge.api_jobs import router as jobs_router
from bridge.api_legacy import router as legacy_ops_router
from bridge.api_limits import BodyLimit, StreamSlots
from bridge.api_scene import router as scene_router
from bridge.jobs import JOB_TYPES, QUEUES
from bridge.residency import ResidencyError

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health"})
#: ``which=`` of the memory routes → the models it means.
WHICH: dict[str, tuple[str, ...]] = {
    "sdxl": ("sdxl",),
    "wan": ("wan",),
    "instruct": ("qwen_instruct",),
    "base": ("qwen_base",),
    "all": ("sdxl", "qwen_instruct", "qwen_base", "wan"),
}
Which = Literal["sdxl", "wan", "instruct", "base", "all"]


class ApiConfigError(RuntimeError):
    """The API must not start as configured (bound beyond localhost without a key)."""


def _version() -> str:
    try:
        return package_metadata.version("gpu-worker")
    except package_metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


# ----------------------------------------------------------------------------- authentication
def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the API on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class BearerAuth:
    """ASGI middleware: every HTTP path but :data:`PUBLIC_PATHS` needs ``Authorization: Bearer
    <key>``. The key is compared by digest with :func:`hmac.compare_digest` (constant time, and
    its length does not leak). ``key=None`` lets everything in (loopback-only local development)."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self._digest = None if key is None else _digest(key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._digest is None or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._authorized(Headers(scope=scope).get("authorization", "")):
            response = error_response(
                Request(scope), 401, "missing or invalid API key: send 'Authorization: Bearer <WORKER_API_KEY>'",
                type="authentication_error", headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        matches = hmac.compare_digest(_digest(token.strip()), self._digest)  # type: ignore[arg-type]
        return matches and scheme.lower() == "bearer"


def _api_key(settings: Any) -> str | None:
    """The key to require; refuses a non-loopback bind without one."""
    key = settings.worker_api_key.get_secret_value() if settings.worker_api_key is not None else None
    if key:
        return key
    if not is_loopback(settings.api_host):
        raise ApiConfigError(
            f"API_HOST={settings.api_host} exposes the API beyond this machine, but WORKER_API_KEY is not set: "
            "set WORKER_API_KEY (or bind API_HOST=127.0.0.1 for local development)"
        )
    log.warning("WORKER_API_KEY is not set: the API on %s accepts requests without a key (local development only)",
                settings.api_host)
    return None


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


def _model_states(runtime: Any) -> dict[str, str]:
    return {name: model.state for name, model in runtime.residency.report().models.items()}


def _resident(states: dict[str, str]) -> list[str]:
    return sorted(name for name, state in states.items() if state == "ready")


@ops_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness for load balancers (no key needed): 200 when Triton and Redis answer, else 503.
    ``model_loaded``: some model is resident; ``chat_model_loaded``: Qwen Instruct is."""
    runtime = runtime_of(request)
    triton_live = bool(await probe(runtime.triton.is_live()))
    redis_ok = await probe(runtime.queue.queue_depths()) is not None
    states = _model_states(runtime)
    resident = _resident(states)
    healthy = triton_live and redis_ok
    body = {
        "status": "ok" if healthy else "degraded",
        "model_loaded": bool(resident),
        "chat_model_loaded": "qwen_instruct" in resident,
        "models_loaded": resident,
        "models": states,
        "triton": "live" if triton_live else "unreachable",
        "redis": "ok" if redis_ok else "unreachable",
        "uptime": round(time.monotonic() - request.app.state.started, 1),
        "version": VERSION,
    }
    return JSONResponse(body, status_code=200 if healthy else 503)


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


def _memory(runtime: Any) -> dict[str, Any]:
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
    return {"success": True, **_memory(runtime_of(request))}


@ops_router.post("/memory/load")
async def memory_load(request: Request, which: Which = Query(...)) -> dict[str, Any]:
    """Load the model(s) ``which`` names, evicting others per policy; 503 when that cannot be done."""
    runtime = runtime_of(request)
    names = WHICH[which]
    try:
        await runtime.residency.ensure(names, retry_failed=True)
    except ResidencyError as exc:
        raise unavailable(str(exc)) from None
    return {"success": True, "which": which, "models": list(names), "message": f"loaded {', '.join(names)}",
            "memory": _memory(runtime)}


@ops_router.post("/memory/unload")
async def memory_unload(request: Request, which: Which = Query(...)) -> dict[str, Any]:
    """Unload the model(s) ``which`` names once their requests in flight end."""
    runtime = runtime_of(request)
    unloaded = []
    for name in WHICH[which]:
        try:
            if await runtime.residency.unload(name):
                unloaded.append(name)
        except ResidencyError as exc:
            raise unavailable(str(exc)) from None
    message = f"unloaded {', '.join(unloaded)}" if unloaded else "nothing to unload"
    return {"success": True, "which": which, "models": list(WHICH[which]), "unloaded": unloaded,
            "message": message, "memory": _memory(runtime)}


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
def create_app(runtime: Any) -> FastAPI:
    """The API for ``runtime``; :class:`ApiConfigError` when it is bound beyond localhost
    without ``WORKER_API_KEY``."""
    key = _api_key(runtime.settings)
    app = FastAPI(title="gpu-worker", version=VERSION, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    app.state.started = time.monotonic()
    app.state.event_slots = StreamSlots(runtime.settings.event_streams_max)
    # Added first, so it runs inside the key check: an unauthenticated body is never read.
    app.add_middleware(BodyLimit, max_bytes=runtime.settings.max_request_bytes)
    app.add_middleware(BearerAuth, key=key)
    _install_error_handlers(app)
    for router in (ops_router, legacy_router, openai_router, jobs_router, legacy_ops_router, scene_router):
        app.include_router(router)
    return app
