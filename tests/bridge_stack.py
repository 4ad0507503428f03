"""An in-process bridge over the real parts: a Runtime on the session's tritonserver, a real
redis-server, and (optionally) the local Supabase stand-in. Helpers to push jobs and wait for them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from bridge.jobs import JOB_TYPES
from bridge.launcher import TritonServer
from bridge.redis_server import RedisServer
from bridge.runtime import Runtime
from bridge.settings import Settings
from tests.stack import TERMINAL
from tests.stack import stack_settings as api_stack_settings


def stack_settings(tiny_models_dir: Path, triton: TritonServer, redis: RedisServer, output_dir: Path,
                   **overrides: Any) -> Settings:
    """Settings for a worker on the shared tritonserver and the given redis-server, with the real
    model table and budget (tests.stack's API defaults otherwise)."""
    values: dict[str, Any] = dict(
        heartbeat_ttl_s=2.0, report_deadline_s=10.0, vram_budget_gb=47.0, model_table={}, fetch_allowed_hosts=[],
    )
    values.update(overrides)
    return api_stack_settings(tiny_models_dir, triton.grpc_url, redis.url, output_dir, **values)


def sdxl_job(**config: Any) -> dict[str, Any]:
    cfg = {"width": 64, "height": 64, "num_inference_steps": 2, "num_images": 1, "seed": 7}
    cfg.update(config)
    return {"id": str(uuid.uuid4()), "type": "sdxl_image_fast", "prompt": "a red fox in the snow",
            "user_id": "user-1", "config": cfg, "metadata": {}}


def wan_job(job_type: str = "video_fast", **config: Any) -> dict[str, Any]:
    cfg = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}
    if job_type.startswith("video") or "video" in job_type:
        cfg.setdefault("frame_num", 5)
    cfg.update(config)
    return {"id": str(uuid.uuid4()), "type": job_type, "prompt": "waves on a beach at sunset",
            "user_id": "user-1", "config": cfg, "metadata": {}}


def chat_job(job_type: str = "chat_conversation", prompt: str = "Tell me about lighthouses.",
             **metadata: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": job_type, "prompt": prompt, "user_id": "user-1",
            "config": {"seed": 1}, "metadata": {"max_tokens": 8, **metadata}}


async def push(runtime: Runtime, job: dict[str, Any] | bytes | str, queue: str | None = None) -> None:
    if queue is None:
        assert isinstance(job, dict)
        queue = JOB_TYPES[job["type"]].queue
    payload = job if isinstance(job, (bytes, str)) else json.dumps(job)
    await runtime.queue.push(queue, payload)


async def wait_state(runtime: Runtime, job_id: str, statuses: tuple[str, ...] = TERMINAL,
                     timeout: float = 120.0) -> dict[str, Any]:
    """Poll the job's recorded state until it reaches one of ``statuses`` (test helper only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await runtime.queue.get_state(job_id)
        if state and state.get("status") in statuses:
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {statuses}; last state {await runtime.queue.get_state(job_id)}")
