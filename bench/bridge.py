"""Bridge benchmark on the tiny models (CPU): pickup latency, per-job overhead, throughput.

    python bench/bridge.py [--jobs 40] [--models-dir .cache/tiny-models]

Local mode (no Supabase): results go to OUTPUT_DIR, statuses to Redis. Figures:

- pickup: RPUSH → the job's first ``processing`` state recorded, with an idle worker (p50/p99).
  The old worker polled every 2–5 s; the target is p50 ≤ 5 ms.
- latency overhead (idle worker, one job at a time): push → ``completed`` recorded (PNG and WEBP
  thumbnail written, state in Redis), minus the same Triton request made directly right after it.
  Both the mean difference and the median of the paired differences are printed: it is
  everything the bridge adds to one job (queue, claims, safety gate, spool, thumbnail, files,
  state), i.e. the time a user waits beyond the GPU.
- per-job overhead with a full queue (target ≤ 2 ms): N jobs queued at once, wall time until all
  completed, minus N of the same requests sent directly back to back, divided by N: the GPU time
  the bridge costs per job (the median of ``--rounds`` alternating rounds). On this CPU-only
  machine the model computes on the same two cores as the bridge, so the bridge's work for one
  job (thumbnail, files, Redis) slows the next job's generation a little; on a GPU it would not.
  Beside it: the idle gap between one job's Triton request ending and the next one's starting
  (the bench times the bridge's requests), the time the server has nothing of ours to do. While one job's results are stored and reported the next one already
  runs, so this is the gap between two generations.
- throughput: jobs per second through the bridge and directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.jobs import parse_job  # noqa: E402
from bridge.launcher import TritonServer, free_port  # noqa: E402
from bridge.redis_server import RedisServer  # noqa: E402
from bridge.runtime import Runtime  # noqa: E402
from bridge.settings import Settings  # noqa: E402


def _job(seed: int) -> dict:
    return {"id": str(uuid.uuid4()), "type": "sdxl_image_fast", "prompt": "a lighthouse at dawn", "user_id": "bench",
            "config": {"width": 64, "height": 64, "num_inference_steps": 2, "num_images": 1, "seed": seed}}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _wait(runtime: Runtime, job_id: str, status: str = "completed", timeout: float = 300) -> dict:
    last, deadline = "0", time.monotonic() + timeout
    while time.monotonic() < deadline:
        for last, event in await runtime.queue.events(job_id, last, block_ms=1000):
            if event.get("status") == status or event.get("status") in ("failed", "cancelled"):
                return event
    raise TimeoutError(job_id)


async def _pickup(runtime: Runtime, jobs: int) -> list[float]:
    """ms from RPUSH to the recorded ``processing`` state, one job at a time (idle worker)."""
    latencies = []
    for i in range(jobs):
        job = _job(i)
        await asyncio.sleep(0.05)  # the worker is idle, blocked in BLMOVE
        pushed = time.time()
        await runtime.queue.push("sdxl_queue", json.dumps(job))
        first = await _wait(runtime, job["id"], "processing")
        latencies.append((first["updated_at"] - pushed) * 1000)
        await _wait(runtime, job["id"])
    return latencies


async def _direct(runtime: Runtime, job: dict) -> float:
    """Seconds of the job's Triton request sent directly (what the bridge sends, minus progress)."""
    parsed = parse_job(json.dumps(job))
    inputs = {"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt,
              "parameters": parsed.triton_parameters()}
    started = time.perf_counter()
    await runtime.triton.run("sdxl", inputs)
    return time.perf_counter() - started


async def _overhead(runtime: Runtime, jobs: int) -> tuple[list[float], list[float]]:
    """(s through the bridge, s of the same request direct) per job, one job at a time."""
    bridge_s, direct_s = [], []
    for i in range(jobs):
        job = _job(1000 + i)
        await asyncio.sleep(0.05)  # idle worker
        pushed = time.time()
        await runtime.queue.push("sdxl_queue", json.dumps(job))
        done = await _wait(runtime, job["id"])
        bridge_s.append(done["updated_at"] - pushed)
        await asyncio.sleep(0.05)  # the direct request starts from an idle machine too (a fair pair)
        direct_s.append(await _direct(runtime, job))
    return bridge_s, direct_s


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


async def _full_queue(runtime: Runtime, jobs: int, first_seed: int) -> tuple[float, float]:
    """(wall s for ``jobs`` queued at once through the bridge, wall s for them direct back to back)."""
    batch = [_job(first_seed + i) for i in range(jobs)]
    pushed = time.time()
    for job in batch:
        await runtime.queue.push("sdxl_queue", json.dumps(job))
    await _wait(runtime, batch[-1]["id"])  # FIFO: the last one ends last (one reader: the bench adds no load)
    await asyncio.sleep(0.2)
    states = [await runtime.queue.get_state(job["id"]) for job in batch]
    if any((state or {}).get("status") != "completed" for state in states):
        raise RuntimeError(f"not all jobs completed: {[(state or {}).get('status') for state in states]}")
    bridge_wall = max(state["updated_at"] for state in states) - pushed
    started = time.perf_counter()
    for job in batch:
        await _direct(runtime, job)
    return bridge_wall, time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    from model_kit.tiny import build_all

    models = build_all(Path(args.models_dir))
    out = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    redis = RedisServer(data_dir=out / "redis").start()
    settings = Settings(models_dir=models, output_dir=out, redis_url=redis.url, api_port=0, model_threads=1,
                        triton_http_port=free_port(), triton_grpc_port=free_port(), triton_metrics_port=free_port(),
                        triton_exit_timeout_s=3, device="cpu")
    triton = TritonServer(settings, startup_models=["sdxl"]).start()
    try:
        async with Runtime(settings.model_copy(update={"triton_url": triton.grpc_url}), api=False) as runtime:
            await _overhead(runtime, 3)  # warm-up
            pickup = await _pickup(runtime, args.jobs)
            bridge_s, direct_s = await _overhead(runtime, args.jobs)
            # Rounds alternate bridge and direct batches: the machine's drift hits both alike.
            requests = _RequestTimes(runtime)
            rounds, gaps = [], []
            for r in range(args.rounds):
                since = len(requests.spans)
                rounds.append(await _full_queue(runtime, args.jobs, 2000 + 1000 * r))
                gaps += requests.gaps(since, args.jobs)  # the round's first requests are the bridge's
    finally:
        triton.stop()
        redis.stop()
    paired = [b - d for b, d in zip(bridge_s, direct_s)]
    table = Table(title=f"bridge on tiny SDXL (64x64, 2 steps), local mode, {args.jobs} jobs per figure")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("pickup latency p50", f"{_pct(pickup, 0.5):.2f} ms", "≤ 5 ms")
    table.add_row("pickup latency p99", f"{_pct(pickup, 0.99):.2f} ms", "")
    table.add_row("one job through the bridge (mean, idle worker)", f"{statistics.mean(bridge_s) * 1000:.1f} ms", "")
    table.add_row("same request direct to Triton (mean)", f"{statistics.mean(direct_s) * 1000:.1f} ms", "")
    table.add_row("latency overhead per job (mean)", f"{(statistics.mean(bridge_s) - statistics.mean(direct_s)) * 1000:.2f} ms", "")
    table.add_row("latency overhead per job (median of pairs)", f"{statistics.median(paired) * 1000:.2f} ms", "")
    per_job = sorted((bridge - direct) / args.jobs * 1000 for bridge, direct in rounds)
    table.add_row(f"per-job overhead, full queue (median of {args.rounds} rounds)", f"{statistics.median(per_job):.2f} ms",
                  "≤ 2 ms")
    table.add_row("  rounds (ms per job)", " ".join(f"{value:.2f}" for value in per_job), "")
    table.add_row("idle gap between two jobs' Triton requests (mean / p99)",
                  f"{statistics.mean(gaps) * 1000:.2f} / {_pct(gaps, 0.99) * 1000:.2f} ms", "")
    bridge_wall, direct_wall = (sum(walls) for walls in zip(*rounds))
    table.add_row("throughput through the bridge", f"{args.jobs * args.rounds / bridge_wall:.2f} jobs/s", "")
    table.add_row("throughput direct to Triton", f"{args.jobs * args.rounds / direct_wall:.2f} jobs/s", "")
    Console(width=120).print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=9, help="full-queue rounds (bridge batch, then direct batch)")
    parser.add_argument("--models-dir", default=str(Path(__file__).resolve().parent.parent / ".cache" / "tiny-models"))
    asyncio.run(main(parser.parse_args()))
