"""The worker end to end: real redis-server, the session's real tritonserver with tiny models, and
the local Supabase stand-in checking every upload and callback against the contract."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from PIL import Image

from bridge import metrics
from bridge.jobs import JOB_TYPES
from bridge.queue import finished_key
from bridge.runtime import Runtime
from bridge.safety import REFUSAL_REASON
from tests.job_outputs import decode_mp4
from tests.bridge_stack import TERMINAL, chat_job, push, sdxl_job, stack_settings, wait_state, wan_job
from harness.supabase_stub import SupabaseStub

pytestmark = pytest.mark.timeout(600)


@pytest.fixture()
async def bridge(tiny_models_dir, triton, redis_server, supabase, tmp_path):
    settings = stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "out", **supabase.settings_values())
    async with Runtime(settings, api=False) as runtime:
        yield runtime


async def wait_terminal(stub: SupabaseStub, job_id: str, timeout: float = 180.0) -> dict:
    """The job's one terminal callback, as the stand-in received it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        terminal = [c for c in stub.callbacks(job_id) if c["status"] in TERMINAL]
        if terminal:
            return terminal[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no terminal callback for {job_id}: {stub.callbacks(job_id, outcome=None)}")


def assert_callback_sequence(stub: SupabaseStub, job_id: str, terminal: str) -> None:
    statuses = [c["status"] for c in stub.callbacks(job_id, outcome=None)]
    assert statuses[-1] == terminal, statuses
    assert statuses.count(terminal) == 1 and all(s == "processing" for s in statuses[:-1]), statuses
    progress = [c["metadata"].get("progress") for c in stub.callbacks(job_id) if c["status"] == "processing"]
    assert progress == sorted(progress), f"progress went backwards: {progress}"


async def finished_mark(redis_server, job_id: str) -> str | None:
    """The job's finished mark (what a duplicate delivery's claim finds), read straight from Redis."""
    async with aioredis.Redis.from_url(redis_server.url) as raw:
        value = await raw.get(finished_key(job_id))
    return None if value is None else value.decode()


def stored(stub: SupabaseStub, path: str) -> bytes:
    obj = stub.object(path)
    assert obj is not None, f"nothing uploaded at {path}"
    return obj.data


# --------------------------------------------------------------------------- every job type
IMAGE_TYPES = [name for name, t in JOB_TYPES.items() if t.output == "image"]
VIDEO_TYPES = [name for name, t in JOB_TYPES.items() if t.output == "video"]


@pytest.mark.parametrize("job_type", IMAGE_TYPES)
async def test_image_job_types_end_to_end(bridge: Runtime, supabase: SupabaseStub, job_type: str) -> None:
    if JOB_TYPES[job_type].model == "sdxl":
        job = sdxl_job(num_images=3, seed=11)
        job["type"] = job_type
    else:
        job = wan_job(job_type, seed=11)
    await push(bridge, job)
    callback = await wait_terminal(supabase, job["id"])
    assert callback["status"] == "completed", callback
    assert_callback_sequence(supabase, job["id"], "completed")
    count = 3 if JOB_TYPES[job_type].model == "sdxl" else 1
    assets = callback["assets"]
    assert [a["url"] for a in assets] == [f"user-1/{job['id']}/{i}.png" for i in range(count)]
    for i, asset in enumerate(assets):
        image = Image.open(io.BytesIO(stored(supabase, asset["url"])))
        assert image.format == "PNG" and image.size == (64, 64)
        assert asset["metadata"]["seed"] == 11 + i
        thumb = Image.open(io.BytesIO(stored(supabase, asset["thumbnail_url"])))
        assert thumb.format == "WEBP" and max(thumb.size) <= 256
    assert callback["metadata"]["seed"] == 11
    if JOB_TYPES[job_type].enhance:
        meta = callback["metadata"]
        assert meta["original_prompt"] == job["prompt"] and "enhanced_prompt" in meta
        assert "enhancement_fell_back" in meta


@pytest.mark.parametrize("job_type", VIDEO_TYPES)
async def test_video_job_types_end_to_end(bridge: Runtime, supabase: SupabaseStub, job_type: str) -> None:
    job = wan_job(job_type, seed=5, frame_num=5, fps=8)
    await push(bridge, job)
    callback = await wait_terminal(supabase, job["id"])
    assert callback["status"] == "completed", callback
    assert_callback_sequence(supabase, job["id"], "completed")
    (asset,) = callback["assets"]
    assert asset["url"] == f"user-1/{job['id']}/0.mp4"
    frames = decode_mp4(stored(supabase, asset["url"]))
    assert len(frames) == 5 and frames[0].shape[:2] == (64, 64)
    meta = asset["metadata"]
    assert meta["frame_num"] == 5 and meta["fps"] == 8 and meta["duration_seconds"] == pytest.approx(5 / 8)
    assert meta["seed"] == 5 and callback["metadata"]["seed"] == 5


async def test_same_seed_same_image_and_seed_zero_is_a_seed(bridge: Runtime, supabase: SupabaseStub) -> None:
    first, second, zero = sdxl_job(seed=0), sdxl_job(seed=0), sdxl_job(seed=1)
    for job in (first, second, zero):
        await push(bridge, job)
    results = [await wait_terminal(supabase, job["id"]) for job in (first, second, zero)]
    data = [stored(supabase, r["assets"][0]["url"]) for r in results]
    assert results[0]["metadata"]["seed"] == 0
    assert data[0] == data[1] and data[0] != data[2]


# --------------------------------------------------------------------------- queue semantics
async def test_double_encoded_payload_and_fifo_order(bridge: Runtime, supabase: SupabaseStub) -> None:
    jobs = [sdxl_job(seed=i) for i in range(3)]
    await push(bridge, json.dumps([json.dumps(jobs[0])]), queue="sdxl_queue")  # ["{...}"] form
    for job in jobs[1:]:
        await push(bridge, job)
    for job in jobs:
        assert (await wait_terminal(supabase, job["id"]))["status"] == "completed"
    started = [next(i for i, r in enumerate(supabase.requests_for("job-callback"))
                    if r.json()["job_id"] == job["id"]) for job in jobs]
    assert started == sorted(started), "jobs must start oldest first"


async def test_a_worker_takes_only_the_next_job_not_the_whole_queue(bridge: Runtime, supabase: SupabaseStub) -> None:
    """While one job generates, one more is taken (parsed, checked, waiting for the GPU); the rest
    stay in the queue for any worker. (A finished job used to let one more in each time, so a
    busy worker drained the whole queue into its processing list.)"""
    from bridge.queue import processing_key

    jobs = [sdxl_job(seed=i, num_inference_steps=6) for i in range(10)]
    for job in jobs:
        await push(bridge, job)
    held, queued, waiting = [], [], []
    terminal = asyncio.gather(*(wait_terminal(supabase, job["id"]) for job in jobs))
    key = processing_key(bridge.settings.worker_id, "sdxl_queue")
    while not terminal.done():
        held.append(await bridge.queue._client.llen(key))
        queued.append(await bridge.queue._client.llen("sdxl_queue"))
        waiting.append(len(bridge.worker.dispatcher.waiting()))
        await asyncio.sleep(0.005)
    assert all(body["status"] == "completed" for body in await terminal)
    assert max(waiting) <= 1, waiting  # one job of the queue waits for the GPU at most
    # Held besides: the running job, and finished ones until their callback is accepted.
    assert max(queued) >= 5 and min(held) <= 2, (queued, held)  # the rest stayed in Redis


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda j: j.update(type="no_such_type"), "type"),
        (lambda j: j["config"].update(width="wide"), "config.width"),
        (lambda j: j["config"].update(width=100000), "config.width"),
        (lambda j: j["config"].update(num_images=4), "config.num_images"),
        (lambda j: j.update(prompt="x" * 100_000), "prompt"),
    ],
)
async def test_invalid_jobs_fail_with_the_field_named_and_the_next_job_runs(
    bridge: Runtime, supabase: SupabaseStub, mutate, field: str
) -> None:
    bad, good = sdxl_job(), sdxl_job()
    mutate(bad)
    await push(bridge, bad, queue="sdxl_queue")
    await push(bridge, good)
    failed = await wait_terminal(supabase, bad["id"])
    assert failed["status"] == "failed" and field in failed["error_message"], failed
    assert failed["metadata"]["error_type"] and failed["metadata"]["timestamp"]
    assert (await wait_terminal(supabase, good["id"]))["status"] == "completed"


@pytest.mark.parametrize("make", [lambda prompt: {**sdxl_job(), "prompt": prompt},
                                  lambda prompt: chat_job("chat_enhance", prompt=prompt)], ids=["sdxl", "chat_enhance"])
async def test_a_refused_prompt_fails_before_the_gpu_and_the_next_job_runs(
    bridge: Runtime, supabase: SupabaseStub, make
) -> None:
    """The safety gate runs while the job's claim is in flight; its refusal is the job's one
    callback (no ``processing``: no model saw the prompt), counted in the metrics."""
    refused, good = make("nude child"), sdxl_job()  # the team's short non-graphic test phrase
    job_type = refused["type"]

    def refusals() -> float:
        return metrics.METRICS.registry.get_sample_value("gpu_worker_safety_refusals_total",
                                                         {"job_type": job_type}) or 0.0

    before = refusals()
    await push(bridge, refused)
    await push(bridge, good)
    failed = await wait_terminal(supabase, refused["id"])
    assert failed["status"] == "failed" and failed["error_message"] == REFUSAL_REASON
    assert failed["metadata"]["error_type"] == "content_refused"
    assert [c["status"] for c in supabase.callbacks(refused["id"], outcome=None)] == ["failed"]
    assert refusals() == before + 1
    assert (await wait_terminal(supabase, good["id"]))["status"] == "completed"


@pytest.mark.parametrize("raw", [b"not json at all", b'{"type": "sdxl_image_fast", "prompt": "no id"}', b"[1, 2]"])
async def test_unparseable_payloads_are_dead_lettered(bridge: Runtime, supabase: SupabaseStub, raw: bytes) -> None:
    good = sdxl_job()
    await push(bridge, raw, queue="sdxl_queue")
    await push(bridge, good)
    assert (await wait_terminal(supabase, good["id"]))["status"] == "completed"
    letters = await bridge.queue.dead_letters()
    assert any(entry["raw"] == raw.decode() and entry["reason"] for entry in letters), letters


async def test_supabase_500_then_200_is_retried(bridge: Runtime, supabase: SupabaseStub) -> None:
    supabase.fail_next("storage", 2, status=500)
    supabase.fail_next("job-callback", 2, status=503)
    job = sdxl_job()
    await push(bridge, job)
    callback = await wait_terminal(supabase, job["id"])
    assert callback["status"] == "completed"
    assert_callback_sequence(supabase, job["id"], "completed")


async def test_duplicate_delivery_of_a_finished_job_is_not_run_again(bridge: Runtime, supabase: SupabaseStub) -> None:
    job = sdxl_job()
    await push(bridge, job)
    await wait_terminal(supabase, job["id"])
    await push(bridge, job)
    follow_up = sdxl_job()
    await push(bridge, follow_up)
    await wait_terminal(supabase, follow_up["id"])
    statuses = [c["status"] for c in supabase.callbacks(job["id"], outcome=None)]
    assert statuses.count("completed") == 1 and statuses.count("processing") >= 1
    assert sum(1 for s in statuses if s == "processing") == len(statuses) - 1


class _SlowClaim:
    """Observes a worker (docs/ARCHITECTURE.md, one job's path: the claim's round trip): its claim (``Queue.begin``) answers
    ``delay_s`` late, as from a distant Redis, and each Triton request is recorded with when it
    started and how it ended ("completed", "cancelled" or the exception's name)."""

    def __init__(self, runtime: Runtime, delay_s: float) -> None:
        self.claimed: list[float] = []  # time.monotonic() when each claim answered
        self.requests: list[tuple[float, str]] = []
        queue, triton = runtime.worker.queue, runtime.worker.triton
        begin, run = queue.begin, triton.run

        async def slow_begin(*args, **kwargs):
            answer = await begin(*args, **kwargs)
            await asyncio.sleep(delay_s)
            self.claimed.append(time.monotonic())
            return answer

        async def observed_run(*args, **kwargs):
            started = time.monotonic()
            try:
                result = await run(*args, **kwargs)
            except BaseException as exc:
                self.requests.append((started, "cancelled" if isinstance(exc, asyncio.CancelledError)
                                      else type(exc).__name__))
                raise
            self.requests.append((started, "completed"))
            return result

        queue.begin, triton.run = slow_begin, observed_run  # type: ignore[method-assign]


def callback_times(stub: SupabaseStub, job_id: str) -> list[float]:
    return [r.at for r in stub.requests_for("job-callback") if r.json().get("job_id") == job_id]


async def test_an_idle_worker_starts_the_request_while_the_claim_is_on_its_way(
        bridge: Runtime, supabase: SupabaseStub) -> None:
    warm_up = sdxl_job()  # the model is resident afterwards: a head start needs no load
    await push(bridge, warm_up)
    await wait_terminal(supabase, warm_up["id"])
    slow = _SlowClaim(bridge, delay_s=0.5)
    job = sdxl_job(seed=11)
    await push(bridge, job)
    assert (await wait_terminal(supabase, job["id"]))["status"] == "completed"
    (claimed,), ((started, outcome),) = slow.claimed, slow.requests
    assert outcome == "completed" and started < claimed - 0.4, (started, claimed)  # not after the claim
    # Nothing of the job was reported before it was known to be this worker's.
    assert min(callback_times(supabase, job["id"])) >= claimed
    assert_callback_sequence(supabase, job["id"], "completed")


async def test_a_head_start_is_cancelled_when_the_claim_says_no(bridge: Runtime, supabase: SupabaseStub) -> None:
    """A duplicate of a finished job, and a job cancelled before it started: each one's request
    started while its claim was on its way, and was cancelled; neither ran to the end or reported
    anything new. The next job runs."""
    finished = sdxl_job()
    await push(bridge, finished)
    await wait_terminal(supabase, finished["id"])
    while bridge.worker.spool.has(finished["id"]):  # settled: a spooled result is re-sent, not started early
        await asyncio.sleep(0.02)
    before = len(supabase.callbacks(finished["id"], outcome=None))
    slow = _SlowClaim(bridge, delay_s=0.5)
    # Long requests (100 steps), so each is still running when its claim answers.
    duplicate = {**finished, "config": {**finished["config"], "num_inference_steps": 100}}
    cancelled = sdxl_job(seed=12, num_inference_steps=100)
    await bridge.queue.request_cancel(cancelled["id"])
    for job in (duplicate, cancelled):
        await push(bridge, job)
    follow_up = sdxl_job(seed=13)
    await push(bridge, follow_up)
    assert (await wait_terminal(supabase, follow_up["id"]))["status"] == "completed"
    assert [outcome for _, outcome in slow.requests] == ["cancelled", "cancelled", "completed"], slow.requests
    assert len(supabase.callbacks(finished["id"], outcome=None)) == before  # the duplicate: nothing
    assert [c["status"] for c in supabase.callbacks(cancelled["id"], outcome=None)] == ["cancelled"]
    assert bridge.worker.dispatcher.running() == ()  # every grant given back


async def test_the_next_request_goes_out_before_the_finished_job_stores_its_results(
        bridge: Runtime, supabase: SupabaseStub) -> None:
    """(docs/ARCHITECTURE.md, one job's path) With jobs queued, the job the release grants the GPU to has its request written
    to Triton before the finished job starts storing (CPU work that delayed the next request and
    left the GPU idle)."""
    events: list[tuple[str, str]] = []
    worker = bridge.worker
    run, save = worker.triton.run, worker.spool.save

    async def observed_run(model, inputs, *, on_sent=None, request_id="", **kwargs):
        def sent() -> None:
            events.append(("sent", request_id))
            if on_sent is not None:
                on_sent()
        return await run(model, inputs, on_sent=sent, request_id=request_id, **kwargs)

    def observed_save(job_id, *args, **kwargs):
        events.append(("store", job_id))
        return save(job_id, *args, **kwargs)

    worker.triton.run, worker.spool.save = observed_run, observed_save  # type: ignore[method-assign]
    jobs = [sdxl_job(seed=20 + i) for i in range(4)]
    for job in jobs:
        await push(bridge, job)
    for job in jobs:
        assert (await wait_terminal(supabase, job["id"]))["status"] == "completed"
    order = {event: index for index, event in enumerate(events)}
    for finished, following in zip(jobs, jobs[1:]):
        assert order[("sent", following["id"])] < order[("store", finished["id"])], events


async def test_time_limit_stops_the_generation(bridge: Runtime, supabase: SupabaseStub, monkeypatch) -> None:
    from dataclasses import replace

    monkeypatch.setitem(JOB_TYPES, "video_high", replace(JOB_TYPES["video_high"], time_limit_s=0.5))
    job = wan_job("video_high", num_inference_steps=100, frame_num=81)  # seconds on tiny WAN
    await push(bridge, job)
    callback = await wait_terminal(supabase, job["id"])
    assert callback["status"] == "failed" and "time limit" in callback["error_message"]
    follow_up = wan_job("image_fast")
    await push(bridge, follow_up)
    assert (await wait_terminal(supabase, follow_up["id"]))["status"] == "completed"


async def test_cancel_request_stops_the_job(bridge: Runtime, supabase: SupabaseStub) -> None:
    job = wan_job("video_high", num_inference_steps=100, frame_num=161)
    await push(bridge, job)
    await wait_state(bridge, job["id"], ("processing",))
    await bridge.queue.request_cancel(job["id"])
    callback = await wait_terminal(supabase, job["id"], timeout=60)
    assert callback["status"] == "cancelled"
    assert_callback_sequence(supabase, job["id"], "cancelled")


async def test_local_mode_writes_files_and_records_state(tiny_models_dir, triton, redis_server, tmp_path) -> None:
    settings = stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "out")
    assert settings.local_mode
    async with Runtime(settings, api=False) as runtime:
        job = sdxl_job(num_images=3)
        await push(runtime, job)
        state = await wait_state(runtime, job["id"])
    assert state["status"] == "completed" and state["progress"] == 100
    for i in range(3):
        assert (tmp_path / "out" / "user-1" / job["id"] / f"{i}.png").exists()
        assert (tmp_path / "out" / "user-1" / job["id"] / f"{i}.thumb.webp").exists()
    assert [a["url"] for a in state["assets"]] == [f"user-1/{job['id']}/{i}.png" for i in range(3)]


# --------------------------------------------------------------------------- chat queue
@pytest.mark.parametrize(
    "job_type, metadata, template",
    [
        ("chat_conversation", {"system_prompt": "You are terse.",
                               "conversation_history": [{"sender": "user", "content": "hi"},
                                                        {"sender": "assistant", "content": "hello"}]}, "chat"),
        ("chat_unrestricted", {}, "unrestricted"),
        ("admin_utilities", {}, "admin"),
        ("chat_conversation", {"sfw_mode": True}, "chat"),
    ],
)
async def test_chat_jobs_report_the_reply_in_metadata(bridge: Runtime, supabase: SupabaseStub, job_type: str,
                                                      metadata: dict, template: str) -> None:
    job = chat_job(job_type, **metadata)
    await push(bridge, job)
    callback = await wait_terminal(supabase, job["id"])
    assert callback["status"] == "completed", callback
    assert_callback_sequence(supabase, job["id"], "completed")
    meta = callback["metadata"]
    assert isinstance(meta["response"], str) and callback["assets"] == []
    assert 0 < meta["output_tokens"] <= 8 and meta["input_tokens"] > 0 and meta["generation_time"] > 0
    assert meta["template"] == template and meta["job_type"] == job_type


async def test_chat_enhance_job_fits_the_sdxl_budget(bridge: Runtime, supabase: SupabaseStub) -> None:
    job = chat_job("chat_enhance", prompt="a knight on a horse", max_tokens=40)
    await push(bridge, job)
    callback = await wait_terminal(supabase, job["id"])
    assert callback["status"] == "completed", callback
    meta = callback["metadata"]
    assert meta["original_prompt"] == "a knight on a horse" and meta["enhanced_prompt"] == meta["response"]
    assert meta["prompt_tokens"] <= meta["prompt_budget"] == 75


async def test_chat_job_with_bad_metadata_fails_naming_the_field(bridge: Runtime, supabase: SupabaseStub) -> None:
    job = chat_job(temperature=9)
    await push(bridge, job)
    callback = await wait_terminal(supabase, job["id"])
    assert callback["status"] == "failed" and "metadata.temperature" in callback["error_message"]


# --------------------------------------------------------------------------- shutdown
async def test_shutdown_requeues_a_running_job_without_counting_an_attempt(
    tiny_models_dir, triton, redis_server, supabase: SupabaseStub, tmp_path: Path
) -> None:
    """What SIGTERM does (serve's handler calls Runtime.stop): the running job gets the grace
    period, is then cancelled and put back at the front of its queue; with max_attempts=1 the next
    worker still runs it, so the interrupted run did not count."""
    values = dict(shutdown_grace_s=0.5, max_attempts=1, **supabase.settings_values())
    job = wan_job("video_high", num_inference_steps=60, frame_num=81)
    first = Runtime(stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "a", worker_id="w-first",
                                   **values), api=False)
    await first.start()
    try:
        await push(first, job)
        await wait_state(first, job["id"], ("processing",))
    finally:
        await first.stop()
    assert [c["status"] for c in supabase.callbacks(job["id"])] == ["processing"] * len(supabase.callbacks(job["id"]))
    assert await first.queue._client.lindex("wan_queue", 0) is not None  # back at the front
    second = Runtime(stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "b", worker_id="w-second",
                                    **values), api=False)
    async with second:
        callback = await wait_terminal(supabase, job["id"], timeout=300)
    assert callback["status"] == "completed", callback
    assert_callback_sequence(supabase, job["id"], "completed")


async def test_a_shutdown_with_redis_away_gives_up_requeueing_and_leaves_the_job_to_the_reaper(
    tiny_models_dir, triton, redis_server, supabase: SupabaseStub, tmp_path: Path, monkeypatch
) -> None:
    """SIGTERM while Redis is unreachable: putting the running job back is given up after the
    bound (it retried forever before) and the job is still in the worker's processing list, where
    another worker's reaper finds it once the heartbeat expires. Nothing is lost."""
    from bridge import worker as worker_module
    from bridge.queue import Queue, processing_key

    monkeypatch.setattr(worker_module, "SHUTDOWN_REQUEUE_S", 2.0)
    job = wan_job("video_high", num_inference_steps=60, frame_num=81)
    runtime = Runtime(stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "out", worker_id="w-cut-off",
                                     shutdown_grace_s=0.5, **supabase.settings_values()), api=False)
    await runtime.start()
    try:
        await push(runtime, job)
        await wait_state(runtime, job["id"], ("processing",))
    finally:
        redis_server.stop()
        started = time.monotonic()
        await asyncio.wait_for(runtime.stop(), 60)
    print(f"shutdown with Redis away took {time.monotonic() - started:.1f}s")
    redis_server.start()
    async with Queue(redis_server.url, worker_id="reader") as reader:
        held = await reader._client.lrange(processing_key("w-cut-off", "wan_queue"), 0, -1)
    assert [json.loads(raw)["id"] for raw in held] == [job["id"]]


async def test_a_shutdown_lets_a_job_that_is_reporting_its_end_finish(
        tiny_models_dir, triton, redis_server, supabase: SupabaseStub, tmp_path: Path) -> None:
    """A shutdown while a job's failed callback is on its way (it holds no GPU) waits for that
    end to be reported and settled; cancelled halfway, the job went back to its queue after the
    app may already have heard its end."""
    from bridge.queue import Queue

    settings = stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "out", **supabase.settings_values())
    job = {**sdxl_job(), "prompt": "nude child"}  # refused by the gate: a failed end, no GPU
    supabase.fail_next("job-callback", 1, mode="hang", hang_s=1.5)  # the first attempt hangs, then drops
    async with Runtime(settings, api=False) as runtime:
        await push(runtime, job)
        deadline = time.monotonic() + 60
        while not any(r.json().get("job_id") == job["id"] for r in supabase.requests_for("job-callback")):
            assert time.monotonic() < deadline, "the failed callback was never sent"
            await asyncio.sleep(0.02)
    # The shutdown came while the callback hung: the job was let finish.
    assert [c["status"] for c in supabase.callbacks(job["id"], outcome=None)] == ["failed"] * 2  # hung, retried
    assert [c["status"] for c in supabase.callbacks(job["id"])] == ["failed"]
    async with Queue(redis_server.url, worker_id="reader") as reader:
        assert await finished_mark(redis_server, job["id"]) == "failed"
        assert await reader.queue_depths(["sdxl_queue"]) == {"sdxl_queue": 0}


async def test_a_job_whose_worker_died_each_time_fails_after_max_attempts(
    tiny_models_dir, triton, redis_server, supabase: SupabaseStub, tmp_path: Path
) -> None:
    """Three workers start the job and die (no ack, heartbeat gone; another worker's reaper puts it
    back each time): the fourth delivery fails it with a clear message and a dead-letter entry."""
    from bridge.queue import Queue

    job = sdxl_job()
    settings = stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "out", max_attempts=3,
                              **supabase.settings_values())
    async with Queue(redis_server.url, worker_id="reaper", heartbeat_ttl_s=0.5) as reaper:
        await reaper.push("sdxl_queue", json.dumps(job))
        for attempt in range(1, 4):
            async with Queue(redis_server.url, worker_id=f"doomed-{attempt}", heartbeat_ttl_s=0.5) as doomed:
                await doomed.heartbeat()
                delivery = await doomed.take("sdxl_queue", timeout=5)
                assert delivery is not None and await doomed.count_start(delivery) == attempt  # started, then died
            await asyncio.sleep(0.7)  # its heartbeat expires: the worker is dead
            assert await reaper.reap() == 1
    async with Runtime(settings, api=False) as runtime:
        callback = await wait_terminal(supabase, job["id"], timeout=60)
        # The dead-letter entry follows the callback (the app hears first); the shutdown at the
        # end of this block lets that end finish rather than requeue a job already reported.
    async with Queue(redis_server.url, worker_id="reader") as reader:
        letters = await reader.dead_letters()
    finished = await finished_mark(redis_server, job["id"])
    assert callback["status"] == "failed" and "gave up after 3 attempts" in callback["error_message"]
    assert callback["metadata"]["error_type"] == "attempts_exhausted"
    assert [c["status"] for c in supabase.callbacks(job["id"], outcome=None)] == ["failed"]  # never ran again
    assert any(json.loads(entry["raw"])["id"] == job["id"] for entry in letters)
    assert finished == "failed"
    async with Queue(redis_server.url, worker_id="reader") as reader:
        assert await reader.queue_depths(["sdxl_queue"]) == {"sdxl_queue": 0}  # not requeued by the shutdown


async def test_a_result_in_the_spool_is_reported_again_even_past_max_attempts(
    tiny_models_dir, triton, redis_server, supabase: SupabaseStub, tmp_path: Path
) -> None:
    """A worker settled the job as cancelled (spooled, reported) and died before acknowledging it,
    three times over: the redelivery re-sends that same result, never a different one."""
    from bridge.queue import Queue
    from bridge.spool import JobOutputs, Spool

    job = sdxl_job()
    settings = stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "out", max_attempts=3,
                              **supabase.settings_values())
    record = {"job_type": "sdxl_image_fast", "timestamp": "2026-01-01T00:00:00Z", "terminal_status": "cancelled",
              "error_message": "cancelled on request", "dead_letter": False}
    Spool(settings.spool_dir).save(job["id"], JobOutputs("user-1", "sdxl_image_fast", [], record))
    async with Queue(redis_server.url, worker_id="reaper", heartbeat_ttl_s=0.5) as reaper:
        await reaper.push("sdxl_queue", json.dumps(job))
        for attempt in range(1, 4):
            async with Queue(redis_server.url, worker_id=f"doomed-{attempt}", heartbeat_ttl_s=0.5) as doomed:
                await doomed.heartbeat()
                delivery = await doomed.take("sdxl_queue", timeout=5)
                assert await doomed.count_start(delivery) == attempt  # started, then died
            await asyncio.sleep(0.7)
            assert await reaper.reap() == 1
    async with Runtime(settings, api=False) as runtime:
        callback = await wait_terminal(supabase, job["id"], timeout=60)
        assert await finished_mark(redis_server, job["id"]) == "cancelled"
    assert callback["status"] == "cancelled" and callback["error_message"] == "cancelled on request", callback
    assert "terminal_status" not in callback["metadata"]
    assert Spool(settings.spool_dir).load(job["id"]) is None  # settled: the spool entry is gone


def test_error_texts_for_the_app_keep_the_reason_and_drop_stack_paths_and_addresses() -> None:
    """What a model or the server says goes to the app without the Python backend's stack, file
    paths or addresses (the worker's log keeps the original); the reason itself stays."""
    from bridge.generation import client_text

    backend = ("Failed to process the request(s) for model instance 'sdxl_0_0', message: RuntimeError: CUDA error: "
               "an illegal memory access was encountered\n\nAt:\n  /app/model_kit/diffusion.py(212): run\n"
               "  /app/model_repository/sdxl/1/model.py(88): execute\n")
    assert client_text(backend) == ("Failed to process the request(s) for model instance 'sdxl_0_0', message: "
                                    "RuntimeError: CUDA error: an illegal memory access was encountered")
    assert client_text("Traceback (most recent call last):\n  File \"/app/x.py\", line 3, in f\nValueError: boom") \
        == "ValueError: boom"
    assert client_text("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.3.7:8001: refused") \
        == "failed to connect to all addresses; last error: UNKNOWN: ipv4:<address>: refused"
    assert client_text("failed to open /workspace/models/wan/config.json") == "failed to open <path>"
    field = "parameters.width: must be a multiple of 8 (got 65)"  # the models' own reasons pass as they are
    assert client_text(field) == field
    assert len(client_text("x" * 2000)) == 500
