"""Scene routes (bridge/api_scene.py) against the real stack: a Runtime over the session's
tritonserver (tiny models), a real redis-server, the worker loop and uvicorn (tests/stack.py).
The tiny qwen_instruct writes garbage, so a model pass either counts or falls back with a note;
the prompt is checked against the tiny SDXL's real CLIP tokenizer."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from bridge import chat
from bridge.safety import REFUSAL_REASON
from model_kit import layout
from tests.stack import TERMINAL, api_error, client, running, wait_for_state

LUNA = {"name": "Luna", "appearance": "silver hair, green eyes"}
KAI = {"name": "Kai", "appearance": "tall man, black coat", "aliases": ["the captain"]}
REPLY = (
    "*Luna smiles and walks slowly toward the window, moonlight on her face.* "
    '"It is beautiful tonight," she whispers, while Kai leans against the balcony railing.'
)
TALK = "I think that is a great idea. Tell me more about your plans."
TINY_SDXL = {"width": 64, "height": 64, "num_inference_steps": 2, "num_images": 1, "seed": 3}


@pytest.fixture(scope="module")
def clip_tok(tiny_models_dir: Path):
    return chat.load_tokenizer(tiny_models_dir / layout.SDXL_CONFIG / "tokenizer")


def _unload_from_triton(url: str, model: str) -> None:
    control = grpcclient.InferenceServerClient(url)
    try:
        control.unload_model(model)
        while control.is_model_ready(model):
            time.sleep(0.05)
    finally:
        control.close()


def _check_prompt(body: dict, clip_tok) -> None:
    """A scene prompt within 75 CLIP tokens that keeps each found character's appearance."""
    assert body["prompt_budget"] == 75
    assert chat.count_tokens(clip_tok, body["prompt"]) == body["prompt_tokens"] <= 75
    assert len(clip_tok(body["prompt"])["input_ids"]) <= 77
    for character in (LUNA, KAI):
        if character["name"] in body["characters"]:
            assert character["appearance"] in body["prompt"]


async def _refusals(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    match = re.search(r'gpu_worker_safety_refusals_total\{job_type="scene"\} ([0-9.e+]+)', text)
    return float(match.group(1)) if match else 0.0


# ----------------------------------------------------------------------------- detect
async def test_detect_with_the_tiny_model_answers_a_scene_within_budget(http: httpx.AsyncClient, clip_tok) -> None:
    response = await http.post("/scene/detect", json={"text": REPLY, "characters": [LUNA, KAI]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"has_scene", "characters", "actions", "setting", "prompt", "prompt_tokens", "used_model",
                         "note"}
    assert body["used_model"] is True or "rules only" in body["note"]  # garbage JSON from the tiny model: rules
    if not body["used_model"]:
        assert body["has_scene"] is True and body["characters"] == ["Luna", "Kai"] and body["actions"]
    if body["has_scene"]:
        _check_prompt(body, clip_tok)


async def test_detect_rules_only_on_request_and_without_a_scene(http: httpx.AsyncClient, clip_tok) -> None:
    rules = (await http.post("/scene/detect", json={"text": REPLY, "characters": [LUNA, KAI],
                                                    "use_model": False})).json()
    assert rules["has_scene"] is True and rules["used_model"] is False and "rules only" in rules["note"]
    assert rules["characters"] == ["Luna", "Kai"] and "balcony" in rules["setting"]
    assert any("walks slowly toward the window" in action for action in rules["actions"])
    _check_prompt(rules, clip_tok)
    aliased = (await http.post("/scene/detect", json={"text": "The captain runs along the pier at dawn.",
                                                      "characters": [KAI], "use_model": False})).json()
    assert aliased["characters"] == ["Kai"] and KAI["appearance"] in aliased["prompt"]

    talk = (await http.post("/scene/detect", json={"text": TALK, "characters": [LUNA], "use_model": False})).json()
    assert talk["has_scene"] is False and talk["prompt"] == "" and talk["actions"] == []


async def test_detect_falls_back_to_rules_when_the_model_cannot_be_resident(settings_for, triton, clip_tok) -> None:
    await asyncio.to_thread(_unload_from_triton, triton.grpc_url, "qwen_instruct")  # an earlier test may hold it
    too_big = {"sdxl": {"vram_gb": 1.0}, "wan": {"vram_gb": 1.0}, "qwen_base": {"vram_gb": 1.0},
               "qwen_instruct": {"vram_gb": 100.0}}
    async with running(settings_for(model_table=too_big)) as runtime, client(runtime) as http:
        started = time.monotonic()
        response = await http.post("/scene/detect", json={"text": REPLY, "characters": [LUNA, KAI]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["used_model"] is False and body["has_scene"] is True
        assert "rules only" in body["note"] and "qwen_instruct" in body["note"]
        assert time.monotonic() - started < 20  # refused at once, not after the model timeout
        _check_prompt(body, clip_tok)
        assert runtime.residency.state("qwen_instruct") != "ready" and "budget" in body["note"]


async def test_detect_rejects_bad_input_and_refuses_unsafe_text(http: httpx.AsyncClient) -> None:
    assert api_error(await http.post("/scene/detect", json={}), 422, "text")
    assert api_error(await http.post("/scene/detect", json={"text": "  "}), 422, "text")
    assert api_error(await http.post("/scene/detect", json={"text": REPLY, "characters": [{"appearance": "tall"}]}),
                  422, "characters.0.name")
    assert api_error(await http.post("/scene/detect", json={"text": REPLY, "characters": "Luna"}), 422, "characters")
    assert api_error(await http.post("/scene/detect", json={"text": "x" * 40_000}), 422, "text")
    before = await _refusals(http)
    refused = api_error(await http.post("/scene/detect", json={"text": "*She walks in.* nude child"}), 400)
    assert refused["message"] == REFUSAL_REASON and refused["type"] == "content_refused"
    described = {"text": "*Mia walks to the window.*", "characters": [{"name": "Mia", "appearance": "sexy 14yo"}]}
    assert api_error(await http.post("/scene/detect", json=described), 400)["type"] == "content_refused"
    assert await _refusals(http) == before + 2


# ----------------------------------------------------------------------------- generate
async def test_generate_queues_an_sdxl_job_that_completes(http: httpx.AsyncClient, stack, clip_tok) -> None:
    request = {"text": REPLY, "characters": [LUNA, KAI], "user_id": "user-7", "config": TINY_SDXL,
               "use_model": False}
    response = await http.post("/scene/generate", json=request)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["job_id"] == body["id"] and body["status"] == "queued" and body["queue"] == "sdxl_queue"
    assert body["type"] == "sdxl_image_fast" and response.headers["location"] == f"/jobs/{body['job_id']}"
    assert body["has_scene"] is True
    _check_prompt(body, clip_tok)
    state = await wait_for_state(http, body["job_id"], lambda s: s["status"] in TERMINAL)
    assert state["status"] == "completed", state
    [asset] = state["assets"]
    assert asset["metadata"]["width"] == 64 and asset["metadata"]["seed"] == 3
    assert (stack.settings.output_dir / asset["url"]).read_bytes().startswith(b"\x89PNG")


async def test_generate_with_the_model_pass_queues_a_job(http: httpx.AsyncClient, clip_tok) -> None:
    request = {"text": REPLY, "characters": [LUNA], "user_id": "user-7", "job_type": "sdxl_image_high",
               "config": TINY_SDXL}
    response = await http.post("/scene/generate", json=request)
    if response.status_code == 422:  # the tiny model may say there is no scene
        assert response.json()["error"]["type"] == "no_scene"
        return
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["type"] == "sdxl_image_high" and (body["used_model"] or "rules only" in body["note"])
    _check_prompt(body, clip_tok)
    assert (await http.get(f"/jobs/{body['job_id']}")).json()["status"] in ("queued", "processing", "completed")


async def test_generate_errors(http: httpx.AsyncClient) -> None:
    base = {"text": REPLY, "characters": [LUNA], "user_id": "u1", "use_model": False}
    no_scene = api_error(await http.post("/scene/generate", json={**base, "text": TALK}), 422, "text")
    assert no_scene["type"] == "no_scene" and "no visual scene" in no_scene["message"]
    assert api_error(await http.post("/scene/generate", json={**base, "config": {"width": 100}}), 422, "config.width")
    assert api_error(await http.post("/scene/generate", json={**base, "job_type": "video_fast"}), 422, "job_type")
    without_user = {k: v for k, v in base.items() if k != "user_id"}
    assert api_error(await http.post("/scene/generate", json=without_user), 422, "user_id")
    refused = api_error(await http.post("/scene/generate", json={**base, "text": "nude child"}), 400)
    assert refused["message"] == REFUSAL_REASON
