"""The HTTP API against the real stack: a Runtime over the session's tritonserver (tiny models),
a real redis-server, the worker loop and uvicorn on a free port (see tests/stack.py). Clients are
httpx and the official ``openai`` package.

Tiny random-weight models produce garbage text: chat tests check shapes, counts and flags.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import logging
import os
import re
import signal
import sys
import time
import typing
import uuid

import httpx
import openai
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import given, settings as hyp_settings, strategies as st

from bridge.api import ApiConfigError
from bridge.api_auth import PUBLIC_PATHS
from bridge.api_chat import SfwStream
from bridge.api_types import ApiRuntime
from bridge.chat import mask_sfw
from bridge.jobs import QUEUES
from bridge.prompt_data import get_data
from bridge.safety import REFUSAL_REASON
from bridge.stub_watch import stub_pids
from tests.stack import (
    API_KEY,
    TERMINAL,
    Recorder,
    api_routes,
    client,
    read_sse,
    running,
    stack_settings,
    wait_for_state,
)
from tests.triton_helpers import model_metric

RECORDER = Recorder()  # every answer of this module, scanned for secrets at the end
LEGACY = {"/chat", "/generate", "/enhance", "/health", "/worker/info", "/memory/status", "/memory/load",
          "/memory/unload"}
USER = [{"role": "user", "content": "Describe a quiet harbour at dawn."}]
MASKED = get_data().content_mode.sfw_mask.words
#: With this seed the tiny model writes all 24 tokens of USER's answer in many deltas (random
#: weights may otherwise stop after a token or two).
LONG_SEED = 10


def _legacy_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and isinstance(body["error"], str) and body["error"], body
    assert "Traceback" not in response.text
    return body["error"]


def _new_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"], error
    assert "Traceback" not in response.text
    return error


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "job-x", path)


# ----------------------------------------------------------------------------- start-up and auth
async def test_a_public_bind_without_a_key_is_refused(settings_for) -> None:
    from bridge.runtime import Runtime

    runtime = Runtime(settings_for(api_host="0.0.0.0", worker_api_key=None))
    try:
        with pytest.raises(ApiConfigError, match="WORKER_API_KEY"):
            await runtime.start()
        assert runtime.api_server is None  # refused before anything was bound
    finally:
        await runtime.stop()


async def test_without_a_key_on_localhost_requests_pass_and_a_warning_is_logged(settings_for, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="bridge.api")
    async with running(settings_for(worker_api_key=None), jobs=False) as runtime:
        assert any("WORKER_API_KEY is not set" in r.getMessage() for r in caplog.records)
        async with client(runtime, RECORDER, key=None) as http:
            assert (await http.get("/worker/info")).status_code == 200
            assert (await http.get("/v1/models")).status_code == 200
            assert (await http.get("/openapi.json")).status_code == 200  # the docs follow the same rules
            assert (await http.get("/docs", headers={"Host": "evil.example"})).status_code == 400


#: Routes without the key: liveness and readiness, and the operator page's page, script, style and
#: login (no data in them; tests/test_ui.py checks the page shows nothing without a session).
PUBLIC = PUBLIC_PATHS | {"/ui", "/ui/", "/ui/session", "/ui/static/{name}"}


async def test_every_protected_route_answers_401_without_or_with_a_wrong_key(stack) -> None:
    routes = api_routes(stack.api_server.config.app)
    paths = {path for path, _ in routes}
    assert {"/chat", "/v1/chat/completions", "/jobs/{job_id}/events", "/metrics", "/memory/load"} <= paths
    headers = [None, "Bearer wrong-key", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer", API_KEY]
    checked = 0
    async with client(stack, RECORDER, key=None) as http:
        for path, methods in routes:
            if path in PUBLIC:
                continue
            for method in methods:
                for header in headers:
                    extra = {"Authorization": header} if header is not None else {}
                    response = await http.request(method, _fill(path), headers=extra, json={})
                    assert response.headers["www-authenticate"] == "Bearer"
                    if path in LEGACY:
                        _legacy_error(response, 401)
                    else:
                        assert _new_error(response, 401)["type"] == "authentication_error"
                    checked += 1
        assert checked == sum(len(methods) for path, methods in routes if path not in PUBLIC) * len(headers)
        # a path that does not exist is not revealed either
        _new_error(await http.get("/debug/env"), 401)
        health = await http.get("/health")
        assert health.status_code == 200


# ----------------------------------------------------------------------------- the runtime the routes see
def _protocol_hints(protocol: type) -> dict[str, object]:
    """``protocol``'s attribute types, its module's ``if TYPE_CHECKING:`` imports resolved."""
    module = sys.modules[protocol.__module__]
    names: dict[str, object] = {}
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported = importlib.import_module(node.module)
            names.update({alias.asname or alias.name: getattr(imported, alias.name) for alias in node.names})
    return typing.get_type_hints(protocol, globalns=vars(module), localns=names)


async def test_a_started_runtime_holds_every_part_the_routes_use_with_its_type(stack) -> None:
    hints = _protocol_hints(ApiRuntime)
    assert {"settings", "queue", "residency", "text", "worker", "cpu_work"} <= set(hints)
    for name, hint in hints.items():
        if hint is not typing.Any:
            assert isinstance(getattr(stack, name), hint), (name, hint)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- operations
async def test_health_worker_info_metrics(http: httpx.AsyncClient, stack) -> None:
    health = await http.get("/health", headers={"Authorization": ""})
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["triton"] == "live" and body["redis"] == "ok"
    assert isinstance(body["model_loaded"], bool) and body["uptime"] >= 0
    assert set(body["models"]) == {"sdxl", "wan", "qwen_instruct", "qwen_base"}

    info = (await http.get("/worker/info")).json()
    assert info["worker_id"] == stack.settings.worker_id and info["version"]
    assert set(info["queues"]) == set(QUEUES) >= {"sdxl_queue", "wan_queue"}
    assert all(isinstance(v, int) for v in info["queues"].values())
    assert "sdxl_image_fast" in info["job_types"] and info["mode"] == "local"

    metrics = await http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'gpu_worker_queue_depth{queue="sdxl_queue"}' in metrics.text
    # Resident VRAM per model follows what the residency manager holds (the table's 1 GB per model).
    await stack.residency.load("qwen_base")
    scraped = (await http.get("/metrics")).text
    assert 'gpu_worker_model_vram_bytes{model="qwen_base"} 1e+09' in scraped, scraped


async def test_health_stays_200_degraded_and_ready_is_503_while_redis_is_away(http: httpx.AsyncClient,
                                                                             redis_server) -> None:
    ready = await http.get("/ready", headers={"Authorization": ""})
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["waiting_for"] == []
    await asyncio.to_thread(redis_server.stop)
    try:
        down = await http.get("/health")
        assert down.status_code == 200, down.text  # the app's health checks: still takes work (chat)
        assert down.json()["status"] == "degraded" and down.json()["redis"] == "unreachable"
        assert down.json()["triton"] == "live" and any("redis" in p for p in down.json()["problems"])
        not_ready = await http.get("/ready")
        assert not_ready.status_code == 503 and not_ready.json()["waiting_for"] == ["redis"]
        assert int(not_ready.headers["retry-after"]) > 0
    finally:
        await asyncio.to_thread(redis_server.start)
    for _ in range(50):
        if (await http.get("/ready")).status_code == 200:
            break
        await asyncio.sleep(0.1)
    back = await http.get("/health")
    assert back.json()["redis"] == "ok" and back.json()["status"] == "ok" and back.json()["problems"] == []
    assert (await http.get("/ready")).status_code == 200


async def test_memory_status_load_and_unload_change_what_triton_holds(http: httpx.AsyncClient, triton) -> None:
    control = grpcclient.InferenceServerClient(triton.grpc_url)

    def ready(model: str) -> bool:
        return bool(control.is_model_ready(model))

    status = (await http.get("/memory/status")).json()
    assert status["success"] is True and status["unit"] == "GB"
    assert status["total_vram"] == (status["gpu"]["total_gb"] or 4.0)
    assert {"total_vram", "allocated_vram", "available_vram", "model_loaded"} <= set(status)

    loaded = await http.post("/memory/load", params={"which": "base", "wait": "true"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["success"] is True and loaded.json()["models"] == ["qwen_base"]
    assert await asyncio.to_thread(ready, "qwen_base")
    after = (await http.get("/memory/status")).json()
    assert after["models"]["qwen_base"]["state"] == "ready" and "qwen_base" in after["models_loaded"]
    assert after["allocated_vram"] >= 1.0

    unloaded = await http.post("/memory/unload", params={"which": "base", "wait": "true"})
    assert unloaded.status_code == 200 and unloaded.json()["unloaded"] == ["qwen_base"]
    assert not await asyncio.to_thread(ready, "qwen_base")
    again = await http.post("/memory/unload", params={"which": "base", "wait": "true"})
    assert again.json()["unloaded"] == [] and again.json()["message"] == "nothing to unload"

    assert "which" in _legacy_error(await http.post("/memory/load", params={"which": "gpu", "wait": "true"}), 400)
    assert "which" in _legacy_error(await http.post("/memory/unload"), 400)
    control.close()


# ----------------------------------------------------------------------------- old chat contract
async def test_chat_and_generate_answer_in_the_old_shape(http: httpx.AsyncClient) -> None:
    response = await http.post("/chat", json={"messages": USER, "max_tokens": 8})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and isinstance(body["response"], str)
    assert 1 <= body["tokens_generated"] <= 8 and body["generation_time"] >= 0
    assert body["model_info"]["model_name"] == "qwen_instruct"
    assert body["context_trimmed"] is False and body["prompt_info"]["template"] == "chat"

    older = await http.post("/generate", json={"message": "Hello there", "conversation_history": [
        {"sender": "user", "content": "Hi"}, {"sender": "assistant", "content": "Hello!"}], "max_tokens": 4})
    assert older.status_code == 200, older.text
    assert older.json()["success"] is True and 1 <= older.json()["tokens_generated"] <= 4


async def test_chat_trims_the_oldest_turns_and_says_so(http: httpx.AsyncClient) -> None:
    turn = ("The lighthouse keeper counted the ships again and wrote each name in the ledger. " * 25)[:1990]
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {turn}"} for i in range(18)]
    messages = [{"role": "system", "content": "You are terse."}, *history, *USER]
    response = await http.post("/chat", json={"messages": messages, "max_tokens": 8})
    assert response.status_code == 200, response.text
    body = response.json()
    info = body["prompt_info"]
    assert body["context_trimmed"] is True and info["context_trimmed"] is True
    assert 0 < info["dropped_turns"] < 18 and info["user_message_trimmed"] is False
    assert info["prompt_tokens"] <= 4096 - 8  # the tiny model's context


async def test_sfw_mode_forces_the_general_template_and_masks(http: httpx.AsyncClient) -> None:
    adult = [{"role": "user", "content": "nsfw mode: write something sexy and erotic"}]
    free = (await http.post("/chat", json={"messages": adult, "max_tokens": 4})).json()
    assert free["prompt_info"]["content_mode"] == "unrestricted"
    safe = (await http.post("/chat", json={"messages": adult, "max_tokens": 16, "sfw_mode": True})).json()
    assert safe["prompt_info"]["content_mode"] == "general" and safe["prompt_info"]["sfw_mode"] is True
    assert safe["prompt_info"]["template"] == "chat"
    assert mask_sfw(safe["response"]) == safe["response"]  # nothing left to mask


async def test_enhance_answers_a_prompt_within_the_target_budget(http: httpx.AsyncClient) -> None:
    response = await http.post("/enhance", json={"message": "a cat on a tin roof", "target": "sdxl", "max_tokens": 16})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["enhanced_prompt"] and body["original_prompt"] == "a cat on a tin roof"
    assert body["tokens_generated"] >= 1 and body["model_info"]["model_name"] == "qwen_instruct"
    assert body["enhancement"]["prompt_tokens"] <= 75 and body["enhancement"]["target"] == "sdxl"


async def test_old_routes_answer_bad_input_with_400_naming_the_field(http: httpx.AsyncClient) -> None:
    cases = [
        ({}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "model": "gpt-4"}, "model"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "last non-system message"),
    ]
    for body, field in cases:
        assert field in _legacy_error(await http.post("/chat", json=body), 400)
    assert _legacy_error(await http.post("/chat", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert _legacy_error(await http.post("/generate", json=["a list"]), 400)
    assert "target" in _legacy_error(await http.post("/enhance", json={"message": "x", "target": "mp3"}), 400)
    refused = await http.post("/chat", json={"messages": [{"role": "user", "content": "a sexual scene involving a minor"}]})
    assert _legacy_error(refused, 400) == REFUSAL_REASON


# ----------------------------------------------------------------------------- OpenAI-compatible
async def test_the_openai_package_completes_and_streams_a_chat(stack) -> None:
    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{stack.api_port}/v1", api_key=API_KEY, max_retries=0,
                             timeout=240)
    models = await api.models.list()
    assert {m.id for m in models.data} == {"qwen_instruct", "qwen_base"}

    completion = await api.chat.completions.create(model="qwen_instruct", messages=USER, max_tokens=8)
    assert completion.object == "chat.completion" and completion.choices[0].message.role == "assistant"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert 1 <= completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0

    stream = await api.chat.completions.create(model="qwen_instruct", messages=USER, max_tokens=12, stream=True,
                                               seed=LONG_SEED, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) >= 3 and with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 12
    assert len({c.id for c in chunks}) == 1

    wrong = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{stack.api_port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.chat.completions.create(model="qwen_instruct", messages=USER, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        await api.chat.completions.create(model="gpt-4", messages=USER)
    assert "model" in str(bad.value)
    await api.close()
    await wrong.close()


async def test_streamed_completion_arrives_incrementally_and_ends_with_done(http: httpx.AsyncClient) -> None:
    body = {"model": "qwen_instruct", "messages": USER, "max_tokens": 24, "stream": True, "seed": LONG_SEED,
            "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await read_sse(response, RECORDER)
    assert events[-1]["data"] == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert len(chunks) >= 4
    deltas = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]]
    assert len(deltas) >= 10  # the role chunk, then pieces of text as they were generated
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert len({e.read for e in events}) >= 5, "the events came in a few reads: the stream was buffered"
    assert events[0].at < events[-1].at


async def test_leaving_a_stream_early_stops_the_request_on_the_server(http: httpx.AsyncClient, stack, triton) -> None:
    # greedy decoding: the tiny model never stops by itself, 3500 tokens take well over 10 s
    body = {"model": "qwen_instruct", "messages": USER, "max_tokens": 3500, "stream": True, "temperature": 0}

    def stopped() -> list[str]:
        # "not held": the client left before its request reached the model, which then ends it on arrival
        return re.findall(r"qwen_instruct stop request for '(chat-\w+)': (?:stopped|not held)", triton.log_path.read_text())

    before = stopped()
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.aiter_lines()
        while "content" not in await anext(lines) or stack.residency.report().models["qwen_instruct"].in_flight == 0:
            pass
        assert stack.residency.report().models["qwen_instruct"].in_flight == 1
    # the disconnect ends the turn: the bridge sends the model a stop request (not a cancelled
    # gRPC call, docs/ARCHITECTURE.md "Stopping a stream"), the model ends the stream within a step
    deadline = time.monotonic() + 10
    ended = None
    while ended is None or model_metric(triton.metrics_url, "qwen_sequences_running", "qwen_instruct") != 0:
        assert time.monotonic() < deadline, "the request was not stopped"
        await asyncio.sleep(0.05)
        if len(stopped()) > len(before):
            ended = re.search(rf"qwen_instruct request '{stopped()[-1]}': finish_reason=(\w+) .* output_tokens=(\d+)",
                              triton.log_path.read_text())
    assert ended.group(1) == "cancelled" and int(ended.group(2)) < 3500
    assert stack.residency.report().models["qwen_instruct"].in_flight == 0


async def test_chat_turns_outlive_a_dead_qwen_stub_and_a_dead_server(tiny_models_dir, redis_server, tmp_path,
                                                                     caplog) -> None:
    """SIGKILL of qwen_instruct's stub between turns (Triton still reports the model ready and
    fails every request to it): the next turn's model is reloaded and the turn answered; two turns
    sent at once after another kill recover it once, not twice; a streamed turn that meets a dead
    stub ends with an error event, and the turn after it is answered by a new process. Then
    SIGKILL of the whole server: a turn sent at once is answered after its restart.

    On a tritonserver of the bridge's own, not the session's: Triton itself may abort when
    requests reach a dead stub (a ``boost::interprocess::lock_exception``, about 1 in 15 kills
    with two requests here; docs/ARCHITECTURE.md, process life cycle), which would take every
    later test's server with it. Here the bridge restarts it and the turn is still answered, so a
    kill is recovered by a reload of the model or, rarely, by a restart of the server."""
    settings = stack_settings(tiny_models_dir, None, redis_server.url, tmp_path / "out")
    caplog.set_level(logging.INFO, logger="bridge")
    async with running(settings, jobs=False) as runtime, client(runtime, RECORDER) as http:
        server = runtime.triton_server
        assert server is not None and server.process is not None

        def kill_stub() -> int:
            (pid,) = stub_pids(server.process.pid, "qwen_instruct")
            os.kill(pid, signal.SIGKILL)
            return pid

        def said(text: str) -> int:
            return sum(text in r.getMessage() for r in caplog.records)

        def recoveries() -> int:
            return said("reloaded qwen_instruct") + said("tritonserver is not live; restarting it")

        body = {"model": "qwen_instruct", "messages": USER, "max_tokens": 4, "temperature": 0}
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        first = kill_stub()
        answer = await http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] and recoveries() == 1
        second = kill_stub()
        both = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(2)))
        assert [r.status_code for r in both] == [200, 200], [r.text for r in both]
        assert recoveries() == 2
        kill_stub()
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = await read_sse(response, RECORDER)
        assert events[-1].json()["error"]["type"] == "model_unavailable"
        answer = await http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert recoveries() == 3
        (now,) = stub_pids(server.process.pid, "qwen_instruct")
        assert now not in (first, second) and runtime.residency.state("qwen_instruct") == "ready"

        restarts = said("tritonserver is not live; restarting it")
        os.kill(server.process.pid, signal.SIGKILL)
        answer = await http.post("/v1/chat/completions", json=body)  # before: 503 until the watch's restart
        assert answer.status_code == 200, answer.text
        assert said("tritonserver is not live; restarting it") == restarts + 1


async def test_openai_route_validation_errors_are_422_naming_the_field(http: httpx.AsyncClient) -> None:
    cases = [
        ({"model": "qwen_instruct"}, "messages"),
        ({"model": "qwen_instruct", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"model": "qwen_instruct", "messages": USER, "temperature": 9}, "temperature"),
        ({"model": "qwen_instruct", "messages": USER, "n": 2}, "n"),
        ({"messages": USER}, "model"),
    ]
    for body, field in cases:
        error = _new_error(await http.post("/v1/chat/completions", json=body), 422)
        assert error["param"] == field and field in error["message"], error


# ----------------------------------------------------------------------------- jobs
def _job(job_type: str, **config) -> dict:
    return {"type": job_type, "prompt": "a lighthouse on a cliff at dusk", "user_id": "user-1", "config": config}


async def test_an_sdxl_job_completes_with_assets_and_its_events_stream_until_terminal(http, stack) -> None:
    submitted = await http.post("/jobs", json=_job("sdxl_image_fast", width=64, height=64, num_inference_steps=2,
                                                   num_images=1, seed=1))
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["status"] == "queued" and job["queue"] == "sdxl_queue" and submitted.headers["location"] == f"/jobs/{job['id']}"

    async with http.stream("GET", f"/jobs/{job['id']}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = await read_sse(response, RECORDER)
    states = [e.json() for e in events]
    statuses = [s.get("status") for s in states]
    assert statuses[0] == "queued" and statuses[-1] == "completed", statuses
    assert "processing" in statuses and len(events) >= 3
    assert all(s not in TERMINAL for s in statuses[:-1])
    assert events[0].at < events[-1].at and len({e.read for e in events}) >= 2
    assert all(e["id"] for e in events)

    state = (await http.get(f"/jobs/{job['id']}")).json()
    assert state["status"] == "completed" and state["progress"] == 100
    [asset] = state["assets"]
    assert asset["type"] == "image" and asset["metadata"]["seed"] == 1 and asset["metadata"]["width"] == 64
    assert (stack.settings.output_dir / asset["url"]).read_bytes().startswith(b"\x89PNG")

    again = await http.post("/jobs", json={**_job("sdxl_image_fast"), "id": job["id"]})
    assert _new_error(again, 409)["param"] == "id"
    assert _new_error(await http.post(f"/jobs/{job['id']}/cancel"), 409)["type"] == "conflict"


async def test_cancelling_a_running_wan_job_ends_it_cancelled_and_the_next_one_runs(http: httpx.AsyncClient) -> None:
    # Slow enough to cancel mid-way even with WAN already resident (about 10 s here; 64x64 at 81
    # frames took 2 s, all steps within the first progress callback's 1 s throttle)
    job = _job("video_fast", width=96, height=96, num_inference_steps=100, frame_num=161)
    submitted = await http.post("/jobs", json=job)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    after = await http.post("/jobs", json=_job("video_fast", width=64, height=64, num_inference_steps=2, frame_num=5))
    assert after.status_code == 202, after.text
    running = await wait_for_state(http, job_id, lambda s: s["status"] == "processing" and s.get("progress", 0) > 0)
    assert running["progress"] < 50
    started = time.monotonic()
    cancel = await http.post(f"/jobs/{job_id}/cancel")
    assert cancel.status_code == 202 and cancel.json()["cancel_requested"] is True
    async with http.stream("GET", f"/jobs/{job_id}/events") as response:
        events = await asyncio.wait_for(read_sse(response, RECORDER), 60)
    assert events[-1].json()["status"] == "cancelled"
    assert time.monotonic() - started < 10, "the generation did not stop within a step"
    state = await wait_for_state(http, job_id, lambda s: s["status"] in TERMINAL, timeout=10)
    assert state["status"] == "cancelled" and state.get("progress", 0) < 100 and not state.get("assets")
    # the WAN job queued behind it (or beside it) is not held up by the cancelled one
    follower = await wait_for_state(http, after.json()["id"], lambda s: s["status"] in TERMINAL, timeout=60)
    assert follower["status"] == "completed", follower


async def test_job_routes_answer_errors_in_their_shape(http: httpx.AsyncClient) -> None:
    bad_size = _new_error(await http.post("/jobs", json=_job("sdxl_image_fast", width=100)), 422)
    assert bad_size["param"] == "config.width" and "multiple of 8" in bad_size["message"]
    assert any(f["field"] == "config.width" for f in bad_size["fields"])
    assert _new_error(await http.post("/jobs", json=_job("gif_fast")), 422)["param"] == "type"
    no_user = _job("sdxl_image_fast")
    del no_user["user_id"]
    assert _new_error(await http.post("/jobs", json=no_user), 422)["param"] == "user_id"
    assert _new_error(await http.post("/jobs", content=b"{oops"), 400)
    assert _new_error(await http.post("/jobs", json={**_job("sdxl_image_fast"), "id": "no spaces!"}), 400)
    unknown = f"missing-{uuid.uuid4().hex}"
    for method, path in (("GET", f"/jobs/{unknown}"), ("GET", f"/jobs/{unknown}/events"),
                         ("POST", f"/jobs/{unknown}/cancel")):
        assert _new_error(await http.request(method, path), 404)["type"] == "not_found"
    assert _new_error(await http.get("/jobs/bad.id"), 422)["param"] == "job_id"


# ----------------------------------------------------------------------------- 503
async def test_a_model_that_cannot_be_loaded_answers_503_with_retry_after(settings_for) -> None:
    too_big = {**{name: {"vram_gb": 1.0} for name in ("sdxl", "wan", "qwen_instruct")}, "qwen_base": {"vram_gb": 100.0}}
    async with running(settings_for(model_table=too_big)) as runtime, client(runtime, RECORDER) as http:
        chat = await http.post("/chat", json={"messages": USER, "model": "qwen_base", "max_tokens": 4})
        assert "qwen_base" in _legacy_error(chat, 503) and int(chat.headers["retry-after"]) > 0
        streamed = await http.post("/v1/chat/completions", json={"model": "qwen_base", "messages": USER, "stream": True})
        assert _new_error(streamed, 503)["type"] == "model_unavailable" and int(streamed.headers["retry-after"]) > 0
        load = await http.post("/memory/load", params={"which": "base", "wait": "true"})
        assert "budget" in _legacy_error(load, 503) and int(load.headers["retry-after"]) > 0
        status = (await http.get("/memory/status")).json()
        assert status["models"]["qwen_base"]["state"] != "ready"


# ----------------------------------------------------------------------------- helpers and secrets
@hyp_settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.sampled_from(["calm", "sea", *MASKED, "Nude", "sexy,", "sexes", "x"]), min_size=1, max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=40),
)
def test_sfw_stream_masks_a_split_reply_exactly_as_the_whole(words: list[str], cuts: list[int]) -> None:
    text = " ".join(words) + "."
    stream = SfwStream(mask_sfw, max(len(w) for w in MASKED) + 8)
    out, position = [], 0
    for size in cuts * 20:
        if position >= len(text):
            break
        out.append(stream.feed(text[position:position + size]))
        position += size
    out.append(stream.feed(text[position:]))
    out.append(stream.flush())
    assert "".join(out) == mask_sfw(text)


async def test_no_answer_contains_a_secret(http: httpx.AsyncClient, stack) -> None:
    for path in ("/health", "/worker/info", "/memory/status", "/metrics", "/v1/models", "/jobs/none"):
        await http.get(path)
    await http.post("/chat", json={"messages": "not a list"})
    await http.post("/jobs", json={"type": "sdxl_image_fast"})
    assert len(RECORDER.seen) >= 16
    assert RECORDER.leaks() == []
    assert not any(stack.settings.redis_url.get_secret_value() in text for text in RECORDER.seen)
