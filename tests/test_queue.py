"""bridge.queue against real redis-server processes (fixture ``redis_server``: a fresh server per
test, stopped and restarted by the fault tests)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time

import pytest
import redis.asyncio as aioredis

from bridge.job_state import CANCEL_CHANNEL
from bridge.queue import (
    DEAD_LETTER_KEY,
    WORKERS_KEY,
    Queue,
    RedisUnavailable,
    attempts_key,
    heartbeat_key,
    processing_key,
)
from bridge.redis_server import RedisServer
from bridge.settings import Settings

Q = "sdxl_queue"


def job(job_id: str, **extra: object) -> str:
    return json.dumps({"id": job_id, "type": "sdxl_image_fast", "prompt": "a cat", "user_id": "u1", **extra})


def make_queue(server: RedisServer, worker_id: str = "w1", **options: object) -> Queue:
    options.setdefault("backoff_cap_s", 0.3)
    return Queue(server.url, worker_id=worker_id, **options)


@pytest.fixture()
async def raw(redis_server: RedisServer):
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture()
async def queue(redis_server: RedisServer):
    q = make_queue(redis_server)
    yield q
    await q.close()


async def wait_blocked(raw: aioredis.Redis, count: int = 1, timeout: float = 5.0) -> None:
    """Until ``count`` clients are blocked in the server (a BLMOVE is really waiting)."""
    deadline = time.monotonic() + timeout
    while (await raw.info("clients"))["blocked_clients"] < count:
        assert time.monotonic() < deadline, "the take never blocked in Redis"
        await asyncio.sleep(0.01)


async def wait_subscribed(raw: aioredis.Redis, channel: str = CANCEL_CHANNEL, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while dict(await raw.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:
        assert time.monotonic() < deadline, "nobody subscribed"
        await asyncio.sleep(0.01)


async def where(raw: aioredis.Redis, item: bytes, worker_id: str = "w1") -> dict[str, int]:
    """How many copies of ``item`` are in the queue, the processing list and dead letters."""
    dead = [json.loads(e)["raw"].encode() for e in await raw.lrange(DEAD_LETTER_KEY, 0, -1)]
    return {
        "queue": (await raw.lrange(Q, 0, -1)).count(item),
        "processing": (await raw.lrange(processing_key(worker_id, Q), 0, -1)).count(item),
        "dead": dead.count(item),
    }


# --- taking ---------------------------------------------------------------------------------


async def test_rpush_producer_is_served_oldest_first(queue: Queue, raw: aioredis.Redis) -> None:
    payloads = [job(f"j{i}") for i in range(5)]
    for payload in payloads:
        await queue.push(Q, payload)
    taken = [await queue.take(Q, timeout=1) for _ in payloads]
    assert [d.raw.decode() for d in taken] == payloads
    assert [d.job_id for d in taken] == [f"j{i}" for i in range(5)]
    assert all(d.attempt == 0 and d.queue == Q for d in taken)  # taking costs no attempt: a start does
    # Until acknowledged they sit in this worker's processing list, nowhere else.
    assert await raw.llen(Q) == 0
    assert await raw.lrange(processing_key("w1", Q), 0, -1) == [p.encode() for p in payloads]
    for d in taken:
        assert await queue.ack(d) is True
    assert await raw.llen(processing_key("w1", Q)) == 0


async def test_pop_side_right_serves_an_lpush_producer_oldest_first(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    q = make_queue(redis_server, pop_side="right")
    try:
        for i in range(3):
            await raw.lpush(Q, job(f"j{i}"))
        assert [(await q.take(Q, 1)).job_id for _ in range(3)] == ["j0", "j1", "j2"]
        assert await raw.llen(Q) == 0
    finally:
        await q.close()


async def test_take_times_out_with_none(queue: Queue) -> None:
    start = time.monotonic()
    assert await queue.take(Q, timeout=0.3) is None
    assert 0.25 <= time.monotonic() - start < 3


async def test_take_wakes_at_once_on_push(queue: Queue, raw: aioredis.Redis, redis_server: RedisServer) -> None:
    producer = make_queue(redis_server, worker_id="producer")
    try:
        waiter = asyncio.create_task(queue.take(Q, timeout=20))
        await wait_blocked(raw)
        pushed = time.monotonic()
        await producer.push(Q, job("fast"))
        delivery = await waiter
        pickup = time.monotonic() - pushed
    finally:
        await producer.close()
    assert delivery is not None and delivery.job_id == "fast"
    # Typically a few ms; the bound is generous for a loaded 2-core box (a 2 s poll: ~1000 ms average).
    assert pickup < 0.2, f"pickup took {pickup * 1000:.1f} ms"


async def test_blocking_take_does_not_starve_other_calls(queue: Queue, raw: aioredis.Redis) -> None:
    waiters = [asyncio.create_task(queue.take(name, timeout=20)) for name in (Q, "wan_queue")]
    await wait_blocked(raw, 2)
    start = time.monotonic()
    await queue.set_state("j1", status="queued")
    assert (await queue.get_state("j1"))["status"] == "queued"
    assert await queue.queue_depths() == {"sdxl_queue": 0, "wan_queue": 0, "chat_queue": 0}
    assert time.monotonic() - start < 1.0
    await queue.push("wan_queue", job("w"))
    await queue.push(Q, job("s"))
    assert {(await w).job_id for w in waiters} == {"w", "s"}


async def test_settings_drive_the_queue(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url, worker_id="from-settings", queue_pop_side="right", max_attempts=7)
    q = Queue.from_settings(settings)
    try:
        assert (q.worker_id, q.pop_side, q.max_attempts) == ("from-settings", "right", 7)
        assert "from-settings" in repr(q) and await q.push(Q, job("a")) == 1
    finally:
        await q.close()
    with pytest.raises(ValueError, match="REDIS_URL"):
        Queue.from_settings(Settings(redis_url=None))


# --- settling: ack, requeue, dead letter ------------------------------------------------------


async def test_requeue_puts_the_job_at_the_front_and_counts_an_attempt(queue: Queue, raw: aioredis.Redis) -> None:
    for name in ("a", "b", "c"):
        await queue.push(Q, job(name))
    first = await queue.take(Q, 1)
    assert await queue.count_start(first) == 1
    assert await queue.requeue(first) is True
    assert await raw.llen(processing_key("w1", Q)) == 0
    assert [json.loads(x)["id"] for x in await raw.lrange(Q, 0, -1)] == ["a", "b", "c"]
    again = await queue.take(Q, 1)
    assert again.job_id == "a" and await queue.count_start(again) == 2


async def test_requeue_without_counting_takes_the_attempt_back(queue: Queue) -> None:
    await queue.push(Q, job("a"))
    d1 = await queue.take(Q, 1)
    assert await queue.count_start(d1) == 1
    assert await queue.requeue(d1, count_attempt=False)  # SIGTERM: not the job's fault
    d2 = await queue.take(Q, 1)
    assert await queue.count_start(d2) == 1
    assert await queue.requeue(d2, count_attempt=True)
    d3 = await queue.take(Q, 1)
    assert await queue.count_start(d3) == 2


async def test_attempts_are_counted_for_payloads_without_an_id(queue: Queue, raw: aioredis.Redis) -> None:
    await queue.push(Q, b"not json at all")
    d1 = await queue.take(Q, 1)
    assert d1.job_id is None and d1.attempts_key.startswith("attempts:sha256:")
    await queue.count_start(d1)
    await queue.requeue(d1)
    d2 = await queue.take(Q, 1)
    assert await queue.count_start(d2) == 2 and d2.raw == b"not json at all"


async def test_past_max_attempts(redis_server: RedisServer) -> None:
    q = make_queue(redis_server, max_attempts=2)
    try:
        await q.push(Q, job("a"))
        seen = []
        for _ in range(3):
            d = await q.take(Q, 1)
            d = dataclasses.replace(d, attempt=(await q.begin("a", d)).attempt)  # as the worker does
            seen.append(q.past_max_attempts(d))
            await q.count_start(d)
            await q.requeue(d)
        assert seen == [False, False, True]
    finally:
        await q.close()


async def test_ack_clears_attempts_and_is_idempotent(queue: Queue, raw: aioredis.Redis) -> None:
    await queue.push(Q, job("a"))
    d = await queue.take(Q, 1)
    assert await queue.count_start(d) == 1 and await raw.exists(attempts_key(d.raw))
    assert await queue.ack(d) is True
    assert await queue.ack(d) is False  # already gone: nothing else removed
    assert not await raw.exists(attempts_key(d.raw))
    assert await where(raw, d.raw) == {"queue": 0, "processing": 0, "dead": 0}


async def test_dead_letter_records_why_and_leaves_processing(queue: Queue, raw: aioredis.Redis) -> None:
    await queue.push(Q, job("a"))
    d = await queue.take(Q, 1)
    before = time.time()
    assert await queue.dead_letter(d, "payload is not valid JSON") is True
    assert await queue.dead_letter(d, "again") is False
    entries = await queue.dead_letters()
    assert len(entries) == 1
    entry = entries[0]
    assert entry["raw"] == d.raw.decode() and entry["reason"] == "payload is not valid JSON"
    assert entry["queue"] == Q and entry["worker_id"] == "w1" and entry["time"] >= before - 1
    assert await where(raw, d.raw) == {"queue": 0, "processing": 0, "dead": 1}


async def test_dead_letter_keeps_undecodable_bytes(queue: Queue) -> None:
    await queue.push(Q, b"\xff\xfe garbage")
    d = await queue.take(Q, 1)
    await queue.dead_letter(d, "payload is not UTF-8 text")
    assert base64.b64decode((await queue.dead_letters())[0]["raw_base64"]) == b"\xff\xfe garbage"


async def test_racing_settlements_keep_exactly_one_copy(queue: Queue, raw: aioredis.Redis) -> None:
    """ack / requeue / dead_letter race for one delivery: exactly one wins, the job is never
    lost (zero copies) nor duplicated (two copies)."""
    for round_ in range(10):
        await queue.push(Q, job(f"r{round_}"))
        d = await queue.take(Q, 1)
        results = await asyncio.gather(queue.requeue(d), queue.dead_letter(d, "race"), queue.requeue(d, False))
        assert sum(results) == 1
        copies = await where(raw, d.raw)
        assert sum(copies.values()) == 1 and copies["processing"] == 0
        if copies["queue"]:
            await queue.ack(await queue.take(Q, 1))


# --- heartbeats, reaper, restart ------------------------------------------------------------


async def test_reaper_returns_a_dead_workers_jobs_to_the_front(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    dead = make_queue(redis_server, worker_id="dead", heartbeat_ttl_s=0.3)
    live = make_queue(redis_server, worker_id="live", heartbeat_ttl_s=30)
    reaper = make_queue(redis_server, worker_id="reaper")
    try:
        for name in ("a", "b", "c", "d", "e"):
            await raw.rpush(Q, job(name))
        held = [await dead.take(Q, 1) for _ in range(2)]  # a, b: the dead worker crashes running them
        for delivery in held:
            await dead.count_start(delivery)
        kept = await live.take(Q, 1)  # c: a live worker holds it
        assert [d.job_id for d in held] == ["a", "b"] and kept.job_id == "c"
        assert await reaper.reap() == 0  # everyone is alive
        await asyncio.sleep(0.5)  # the dead worker's heartbeat expires; the live one beats
        await live.heartbeat()
        assert await reaper.reap() == 2
        assert [json.loads(x)["id"] for x in await raw.lrange(Q, 0, -1)] == ["a", "b", "d", "e"]
        assert await raw.llen(processing_key("dead", Q)) == 0
        assert await raw.lrange(processing_key("live", Q), 0, -1) == [kept.raw]
        members = {m.decode() for m in await raw.smembers(WORKERS_KEY)}
        assert "dead" not in members and "live" in members
        redelivered = await reaper.take(Q, 1)
        assert redelivered.job_id == "a" and await reaper.count_start(redelivered) == 2  # a crash counts
        assert await reaper.reap() == 0
    finally:
        for q in (dead, live, reaper):
            await q.close()


async def test_reaper_never_reaps_itself(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    q = make_queue(redis_server, worker_id="me", heartbeat_ttl_s=0.2)
    try:
        await q.push(Q, job("mine"))
        d = await q.take(Q, 1)
        await asyncio.sleep(0.4)
        assert not await raw.exists(heartbeat_key("me"))  # our own heartbeat lapsed...
        assert await q.reap() == 0  # ...but we never reap ourselves
        assert await raw.lrange(processing_key("me", Q), 0, -1) == [d.raw]
    finally:
        await q.close()


async def test_keep_alive_beats_and_reaps(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    dead = make_queue(redis_server, worker_id="dead", heartbeat_ttl_s=0.2)
    q = make_queue(redis_server, worker_id="keeper", heartbeat_ttl_s=0.6)
    try:
        await dead.push(Q, job("x"))
        await dead.take(Q, 1)
        task = asyncio.create_task(q.keep_alive(interval_s=0.1))
        deadline = time.monotonic() + 5
        while await raw.llen(Q) == 0:
            assert time.monotonic() < deadline, "the keeper never reaped"
            await asyncio.sleep(0.05)
        assert await raw.exists(heartbeat_key("keeper"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await dead.close()
        await q.close()


async def test_restarted_worker_takes_back_its_own_orphans(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    first = make_queue(redis_server, worker_id="pod-1")
    await first.push(Q, job("a"))
    await first.push(Q, job("b"))
    taken = await first.take(Q, 1)
    assert taken.job_id == "a" and await first.count_start(taken) == 1
    await first.close()  # crash: "a" stays in processing:pod-1:sdxl_queue
    second = make_queue(redis_server, worker_id="pod-1")  # same id after a restart
    try:
        d = await second.take(Q, 1)
        assert d.job_id == "a" and await second.count_start(d) == 2
        assert await raw.lrange(processing_key("pod-1", Q), 0, -1) == [d.raw]
    finally:
        await second.close()


async def test_release_all_returns_everything_held_uncounted(queue: Queue, raw: aioredis.Redis) -> None:
    for name in ("a", "b", "c", "d", "e"):
        await queue.push(Q, job(name))
    a, b, c = [await queue.take(Q, 1) for _ in range(3)]
    assert await queue.count_start(a) == 1
    await queue.ack(b)
    # An orphan: in our processing list but held by no delivery (a BLMOVE whose reply was lost).
    await raw.lmove(Q, processing_key("w1", Q), "LEFT", "RIGHT")
    assert await queue.release_all() == 3
    assert [json.loads(x)["id"] for x in await raw.lrange(Q, 0, -1)] == ["a", "c", "d", "e"]
    assert await raw.llen(processing_key("w1", Q)) == 0
    assert not await raw.exists(heartbeat_key("w1")) and not await raw.sismember(WORKERS_KEY, "w1")
    again = await queue.take(Q, 1)
    assert again.job_id == "a" and await queue.count_start(again) == 1  # a shutdown is not the job's fault
    assert await queue.ack(a) is False  # the released delivery is void


async def test_cancelled_take_loses_nothing(queue: Queue, raw: aioredis.Redis) -> None:
    waiter = asyncio.create_task(queue.take(Q, timeout=20))
    await wait_blocked(raw)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await queue.push(Q, job("after-cancel"))
    d = await queue.take(Q, 2)
    assert d.job_id == "after-cancel"
    assert await where(raw, d.raw) == {"queue": 0, "processing": 1, "dead": 0}


# --- idempotency, state, events, cancellation ------------------------------------------------


async def test_finished_marks(queue: Queue, raw: aioredis.Redis) -> None:
    assert await raw.get("finished:j1") is None
    await queue.mark_finished("j1", "completed")
    assert await raw.get("finished:j1") == b"completed"
    assert (await queue.begin("j1")).finished == "completed"  # what a duplicate delivery finds
    assert await raw.ttl("finished:j1") > 86_400


async def test_begin_checks_finished_claim_and_cancel_in_one_step(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    one, two = make_queue(redis_server, "w1"), make_queue(redis_server, "w2")
    try:
        await one.heartbeat()
        await two.heartbeat()
        await raw.rpush("sdxl_queue", job("j1"), job("j1", other=True))
        held = await one.take("sdxl_queue")
        assert held.attempt == 0
        first = await one.begin("j1", held)
        assert (first.finished, first.owner, first.cancelled, first.attempt) == (None, None, False, 1)
        assert await raw.get("job_claim:j1") == b"w1"
        duplicate = await two.begin("j1", held)
        assert duplicate.owner == "w1" and duplicate.finished is None  # w1 holds it: w2 must not run it
        assert duplicate.attempt == 0  # a duplicate is not counted
        # A claim whose owner no longer holds the payload does not count (docs/ARCHITECTURE.md, process life cycle).
        other = await two.take("sdxl_queue")
        assert (await two.begin("j1", other)).owner is None

        await raw.set("cancel:j2", "1")
        assert (await one.begin("j2")).cancelled is True
        await one.mark_finished("j3", "failed")
        finished = await one.begin("j3")
        assert finished.finished == "failed" and await raw.get("job_claim:j3") is None  # not claimed
    finally:
        await one.close()
        await two.close()


async def test_an_attempt_is_counted_at_the_start_not_when_taken_or_reaped(redis_server: RedisServer,
                                                                            raw: aioredis.Redis) -> None:
    """Taken and begun (claimed) without a start costs no attempt: a worker killed then (its job
    reaped) leaves the count as it was; each real start counts once."""
    dead, live = make_queue(redis_server, "dead", heartbeat_ttl_s=0.3), make_queue(redis_server, "live")
    try:
        await raw.rpush("sdxl_queue", job("j1"))
        await dead.heartbeat()
        taken = await dead.take("sdxl_queue")
        assert (await dead.begin("j1", taken)).attempt == 1  # the number its start will get
        assert await raw.scard("attempts:j1") == 0
        await asyncio.sleep(0.5)  # killed before the start: its heartbeat expires
        assert await live.reap() == 1
        again = await live.take("sdxl_queue")
        assert (await live.begin("j1", again)).attempt == 1  # the reaped delivery cost nothing
        assert await live.count_start(again) == 1
        assert await live.count_start(again) == 1  # once per delivery
        assert await live.requeue(again)  # a failed run: it stays counted
        third = await live.take("sdxl_queue")
        assert (await live.begin("j1", third)).attempt == 2
    finally:
        await dead.close()
        await live.close()


async def test_settle_marks_acks_and_releases_in_one_step(queue: Queue, raw: aioredis.Redis) -> None:
    await raw.rpush("sdxl_queue", job("j1"))
    delivery = await queue.take("sdxl_queue")
    assert (await queue.begin("j1", delivery)).owner is None
    assert await queue.settle(delivery, "completed") is True
    assert await where(raw, delivery.raw) == {"queue": 0, "processing": 0, "dead": 0}
    assert await raw.get("finished:j1") == b"completed"
    assert await raw.exists("job_claim:j1", delivery.attempts_key) == 0
    assert await queue.settle(delivery, "completed") is False  # settled once only
    # Another worker's claim is left alone.
    await raw.rpush("sdxl_queue", job("j2"))
    other = await queue.take("sdxl_queue")
    await raw.set("job_claim:j2", "w9")
    assert await queue.settle(other, "failed") is True
    assert await raw.get("job_claim:j2") == b"w9" and await raw.get("finished:j2") == b"failed"


async def test_state_round_trip(queue: Queue, raw: aioredis.Redis) -> None:
    assert await queue.get_state("nope") is None
    assets = [{"type": "image", "url": "u1/j1/0.png"}]
    await queue.set_state("j1", status="processing", progress=42.5, type="sdxl_image_fast", user_id="u1")
    await queue.set_state("j1", status="completed", progress=100, assets=assets, error=None)
    state = await queue.get_state("j1")
    assert state["status"] == "completed" and state["progress"] == 100 and state["assets"] == assets
    assert state["type"] == "sdxl_image_fast" and state["user_id"] == "u1"
    assert "error" not in state and abs(state["updated_at"] - time.time()) < 5
    await queue.set_state("j1", error="boom")
    await queue.set_state("j1", error=None)
    assert "error" not in await queue.get_state("j1")
    assert 0 < await raw.ttl("job:j1") <= queue.state_ttl_s


async def test_events_follow_state_and_wake_a_blocked_reader(queue: Queue, raw: aioredis.Redis) -> None:
    first = await queue.set_state("j1", status="queued")
    await queue.set_state("j1", status="processing", progress=10)
    events = await queue.events("j1")
    assert [e[1]["status"] for e in events] == ["queued", "processing"] and events[0][0] == first
    last = events[-1][0]
    assert await queue.events("j1", last) == []
    reader = asyncio.create_task(queue.events("j1", last, block_ms=5000))
    await wait_blocked(raw)
    sent = time.monotonic()
    await queue.set_state("j1", progress=55)
    got = await reader
    assert [e[1]["progress"] for e in got] == [55] and time.monotonic() - sent < 1
    start = time.monotonic()
    assert await queue.events("j1", got[-1][0], block_ms=200) == []
    assert time.monotonic() - start >= 0.15


async def test_event_stream_is_capped(redis_server: RedisServer, raw: aioredis.Redis) -> None:
    q = make_queue(redis_server, events_maxlen=10)
    try:
        for i in range(500):
            await q.set_state("j1", progress=i)
        assert await raw.xlen("job_events:j1") < 200  # MAXLEN ~ trims in whole nodes
        assert (await q.events("j1", count=1000))[-1][1]["progress"] == 499
    finally:
        await q.close()


async def test_cancel_reaches_a_listener_fast(queue: Queue, redis_server: RedisServer) -> None:
    api = make_queue(redis_server, worker_id="api")
    try:
        assert not (await queue.begin("j9")).cancelled
        async with queue.watch_cancels() as watch:
            sent = time.monotonic()
            assert await api.request_cancel("j9") == 1
            job_id = await asyncio.wait_for(watch.__anext__(), 2)
            latency = time.monotonic() - sent
        assert job_id == "j9" and latency < 0.1, f"cancel took {latency * 1000:.1f} ms"
        assert (await queue.begin("j9")).cancelled  # a worker about to run it finds the flag
    finally:
        await api.close()


async def test_listen_cancels_calls_back(queue: Queue, raw: aioredis.Redis) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(queue.listen_cancels(got.put))
    await wait_subscribed(raw)
    await queue.request_cancel("a")
    await queue.request_cancel("b")
    assert [await asyncio.wait_for(got.get(), 2) for _ in range(2)] == ["a", "b"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_depths_and_peek(queue: Queue) -> None:
    assert await queue.peek_waiting(Q, 5) == []
    await queue.push(Q, {"id": "first"})
    await queue.push(Q, job("second"))
    await queue.push("wan_queue", job("w"))
    assert await queue.queue_depths() == {"sdxl_queue": 2, "wan_queue": 1, "chat_queue": 0}
    assert await queue.queue_depths(["chat_queue"]) == {"chat_queue": 0}
    assert [json.loads(raw)["id"] for raw in await queue.peek_waiting(Q, 5)] == ["first", "second"]
    assert (await queue.take(Q, 1)).job_id == "first"  # peek did not take it


# --- outages ----------------------------------------------------------------------------------


async def test_redis_restart_during_a_blocking_take(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Redis is killed under a blocked take and restarted (same port, same data): the take resumes
    and gets the next job, the waiting jobs survive, the outage is logged once (and its end once),
    and the password in the URL never shows in the log."""
    caplog.set_level(logging.DEBUG, logger="bridge.queue")
    password = "s3cret-Pa55word"
    server = RedisServer(data_dir=tmp_path / "redis", password=password).start()
    q = make_queue(server, worker_id="w1", backoff_cap_s=0.2)
    raw = aioredis.Redis.from_url(server.url)
    try:
        await raw.rpush("wan_queue", job("waiting"))
        waiter = asyncio.create_task(q.take(Q, timeout=60))
        await wait_blocked(raw)
        await raw.aclose()
        server.stop(kill=True)
        await asyncio.sleep(0.7)  # the take keeps retrying against a dead port
        assert not waiter.done()
        assert any("unreachable" in r.getMessage() for r in caplog.records if r.name == "bridge.queue")
        await asyncio.to_thread(server.start)
        raw = aioredis.Redis.from_url(server.url)
        await wait_blocked(raw)  # the take is blocked again, no polling
        await raw.rpush(Q, job("after-restart"))
        delivery = await asyncio.wait_for(waiter, 10)
        assert delivery.job_id == "after-restart"
        assert any("reachable again" in r.getMessage() for r in caplog.records if r.name == "bridge.queue")
        assert await raw.lrange("wan_queue", 0, -1) == [job("waiting").encode()]  # nothing lost
        assert await raw.lrange(processing_key("w1", Q), 0, -1) == [delivery.raw]
    finally:
        await raw.aclose()
        await q.close()
        server.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "bridge.queue" and r.levelno >= logging.INFO]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages
    assert password not in caplog.text
    assert password not in repr(q)


async def test_calls_wait_out_an_outage(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge.queue")
    q = make_queue(redis_server, backoff_cap_s=0.2)
    try:
        await q.push(Q, job("a"))
        d = await q.take(Q, 1)
        redis_server.stop(kill=True)
        ack = asyncio.create_task(q.ack(d))
        push = asyncio.create_task(q.push(Q, job("b")))
        await asyncio.sleep(0.5)
        assert not ack.done() and not push.done()
        await asyncio.to_thread(redis_server.start)
        assert await asyncio.wait_for(ack, 10) is True
        assert await asyncio.wait_for(push, 10) == 1
        assert (await q.take(Q, 1)).job_id == "b"
    finally:
        await q.close()
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1


async def test_a_call_that_slept_through_an_outage_does_not_log_a_second_one(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two calls wait out an outage; one gets through and the outage is over. The other, woken
    later from its backoff, meets a stale pooled connection once (as after a real Redis restart)
    and then gets through: one outage, logged once at each end, not a second one "after 0.0 s"."""
    caplog.set_level(logging.INFO, logger="bridge.queue")
    q = make_queue(redis_server, backoff_cap_s=0.05)
    back = asyncio.Event()
    stale_left = 1

    async def first() -> str:
        if not back.is_set():
            raise aioredis.ConnectionError("Connection closed by server.")
        return "first"

    async def second() -> str:
        nonlocal stale_left
        if not back.is_set():
            raise aioredis.ConnectionError("Connection closed by server.")
        await a  # woken after the other call found Redis back
        if stale_left:
            stale_left -= 1
            raise aioredis.ConnectionError("Connection closed by server.")
        return "second"

    try:
        a = asyncio.create_task(q._retrying(first))
        b = asyncio.create_task(q._retrying(second))
        await asyncio.sleep(0.3)  # both have failed several times: an outage
        assert not a.done() and not b.done()
        back.set()
        assert await asyncio.wait_for(a, 5) == "first"
        assert await asyncio.wait_for(b, 5) == "second"
        assert stale_left == 0  # the stale connection was met after the outage had ended
    finally:
        await q.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "bridge.queue"]
    assert sum("is unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages


async def test_give_up_after_raises(redis_server: RedisServer) -> None:
    q = make_queue(redis_server, give_up_after_s=0.3, backoff_cap_s=0.1)
    try:
        redis_server.stop()
        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match="unreachable"):
            await q.get_state("x")
        assert time.monotonic() - start < 3
        start = time.monotonic()
        assert await q.take(Q, timeout=0.4) is None  # a take with a timeout returns on time
        assert time.monotonic() - start < 3
    finally:
        await q.close()


async def test_cancel_watch_survives_a_restart(redis_server: RedisServer) -> None:
    q = make_queue(redis_server, backoff_cap_s=0.2)
    try:
        async with q.watch_cancels() as watch:
            redis_server.stop(kill=True)
            nxt = asyncio.create_task(watch.__anext__())
            await asyncio.sleep(0.5)
            await asyncio.to_thread(redis_server.start)
            api = make_queue(redis_server, worker_id="api")
            try:
                # A cancel sent while the watcher resubscribes is either heard or replayed.
                await api.request_cancel("late")
                assert await asyncio.wait_for(nxt, 10) == "late"
            finally:
                await api.close()
    finally:
        await q.close()
