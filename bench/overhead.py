"""Bridge benchmark on the tiny models (CPU): pickup latency, per-job overhead, throughput.

    python bench/overhead.py [--jobs 40] [--rounds 25] [--batch 10] [--no-pin] [--models-dir .cache/tiny-models]

The app's side (RPUSH, then following the job's events) runs in a process of its own, as in
production, so none of its work runs on the bridge's event loop. Local mode (no Supabase) unless
said: results go to OUTPUT_DIR, statuses to Redis. Figures:

- pickup: RPUSH → the job's first ``processing`` state recorded, with an idle worker (p50/p99).
  The old worker polled every 2–5 s; the target is p50 ≤ 5 ms.
- latency overhead (idle worker, one job at a time): push → ``completed`` recorded, less the
  server's own time on the job's request (Triton's statistics), against the same request sent
  directly right after, less the server's time on it; the median over the pairs. Everything the
  bridge adds to one job over a client calling Triton directly, including anything it does that
  slows its own request's way to and from the server, without the model's run-to-run noise.
  Split into the queue's own hop (the app's RPUSH waking a bare ``BLMOVE`` in this process: Redis
  and two process wake-ups, before any bridge code), storing the results (the spool: files,
  thumbnail, asset metadata; then the files placed: hard links in local mode) and the rest
  (claims, safety gate, scheduling, states, hand-offs between tasks and threads).
- the same overhead on the production path, Supabase mode, against the tests' local stand-in
  (``harness/supabase_stub.py``, checking the contract): uploads and the signed callback, without
  the network's latency; the stand-in runs in this process, so its own work is counted too.
- per-job overhead with a full queue (target ≤ 2 ms): ``--batch`` jobs queued at once, wall time
  until all completed, against the same requests sent directly back to back. Each side's wall
  time less the time the server spent on its requests (Triton's own statistics: ``success``
  time), i.e. the time the server waited for us; the bridge's minus the direct client's, per job
  (the median of ``--rounds`` alternating rounds, and its quartiles). Taking out the server's
  time takes out the model's run-to-run noise (the same batch computes several ms per job faster
  or slower from one round to the next), which the plain wall difference (also printed) keeps.
  Beside it, the idle gap between one job's Triton request ending and the next one's starting,
  as the bridge sees its requests.
- ``--pin`` (default): tritonserver runs on a CPU of its own, the bridge, Redis and the app on
  the others, as on a GPU box the model computes off the bridge's CPUs. ``--no-pin`` shares them.
- throughput: jobs per second through the bridge and directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.jobs import parse_job  # noqa: E402
from bridge.launcher import TritonServer, free_port  # noqa: E402
from bridge.redis_server import RedisServer  # noqa: E402
from bridge.runtime import Runtime, freeze_startup_heap  # noqa: E402
from bridge.settings import Settings  # noqa: E402


def _job(seed: int) -> dict:
    return {"id": str(uuid.uuid4()), "type": "sdxl_image_fast", "prompt": "a lighthouse at dawn", "user_id": "bench",
            "config": {"width": 64, "height": 64, "num_inference_steps": 2, "num_images": 1, "seed": seed}}


@dataclass
class _CpuSplit:
    model: set[int]
    bridge: set[int]


def _cpu_split() -> _CpuSplit | None:
    """The model's computation on a CPU of its own, as it is on a GPU in production: here the tiny
    model computes on the CPUs, and on shared CPUs each job's bridge work (files, Redis, the app's
    events) slows the next job's generation, which a GPU box does not see. None with one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return _CpuSplit(model={cpus[-1]}, bridge=set(cpus[:-1]))


def _cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class _App:
    """The app's side, in a process of its own as in production: it pushes jobs (RPUSH) and follows
    their events on its own Redis connection, so none of that work runs on the bridge's event loop
    (an in-process client made the bridge's loop also parse the bench's replies). It answers each
    batch with the ``updated_at`` of every job's first ``processing`` and its ``completed`` event."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> "_App":
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--app", self.redis_url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.close()
        await self._process.wait()

    async def run(self, jobs: list[dict]) -> dict:
        """Push ``jobs`` at once; when all completed: {"pushed": t, "processing": {id: t}, "completed": {id: t}}."""
        return await self._ask(jobs)

    async def push_stamp(self, key: str) -> None:
        """RPUSH the current time (``time.time()``) to list ``key``."""
        await self._ask({"stamp": key})

    async def _ask(self, message: Any) -> dict:
        assert self._process is not None and self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write((json.dumps(message) + "\n").encode())
        await self._process.stdin.drain()
        line = await self._process.stdout.readline()
        if not line:
            raise RuntimeError("the app process ended")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer


def _app_process(redis_url: str) -> None:
    """``bench/overhead.py --app REDIS_URL``: the app side of :class:`_App` (stdin/stdout, one JSON line each)."""
    import redis

    from bridge.job_state import events_key

    client = redis.Redis.from_url(redis_url)
    for line in sys.stdin:
        jobs = json.loads(line)
        if isinstance(jobs, dict):  # push_stamp
            client.rpush(jobs["stamp"], repr(time.time()))
            print("{}", flush=True)
            continue
        pushed = time.time()
        client.rpush("sdxl_queue", *(json.dumps(job) for job in jobs))
        times: dict[str, dict[str, float]] = {"processing": {}, "completed": {}}
        cursors = {events_key(job["id"]): "0" for job in jobs}
        deadline = time.monotonic() + 600
        error = None
        while len(times["completed"]) < len(jobs) and error is None and time.monotonic() < deadline:
            open_streams = {key: last for key, last in cursors.items()
                            if key.split(":", 1)[1] not in times["completed"]}
            for stream, entries in client.xread(open_streams, block=1000) or []:
                key = stream.decode()
                job_id = key.split(":", 1)[1]
                for event_id, fields in entries:
                    cursors[key] = event_id.decode()
                    event = json.loads(fields[b"data"])
                    if event.get("status") in ("failed", "cancelled"):
                        error = f"job {job_id} {event['status']}: {event.get('error')}"
                    elif event.get("status") in times:
                        times[event["status"]].setdefault(job_id, event["updated_at"])
        if error is None and len(times["completed"]) < len(jobs):
            error = "jobs did not complete within 600 s"
        print(json.dumps({"error": error} if error else {"pushed": pushed, **times}), flush=True)


async def _pickup(app: _App, jobs: int) -> list[float]:
    """ms from RPUSH to the recorded ``processing`` state, one job at a time (idle worker)."""
    latencies = []
    for i in range(jobs):
        job = _job(i)
        await asyncio.sleep(0.05)  # the worker is idle, blocked in BLMOVE
        times = await app.run([job])
        latencies.append((times["processing"][job["id"]] - times["pushed"]) * 1000)
    return latencies


async def _direct(runtime: Runtime, job: dict) -> float:
    """Seconds of the job's Triton request sent directly (what the bridge sends, minus progress)."""
    parsed = parse_job(json.dumps(job))
    inputs = {"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt,
              "parameters": parsed.triton_parameters()}
    started = time.perf_counter()
    await runtime.triton.run("sdxl", inputs)
    return time.perf_counter() - started


@dataclass
class _Latency:
    """One job on an idle worker: seconds end to end (push → ``completed`` recorded), of its own
    Triton request as the bridge saw it, of the same request sent directly afterwards, and the
    server's own time on each (Triton's statistics)."""

    total: float
    request: float
    direct: float
    server: float
    direct_server: float

    @property
    def overhead(self) -> float:
        """What the bridge adds to the job, beyond what a client calling Triton directly costs:
        end to end less the server's time, against the direct call less the server's time (the
        model's own run-to-run noise taken out, the bridge's effect on its request's way kept)."""
        return (self.total - self.server) - (self.direct - self.direct_server)


async def _latencies(runtime: Runtime, app: _App, triton_url: str, requests: "_RequestTimes",
                     jobs: int) -> list[_Latency]:
    latencies = []
    for i in range(jobs):
        job = _job(1000 + i)
        await asyncio.sleep(0.05)  # idle worker
        since = len(requests.spans)
        before = await _server_seconds(triton_url)
        times = await app.run([job])
        between = await _server_seconds(triton_url)
        started, ended = requests.spans[since]  # the bridge's request for this job
        await asyncio.sleep(0.05)  # the direct request starts from an idle machine too (a fair pair)
        direct = await _direct(runtime, job)
        after = await _server_seconds(triton_url)
        latencies.append(_Latency(times["completed"][job["id"]] - times["pushed"], ended - started, direct,
                                  between - before, after - between))
    return latencies


async def _queue_hop(app: _App, redis_url: str, count: int) -> list[float]:
    """ms from the app's RPUSH to a bare redis-py BLMOVE in this process returning it: what the
    queue itself costs a job, before any code of the bridge runs."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    hops = []
    try:
        for _ in range(count):
            taken = asyncio.create_task(client.blmove("bench:hop", "bench:hop:taken", 10, "LEFT", "RIGHT"))
            await asyncio.sleep(0.05)  # blocked, as an idle worker is
            await app.push_stamp("bench:hop")
            raw = await taken
            hops.append((time.time() - float(raw)) * 1000)
    finally:
        await client.aclose()
    return hops


class _StoreTimes:
    """How long the worker spends storing each job's results: the spool (files, thumbnail, asset
    metadata: in a thread) and the reporter placing them (local mode: hard links)."""

    def __init__(self, runtime: Runtime) -> None:
        self.per_job: list[float] = []
        worker = runtime.worker
        save, upload = worker.spool.save, worker.reporter.upload_assets
        pending: dict[str, float] = {}

        def timed_save(job_id: str, *args, **kwargs):
            started = time.perf_counter()
            try:
                return save(job_id, *args, **kwargs)
            finally:
                pending[job_id] = time.perf_counter() - started

        async def timed_upload(entry, *args, **kwargs):
            started = time.perf_counter()
            try:
                return await upload(entry, *args, **kwargs)
            finally:
                self.per_job.append(pending.pop(entry.job_id, 0.0) + time.perf_counter() - started)

        worker.spool.save = timed_save  # type: ignore[method-assign]
        worker.reporter.upload_assets = timed_upload  # type: ignore[method-assign]


class _RequestTimes:
    """Start and end of every Triton request the bridge makes (the bench wraps the client's ``run``)."""

    def __init__(self, runtime: Runtime) -> None:
        self.spans: list[tuple[float, float]] = []
        inner = runtime.worker.triton.run

        async def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await inner(*args, **kwargs)
            finally:
                self.spans.append((started, time.perf_counter()))

        runtime.worker.triton.run = run  # type: ignore[method-assign]

    def gaps(self, since: int, count: int) -> list[float]:
        """Seconds with no request of ours on the server between consecutive requests (of the
        ``count`` requests from index ``since``)."""
        spans = sorted(self.spans[since:since + count])
        return [max(0.0, later[0] - earlier[1]) for earlier, later in zip(spans, spans[1:])]


@dataclass
class _Round:
    """One full-queue round: wall seconds and the server's own seconds (Triton's statistics) for
    a batch through the bridge, then for the same requests sent directly back to back."""

    bridge_wall: float
    bridge_server: float
    direct_wall: float
    direct_server: float

    def overhead(self, jobs: int) -> float:
        """ms per job the server waited on the bridge, beyond what it waited on the direct client."""
        return ((self.bridge_wall - self.bridge_server) - (self.direct_wall - self.direct_server)) / jobs * 1000

    def wall_difference(self, jobs: int) -> float:
        return (self.bridge_wall - self.direct_wall) / jobs * 1000


async def _server_seconds(url: str, model: str = "sdxl") -> float:
    """Total time Triton spent on ``model``'s successful requests so far (its statistics)."""
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    try:
        stats = await client.get_inference_statistics(model, as_json=True)
    finally:
        await client.close()
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("ns", 0)) / 1e9


async def _full_queue(runtime: Runtime, app: _App, triton_url: str, jobs: int, first_seed: int) -> _Round:
    """``jobs`` queued at once through the bridge, then the same requests direct back to back."""
    batch = [_job(first_seed + i) for i in range(jobs)]
    before = await _server_seconds(triton_url)
    times = await app.run(batch)
    bridge_wall = max(times["completed"].values()) - times["pushed"]
    between = await _server_seconds(triton_url)
    started = time.perf_counter()
    for job in batch:
        await _direct(runtime, job)
    direct_wall = time.perf_counter() - started
    after = await _server_seconds(triton_url)
    return _Round(bridge_wall, between - before, direct_wall, after - between)


async def main(args: argparse.Namespace) -> None:
    from model_kit.tiny import build_all

    from harness.supabase_stub import SupabaseStub  # the local stand-in for Supabase (it checks the contract)

    models = build_all(Path(args.models_dir))
    split = _cpu_split() if args.pin else None
    if split is not None:
        os.sched_setaffinity(0, split.bridge)  # inherited by Redis, the app and every thread started from here
    out = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    redis = RedisServer(data_dir=out / "redis").start()
    base = dict(models_dir=models, output_dir=out, redis_url=redis.url, api_port=0, model_threads=1,
                triton_http_port=free_port(), triton_grpc_port=free_port(), triton_metrics_port=free_port(),
                triton_exit_timeout_s=3, device="cpu")
    if split is not None:
        os.sched_setaffinity(0, split.model)  # tritonserver and its model processes inherit this
    try:
        triton = TritonServer(Settings(**base), startup_models=["sdxl"]).start()
    finally:
        if split is not None:
            os.sched_setaffinity(0, split.bridge)
    supabase = SupabaseStub().start()
    try:
        async with Runtime(Settings(**base, triton_url=triton.grpc_url), api=False) as runtime, \
                _App(redis.url) as app:
            freeze_startup_heap()  # as `serve` does (here it also holds the tiny models' builder: torch)
            requests = _RequestTimes(runtime)
            await _latencies(runtime, app, triton.grpc_url, requests, 3)  # warm-up
            pickup = await _pickup(app, args.jobs)
            stores = _StoreTimes(runtime)
            latencies = await _latencies(runtime, app, triton.grpc_url, requests, args.jobs)
            hops = await _queue_hop(app, redis.url, args.jobs)
            # Rounds alternate bridge and direct batches: the machine's drift hits both alike.
            rounds, gaps = [], []
            for r in range(args.rounds):
                since = len(requests.spans)
                rounds.append(await _full_queue(runtime, app, triton.grpc_url, args.batch, 2000 + 1000 * r))
                gaps += requests.gaps(since, args.batch)  # the round's first requests are the bridge's
        # The production path: uploads to Storage and the signed callback (to the local stand-in,
        # so without the network's own latency); `completed` is recorded once the callback got through.
        async with Runtime(Settings(**base, **supabase.settings_values(), triton_url=triton.grpc_url),
                           api=False) as runtime, _App(redis.url) as app:
            freeze_startup_heap()
            requests = _RequestTimes(runtime)
            await _latencies(runtime, app, triton.grpc_url, requests, 3)  # warm-up
            uploads = _StoreTimes(runtime)
            remote = await _latencies(runtime, app, triton.grpc_url, requests, args.jobs)
        if supabase.violations:
            raise RuntimeError(f"the bridge broke the contract: {supabase.violations[:3]}")
    finally:
        supabase.stop()
        triton.stop()
        redis.stop()
    where = (f"tritonserver on CPU {_cpus(split.model)}; the bridge, Redis and the app on CPU {_cpus(split.bridge)}"
             if split is not None else "every process on every CPU")
    table = Table(title=f"bridge on tiny SDXL (64x64, 2 steps), local mode, {args.jobs} jobs per figure\n{where}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("pickup latency p50", f"{_pct(pickup, 0.5):.2f} ms", "≤ 5 ms")
    table.add_row("pickup latency p99", f"{_pct(pickup, 0.99):.2f} ms", "")

    def median_ms(values) -> float:
        return statistics.median(values) * 1000

    overhead, hop, store = (median_ms([x.overhead for x in latencies]), statistics.median(hops),
                            median_ms(stores.per_job))
    table.add_row("one job through the bridge, idle worker (median)", f"{median_ms([x.total for x in latencies]):.1f} ms", "")
    table.add_row("  its request as the bridge saw it / the same request direct (median)",
                  f"{median_ms([x.request for x in latencies]):.1f} / {median_ms([x.direct for x in latencies]):.1f} ms", "")
    table.add_row("  the server's own time on each (median)",
                  f"{median_ms([x.server for x in latencies]):.1f} / {median_ms([x.direct_server for x in latencies]):.1f} ms", "")
    table.add_row("latency overhead per job, over the direct call (median of pairs)", f"{overhead:.2f} ms", "")
    table.add_row("  of it: the queue's own hop (RPUSH → a bare BLMOVE wakes)", f"{hop:.2f} ms", "")
    table.add_row("  of it: storing results (spool with thumbnail, files placed)", f"{store:.2f} ms", "")
    table.add_row("  the rest: claims, gate, scheduling, states, hand-offs", f"{overhead - hop - store:.2f} ms", "")
    table.add_row("  p90 of the overhead", f"{_pct([x.overhead for x in latencies], 0.9) * 1000:.2f} ms", "")
    remote_overhead, remote_store = median_ms([x.overhead for x in remote]), median_ms(uploads.per_job)
    table.add_row("Supabase mode (local stand-in): overhead per job (median)", f"{remote_overhead:.2f} ms", "")
    table.add_row("  of it: storing results (spool, both files uploaded at once)", f"{remote_store:.2f} ms", "")
    table.add_row("  of it: the queue's hop, as above", f"{hop:.2f} ms", "")
    table.add_row("  the rest: the signed callback, claims, gate, scheduling, states",
                  f"{remote_overhead - hop - remote_store:.2f} ms", "")
    per_job = sorted(r.overhead(args.batch) for r in rounds)
    table.add_row(f"per-job overhead, full queue: the server's wait on us (median of {args.rounds} rounds)",
                  f"{statistics.median(per_job):.2f} ms", "≤ 2 ms")
    table.add_row("  rounds' quartiles (ms per job: 25 % / 75 %)", f"{_pct(per_job, 0.25):.2f} / {_pct(per_job, 0.75):.2f}", "")
    walls = sorted(r.wall_difference(args.batch) for r in rounds)
    table.add_row("  plain wall difference per job, model noise included (median; quartiles)",
                  f"{statistics.median(walls):.2f} ms; {_pct(walls, 0.25):.2f} / {_pct(walls, 0.75):.2f}", "")
    table.add_row("idle gap between two jobs' Triton requests (mean / p99)",
                  f"{statistics.mean(gaps) * 1000:.2f} / {_pct(gaps, 0.99) * 1000:.2f} ms", "")
    bridge_wall, direct_wall = sum(r.bridge_wall for r in rounds), sum(r.direct_wall for r in rounds)
    table.add_row("throughput through the bridge", f"{args.batch * args.rounds / bridge_wall:.2f} jobs/s", "")
    table.add_row("throughput direct to Triton", f"{args.batch * args.rounds / direct_wall:.2f} jobs/s", "")
    Console(width=120).print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=25, help="full-queue rounds (bridge batch, then direct batch)")
    parser.add_argument("--batch", type=int, default=10, help="jobs queued at once in each full-queue round")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="tritonserver on a CPU of its own, as the model is on a GPU (default: on)")
    parser.add_argument("--app", metavar="REDIS_URL", help=argparse.SUPPRESS)  # the app process (_App)
    parser.add_argument("--models-dir", default=str(Path(__file__).resolve().parent.parent / ".cache" / "tiny-models"))
    arguments = parser.parse_args()
    if arguments.app:
        _app_process(arguments.app)
    else:
        asyncio.run(main(arguments))
