"""The remaining routes of the old API (bridge/api_legacy.py, bridge/api_admin.py) against the real
stack: a Runtime over the session's tritonserver (tiny models), a real redis-server, the worker
loop and uvicorn (tests/stack.py). Tiny random-weight models write garbage: these tests check
shapes, routing, limits and errors, not wording."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import httpx
import redis.asyncio as aioredis
import tritonclient.grpc as grpcclient

from bridge.prompt_data import PACKAGED_DATA_DIR, get_data
from bridge.redis_server import RedisServer
from bridge.safety import REFUSAL_REASON
from tests.stack import API_KEY, SECRETS, TERMINAL, api_error, client, running, stack_settings, wait_for_state

ROUTES = {
    ("POST", "/chat/unrestricted"), ("POST", "/enhance/legacy"), ("GET", "/enhancement/info"),
    ("GET", "/chat/health"), ("GET", "/model/info"), ("POST", "/admin"), ("GET", "/status"),
    ("GET", "/memory/report"), ("POST", "/emergency/operation"), ("GET", "/debug/env"),
}
MODELS = {"sdxl", "wan", "qwen_instruct", "qwen_base"}
SHORT_REFUSED = "nude child"  # the team's short non-graphic test phrase (tests/test_safety.py)


async def _refusals(http: httpx.AsyncClient, kind: str) -> float:
    text = (await http.get("/metrics")).text
    match = re.search(rf'gpu_worker_safety_refusals_total{{job_type="{kind}"}} ([0-9.e+]+)', text)
    return float(match.group(1)) if match else 0.0


def _ready_in_triton(url: str) -> set[str]:
    control = grpcclient.InferenceServerClient(url)
    try:
        return {name for name in MODELS if control.is_model_ready(name)}
    finally:
        control.close()


# ----------------------------------------------------------------------------- authentication
async def test_every_new_route_is_registered_and_answers_401_without_the_key(stack) -> None:
    from fastapi.routing import APIRoute

    app = stack.api_server.config.app
    try:
        from fastapi.routing import iter_route_contexts
        routes = {(m, c.path) for c in iter_route_contexts(app.routes) if isinstance(c.original_route, APIRoute)
                  for m in c.methods}
    except ImportError:
        routes = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods}
    assert ROUTES <= routes
    async with client(stack, key=None) as anonymous:
        for method, path in sorted(ROUTES):
            for header in (None, "Bearer wrong-key", f"Bearer {API_KEY}x", f"Basic {API_KEY}"):
                headers = {"Authorization": header} if header else {}
                response = await anonymous.request(method, path, headers=headers, json={})
                assert api_error(response, 401)["type"] == "authentication_error"
                assert response.headers["www-authenticate"] == "Bearer"


# ----------------------------------------------------------------------------- chat and enhancement
async def test_chat_unrestricted_forces_the_template_and_sfw_mode_still_wins(http: httpx.AsyncClient) -> None:
    older = {"message": "Tell me about the harbour.", "system_prompt": "You are a sailor.", "conversation_id": "c1",
             "context_type": "general", "conversation_history": [{"sender": "user", "content": "Hi"},
                                                                 {"sender": "character", "content": "Ahoy!"}],
             "max_tokens": 4}
    response = await http.post("/chat/unrestricted", json=older)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and isinstance(body["response"], str) and 1 <= body["tokens_generated"] <= 4
    assert body["prompt_info"]["template"] == "unrestricted" and body["prompt_info"]["content_mode"] == "unrestricted"
    assert body["content_mode"]["mode"] == "unrestricted" and body["content_mode"]["forced"] is True
    assert "forced" in body["content_mode"]["reason"] and body["model_info"]["model_name"] == "qwen_instruct"

    safe = (await http.post("/chat/unrestricted", json={**older, "sfw_mode": True})).json()
    assert safe["prompt_info"]["template"] == "chat" and safe["content_mode"]["mode"] == "general"
    assert safe["content_mode"]["forced"] is False and safe["prompt_info"]["sfw_mode"] is True

    assert api_error(await http.post("/chat/unrestricted", json={"message": "  "}), 422, "message")
    assert api_error(await http.post("/chat/unrestricted", json={"message": "hi", "max_tokens": 0}), 422, "max_tokens")
    assert api_error(await http.post("/chat/unrestricted", json=["x"]), 422)
    before = await _refusals(http, "chat")
    refused = api_error(await http.post("/chat/unrestricted", json={"message": SHORT_REFUSED}), 400)
    assert refused["message"] == REFUSAL_REASON and refused["type"] == "content_refused"
    assert await _refusals(http, "chat") == before + 1


async def test_enhance_legacy_fits_the_target_budget(http: httpx.AsyncClient) -> None:
    request = {"prompt": "a cat on a tin roof", "enhancement_type": "sdxl", "job_type": "sdxl_image_fast",
               "quality": "fast"}
    response = await http.post("/enhance/legacy", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["original_prompt"] == "a cat on a tin roof" and body["enhanced_prompt"]
    assert body["enhancement_type"] == "sdxl" and body["job_type"] == "sdxl_image_fast" and body["quality"] == "fast"
    assert body["generation_time"] >= 0 and body["enhancement"]["model"] == "qwen_base"
    assert body["enhancement"]["prompt_budget"] == 75 and body["enhancement"]["prompt_tokens"] <= 75
    assert isinstance(body["enhancement"]["enhancement_fell_back"], bool)

    auto = (await http.post("/enhance/legacy", json={"prompt": "waves at night", "job_type": "video_fast",
                                                     "quality": "high"})).json()
    assert auto["enhancement_type"] == "wan" and auto["enhancement"]["prompt_budget"] == 100
    assert auto["enhancement"]["prompt_tokens"] <= 100 and auto["quality"] == "high"
    sdxl_auto = (await http.post("/enhance/legacy", json={"prompt": "a red boat", "job_type": "sdxl_image_high"})).json()
    assert sdxl_auto["enhancement_type"] == "sdxl"


async def test_enhance_legacy_rejects_bad_input_and_refuses_unsafe_prompts(http: httpx.AsyncClient) -> None:
    assert api_error(await http.post("/enhance/legacy", json={"prompt": "x", "quality": "ultra"}), 422, "quality")
    assert "gif_fast" in api_error(await http.post("/enhance/legacy", json={"prompt": "x", "job_type": "gif_fast"}),
                                422, "job_type")["message"]
    assert api_error(await http.post("/enhance/legacy", json={"prompt": "x", "enhancement_type": "mp3"}), 422,
                  "enhancement_type")
    assert api_error(await http.post("/enhance/legacy", json={"prompt": " "}), 422, "prompt")
    assert api_error(await http.post("/enhance/legacy", json={}), 422, "prompt")
    before = await _refusals(http, "enhance")
    refused = api_error(await http.post("/enhance/legacy", json={"prompt": SHORT_REFUSED, "enhancement_type": "sdxl"}), 400)
    assert refused["message"] == REFUSAL_REASON and refused["type"] == "content_refused"
    assert await _refusals(http, "enhance") == before + 1


async def test_enhancement_info_lists_templates_with_budgets(http: httpx.AsyncClient) -> None:
    body = (await http.get("/enhancement/info")).json()
    data = get_data()
    assert set(body["templates"]) == set(data.templates.templates)
    sdxl = body["templates"]["sdxl_enhance"]
    assert sdxl["prompt_budget"] == 75 and sdxl["quality_tags"] == list(data.template("sdxl_enhance").quality_tags)
    assert body["templates"]["wan_enhance"]["prompt_budget"] == 100
    assert body["enhancement_types"]["sdxl"] == "sdxl_enhance" and set(body["qualities"]) == {"fast", "high"}
    assert "system" not in sdxl


# ----------------------------------------------------------------------------- state
async def test_chat_health_reports_residency_and_probes_a_resident_model(http: httpx.AsyncClient) -> None:
    await http.post("/memory/unload", params={"which": "instruct", "wait": "true"})  # the session's Triton may hold it
    cold = await http.get("/chat/health")
    assert cold.status_code == 200, cold.text
    assert cold.json()["status"] == "not_loaded" and cold.json()["model_loaded"] is False
    assert cold.json()["inference"] is None
    assert (await http.post("/memory/load", params={"which": "instruct", "wait": "true"})).status_code == 200
    warm = await http.get("/chat/health")
    assert warm.status_code == 200, warm.text
    body = warm.json()
    assert body["status"] == "ok" and body["model_loaded"] is True and body["state"] == "ready"
    assert body["inference"]["ok"] is True and body["inference"]["tokens"] <= 1


async def test_model_info_and_memory_report(http: httpx.AsyncClient, stack, tiny_models_dir: Path) -> None:
    info = (await http.get("/model/info")).json()
    assert set(info["models"]) == MODELS and info["budget_gb"] == 4.0
    for name, model in info["models"].items():
        assert model["vram_gb"] == 1.0 and model["policy"] in ("pinned", "preferred", "on_demand")
        assert model["weights_present"] is True and "weights_path" not in model, name
    assert info["models"]["sdxl"]["kind"] == "image" and info["models"]["wan"]["kind"] == "video"

    await http.post("/memory/unload", params={"which": "base", "wait": "true"})  # the session's Triton may hold it
    assert (await http.post("/memory/load", params={"which": "base", "wait": "true"})).status_code == 200
    report = (await http.get("/memory/report")).json()
    assert report["success"] is True and report["budget_gb"] == 4.0 and set(report["models"]) == MODELS
    base = report["models"]["qwen_base"]
    assert base["state"] == "ready" and base["loads"] >= 1 and base["last_load_s"] > 0
    assert {"measured_gb", "in_flight", "idle_s", "unloads", "total_unload_s"} <= set(base)
    assert report["loads"] >= 1 and report["accounted_gb"] >= 1.0


async def test_status_shows_queues_and_the_running_job(http: httpx.AsyncClient, stack) -> None:
    idle = (await http.get("/status")).json()
    assert idle["worker_id"] == stack.settings.worker_id and idle["jobs_enabled"] is True
    assert set(idle["queues"]) >= {"sdxl_queue", "wan_queue"} and idle["running_jobs"] == []
    assert set(idle["residency"]["models"]) == MODELS and idle["residency"]["budget_gb"] == 4.0
    # slow enough (81 frames, 100 steps) to be seen running, then cancelled
    job = {"type": "video_fast", "prompt": "waves", "user_id": "u1",
           "config": {"width": 64, "height": 64, "num_inference_steps": 100, "frame_num": 81}}
    job_id = (await http.post("/jobs", json=job)).json()["id"]
    await wait_for_state(http, job_id, lambda s: s["status"] == "processing")
    busy = (await http.get("/status")).json()
    [running_job] = busy["running_jobs"]
    assert running_job["id"] == job_id and running_job["queue"] == "wan_queue"
    assert running_job["status"] == "processing" and running_job["type"] == "video_fast"
    assert (await http.post(f"/jobs/{job_id}/cancel")).status_code == 202
    await wait_for_state(http, job_id, lambda s: s["status"] in TERMINAL, timeout=60)


# ----------------------------------------------------------------------------- emergency
async def test_emergency_operations_change_what_triton_holds(http: httpx.AsyncClient, triton) -> None:
    emptied = await http.post("/emergency/operation", json={"operation": "force_unload_all_except", "keep": []})
    assert emptied.status_code == 200 and emptied.json()["kept"] == [], emptied.text
    assert await asyncio.to_thread(_ready_in_triton, triton.grpc_url) == set()
    for which in ("sdxl", "instruct", "base"):
        assert (await http.post("/memory/load", params={"which": which, "wait": "true"})).status_code == 200
    assert await asyncio.to_thread(_ready_in_triton, triton.grpc_url) == {"sdxl", "qwen_instruct", "qwen_base"}

    status = (await http.post("/emergency/operation", json={"operation": "status"})).json()
    assert status["success"] is True and status["memory"]["models"]["sdxl"]["state"] == "ready"

    kept = await http.post("/emergency/operation", json={"operation": "force_unload_all_except", "keep": ["sdxl"]})
    assert kept.status_code == 200, kept.text
    body = kept.json()
    assert body["success"] is True and body["kept"] == ["sdxl"]
    assert sorted(body["unloaded"]) == ["qwen_base", "qwen_instruct"] and body["failed"] == {}
    assert await asyncio.to_thread(_ready_in_triton, triton.grpc_url) == {"sdxl"}
    assert body["memory"]["models"]["qwen_base"]["state"] == "unloaded"

    cleanup = (await http.post("/emergency/operation", json={"operation": "force_cleanup"})).json()
    assert cleanup["success"] is True and cleanup["unloaded"] == ["sdxl"] and cleanup["gc_collected"] >= 0
    assert await asyncio.to_thread(_ready_in_triton, triton.grpc_url) == set()


async def test_emergency_operation_validates_names(http: httpx.AsyncClient) -> None:
    assert api_error(await http.post("/emergency/operation", json={"operation": "explode"}), 422, "operation")
    assert api_error(await http.post("/emergency/operation", json={}), 422, "operation")
    assert api_error(await http.post("/emergency/operation",
                                  json={"operation": "force_unload_all_except", "keep": ["sdxl", "gpt4"]}), 422, "keep.1")
    assert api_error(await http.post("/emergency/operation", json={"operation": "force_unload_all_except"}), 422, "keep")
    assert api_error(await http.post("/emergency/operation",
                                  json={"operation": "force_unload_all_except", "keep": "sdxl"}), 422, "keep")


# ----------------------------------------------------------------------------- admin
async def test_admin_dead_letters_are_redacted_and_a_requeued_one_runs(settings_for, redis_server) -> None:
    token = f"signed-token-{uuid.uuid4().hex}"
    job_id = f"dead-{uuid.uuid4().hex[:8]}"
    job = {"id": job_id, "type": "sdxl_image_fast", "prompt": "a lighthouse", "user_id": "u1",
           "config": {"width": 64, "height": 64, "num_inference_steps": 2, "num_images": 1},
           "metadata": {"reference_note": f"https://cdn.example/x.png?token={token}", "api_key": token}}
    entry = {"reason": "gave up after 3 attempts", "queue": "sdxl_queue", "worker_id": "old", "time": 1.0,
             "raw": json.dumps(job)}
    direct = aioredis.from_url(redis_server.url)
    await direct.rpush("dead_letter", json.dumps(entry))
    await direct.set(f"finished:{job_id}", "failed")  # as the worker marks a job it gave up on
    async with running(settings_for()) as runtime, client(runtime) as http:
        await runtime.queue.push("sdxl_queue", b"{not json")  # the worker dead-letters this one itself
        for _ in range(100):
            listed = (await http.post("/admin", json={"action": "dead_letters"})).json()
            if len(listed["entries"]) == 2:
                break
            await asyncio.sleep(0.1)
        newest, ours = listed["entries"]
        assert newest["index"] == -1 and newest["queue"] == "sdxl_queue" and newest["job_id"] is None
        assert ours["index"] == -2 and ours["job_id"] == job_id and ours["reason"] == entry["reason"]
        assert ours["payload"]["prompt"] == "a lighthouse" and ours["payload"]["metadata"]["api_key"] == "***redacted***"
        assert token not in json.dumps(listed) and "***redacted***" in ours["payload"]["metadata"]["reference_note"]
        one = (await http.post("/admin", json={"action": "dead_letters", "limit": 1})).json()["entries"]
        assert [e["index"] for e in one] == [-1]

        wrong = await http.post("/admin", json={"action": "requeue_dead_letter", "index": -1, "job_id": job_id})
        assert api_error(wrong, 409, "job_id")
        moved = await http.post("/admin", json={"action": "requeue_dead_letter", "index": -2, "job_id": job_id})
        assert moved.status_code == 200, moved.text
        assert moved.json()["job_id"] == job_id and moved.json()["queue"] == "sdxl_queue"
        state = await wait_for_state(http, job_id, lambda s: s["status"] in TERMINAL)
        assert state["status"] == "completed" and len(state["assets"]) == 1
        remaining = (await http.post("/admin", json={"action": "dead_letters"})).json()["entries"]
        assert [e["job_id"] for e in remaining] == [None]
        assert api_error(await http.post("/admin", json={"action": "requeue_dead_letter", "index": 5}), 404, "index")
    await direct.aclose()


async def test_admin_actions_and_their_errors(settings_for, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(PACKAGED_DATA_DIR / "templates.yaml", data_dir / "templates.yaml")
    async with running(settings_for(data_dir=data_dir), jobs=False) as runtime, client(runtime) as http:
        await runtime.queue.push("wan_queue", {"id": "j1", "type": "video_fast", "prompt": "p", "user_id": "u"})
        depths = (await http.post("/admin", json={"action": "queue_depths"})).json()
        assert depths["queues"]["wan_queue"] == 1 and depths["queues"]["sdxl_queue"] == 0

        reload = await http.post("/admin", json={"action": "templates_reload"})
        assert reload.status_code == 200 and "scene_detect" in reload.json()["templates"]
        (data_dir / "templates.yaml").write_text("templates: [broken\n")
        broken = api_error(await http.post("/admin", json={"action": "templates_reload"}), 409)
        assert broken["type"] == "data_file_error" and "templates.yaml" in broken["message"]
        assert (await http.get("/enhancement/info")).status_code == 200  # the last good copy stays in use

        assert api_error(await http.post("/admin", json={"action": "shell"}), 422, "action")
        assert api_error(await http.post("/admin", json={"action": "requeue_dead_letter"}), 422, "index")
        assert api_error(await http.post("/admin", json={"action": "dead_letters", "limit": 0}), 422, "limit")
        assert api_error(await http.post("/admin", json={"action": "requeue_dead_letter", "index": 0}), 404, "index")


# ----------------------------------------------------------------------------- /debug/env
async def test_debug_env_shows_the_settings_with_every_secret_redacted(tiny_models_dir: Path, triton, tmp_path: Path,
                                                                       monkeypatch) -> None:
    redis_password = f"redis-pass-{uuid.uuid4().hex}"
    public_password = f"public-pass-{uuid.uuid4().hex}"
    env_token = f"hf-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", env_token)
    server = RedisServer(data_dir=tmp_path / "redis-pw", password=redis_password).start()
    try:
        settings = stack_settings(tiny_models_dir, triton.grpc_url, server.url, tmp_path / "out",
                                  public_url=f"https://ops:{public_password}@worker.example")
        async with running(settings, jobs=False) as runtime, client(runtime) as http:
            response = await http.get("/debug/env")
            assert response.status_code == 200, response.text
            text = response.text + json.dumps(dict(response.headers))
            for secret in (*SECRETS, redis_password, public_password, env_token):
                assert secret not in text
            assert os.environ["PATH"] not in text  # no raw environment dump
            view = response.json()["settings"]
            for name in ("worker_api_key", "supabase_service_key", "job_callback_secret", "triton_api_key"):
                assert view[name] == "***redacted***", name
            assert view["redis_url"] == f"redis://:***redacted***@127.0.0.1:{server.port}/0"
            assert view["public_url"] == "https://ops:***redacted***@worker.example"
            assert view["worker_id"] == settings.worker_id and view["vram_budget_gb"] == 4.0
            assert view["local_mode"] is True and "hf_token" not in view
    finally:
        server.stop()
