"""The remaining routes of the old worker's HTTP API, rebuilt on the bridge's parts.

- ``POST /chat/unrestricted``: the older chat shape forced to the ``unrestricted`` template
  (``sfw_mode`` still wins), answered like ``/chat`` plus the content-mode decision;
- ``POST /enhance/legacy``: ``{prompt, enhancement_type, job_type, quality}`` rewritten by the
  worker's own :class:`bridge.textgen.Enhancer` (token budget, fallback to the original);
- ``GET /enhancement/info``: templates with their budgets and quality tags;
- ``GET /chat/health``: the chat model's residency and a one-token inference probe;
- ``GET /model/info``: per model state, VRAM need, policy and weights path;
- ``GET /status``: worker id, queue depths, running jobs, residency summary;
- ``GET /memory/report``: the residency manager's full report;
- operator routes (``POST /admin``, ``POST /emergency/operation``, ``GET /debug/env``) live in
  :mod:`bridge.api_admin`.

Authentication is the app's (every route needs the key). Errors use the newer shape: bad input
is a 422 naming the field (see :mod:`bridge.api_common`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridge.api_chat import answer_chat
from bridge.api_common import ApiError, data_source, probe, public_failure, public_snapshot, runtime_of
from bridge.chat import MAX_MESSAGE_CHARS
from bridge.chat_turns import DISPLAY_NAMES, complete, data_of, gpu_turn, parse_body, refuse_unsafe, refuse_verdict
from bridge.jobs import JOB_TYPES, QUEUES, peek_id
from bridge.safety import check_output
from bridge.textgen import ENHANCE_SAMPLING

router = APIRouter()

#: The model the worker's enhancer runs on (docs/APP_CONTRACT.md §3: Qwen Base rewrites prompts).
ENHANCE_MODEL = "qwen_base"
#: ``quality`` of ``/enhance/legacy`` → sampling over :data:`ENHANCE_SAMPLING` ("high" is the
#: worker's own setting for enhanced jobs; "fast" writes a shorter rewrite).
QUALITY_SAMPLING: dict[str, dict[str, Any]] = {
    "fast": {**ENHANCE_SAMPLING, "max_tokens": 100},
    "high": dict(ENHANCE_SAMPLING),
}
CHAT_MODEL = "qwen_instruct"
#: The chat health probe: one token, answered within this many seconds.
CHAT_PROBE_TIMEOUT_S = 15.0
_PROBE_MESSAGES = [{"role": "user", "content": "Say OK."}]
_KINDS = {"sdxl": "image", "wan": "video", "qwen_instruct": "text", "qwen_base": "text"}


def _uptime(request: Request) -> float:
    return round(time.monotonic() - request.app.state.started, 1)


# ----------------------------------------------------------------------------- chat and enhancement
@router.post("/chat/unrestricted")
async def chat_unrestricted(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """The older request shape (``{message, system_prompt, conversation_id, context_type,
    conversation_history}``; ``messages`` works too) forced to the unrestricted template.
    ``sfw_mode`` still wins (general template, masked reply). Answers like ``/chat`` plus
    ``content_mode: {mode, reason, template, forced}``."""
    runtime = runtime_of(request)
    answer = await answer_chat(runtime, parse_body(body, 422), template="unrestricted")
    info = answer["prompt_info"]
    answer["content_mode"] = {"mode": info["content_mode"], "reason": info["content_mode_reason"],
                              "template": info["template"], "forced": info["template"] == "unrestricted"}
    return answer


class LegacyEnhanceRequest(BaseModel):
    """``POST /enhance/legacy``: ``enhancement_type`` ``auto`` follows ``job_type`` (``sdxl_*`` →
    sdxl, anything else → wan)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    enhancement_type: Literal["sdxl", "wan", "auto"] = "auto"
    job_type: str | None = None
    quality: Literal["fast", "high"] = "fast"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("job_type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        if value is not None and value not in JOB_TYPES:
            raise ValueError(f"unknown job type {value!r}; known: {', '.join(sorted(JOB_TYPES))}")
        return value

    def kind(self) -> Literal["sdxl", "wan"]:
        if self.enhancement_type != "auto":
            return self.enhancement_type
        return "sdxl" if (self.job_type or "").startswith("sdxl") else "wan"


@router.post("/enhance/legacy")
async def enhance_legacy(request: Request, body: LegacyEnhanceRequest) -> dict[str, Any]:
    """Safety gate, then the worker's enhancer (Qwen Base, in an interactive GPU turn): the
    rewrite fitted to the target's token budget, or the original prompt when it fails."""
    runtime = runtime_of(request)
    data = data_of(runtime)
    await refuse_unsafe(runtime, body.prompt, data, "enhance")
    kind = body.kind()
    started = time.monotonic()
    async with gpu_turn(runtime, ENHANCE_MODEL):
        enhanced = await runtime.worker.enhancer.enhance(body.prompt, kind, sampling=QUALITY_SAMPLING[body.quality],
                                                         model=ENHANCE_MODEL)
    refuse_verdict(check_output(enhanced.prompt, body.prompt, data=data), "enhance_output")
    return {
        "success": True,
        "original_prompt": body.prompt,
        "enhanced_prompt": enhanced.prompt,
        "generation_time": round(time.monotonic() - started, 3),
        "enhancement_type": kind,
        "job_type": body.job_type,
        "quality": body.quality,
        "enhancement": {**enhanced.metadata(), "model": ENHANCE_MODEL, "template": f"{kind}_enhance"},
    }


@router.get("/enhancement/info")
async def enhancement_info(request: Request) -> dict[str, Any]:
    """The templates of ``templates.yaml`` with their token budgets and quality tags, and how
    ``/enhance/legacy`` picks one (no system prompt text)."""
    data = data_of(runtime_of(request))
    templates = {
        name: {"description": t.description, "max_tokens": t.max_tokens, "context_tokens": t.context_tokens,
               "temperature": t.temperature, "top_p": t.top_p, "prompt_budget": t.prompt_budget,
               "quality_tags": list(t.quality_tags)}
        for name, t in sorted(data.templates.templates.items())
    }
    return {
        "success": True,
        "templates": templates,
        "enhancement_types": {"sdxl": "sdxl_enhance", "wan": "wan_enhance",
                              "auto": "sdxl_enhance for job types sdxl_*, else wan_enhance"},
        "qualities": QUALITY_SAMPLING,
        "model": ENHANCE_MODEL,
        "source": data_source(data),
    }


# ----------------------------------------------------------------------------- state
@router.get("/chat/health", response_model=None)
async def chat_health(request: Request) -> dict[str, Any] | JSONResponse:
    """The chat model's residency, and when it is resident a one-token completion within
    :data:`CHAT_PROBE_TIMEOUT_S` (it is never loaded for the probe). ``status``: ``ok``;
    ``not_loaded`` (200: nothing wrong, it loads on the first chat); ``degraded`` (503: resident
    but the probe failed)."""
    runtime = runtime_of(request)
    state = runtime.residency.state(CHAT_MODEL)
    body: dict[str, Any] = {"success": True, "model": CHAT_MODEL, "display_name": DISPLAY_NAMES[CHAT_MODEL],
                            "state": state, "model_loaded": state == "ready"}
    if state != "ready":
        return {**body, "status": "not_loaded", "inference": None}
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(
            complete(runtime, CHAT_MODEL, _PROBE_MESSAGES, {"max_tokens": 1, "temperature": 0.0}),
            CHAT_PROBE_TIMEOUT_S)
    except ApiError as exc:
        error = exc.message
    except TimeoutError:
        error = f"no answer within {CHAT_PROBE_TIMEOUT_S:.0f}s"
    else:
        inference = {"ok": True, "seconds": round(time.monotonic() - started, 3), "tokens": result.output_tokens}
        return {**body, "status": "ok", "inference": inference}
    inference = {"ok": False, "seconds": round(time.monotonic() - started, 3), "error": error}
    return JSONResponse({**body, "success": False, "status": "degraded", "inference": inference}, status_code=503)


@router.get("/model/info")
async def model_info(request: Request) -> dict[str, Any]:
    """Per model: state, kind, VRAM need (the table's estimate, and NVML's measurement on a GPU),
    policy, requests in flight, and where its weights are expected (no settings values)."""
    runtime = runtime_of(request)
    report = runtime.residency.report()
    models = {}
    for name, m in report.models.items():
        weights = runtime.settings.weights_path(name)
        models[name] = {
            "state": m.state, "kind": _KINDS.get(name), "policy": m.policy, "vram_gb": m.vram_gb,
            "measured_gb": m.measured_gb, "in_flight": m.in_flight,
            "weights_present": weights.exists(), "last_error": public_failure(m.last_error),
        }
    return {"success": True, "budget_gb": report.budget_gb, "models": models}


async def _running_jobs(queue: Any) -> list[dict[str, Any]]:
    """The jobs in this worker's processing lists (running, or taken and waiting for the GPU)."""
    jobs = []
    for name in QUEUES:
        for raw in await queue.in_processing(name):
            job_id = peek_id(raw)
            state = (await queue.get_state(job_id) or {}) if job_id else {}
            jobs.append({"id": job_id, "queue": name, "type": state.get("type"), "status": state.get("status"),
                         "progress": state.get("progress")})
    return jobs


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    """Worker id, uptime, queue depths, this worker's running jobs, interactive requests waiting
    for the GPU, and a residency summary. Redis values are ``null`` while Redis does not answer."""
    runtime = runtime_of(request)
    report = runtime.residency.report()
    states = {name: m.state for name, m in report.models.items()}
    waiting = runtime.worker.dispatcher.waiting() if runtime.with_jobs else []
    return {
        "success": True,
        "worker_id": runtime.settings.worker_id,
        "uptime": _uptime(request),
        "jobs_enabled": bool(runtime.with_jobs),
        "queues": await probe(runtime.queue.queue_depths()),
        "running_jobs": await probe(_running_jobs(runtime.queue)),
        "waiting_for_gpu": len(waiting),
        "residency": {
            "budget_gb": report.budget_gb,
            "accounted_gb": round(report.accounted_gb, 3),
            "models": states,
            "models_loaded": sorted(name for name, state in states.items() if state == "ready"),
            "loads": report.loads,
            "unloads": report.unloads,
            "load_failures": report.load_failures,
        },
    }


@router.get("/memory/report")
async def memory_report(request: Request) -> dict[str, Any]:
    """:meth:`ResidencyManager.report`: per model state, budget, measured memory, in flight,
    idle time, load/unload counts and durations; GPU readings on a GPU."""
    return {"success": True, **public_snapshot(runtime_of(request).residency.snapshot())}
