"""The real bridge in-process, for HTTP API tests: a :class:`bridge.runtime.Runtime` over the
session's tritonserver (tiny models) and a test redis-server, with its API on a free port.

Nothing is replaced: the worker loop takes jobs from Redis and runs them on Triton, the API talks
to the same parts ``python -m bridge serve`` wires together. Every secret setting holds a
distinctive value, so a test can scan answers for any of them (:data:`SECRETS`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi.routing import APIRoute

from bridge.runtime import Runtime
from bridge.settings import Settings
from tests.conftest import triton_settings

API_KEY = f"test-key-{uuid.uuid4().hex}"
SERVICE_KEY = f"service-key-{uuid.uuid4().hex}"
CALLBACK_SECRET = f"callback-secret-{uuid.uuid4().hex}"
TRITON_KEY = f"triton-key-{uuid.uuid4().hex}"
SECRETS = (API_KEY, SERVICE_KEY, CALLBACK_SECRET, TRITON_KEY)
MODELS = ("sdxl", "wan", "qwen_instruct", "qwen_base")
TERMINAL = ("completed", "failed", "cancelled")


def stack_settings(models_dir: Path, triton_url: str, redis_url: str, output_dir: Path, **overrides: Any) -> Settings:
    """Settings for an in-process bridge: the given Triton and Redis, local mode (assets under
    ``output_dir``), the API on a free loopback port with :data:`API_KEY`, every model 1 GB of
    a 4 GB budget (all four fit). ``overrides`` win."""
    values: dict[str, Any] = dict(
        triton_url=triton_url,
        redis_url=redis_url,
        output_dir=output_dir,
        api_host="127.0.0.1",
        api_port=0,
        worker_api_key=API_KEY,
        supabase_service_key=SERVICE_KEY,  # unused in local mode; here to be looked for in answers
        job_callback_secret=CALLBACK_SECRET,
        triton_api_key=TRITON_KEY,  # sent as a header; the test server does not restrict its API
        worker_id=f"api-test-{uuid.uuid4().hex[:8]}",
        vram_budget_gb=4.0,
        model_table={name: {"vram_gb": 1.0} for name in MODELS},
        shutdown_grace_s=5.0,
        heartbeat_ttl_s=30.0,
        # The route sweeps of test_api*.py send hundreds of wrong keys from 127.0.0.1; the limit
        # itself is tested with its own value (tests/test_api_access.py).
        api_auth_failures_per_min=100_000,
    )
    values.update(overrides)
    return triton_settings(models_dir, **values)


@asynccontextmanager
async def running(settings: Settings, *, jobs: bool = True) -> AsyncIterator[Runtime]:
    """A started runtime (worker loop unless ``jobs=False``, and the API); stopped on exit."""
    runtime = Runtime(settings, jobs=jobs)
    try:
        await runtime.start()
        yield runtime
    finally:
        await runtime.stop()


class Recorder:
    """Keeps every answer's status, headers and (read) body, to scan them for secrets."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def on_response(self, response: httpx.Response) -> None:
        self.seen.append(f"{response.status_code} {dict(response.headers)}")
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return  # streamed bodies are recorded by whoever reads them (add_text)
        await response.aread()
        self.seen.append(response.text)

    def add_text(self, text: str) -> None:
        self.seen.append(text)

    def leaks(self) -> list[str]:
        """Every recorded text that contains a secret."""
        return [text[:200] for text in self.seen if any(secret in text for secret in SECRETS)]


def api_routes(app: Any) -> list[tuple[str, set[str]]]:
    """(path, methods) of every endpoint, included routers expanded (FastAPI >= 0.137 keeps them
    as tree nodes in ``app.routes``; older versions flattened them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return [(r.path, r.methods) for r in app.routes if isinstance(r, APIRoute)]
    return [(c.path, c.methods) for c in iter_route_contexts(app.routes) if isinstance(c.original_route, APIRoute)]


def client(runtime: Runtime, recorder: Recorder | None = None, key: str | None = API_KEY) -> httpx.AsyncClient:
    """An HTTP client for the runtime's API, sending ``key`` as the bearer key (None: no header)."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    hooks = {"response": [recorder.on_response]} if recorder is not None else {}
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.api_port}", headers=headers,
                             timeout=httpx.Timeout(240.0), event_hooks=hooks)


async def wait_for_state(http: httpx.AsyncClient, job_id: str, done: Any, timeout: float = 240.0) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until ``done(state)`` is true; the state. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        state = response.json()
        if done(state):
            return state
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there in {timeout:.0f}s; last state {state}")


class Event(dict):
    """One server-sent event's fields (``id``, ``event``, ``data``), with when it arrived:
    ``read`` is the index of the network read that completed it, ``at`` the monotonic time."""

    read: int
    at: float

    def json(self) -> Any:
        return json.loads(self["data"])


async def read_sse(response: httpx.Response, recorder: Recorder | None = None) -> list[Event]:
    """The events of a streamed ``text/event-stream`` answer, in order; comments are skipped."""
    events: list[Event] = []
    fields = Event()
    buffer = ""
    reads = 0
    async for text in response.aiter_text():
        reads += 1
        if recorder is not None:
            recorder.add_text(text)
        buffer += text
        *lines, buffer = buffer.split("\n")
        for line in lines:
            line = line.rstrip("\r")
            if not line:
                if fields:
                    fields.read, fields.at = reads, time.monotonic()
                    events.append(fields)
                fields = Event()
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value
    return events


def api_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The newer error shape: ``{"error": {message, type, param}}``; ``param`` checked when given."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in response.text, error
    if param is not None:
        assert error["param"] == param, error
    return error
