"""What the bridge keeps about each job in Redis, beside the job queue: its state hash and event
stream (the API's ``/jobs`` views, local mode's status record) and cancel requests (a flag for
later checks, a pub/sub message for running jobs).

:class:`JobState` holds these operations; :class:`bridge.queue.Queue` inherits them, so one
client, its connection pools and its outage handling (``_retrying``) serve the queue and the
state alike: each outside system from one place (docs/ARCHITECTURE.md). Key layout:
``job:{job}``, ``job_events:{job}``, ``cancel:{job}``; channel ``job_cancel``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.exceptions as rex
from redis.asyncio import Redis

CANCEL_CHANNEL = "job_cancel"
#: Longest single server-side block; a longer wait is several of these (no polling in between).
BLOCK_CHUNK_S = 5.0

# Connection trouble worth waiting out; a wrong password or missing permission is not.
_RETRYABLE = (rex.ConnectionError, rex.TimeoutError, ConnectionError, asyncio.TimeoutError)
_FATAL = (rex.AuthenticationError, rex.AuthorizationError, rex.ExternalAuthProviderError)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# --- keys -------------------------------------------------------------------------------------


def state_key(job_id: str) -> str:
    return f"job:{job_id}"


def events_key(job_id: str) -> str:
    return f"job_events:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"cancel:{job_id}"


# --- Lua scripts ------------------------------------------------------------------------------

# A job's state and its event in one command (docs/ARCHITECTURE.md, one job's path: a MULTI pipeline of five cost the worker
# several times the CPU). KEYS: state hash, event stream. ARGV: ttl_s, stream maxlen, event JSON
# ('' = no event), number of fields to set, then name/value pairs, then names of fields to delete.
_SET_STATE = """
local n = tonumber(ARGV[4])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + 2 * n)) end
if #ARGV > 4 + 2 * n then redis.call('HDEL', KEYS[1], unpack(ARGV, 5 + 2 * n)) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if ARGV[3] == '' then return false end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return id
"""

# KEYS[1] claim key; ARGV[1] this worker id. Only the owner's own claim is released (docs/ARCHITECTURE.md, process life cycle).


class JobState:
    """Job state, events and cancel requests; the connections are :class:`bridge.queue.Queue`'s."""

    # Provided by the Queue that inherits this (its constructor sets them).
    _client: Redis
    _blocking: Redis
    _events: Redis
    _link: Any
    _scripts: dict[str, Any]
    state_ttl_s: float
    cancel_ttl_s: float
    events_maxlen: int
    _retrying: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]  # calls retried through outages

    async def set_state(self, job_id: str, *, event: bool = True, **fields: Any) -> str | None:
        """Update hash ``job:{id}`` (status, progress, assets, error, type, user_id, ... as JSON;
        ``updated_at`` is set; a ``None`` value deletes its field) and, with ``event``, append the
        same fields to ``job_events:{id}``. Returns the event id."""
        fields.setdefault("updated_at", time.time())
        present = {name: json.dumps(value) for name, value in fields.items() if value is not None}
        absent = [name for name, value in fields.items() if value is None]
        keys = [state_key(job_id), events_key(job_id)]
        args: list[Any] = [int(self.state_ttl_s), self.events_maxlen, json.dumps(fields) if event else "", len(present)]
        for name, value in present.items():
            args += [name, value]
        args += absent
        event_id = await self._retrying(lambda: self._scripts["set_state"](keys=keys, args=args))
        return _text(event_id) if event else None

    async def get_state(self, job_id: str) -> dict[str, Any] | None:
        """The fields set by :meth:`set_state`, decoded; None for an unknown (or expired) job."""
        raw = await self._retrying(lambda: self._client.hgetall(state_key(job_id)))
        if not raw:
            return None
        state = {}
        for name, value in raw.items():
            try:
                state[_text(name)] = json.loads(value)
            except ValueError:
                state[_text(name)] = _text(value)
        return state

    async def events(
        self, job_id: str, last_id: str = "0", block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after ``last_id`` (``"0"``: from the start; ``"$"``: only new ones), waiting up
        to ``block_ms`` for one when there are none yet. For SSE: pass the last id you got."""
        stream = events_key(job_id)
        if block_ms is None:
            reply = await self._retrying(lambda: self._client.xread({stream: last_id}, count=count))
        else:
            block = max(1, min(int(block_ms), int(BLOCK_CHUNK_S * 1000)))
            reply = await self._retrying(lambda: self._events.xread({stream: last_id}, count=count, block=block))
        out = []
        for _name, entries in reply or []:
            for entry_id, data in entries:
                out.append((_text(entry_id), json.loads(data[b"data"])))
        return out

    async def request_cancel(self, job_id: str) -> int:
        """Ask for ``job_id`` to be cancelled: set ``cancel:{id}`` (for later checks) and publish it
        on ``job_cancel`` (for running jobs). Returns how many listeners got the message."""

        async def send() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(cancel_key(job_id), "1", ex=int(self.cancel_ttl_s))
                pipe.publish(CANCEL_CHANNEL, job_id)
                return await pipe.execute()

        return int((await self._retrying(send))[1])

    def watch_cancels(self) -> CancelWatch:
        """``async with queue.watch_cancels() as watch: async for job_id in watch: ...`` — the
        subscription is live once the ``async with`` is entered."""
        return CancelWatch(self)

    async def listen_cancels(self, on_cancel: Callable[[str], Awaitable[None] | None]) -> None:
        """Call ``on_cancel(job_id)`` for every cancel request, forever (run it as a task)."""
        async with self.watch_cancels() as watch:
            async for job_id in watch:
                result = on_cancel(job_id)
                if inspect.isawaitable(result):
                    await result


class CancelWatch:
    """A live subscription to cancel requests; iterate it for job ids. After an outage it
    resubscribes and replays every cancel still on record (messages sent meanwhile are lost)."""

    def __init__(self, queue: JobState) -> None:
        self._queue = queue
        self._pubsub: Any = None
        self._pending: deque[str] = deque()

    async def __aenter__(self) -> "CancelWatch":
        await self._queue._retrying(self._subscribe)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._drop()

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        while True:
            if self._pending:
                return self._pending.popleft()
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except _RETRYABLE as exc:
                if isinstance(exc, _FATAL):
                    raise
                self._queue._link.down(exc, 1)
                await self._drop()
                await self._queue._retrying(self._resubscribe)
                continue
            if message and message.get("type") == "message":
                return _text(message["data"])

    async def _subscribe(self) -> None:
        await self._drop()
        self._pubsub = self._queue._blocking.pubsub()
        await self._pubsub.subscribe(CANCEL_CHANNEL)

    async def _resubscribe(self) -> None:
        await self._subscribe()
        async for key in self._queue._client.scan_iter(match="cancel:*", count=500):
            self._pending.append(_text(key).removeprefix("cancel:"))

    async def _drop(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            try:
                await pubsub.aclose()
            except (rex.RedisError, OSError):
                pass
