"""Limits on what one HTTP request may make the API do (``docs/API.md``, "Limits").

- :class:`BodyLimit` (ASGI middleware): a request body over ``MAX_REQUEST_BYTES`` is refused with
  a 413 while it is read (a ``Content-Length`` over the limit before reading anything; a chunked
  body as soon as the bytes counted pass it), so a 50 MB body is never buffered. A body nested
  deeper than :data:`MAX_JSON_DEPTH` is refused (400 on the old contract's routes, 422 elsewhere)
  before any JSON parser sees it: Python's ``json`` raises ``RecursionError`` on deep nesting,
  which FastAPI does not turn into a client error.
- :class:`StreamSlots`: event streams open at once (each blocks on one connection of the queue's
  bounded event pool, :class:`bridge.queue.Queue`); one more is a 503 with ``Retry-After``.

The middleware reads the whole body (at most the limit) before the route runs: every route takes
JSON, none streams its upload, and a route cannot answer a 413 once it has started on a body.
Starlette has no body limit of its own; this is the small piece it lacks.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.api_common import ApiError, error_response, is_legacy
from bridge.limits import MAX_JSON_DEPTH, json_depth

#: Seconds a client is told to wait for an event stream slot.
STREAM_RETRY_AFTER_S = 5
_SCAN_INLINE_BYTES = 64 * 1024


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BodyLimit:
    """ASGI middleware: bodies up to ``max_bytes`` and :data:`MAX_JSON_DEPTH` levels pass, read
    whole, to the app; others are answered here (413, or 400/422 for the nesting)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        if scope["type"] != "http" or ("content-length" not in headers and "transfer-encoding" not in headers):
            await self.app(scope, receive, send)  # no body (a GET, a POST without one)
            return
        try:
            body = await self._read(headers, receive)
        except _Refused as refused:
            request = Request(scope)
            status = refused.status if refused.status == 413 or not is_legacy(request) else 400
            response = error_response(request, status, refused.message, type="invalid_request_error", param="body")
            await response(scope, receive, send)
            return
        if body is None:
            return  # the client went away before sending its body: nobody to answer
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, headers: Headers, receive: Receive) -> bytes | None:
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise _Refused(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
            if int(declared) > self.max_bytes:
                raise _Refused(413, self._too_large(f"{int(declared)} bytes"))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _Refused(413, self._too_large(f"more than {self.max_bytes} bytes"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # A scan of up to MAX_REQUEST_BYTES: in a thread when large, so it never stalls the loop.
        depth = await asyncio.to_thread(json_depth, body) if len(body) > _SCAN_INLINE_BYTES else json_depth(body)
        if depth > MAX_JSON_DEPTH:
            raise _Refused(422, f"body: JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
        return body

    def _too_large(self, size: str) -> str:
        return (f"request body too large: {size}; at most {self.max_bytes} bytes are accepted "
                "(MAX_REQUEST_BYTES)")


class StreamSlots:
    """Counts the event streams open now; :meth:`take` refuses one past ``limit`` with a 503."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> None:
        if self.open >= self.limit:
            raise ApiError(503, f"too many event streams open ({self.limit}); retry later or poll GET /jobs/{{id}}",
                           type="too_many_streams", headers={"Retry-After": str(STREAM_RETRY_AFTER_S)})
        self.open += 1

    def give_back(self) -> None:
        self.open = max(0, self.open - 1)
