"""``python -m bridge demo``: the whole system on one machine with nothing configured.

Starts embedded Redis and Triton (local mode), queues one job of each kind through the real
queue, follows their real progress with Rich progress bars, runs a chat turn through the HTTP API,
and prints a summary table. Outputs land in ``OUTPUT_DIR`` (``./outputs``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bridge.jobs import JOB_TYPES
from bridge.queue import Queue
from bridge.runtime import Runtime
from bridge.settings import Settings

TERMINAL = ("completed", "failed", "cancelled")


def job_payload(job_type: str, prompt: str, user_id: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": job_type, "prompt": prompt, "user_id": user_id,
            "config": config, "metadata": {}}


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:<32}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    console=console)


async def follow_job(queue: Queue, job_id: str, progress: Progress, task: Any, timeout: float) -> dict[str, Any]:
    """Advance a progress bar from the job's real progress events until it is terminal."""
    last_id, deadline = "0", time.monotonic() + timeout
    while time.monotonic() < deadline:
        for last_id, event in await queue.events(job_id, last_id, block_ms=1000):
            if event.get("progress") is not None:
                progress.update(task, completed=float(event["progress"]))
            if event.get("status") in TERMINAL:
                if event["status"] == "completed":
                    progress.update(task, completed=100)
                return await queue.get_state(job_id) or event
    raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s")


async def submit_and_follow(queue: Queue, payload: dict[str, Any], progress: Progress, timeout: float) -> dict[str, Any]:
    """Queue ``payload`` like any producer would (RPUSH) and follow it to its end."""
    job_type = payload["type"]
    await queue.set_state(payload["id"], status="queued", type=job_type, user_id=payload["user_id"], progress=0)
    await queue.push(JOB_TYPES[job_type].queue, json.dumps(payload))
    task = progress.add_task(f"{job_type} {payload['id'][:8]}", total=100)
    return await follow_job(queue, payload["id"], progress, task, timeout)


def demo_jobs(tiny: bool) -> list[dict[str, Any]]:
    """One job of each kind; tiny sizes on the tiny models, the production defaults otherwise."""
    small_sdxl = {"width": 64, "height": 64, "num_inference_steps": 4} if tiny else {}
    small_wan = {"width": 64, "height": 64, "num_inference_steps": 4} if tiny else {}
    frames = {"frame_num": 9} if tiny else {}
    return [
        job_payload("sdxl_image_fast", "a lighthouse on a cliff at dawn, oil painting", "demo",
                    {**small_sdxl, "num_images": 3, "seed": 42}),
        job_payload("video_fast", "waves rolling onto a sandy beach", "demo", {**small_wan, **frames, "seed": 7}),
        job_payload("image_fast", "a red bicycle leaning on a brick wall", "demo", {**small_wan, "seed": 0}),
        job_payload("video7b_fast_enhanced", "a cat walking through a garden", "demo",
                    {**small_wan, **frames, "seed": 11}),
    ]


async def _chat_turn(runtime: Runtime) -> tuple[str, float, str]:
    headers = {}
    if runtime.settings.worker_api_key is not None:
        headers["Authorization"] = f"Bearer {runtime.settings.worker_api_key.get_secret_value()}"
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.api_port}", headers=headers,
                                 timeout=300) as client:
        response = await client.post("/chat", json={"messages": [{"role": "user", "content": "Say hello."}],
                                                     "max_tokens": 32})
    elapsed = time.monotonic() - started
    body = response.json()
    status = "completed" if response.status_code == 200 and body.get("success") else f"failed ({response.status_code})"
    text = str(body.get("response", body.get("error", "")))
    return status, elapsed, "".join(c if c.isprintable() else " " for c in text)[:40] + " (random weights)"


def _describe_outputs(settings: Settings, assets: list[dict[str, Any]]) -> str:
    """``outputs/demo/<job>/`` and the file names in it."""
    if not assets:
        return "-"
    folder = (settings.output_dir / assets[0]["url"]).parent
    return f"{folder}/\n" + " ".join(a["url"].rsplit("/", 1)[-1] for a in assets)


def page_address(runtime: Runtime) -> str:
    """The operator's page of a running runtime (``GET /ui``), as a browser on this machine reaches it."""
    host = runtime.settings.api_host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{runtime.api_port}/ui"


async def _until_interrupted() -> None:
    """Wait for Ctrl-C (SIGINT) or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_demo(settings: Settings, console: Console, timeout: float = 1800, stay: bool = False) -> bool:
    """Run the demo; True when every job completed. ``stay``: then keep the system running (the
    operator's page stays up) until Ctrl-C, on ``API_PORT`` instead of a free port."""
    tiny = (settings.models_dir / ".tiny").exists()
    table = Table(title="demo summary")
    for column in ("job", "type", "status", "generation s", "outputs"):
        table.add_column(column, overflow="fold")
    ok = True
    console.print("starting redis-server, tritonserver and the bridge (local mode)…")
    async with Runtime(settings if stay else settings.model_copy(update={"api_port": 0})) as runtime:
        key_note = " (log in with WORKER_API_KEY)" if settings.worker_api_key is not None else ""
        console.print(f"operator's page: {page_address(runtime)}{key_note}")
        with progress_bar(console) as progress:
            payloads = demo_jobs(tiny)
            started = time.monotonic()
            results = await asyncio.gather(*(submit_and_follow(runtime.queue, p, progress, timeout) for p in payloads),
                                           return_exceptions=True)
        for payload, result in zip(payloads, results):
            if isinstance(result, BaseException):
                ok = False
                table.add_row(payload["id"][:8], payload["type"], f"error: {result}", "-", "-")
                continue
            status = result.get("status", "?")
            ok = ok and status == "completed"
            seconds = result.get("metadata", {}).get("generation_time", time.monotonic() - started)
            outputs = _describe_outputs(settings, result.get("assets") or [])
            table.add_row(payload["id"][:8], payload["type"], status if status == "completed"
                          else f"{status}: {result.get('error')}", f"{float(seconds):.1f}", outputs or "-")
        status, seconds, text = await _chat_turn(runtime)
        ok = ok and status == "completed"
        table.add_row("-", "chat (qwen_instruct)", status, f"{seconds:.1f}", text)
        console.print(table)
        if stay:
            console.print(f"the system keeps running: {page_address(runtime)}{key_note}; Ctrl-C stops it")
            await _until_interrupted()
            console.print("stopping…")
    return ok
