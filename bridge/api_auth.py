"""Who may call the HTTP API, and how often (``docs/API.md``, "Authentication").

- Every route but :data:`PUBLIC_PATHS` needs ``Authorization: Bearer <key>``. ``WORKER_API_KEY``
  holds one key or several separated by commas (the app sends one secret from some edge functions
  and another from others: ``docs/DEPLOY.md``, "Connecting to the app"); each is accepted on every
  route. The presented key is compared by SHA-256 digest with :func:`hmac.compare_digest` against
  *every* configured key, without stopping at a match, so neither timing nor length tells which
  key matched or how close a guess was. Keys shorter than :data:`MIN_KEY_CHARS` stop start-up
  unless ``API_ALLOW_SHORT_KEYS=1`` (development; logged as a warning).
- ``API_OPEN_ROUTES`` lists routes served without a key (only those of :data:`OPENABLE_ROUTES`;
  the app's ``enhance-prompt`` calls ``/enhance`` without one). They are logged as a warning at
  start, shown by ``python -m bridge doctor`` and limited per client address
  (``API_OPEN_RATE_PER_MIN``; past it 429 with ``Retry-After``). A request that does present a key
  is checked like on any other route.
- Wrong keys are limited per client address (``API_AUTH_FAILURES_PER_MIN``): past the limit every
  request from that address that presents a key gets 429 with ``Retry-After`` without its key
  being looked at, so guessing cannot go on; a request without any key is not a guess and is not
  counted.
- Without a key (local development, loopback bind only) a request must be addressed to a loopback
  name (``Host``: ``localhost``, ``127.x.x.x``, ``[::1]``: DNS rebinding) and a request that may
  change something (POST, PUT, PATCH, DELETE) must be ``Content-Type: application/json``, which a
  web page cannot send cross-site without a CORS preflight that this API never grants (CSRF).

The client address is the TCP peer, or the ``X-Forwarded-For`` client when the peer is one of
``API_TRUSTED_PROXIES`` (uvicorn's proxy-headers handling rewrites it before this code runs).

The limits are a per-process token bucket (:class:`RateLimiter`), not a library: they are two
in-memory counters keyed by address whose refusal must carry ``Retry-After``; the usual library
(``limits``) brings a storage layer with background expiry timers for what is here one small class
with an injectable clock and a bounded table of addresses.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.api_common import error_response

log = logging.getLogger(__name__)

#: Answer without a key, always: liveness and readiness for load balancers and the app.
PUBLIC_PATHS = frozenset({"/health", "/ready"})
#: What ``API_OPEN_ROUTES`` may open: the chat/inference routes and the read-only model list.
#: Everything that reads the worker's state, changes it or queues work stays behind the key.
OPENABLE_ROUTES = frozenset({"/enhance", "/chat", "/generate", "/v1/chat/completions", "/v1/models"})
#: Shortest key accepted without ``API_ALLOW_SHORT_KEYS``.
MIN_KEY_CHARS = 32
#: Client addresses each limiter remembers at most (the least recently seen go first).
MAX_TRACKED_CLIENTS = 10_000
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class ApiConfigError(RuntimeError):
    """The API must not start as configured (a key missing, too short, or a route that cannot be
    opened); the message says what to change."""


# ----------------------------------------------------------------------------- configuration
def api_keys(settings: Any) -> list[str]:
    """The keys of ``WORKER_API_KEY`` (comma-separated, blanks around them ignored)."""
    raw = settings.worker_api_key.get_secret_value() if settings.worker_api_key is not None else ""
    return [key.strip() for key in raw.split(",") if key.strip()]


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the API on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AuthConfig:
    """The checked access settings: key digests (empty: key-less development), open routes."""

    digests: tuple[bytes, ...]
    open_routes: frozenset[str]
    open_rate_per_min: int
    failures_per_min: int
    notes: tuple[str, ...]  # warnings to log at start (never a key)


def check_config(settings: Any) -> AuthConfig:
    """The API's access settings, checked; :class:`ApiConfigError` saying what to change when the
    API must not start (``serve`` calls it before it starts anything)."""
    keys = api_keys(settings)
    notes: list[str] = []
    if settings.worker_api_key is not None and not keys:
        raise ApiConfigError("WORKER_API_KEY is set but holds no key (only commas or blanks)")
    short = [key for key in keys if len(key) < MIN_KEY_CHARS]
    if short:
        which = f"{len(short)} of the {len(keys)} keys" if len(keys) > 1 else "the key"
        if not settings.api_allow_short_keys:
            raise ApiConfigError(
                f"WORKER_API_KEY: {which} is shorter than {MIN_KEY_CHARS} characters; use random keys of at "
                f"least {MIN_KEY_CHARS} characters (e.g. `openssl rand -hex 32`), or set API_ALLOW_SHORT_KEYS=1 "
                "for local development only"
            )
        notes.append(f"WORKER_API_KEY: {which} is shorter than {MIN_KEY_CHARS} characters (API_ALLOW_SHORT_KEYS=1: "
                     "development only, easy to guess)")
    if not keys:
        if not is_loopback(settings.api_host):
            raise ApiConfigError(
                f"API_HOST={settings.api_host} exposes the API beyond this machine, but WORKER_API_KEY is not set: "
                "set WORKER_API_KEY (or bind API_HOST=127.0.0.1 for local development)"
            )
        notes.append(f"WORKER_API_KEY is not set: the API on {settings.api_host} accepts requests without a key "
                     "(local development only: JSON requests addressed to a loopback name)")
    opened = frozenset(settings.api_open_routes)
    refused = sorted(opened - OPENABLE_ROUTES)
    if refused:
        raise ApiConfigError(
            f"API_OPEN_ROUTES: {', '.join(refused)} cannot be served without a key; only "
            f"{', '.join(sorted(OPENABLE_ROUTES))} can"
        )
    if opened and keys:
        notes.append(f"API_OPEN_ROUTES: {', '.join(sorted(opened))} answer without a key, "
                     f"{settings.api_open_rate_per_min} requests a minute per client address")
    return AuthConfig(
        digests=tuple(_digest(key) for key in keys),
        open_routes=opened if keys else frozenset(),
        open_rate_per_min=settings.api_open_rate_per_min,
        failures_per_min=settings.api_auth_failures_per_min,
        notes=tuple(notes),
    )


def describe(settings: Any) -> tuple[str, str]:
    """``(verdict, detail)`` for ``doctor``: ``"ok"``, ``"open"`` (routes are served without a
    key) or ``"refused"`` (``serve`` would not start); the detail gives the number of keys (never
    a key), the open routes and the limits."""
    try:
        config = check_config(settings)
    except ApiConfigError as exc:
        return "refused", str(exc)
    if not config.digests:
        return "ok", "no WORKER_API_KEY: key-less local development (loopback only)"
    detail = (f"{len(config.digests)} key(s) in WORKER_API_KEY; wrong keys limited to {config.failures_per_min} "
              "a minute per client address")
    if config.open_routes:
        return "open", (f"open without a key: {', '.join(sorted(config.open_routes))} "
                        f"({config.open_rate_per_min} requests a minute per client address); {detail}")
    return "ok", f"{detail}; no route open without a key"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


# ----------------------------------------------------------------------------- rate limiting
class RateLimiter:
    """Token buckets per client: each holds up to ``per_minute`` tokens and regains
    ``per_minute`` a minute. :meth:`take` spends one; :meth:`wait_s` only looks.

    At most ``max_clients`` buckets are kept; past that, full ones (equal to a fresh one) are
    dropped, then the least recently used."""

    def __init__(self, per_minute: float, *, max_clients: int = MAX_TRACKED_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client → (tokens, when)

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.refill_per_s)

    def wait_s(self, client: str) -> float:
        """Seconds until ``client`` has a token (0.0: it has one now); spends nothing."""
        tokens = self._tokens(client, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.refill_per_s

    def take(self, client: str) -> float:
        """Spend one of ``client``'s tokens: 0.0 if it had one, else the seconds until it will
        (and nothing is spent)."""
        now = self.clock()
        tokens = self._tokens(client, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self.refill_per_s
        self._buckets[client] = (tokens - 1.0, now)
        self._buckets.move_to_end(client)
        if len(self._buckets) > self.max_clients:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        for client in [c for c in self._buckets if self._tokens(c, now) >= self.capacity]:
            del self._buckets[client]
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


# ----------------------------------------------------------------------------- the middleware
class ApiGuard:
    """ASGI middleware applying :class:`AuthConfig` to every HTTP request (see the module doc)."""

    def __init__(self, app: ASGIApp, config: AuthConfig,
                 also_allowed: Callable[[Scope], bool] | None = None) -> None:
        self.app = app
        self.config = config
        # A second way in for some paths (the operator page's session cookie, bridge/api_ui.py).
        self.also_allowed = also_allowed
        self.open_limit = RateLimiter(config.open_rate_per_min)
        self.failure_limit = RateLimiter(config.failures_per_min)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message, kind, headers = refusal
        response = error_response(Request(scope), status, message, type=kind, headers=headers)
        await response(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, dict[str, str] | None] | None:
        """Why this request is refused (status, message, error type, headers), or None."""
        headers = Headers(scope=scope)
        path = scope["path"]
        if not self.config.digests:
            return _development_refusal(scope, headers)
        if path in PUBLIC_PATHS or (self.also_allowed is not None and self.also_allowed(scope)):
            return None
        client = _client(scope)
        header = headers.get("authorization")
        if header is None:
            if path in self.config.open_routes:
                wait = self.open_limit.take(client)
                if wait > 0:
                    return (429, f"too many requests to {path} without a key from this address; retry later",
                            "rate_limited", {"Retry-After": retry_after(wait)})
                return None
            return _unauthorized()
        wait = self.failure_limit.wait_s(client)
        if wait > 0:
            return (429, "too many wrong API keys from this address; retry later", "rate_limited",
                    {"Retry-After": retry_after(wait)})
        if self._authorized(header):
            return None
        self.failure_limit.take(client)
        log.warning("wrong API key from %s for %s %s", client, scope.get("method"), path)
        return _unauthorized()

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return _matches_any(_digest(token.strip()), self.config.digests) and scheme.lower() == "bearer"


def key_check(config: AuthConfig) -> Callable[[str], bool] | None:
    """Whether a key given another way than the header (the operator page's login form) is one
    of the keys, compared like the header; None when no key is configured."""
    if not config.digests:
        return None
    return lambda given: _matches_any(_digest(given.strip()), config.digests)


def client_address(scope: Scope) -> str:
    """The client address the per-address limits count (after uvicorn's trusted-proxy rewrite)."""
    return _client(scope)


def _matches_any(digest: bytes, digests: Iterable[bytes]) -> bool:
    """Whether ``digest`` is one of ``digests``, compared with every one of them (no early exit)."""
    found = False
    for known in digests:
        found |= hmac.compare_digest(digest, known)
    return found


def _unauthorized() -> tuple[int, str, str, dict[str, str]]:
    return (401, "missing or invalid API key: send 'Authorization: Bearer <WORKER_API_KEY>'", "authentication_error",
            {"WWW-Authenticate": "Bearer"})


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _development_refusal(scope: Scope, headers: Headers) -> tuple[int, str, str, dict[str, str] | None] | None:
    """Key-less development: only requests addressed to a loopback name, and JSON for those that
    may change something."""
    host = headers.get("host", "")
    if not _is_loopback_name(host):
        return (400, f"Host {host[:100]!r} is not a loopback name: without WORKER_API_KEY this development server "
                "only answers requests addressed to localhost, 127.0.0.1 or [::1]", "invalid_host", None)
    if scope.get("method") in _BODY_METHODS:
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return (415, f"Content-Type {media_type or 'missing'!r} refused: without WORKER_API_KEY this development "
                    "server only accepts 'Content-Type: application/json' on POST, PUT, PATCH and DELETE",
                    "unsupported_media_type", None)
    return None


def _is_loopback_name(host: str) -> bool:
    """``Host`` header value (port allowed) names this machine: localhost, 127.x.x.x or [::1]."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return bool(name) and is_loopback(name)
