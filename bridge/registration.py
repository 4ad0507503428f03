"""Tell the application where this worker's API is, as the old workers did at start-up.

When ``SUPABASE_URL`` is configured and a public URL can be built (``PUBLIC_URL``, else RunPod's
proxy ``https://{RUNPOD_POD_ID}-{API_PORT}.proxy.runpod.net``), POST it to the edge functions
``update-worker-url`` (the image/video worker URL) and ``register-chat-worker`` (the chat API; ours
is the same API), with ``Authorization: Bearer <service key>``. Each call is retried with
exponential backoff on network errors, 5xx and 429, and on ``update-worker-url``'s 400: that
function answers 400 when its own ``GET /health`` of our URL fails, which happens while the
worker or the proxy in front of it is still starting (``docs/DEPLOY.md``, "Connecting to the app").
Nothing here ever raises: a failure is logged and the worker carries on (jobs still flow through
Redis; only the HTTP chat routing needs it).

The bodies keep the old workers' fields (``worker_url``, ``auto_registered``,
``registration_method``, ``detection_method``, ``worker_type``, ``capabilities``, ``timestamp``;
found in the old system's worker documentation, not in docs/APP_CONTRACT.md) plus ``worker_id``.

Usage (does not block start-up)::

    asyncio.create_task(registration.register_worker(settings))
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import httpx

from bridge.settings import Settings

log = logging.getLogger(__name__)

FUNCTIONS = ("update-worker-url", "register-chat-worker")
REGISTRATION_METHOD = "gpu_worker_self_registration"
_RETRY_STATUSES = frozenset({408, 425, 429})
#: Per function, further statuses worth retrying (see the module doc).
_RETRY_STATUSES_OF = {"update-worker-url": frozenset({400})}


def public_worker_url(settings: Settings) -> tuple[str, str] | None:
    """``(url, how it was found)`` for this worker's public API, or None when there is none."""
    if settings.public_url:
        return settings.public_url.rstrip("/"), "PUBLIC_URL"
    if settings.runpod_pod_id:
        return f"https://{settings.runpod_pod_id}-{settings.api_port}.proxy.runpod.net", "RUNPOD_POD_ID"
    return None


def registration_bodies(settings: Settings, worker_url: str, detection: str) -> dict[str, dict[str, Any]]:
    """The JSON body sent to each edge function."""
    common = {
        "worker_url": worker_url,
        "worker_id": settings.worker_id,
        "auto_registered": True,
        "registration_method": REGISTRATION_METHOD,
        "detection_method": detection,
        "timestamp": datetime.now(timezone.utc).isoformat(),
    }
    return {
        "update-worker-url": {**common, "worker_type": "gpu_worker"},
        "register-chat-worker": {
            **common,
            "worker_type": "pure_inference_engine",  # what the old chat worker registered as
            "capabilities": {"hardcoded_prompts": False, "prompt_modification": False, "pure_inference": True},
        },
    }


async def register_worker(
    settings: Settings,
    *,
    attempts: int = 8,
    base_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    timeout_s: float = 15.0,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> dict[str, bool]:
    """Register with every edge function in :data:`FUNCTIONS`; return ``{function: succeeded}``
    (empty when registration does not apply). Never raises."""
    try:
        if not settings.register_worker or settings.supabase_url is None or settings.supabase_service_key is None:
            log.info("worker registration skipped (no SUPABASE_URL or REGISTER_WORKER=0)")
            return {}
        found = public_worker_url(settings)
        if found is None:
            log.info("worker registration skipped: set PUBLIC_URL (or run on RunPod, which sets RUNPOD_POD_ID)")
            return {}
        worker_url, detection = found
        bodies = registration_bodies(settings, worker_url, detection)
        headers = {"Authorization": f"Bearer {settings.supabase_service_key.get_secret_value()}"}
        results: dict[str, bool] = {}
        async with httpx.AsyncClient(timeout=timeout_s, headers=headers) as client:
            for function in FUNCTIONS:
                url = f"{settings.supabase_url}/functions/v1/{function}"
                results[function] = await _post_with_retries(
                    client, url, bodies[function], function, attempts, base_delay_s, max_delay_s, sleep
                )
        if all(results.values()):
            log.info("worker registered as %s", worker_url, extra={"worker_url": worker_url, "stage": "registration"})
        return results
    except Exception:  # noqa: BLE001 - registration is never fatal
        log.exception("worker registration failed unexpectedly")
        return {function: False for function in FUNCTIONS}


async def _post_with_retries(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    function: str,
    attempts: int,
    base_delay_s: float,
    max_delay_s: float,
    sleep: Callable[[float], Awaitable[Any]],
) -> bool:
    for attempt in range(1, max(1, attempts) + 1):
        retryable, problem = await _post_once(client, url, body, _RETRY_STATUSES_OF.get(function, frozenset()))
        if problem is None:
            return True
        extra = {"stage": "registration", "function": function, "attempt": attempt}
        if not retryable or attempt >= attempts:
            log.warning("registration with %s failed (attempt %d/%d): %s; giving up",
                        function, attempt, attempts, problem, extra=extra)
            return False
        delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
        log.info("registration with %s failed (attempt %d/%d): %s; retrying in %.1fs",
                 function, attempt, attempts, problem, delay, extra=extra)
        await sleep(delay)
    return False


async def _post_once(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], retry_statuses: frozenset[int] = frozenset()
) -> tuple[bool, str | None]:
    """One POST: ``(retryable, problem)``; ``problem`` is None on success."""
    try:
        response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        return True, f"{type(exc).__name__}: {exc}"
    code = response.status_code
    if code >= 500 or code in _RETRY_STATUSES or code in retry_statuses:
        return True, f"HTTP {code}: {response.text[:200]}" if code in retry_statuses else f"HTTP {code}"
    if code >= 300:
        return False, f"HTTP {code}: {response.text[:200]}"
    try:
        answer = response.json()
    except ValueError:
        return False, None  # 2xx without JSON: accepted
    if isinstance(answer, dict) and answer.get("success") is False:
        return True, f"function answered success=false: {answer.get('error', 'no error given')}"
    return False, None
