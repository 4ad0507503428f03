"""What the HTTP API modules share: the error type, the two error shapes, the runtime accessor.

Two error shapes (see ``docs/API.md``):

- the old contract's routes (:data:`LEGACY_PATHS`, docs/APP_CONTRACT.md §5) answer
  ``{"success": false, "error": "<message>"}``; their bad input is a 400;
- every other route answers ``{"error": {"message", "type", "param"}}`` (the shape OpenAI clients
  read); bad input there is a 422 naming the field in ``param`` and ``fields``.

No error body ever carries a stack trace, an environment value or a key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Send

from bridge.api_types import ApiRuntime
from bridge.prompt_data import PACKAGED_DATA_DIR, PromptData

#: Routes of the old HTTP API whose request and response shapes the edge functions rely on.
LEGACY_PATHS = frozenset({
    "/chat", "/generate", "/enhance", "/health", "/worker/info", "/memory/status", "/memory/load", "/memory/unload",
})
#: Seconds a client is told to wait (``Retry-After``) when a model cannot be made resident now.
RETRY_AFTER_S = 30
#: Health and info probes of Triton and Redis give up after this long.
PROBE_TIMEOUT_S = 2.0


class ApiError(Exception):
    """An error answer: HTTP ``status``, a message a person can act on, and the field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        fields: Sequence[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.fields = fields
        self.headers = headers


def public_failure(detail: str | None) -> str | None:
    """What a client is told of an internal failure (``detail``: an exception's text, which may
    hold file paths): that it happened, not its text; the worker's log has that."""
    return None if not detail else "failed; the worker's log has the details"


def public_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A residency report (:meth:`bridge.residency.ResidencyManager.snapshot`) for an answer: each
    model's ``last_error`` (the server's words) as :func:`public_failure` says it."""
    models = {name: {**model, "last_error": public_failure(model.get("last_error"))}
              for name, model in snapshot.get("models", {}).items()}
    return {**snapshot, "models": models}


def under_models_dir(value: Any, models_dir: Path) -> Any:
    """``value`` (text, or lists and dicts of it) with ``MODELS_DIR``'s path written as
    ``MODELS_DIR``: an answer says where weights belong on the volume, not where the volume is."""
    if isinstance(value, str):
        for root in {str(models_dir.resolve()), str(models_dir)}:
            value = value.replace(root, "MODELS_DIR")
        return value
    if isinstance(value, dict):
        return {key: under_models_dir(item, models_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [under_models_dir(item, models_dir) for item in value]
    return value


def data_source(data: PromptData) -> str:
    """Which copy of the data files is in use, ``packaged`` or ``DATA_DIR``; never where (no
    file paths in answers)."""
    return "packaged" if Path(data.source).resolve() == PACKAGED_DATA_DIR.resolve() else "DATA_DIR"


def unavailable(message: str) -> ApiError:
    """503 with ``Retry-After``: a model is not resident and cannot be made resident now."""
    return ApiError(503, message, type="model_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def is_legacy(request: Request) -> bool:
    """Whether ``request`` is for a route of the old contract (its error shape differs)."""
    return request.url.path in LEGACY_PATHS


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",  # noqa: A002
    param: str | None = None,
    fields: Sequence[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error body in the shape of the route ``request`` is for."""
    if is_legacy(request):
        body: dict[str, Any] = {"success": False, "error": message}
    else:
        error: dict[str, Any] = {"message": message, "type": type, "param": param}
        if fields:
            error["fields"] = list(fields)
        body = {"error": error}
    return JSONResponse(body, status_code=status, headers=headers)


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "role")`` → ``"messages.0.role"`` (the request part dropped)."""
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


async def probe(awaitable: Any) -> Any:
    """The awaitable's result, or ``None`` if it failed or took over :data:`PROBE_TIMEOUT_S`
    (Redis calls retry while Redis is away: a status answer must not wait for that)."""
    try:
        return await asyncio.wait_for(awaitable, PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a probe reports, it does not raise
        return None


def runtime_of(request: Request) -> ApiRuntime:
    """The :class:`bridge.runtime.Runtime` the app was created for."""
    return request.app.state.runtime


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response whose iterator is always closed, and whose ``on_close``
    always runs, when the response ends: normally, on an error, or on a client disconnect (a
    disconnect cancels the stream; closing the iterator there cancels the Triton request)."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str], *, on_close: Callable[[], Awaitable[Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def stream_response(self, send: Send) -> None:
        try:
            async with aclosing(self.body_iterator):  # type: ignore[type-var]
                await super().stream_response(send)
        finally:
            if self._on_close is not None:
                await self._on_close()


def sse(data: Any, *, event: str | None = None, event_id: str | None = None) -> str:
    """One server-sent event: optional ``id:`` and ``event:`` lines, then ``data:`` (JSON unless
    ``data`` is already a string, e.g. ``[DONE]``)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), default=str)
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return "\n".join(lines) + "\n\n"
