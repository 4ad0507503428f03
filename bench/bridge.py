"""Bridge benchmark on the tiny models (CPU): pickup latency, per-job overhead, throughput.

    python bench/bridge.py [--jobs 40] [--models-dir .cache/tiny-models]

- pickup: RPUSH → the job's first ``processing`` state, with an idle worker (p50/p99). The old
  worker polled every 2–5 s; the target is p50 ≤ 5 ms.
- overhead: mean end-to-end job time (push → completed, files written, state recorded) minus the
  mean time of the same Triton request made directly. Target ≤ 2 ms of bridge bookkeeping; the
  figure also shows what PNG thumbnails and durable (fsync'd) spool/output writes cost.
- throughput: N jobs pushed at once, jobs per second until all completed.
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


async def _overhead(runtime: Runtime, jobs: int) -> tuple[float, float]:
    """(mean end-to-end s through the bridge, mean s of the same request sent to Triton directly)."""
    bridge_s, direct_s = [], []
    for i in range(jobs):
        job = _job(1000 + i)
        started = time.perf_counter()
        await runtime.queue.push("sdxl_queue", json.dumps(job))
        await _wait(runtime, job["id"])
        bridge_s.append(time.perf_counter() - started)
        parsed = parse_job(json.dumps(job))
        inputs = {"prompt": parsed.prompt, "negative_prompt": parsed.negative_prompt,
                  "parameters": parsed.triton_parameters()}
        started = time.perf_counter()
        await runtime.triton.run("sdxl", inputs)
        direct_s.append(time.perf_counter() - started)
    return statistics.mean(bridge_s), statistics.mean(direct_s)


async def _throughput(runtime: Runtime, jobs: int) -> float:
    batch = [_job(2000 + i) for i in range(jobs)]
    started = time.perf_counter()
    for job in batch:
        await runtime.queue.push("sdxl_queue", json.dumps(job))
    for job in batch:
        await _wait(runtime, job["id"])
    return jobs / (time.perf_counter() - started)


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
            await _overhead(runtime, 2)  # warm-up
            pickup = await _pickup(runtime, args.jobs)
            bridge_s, direct_s = await _overhead(runtime, args.jobs)
            rate = await _throughput(runtime, args.jobs)
    finally:
        triton.stop()
        redis.stop()
    table = Table(title=f"bridge on tiny SDXL (64x64, 2 steps), {args.jobs} jobs per figure")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("pickup latency p50", f"{_pct(pickup, 0.5):.2f} ms", "≤ 5 ms")
    table.add_row("pickup latency p99", f"{_pct(pickup, 0.99):.2f} ms", "")
    table.add_row("job through the bridge (mean)", f"{bridge_s * 1000:.1f} ms", "")
    table.add_row("same request direct to Triton (mean)", f"{direct_s * 1000:.1f} ms", "")
    table.add_row("bridge overhead per job", f"{(bridge_s - direct_s) * 1000:.1f} ms", "≤ 2 ms")
    table.add_row("throughput", f"{rate:.2f} jobs/s", "")
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--models-dir", default=str(Path(__file__).resolve().parent.parent / ".cache" / "tiny-models"))
    asyncio.run(main(parser.parse_args()))
