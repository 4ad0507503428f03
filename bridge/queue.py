"""All Redis access of the bridge: a reliable queue, heartbeats and the reaper, dead letters and
idempotency marks here; job state with an event stream, and cancellation, in
:mod:`bridge.job_state` (inherited by :class:`Queue`: one client, one set of connection pools).

Reliable-queue semantics (no job is ever only in memory):

- :meth:`Queue.take` moves a job with ``BLMOVE queue processing:{worker}:{queue}`` in one server
  step, so a job is always in its queue, in a processing list, or in ``dead_letter``.
- :meth:`Queue.ack`, :meth:`Queue.requeue` and :meth:`Queue.dead_letter` each leave the processing
  list in one Lua script; a requeued job goes back to the FRONT of its queue (served next).
- Every worker keeps a heartbeat (``worker:{id}``, with a TTL) and lists itself in ``workers``;
  :meth:`Queue.reap` returns the jobs of workers whose heartbeat expired to the front of their
  queues and forgets them. A worker never reaps itself; a restarted worker with the same id takes
  back its own orphans on its first :meth:`Queue.take`.
- Attempts are counted in Redis per job (by id, else by a hash of the raw bytes) when a run
  starts (:meth:`Queue.count_start`), so a crash mid-run and the redelivery count; each delivery
  adds a unique token to a set, which makes the count idempotent under retries and lets a SIGTERM
  requeue take its token back.

Robustness: commands go through a connection pool whose redis-py ``Retry`` absorbs short blips;
around that, every call retries connection errors with exponential backoff and jitter for as long
as Redis is away (or ``give_up_after_s``), logging the outage once when it starts and once when it
ends. Blocking reads (BLMOVE, XREAD BLOCK, pub/sub) use a second pool so they never starve other
calls. The URL may carry a password; it is never logged (only scheme, host, port and db are).

Key layout: ``{queue}``, ``processing:{worker}:{queue}``, ``dead_letter``, ``workers``,
``worker:{id}``, ``worker_queues:{id}``, ``attempts:{job}``, ``finished:{job}``, ``job_claim:{job}``
(and :mod:`bridge.job_state`'s).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import redis.exceptions as rex
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff

from bridge import metrics
from bridge.jobs import QUEUES, peek_id
from bridge.job_state import _FATAL, _RETRYABLE, _SET_STATE, BLOCK_CHUNK_S, JobState, _text, cancel_key
from bridge.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
Side = Literal["left", "right"]

DEAD_LETTER_KEY = "dead_letter"
WORKERS_KEY = "workers"
DAY_S = 86_400

class RedisUnavailable(RuntimeError):
    """Redis stayed unreachable for longer than the queue's ``give_up_after_s``."""


# --- keys -------------------------------------------------------------------------------------


def processing_key(worker_id: str, queue: str) -> str:
    return f"processing:{worker_id}:{queue}"


def heartbeat_key(worker_id: str) -> str:
    return f"worker:{worker_id}"


def worker_queues_key(worker_id: str) -> str:
    return f"worker_queues:{worker_id}"


def attempts_key(raw: bytes, job_id: str | None = None) -> str:
    """Per job id when the payload has a usable one, else per hash of the raw bytes."""
    if job_id is None:
        job_id = peek_id(raw)
    return f"attempts:{job_id}" if job_id else f"attempts:sha256:{hashlib.sha256(raw).hexdigest()}"


def claim_key(job_id: str) -> str:
    return f"job_claim:{job_id}"


def finished_key(job_id: str) -> str:
    return f"finished:{job_id}"


# --- Lua scripts (each one atomic on the server) ----------------------------------------------

# KEYS: attempts. ARGV: token, ttl_s. Adding the same token twice (a retried call) counts once.
_COUNT_ATTEMPT = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('SCARD', KEYS[1])
"""

# Everything a job checks before it runs, in one round trip (docs/ARCHITECTURE.md, one job's path: per-job overhead).
# KEYS: finished, claim, cancel, attempts. ARGV: this worker id, claim ttl_s, raw ('' = not checked).
# Returns {finished status or false, the other live owner or false, cancel requested 0/1, attempt}.
# The attempt is the number this run gets once counted (runs so far + 1): the worker counts a run
# only when it really starts on the GPU (count_start; docs/ARCHITECTURE.md, one job's path).
# A finished job is not claimed; else the job id is claimed for this worker unless a live worker
# (one with a heartbeat) holds it.
# (docs/ARCHITECTURE.md, process life cycle, tests/test_faults.py) A live owner's claim counts only while that owner really holds the
# payload in one of its processing lists: a claim outlives a requeue (until released), the owner's
# restart under the same id (which returns its orphans) and a reap; honouring it then dropped the job.
_BEGIN = """
local finished = redis.call('GET', KEYS[1])
if finished then return {finished, false, 0, 0} end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] and redis.call('EXISTS', 'worker:' .. owner) == 1 then
  local held = ARGV[3] == ''
  if not held then
    for _, q in ipairs(redis.call('SMEMBERS', 'worker_queues:' .. owner)) do
      if redis.call('LPOS', 'processing:' .. owner .. ':' .. q, ARGV[3]) then held = true break end
    end
  end
  if held then return {false, owner, 0, 0} end
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return {false, false, redis.call('EXISTS', KEYS[3]), redis.call('SCARD', KEYS[4]) + 1}
"""

_RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_ACK = """
local n = redis.call('LREM', KEYS[1], 1, ARGV[1])
if n > 0 then redis.call('DEL', KEYS[2]) end
return n
"""

# KEYS: finished, processing, attempts, claim. ARGV: status, finished ttl_s, raw, this worker id.
# A terminal job in one round trip: remember its status, ack it, release this worker's claim.
_SETTLE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local n = redis.call('LREM', KEYS[2], 1, ARGV[3])
if n > 0 then redis.call('DEL', KEYS[3]) end
if redis.call('GET', KEYS[4]) == ARGV[4] then redis.call('DEL', KEYS[4]) end
return n
"""

# KEYS: processing, queue, attempts. ARGV: raw, push command for the front, token to uncount ('' = keep).
_REQUEUE = """
local n = redis.call('LREM', KEYS[1], 1, ARGV[1])
if n == 0 then return 0 end
redis.call(ARGV[2], KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('SREM', KEYS[3], ARGV[3]) end
return 1
"""

# KEYS: processing, dead_letter, attempts. ARGV: raw, entry JSON.
_DEAD_LETTER = """
local n = redis.call('LREM', KEYS[1], 1, ARGV[1])
if n == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: dead_letter, queue, finished, attempts. ARGV: the entry as stored, its raw job.
_REVIVE = """
local n = redis.call('LREM', KEYS[1], 1, ARGV[1])
if n == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3], KEYS[4])
return 1
"""

# KEYS: heartbeat, processing, queue. ARGV: front side. The newest job moves first, so the
# oldest ends up frontmost; -1 when the worker's heartbeat is back.
_REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'RIGHT', ARGV[1]) do n = n + 1 end
return n
"""

# KEYS: heartbeat, workers, worker_queues, processing lists... ARGV: worker id.
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 4, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return 0 end
end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """One job taken from a queue; it sits in ``processing_key`` until acked, requeued or
    dead-lettered. ``attempt`` is 0 when taken; :meth:`Queue.begin` gives the number its run will
    get (1 for the first, 2 after one started run, ...) and :meth:`Queue.count_start` counts it."""

    raw: bytes
    queue: str
    attempt: int
    job_id: str | None
    token: str
    processing_key: str
    taken_at: float = field(default_factory=time.time)

    @property
    def attempts_key(self) -> str:
        return attempts_key(self.raw, self.job_id)


@dataclass(frozen=True)
class Begin:
    """What :meth:`Queue.begin` found: ``finished`` (a terminal status: a duplicate), ``owner``
    (another live worker runs it: a duplicate), else the job is claimed for this worker and
    ``cancelled`` says whether the app asked to cancel it."""

    finished: str | None
    owner: str | None
    cancelled: bool
    attempt: int = 0  # the number the delivery's run gets once counted (0: a duplicate, not claimed)

    @property
    def ours(self) -> bool:
        """Claimed for this worker, not finished, not cancelled: it may run here (attempts allowing)."""
        return self.finished is None and self.owner is None and not self.cancelled


class _Link:
    """Whether Redis is reachable, so an outage is logged once when it starts and once at its end.

    A single failure is not an outage: a pooled connection that went stale (e.g. Redis restarted
    between two calls) fails once and the retry on a fresh connection succeeds. The second
    consecutive failure of a call is logged as the start of an outage. A call counts its failures
    with a :class:`_Streak`, which any call's success in between starts afresh: a call that slept
    through the outage in backoff, woken after another call saw Redis back, meets a stale pooled
    connection once, and that is not a second outage.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.down_since: float | None = None
        self.successes = 0  # any call's: a streak that saw one go by starts again
        self._first_failure: float | None = None

    def streak(self) -> "_Streak":
        return _Streak(self)

    def down(self, exc: BaseException, failures: int) -> None:
        now = time.monotonic()
        if self._first_failure is None:
            self._first_failure = now
        if self.down_since is None and failures >= 2:
            self.down_since = self._first_failure
            log.warning(
                "Redis at %s is unreachable (%s: %s); retrying with backoff, jobs stay in Redis",
                self.where, type(exc).__name__, exc,
            )
        else:
            log.debug("Redis at %s: %s: %s (failure %d)", self.where, type(exc).__name__, exc, failures)

    def up(self) -> None:
        self.successes += 1
        self._first_failure = None
        if self.down_since is not None:
            log.warning("Redis at %s is reachable again after %.1f s", self.where, time.monotonic() - self.down_since)
            metrics.inc_redis_reconnect()
            self.down_since = None


class _Streak:
    """One call's consecutive failures of Redis, for its backoff and for :class:`_Link`."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._seen = link.successes
        self.failures = 0

    def failed(self, exc: BaseException) -> int:
        """Count a failure (afresh if any call succeeded since the last) and report it; the count."""
        if self._link.successes != self._seen:
            self._seen, self.failures = self._link.successes, 0
        self.failures += 1
        self._link.down(exc, self.failures)
        return self.failures


def _safe_location(url: str) -> str:
    """``redis://host:port/db`` without user name or password, for log lines."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path or ''}"


class Queue(JobState):
    """The bridge's Redis client. Create one per process; ``await close()`` when done.

    The job queue is here; what the bridge keeps about each job (state, events, cancel requests)
    is :class:`bridge.job_state.JobState`'s, on the same connections."""

    def __init__(
        self,
        url: str | SecretStr,
        *,
        worker_id: str,
        pop_side: Side = "left",
        max_attempts: int = 3,
        heartbeat_ttl_s: float = 15.0,
        finished_ttl_s: float = 7 * DAY_S,
        state_ttl_s: float = 7 * DAY_S,
        cancel_ttl_s: float = DAY_S,
        events_maxlen: int = 1000,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 5.0,
        give_up_after_s: float | None = None,
        max_connections: int = 64,
        event_connections: int = 32,
    ) -> None:
        secret = url.get_secret_value() if isinstance(url, SecretStr) else url
        if pop_side not in ("left", "right"):
            raise ValueError(f"pop_side must be 'left' or 'right', got {pop_side!r}")
        self.worker_id = worker_id
        self.pop_side: Side = pop_side
        self.max_attempts = max_attempts
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.finished_ttl_s = finished_ttl_s
        self.state_ttl_s = state_ttl_s
        self.cancel_ttl_s = cancel_ttl_s
        self.events_maxlen = events_maxlen
        self.give_up_after_s = give_up_after_s
        self.location = _safe_location(secret)
        self._backoff = EqualJitterBackoff(cap=backoff_cap_s, base=backoff_base_s)
        self._link = _Link(self.location)
        # Short blips are absorbed inside redis-py; outages by _retrying() around each call.
        self._client = Redis.from_url(
            secret, socket_timeout=10.0, socket_connect_timeout=5.0, max_connections=max_connections,
            retry=Retry(EqualJitterBackoff(cap=0.5, base=0.02), retries=2), health_check_interval=30,
        )
        # Blocking reads: own pool; no redis-py retry, so take() knows when a BLMOVE was cut off.
        self._blocking = Redis.from_url(
            secret, socket_timeout=BLOCK_CHUNK_S + 10.0, socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
        )
        # Event streams (SSE) block on their own pool, bounded: the API refuses streams past its
        # size with a 503 (bridge/limits.py), so a client cannot open Redis connections at will.
        self._events = Redis.from_url(
            secret, socket_timeout=BLOCK_CHUNK_S + 10.0, socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0), max_connections=event_connections,
        )
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (
                ("count_attempt", _COUNT_ATTEMPT), ("ack", _ACK), ("requeue", _REQUEUE),
                ("dead_letter", _DEAD_LETTER), ("reap", _REAP), ("forget", _FORGET),
                ("release_claim", _RELEASE_CLAIM), ("begin", _BEGIN), ("settle", _SETTLE),
                ("set_state", _SET_STATE),
                ("revive", _REVIVE),
            )
        }
        self._held: defaultdict[str, Counter[bytes]] = defaultdict(Counter)  # raw jobs we hold, per queue
        self._open: dict[str, Delivery] = {}  # unsettled deliveries by token
        self._take_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._clean: set[str] = set()  # queues whose processing list holds no orphan of ours

    @classmethod
    def from_settings(cls, settings: Settings, url: str | SecretStr | None = None, **options: Any) -> "Queue":
        """A queue configured from settings; ``url`` (e.g. the embedded server's) beats REDIS_URL."""
        url = url or settings.redis_url
        if url is None:
            raise ValueError("no Redis URL: set REDIS_URL or pass the embedded server's url")
        return cls(
            url, worker_id=settings.worker_id, pop_side=settings.queue_pop_side,
            max_attempts=settings.max_attempts, heartbeat_ttl_s=settings.heartbeat_ttl_s,
            event_connections=settings.event_streams_max, **options,
        )

    async def close(self) -> None:
        """Close the connection pools."""
        await self._events.aclose()
        await self._blocking.aclose()
        await self._client.aclose()

    async def __aenter__(self) -> "Queue":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Queue({self.location}, worker_id={self.worker_id!r})"

    # --- taking and settling jobs ---------------------------------------------------------

    async def take(self, queue: str, timeout: float = 0) -> Delivery | None:
        """Wait up to ``timeout`` seconds (0: forever) for the next job of ``queue`` and move it to
        this worker's processing list; ``None`` on timeout. Wakes as soon as a job is pushed. While
        Redis is away it keeps retrying (the job stays in Redis) until ``timeout`` runs out.

        Taking costs no attempt (``attempt`` is 0): only a run that starts does
        (:meth:`count_start`)."""
        deadline = time.monotonic() + timeout if timeout > 0 else None
        processing = processing_key(self.worker_id, queue)
        source = "LEFT" if self.pop_side == "left" else "RIGHT"
        streak = self._link.streak()
        async with self._take_locks[queue]:
            while True:
                try:
                    if queue not in self._clean:
                        await self._prepare(queue)
                        self._clean.add(queue)
                    block = BLOCK_CHUNK_S
                    if deadline is not None:
                        block = min(block, deadline - time.monotonic())
                        if block <= 0.001:
                            return None
                    raw = await self._blocking.blmove(queue, processing, block, source, "RIGHT")
                except asyncio.CancelledError:
                    self._clean.discard(queue)  # a BLMOVE may have landed with its reply lost
                    raise
                except _RETRYABLE as exc:
                    if isinstance(exc, _FATAL):
                        raise
                    self._clean.discard(queue)
                    delay = self._backoff.compute(streak.failed(exc))
                    if deadline is not None and time.monotonic() + delay >= deadline:
                        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                        return None
                    await asyncio.sleep(delay)
                    continue
                self._link.up()
                if raw is not None:
                    break
            self._held[queue][raw] += 1
        token = uuid.uuid4().hex
        delivery = Delivery(raw=raw, queue=queue, attempt=0, job_id=peek_id(raw), token=token, processing_key=processing)
        self._open[token] = delivery
        return delivery

    async def ack(self, delivery: Delivery) -> bool:
        """Done with it (after the terminal callback was accepted): drop it from processing.
        False when it was no longer there (e.g. reaped while this worker was unreachable) or the
        delivery was already settled or released."""
        if delivery.token not in self._open:
            return False
        removed = await self._retrying(
            lambda: self._scripts["ack"](keys=[delivery.processing_key, delivery.attempts_key], args=[delivery.raw])
        )
        self._release(delivery.queue, delivery.raw, delivery.token)
        return bool(removed)

    async def settle(self, delivery: Delivery, status: str, job_id: str | None = None) -> bool:
        """A terminal job, in one step: :meth:`mark_finished` for ``job_id`` (default: the
        delivery's), :meth:`ack` and :meth:`release_claim`. False as for :meth:`ack`."""
        job_id = job_id or delivery.job_id
        if job_id is None:
            return await self.ack(delivery)
        if delivery.token not in self._open:  # released meanwhile: still remember the status
            await self.mark_finished(job_id, status)
            await self.release_claim(job_id)
            return False
        keys = [finished_key(job_id), delivery.processing_key, delivery.attempts_key, claim_key(job_id)]
        args = [status, int(self.finished_ttl_s), delivery.raw, self.worker_id]
        removed = await self._retrying(lambda: self._scripts["settle"](keys=keys, args=args))
        self._release(delivery.queue, delivery.raw, delivery.token)
        return bool(removed)

    async def requeue(self, delivery: Delivery, count_attempt: bool = True) -> bool:
        """Put it back at the FRONT of its queue (served next), atomically. With
        ``count_attempt=False`` (SIGTERM) this delivery does not count as an attempt. False when
        the job was no longer in processing or the delivery was already settled."""
        if delivery.token not in self._open:
            return False
        keys = [delivery.processing_key, delivery.queue, delivery.attempts_key]
        args = [delivery.raw, self._front_push, "" if count_attempt else delivery.token]
        moved = await self._retrying(lambda: self._scripts["requeue"](keys=keys, args=args))
        self._release(delivery.queue, delivery.raw, delivery.token)
        return bool(moved)

    async def dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Move it to ``dead_letter`` as ``{raw, reason, queue, worker_id, time, ...}``, atomically.
        False when the job was no longer in processing or the delivery was already settled."""
        if delivery.token not in self._open:
            return False
        entry = self._dead_entry(delivery.raw, reason, delivery.queue)
        entry.update(attempt=delivery.attempt, job_id=delivery.job_id)
        keys = [delivery.processing_key, DEAD_LETTER_KEY, delivery.attempts_key]
        args = [delivery.raw, json.dumps(entry)]
        moved = await self._retrying(lambda: self._scripts["dead_letter"](keys=keys, args=args))
        self._release(delivery.queue, delivery.raw, delivery.token)
        if moved:
            log.warning("dead-lettered a job from %s (job id %s): %s", delivery.queue, delivery.job_id, reason)
        return bool(moved)

    def past_max_attempts(self, delivery: Delivery) -> bool:
        """True when this delivery is beyond ``max_attempts`` runs: fail it instead of running."""
        return delivery.attempt > self.max_attempts

    async def dead_letters(self, start: int = 0, end: int = -1) -> list[dict[str, Any]]:
        """Entries of the dead-letter list, oldest first."""
        items = await self._retrying(lambda: self._client.lrange(DEAD_LETTER_KEY, start, end))
        return [json.loads(item) for item in items]

    async def requeue_dead_letter(self, index: int) -> dict[str, Any] | None:
        """Move dead-letter entry ``index`` (0 = oldest) to the end of its queue, atomically, and
        forget its finished mark and attempts so it runs again. The entry, or ``None`` when there
        is none at ``index`` (or another caller moved it first); :class:`ValueError` when it holds
        no text payload or names no known queue."""
        stored = await self._retrying(lambda: self._client.lindex(DEAD_LETTER_KEY, index))
        if stored is None:
            return None
        entry = json.loads(stored)
        raw, queue = entry.get("raw"), entry.get("queue")
        if not isinstance(raw, str) or queue not in QUEUES:
            raise ValueError("this entry holds no text payload for a known queue; it cannot be requeued")
        job_id = peek_id(raw)
        keys = [DEAD_LETTER_KEY, queue, finished_key(job_id or "-"), attempts_key(raw.encode("utf-8"), job_id)]
        moved = await self._retrying(lambda: self._scripts["revive"](keys=keys, args=[stored, raw]))
        return entry if moved else None

    async def in_processing(self, queue: str, worker_id: str | None = None) -> list[bytes]:
        """The raw jobs in a worker's processing list for ``queue`` (default: this worker)."""
        key = processing_key(worker_id or self.worker_id, queue)
        return await self._retrying(lambda: self._client.lrange(key, 0, -1))

    async def release_all(self) -> int:
        """Shutting down: put every job of this worker's processing lists back at the FRONT of its
        queue (in order), not counted as an attempt (SIGTERM is not the job's fault), then drop
        this worker's heartbeat and registration. Call it once no job runs and the heartbeat task
        is stopped; deliveries still open become void. Returns how many jobs went back."""
        registered = await self._retrying(lambda: self._client.smembers(worker_queues_key(self.worker_id)))
        queues = sorted({_text(q) for q in registered} | set(self._held))
        returned = 0
        for queue in queues:
            async with self._take_locks[queue]:
                opened = [d for d in self._open.values() if d.queue == queue]

                async def uncount() -> None:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for d in opened:
                            pipe.srem(d.attempts_key, d.token)
                        await pipe.execute()

                if opened:
                    await self._retrying(uncount)
                for d in opened:
                    self._open.pop(d.token, None)
                self._held.pop(queue, None)
                returned += await self._retrying(lambda: self._return_orphans(queue))
                self._clean.discard(queue)
        await self._retrying(lambda: self._client.delete(heartbeat_key(self.worker_id)))
        keys = [heartbeat_key(self.worker_id), WORKERS_KEY, worker_queues_key(self.worker_id)]
        keys += [processing_key(self.worker_id, queue) for queue in queues]
        await self._retrying(lambda: self._scripts["forget"](keys=keys, args=[self.worker_id]))
        if returned:
            log.info("released %d job(s) of this worker back to their queues", returned)
        return returned

    # --- idempotency ------------------------------------------------------------------------

    async def mark_finished(self, job_id: str, status: str) -> None:
        """Remember that ``job_id`` reached a terminal status, so a duplicate is not run again."""
        await self._retrying(lambda: self._client.set(finished_key(job_id), status, ex=int(self.finished_ttl_s)))

    async def count_start(self, delivery: Delivery) -> int:
        """The delivery's job really starts (holds the GPU): count it as an attempt, once per
        delivery. Its attempt number. Taking, prefetching or waiting for the GPU costs none."""
        return int(await self._retrying(lambda: self._scripts["count_attempt"](
            keys=[delivery.attempts_key], args=[delivery.token, int(self.finished_ttl_s)])))

    async def begin(self, job_id: str, delivery: Delivery | None = None) -> Begin:
        """Everything to check before running ``job_id``, in one round trip: whether it already
        finished (then it is not claimed), else claim it for this worker unless another live
        worker holds it (given the ``delivery``, only while that worker holds the same payload in a
        processing list), whether a cancel was requested, and the attempt number the run will get
        once it starts (:meth:`count_start` counts it)."""
        raw = delivery.raw if delivery is not None else b""
        keys = [finished_key(job_id), claim_key(job_id), cancel_key(job_id), attempts_key(raw, job_id)]
        finished, owner, cancelled, attempt = await self._retrying(
            lambda: self._scripts["begin"](keys=keys, args=[self.worker_id, int(self.state_ttl_s), raw])
        )
        return Begin(finished=_text(finished) if finished else None, owner=_text(owner) if owner else None,
                     cancelled=bool(cancelled), attempt=int(attempt or 0))

    async def release_claim(self, job_id: str) -> None:
        """Release this worker's claim on ``job_id`` (another worker's claim is left alone)."""
        await self._retrying(lambda: self._scripts["release_claim"](keys=[claim_key(job_id)], args=[self.worker_id]))

    # --- heartbeats and the reaper -----------------------------------------------------------

    async def heartbeat(self) -> None:
        """Refresh ``worker:{id}`` (TTL ``heartbeat_ttl_s``) and list this worker in ``workers``."""
        await self._retrying(self._beat)

    async def reap(self) -> int:
        """Return every job of workers without a live heartbeat to the FRONT of its queue, then
        forget those workers. Never touches this worker. Returns the number of jobs returned."""
        workers = await self._retrying(lambda: self._client.smembers(WORKERS_KEY))
        total = 0
        for worker in sorted(_text(w) for w in workers):
            if worker == self.worker_id:
                continue
            if await self._retrying(lambda: self._client.exists(heartbeat_key(worker))):
                continue
            total += await self._reap_worker(worker)
        return total

    async def keep_alive(self, interval_s: float | None = None, reap: bool = True) -> None:
        """Heartbeat (and reap others) every ``interval_s`` (default a third of the TTL), forever."""
        interval = interval_s or self.heartbeat_ttl_s / 3
        while True:
            await self.heartbeat()
            if reap:
                try:
                    await self.reap()
                except rex.RedisError as exc:  # a script error must not stop the heartbeat
                    log.error("reaping failed: %s", exc)
            await asyncio.sleep(interval)

    # --- producers and the scheduler --------------------------------------------------------

    async def push(self, queue: str, payload: bytes | str | dict[str, Any]) -> int:
        """Append a job (RPUSH, like the producer); returns the queue's new length."""
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        return int(await self._retrying(lambda: self._client.rpush(queue, data)))

    async def queue_depths(self, queues: Iterable[str] = QUEUES) -> dict[str, int]:
        """Number of waiting jobs per queue."""
        names = list(queues)

        async def count() -> list[int]:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.llen(name)
                return await pipe.execute()

        return dict(zip(names, map(int, await self._retrying(count))))

    async def peek_waiting(self, queue: str, count: int) -> list[bytes]:
        """Up to ``count`` jobs of ``queue`` in the order :meth:`take` serves them (the operator's page)."""
        if self.pop_side == "left":
            return await self._retrying(lambda: self._client.lrange(queue, 0, count - 1))
        return list(reversed(await self._retrying(lambda: self._client.lrange(queue, -count, -1))))

    # --- internals --------------------------------------------------------------------------

    @property
    def _front_push(self) -> str:
        return "LPUSH" if self.pop_side == "left" else "RPUSH"

    def _release(self, queue: str, raw: bytes, token: str | None = None) -> None:
        if token is not None:
            if self._open.pop(token, None) is None:
                return  # settled before (a second ack/requeue of the same delivery)
        held = self._held[queue]
        if held[raw] > 1:
            held[raw] -= 1
        else:
            held.pop(raw, None)

    def _dead_entry(self, raw: bytes, reason: str, queue: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"reason": reason, "queue": queue, "worker_id": self.worker_id, "time": time.time()}
        try:
            entry["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            entry["raw_base64"] = base64.b64encode(raw).decode("ascii")
        return entry

    async def _prepare(self, queue: str) -> None:
        """Before taking from ``queue``: be a live, registered worker (so nobody reaps our jobs),
        and put back jobs in our processing list that no delivery of ours holds: orphans of a
        previous process with our id, or of a BLMOVE whose reply was lost."""
        await self._beat()  # no retry loop here: take() waits out outages within its timeout
        await self._client.sadd(worker_queues_key(self.worker_id), queue)
        returned = await self._return_orphans(queue)
        if returned:
            log.warning("returned %d orphaned job(s) of this worker to the front of %s", returned, queue)

    async def _return_orphans(self, queue: str) -> int:
        """Move every job of our processing list for ``queue`` that we do not hold back to the
        front of ``queue``, keeping their order (one atomic script per job)."""
        processing = processing_key(self.worker_id, queue)
        items = await self._client.lrange(processing, 0, -1)
        held = Counter(self._held[queue])
        orphans = []
        for raw in items:
            if held[raw] > 0:
                held[raw] -= 1
            else:
                orphans.append(raw)
        for raw in reversed(orphans):  # newest first, so the oldest ends up frontmost
            await self._scripts["requeue"](
                keys=[processing, queue, attempts_key(raw)], args=[raw, self._front_push, ""]
            )
        return len(orphans)

    async def _beat(self) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(heartbeat_key(self.worker_id), str(time.time()), px=int(self.heartbeat_ttl_s * 1000))
            pipe.sadd(WORKERS_KEY, self.worker_id)
            await pipe.execute()

    async def _reap_worker(self, worker: str) -> int:
        queues = sorted(_text(q) for q in await self._retrying(lambda: self._client.smembers(worker_queues_key(worker))))
        front = "LEFT" if self.pop_side == "left" else "RIGHT"
        moved = 0
        for queue in queues:
            keys = [heartbeat_key(worker), processing_key(worker, queue), queue]
            count = int(await self._retrying(lambda: self._scripts["reap"](keys=keys, args=[front])))
            if count < 0:
                log.info("worker %s came back while being reaped; left alone", worker)
                return moved
            if count:
                log.warning("returned %d job(s) of dead worker %s to the front of %s", count, worker, queue)
            moved += count
        keys = [heartbeat_key(worker), WORKERS_KEY, worker_queues_key(worker)]
        keys += [processing_key(worker, queue) for queue in queues]
        await self._retrying(lambda: self._scripts["forget"](keys=keys, args=[worker]))
        return moved

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` until it gets through: connection errors are retried with exponential
        backoff and jitter (forever, or ``give_up_after_s``); the outage is logged once."""
        deadline = None if self.give_up_after_s is None else time.monotonic() + self.give_up_after_s
        streak = self._link.streak()
        while True:
            try:
                result = await call()
            except _RETRYABLE as exc:
                if isinstance(exc, _FATAL):
                    raise
                delay = self._backoff.compute(streak.failed(exc))
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise RedisUnavailable(f"Redis at {self.location} unreachable for {self.give_up_after_s} s") from exc
                await asyncio.sleep(delay)
                continue
            self._link.up()
            return result
