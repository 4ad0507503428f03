"""Who may call the API and how often, and the app's chat callers (docs/API.md, docs/DEPLOY.md
"Connecting to the app"), through the real stack: a Runtime over the session's tritonserver (tiny
models) and a real redis-server, uvicorn on a free port.

Requests are built the way the app's edge functions build them (:func:`enhance_prompt_request`,
:func:`roleplay_chat_request`). Client addresses other than 127.0.0.1 come through
``X-Forwarded-For``, which uvicorn honours from the default trusted proxy 127.0.0.1
(``API_TRUSTED_PROXIES``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from bridge import doctor
from bridge.api import ApiConfigError
from bridge.api_auth import RateLimiter
from bridge.chat import count_chat_tokens
from bridge.logs import Redactor, secrets_from_settings
from bridge.runtime import Runtime
from bridge.safety import MINOR_RULE
from bridge.settings import Settings
from tests.stack import API_KEY, client, running

REPO = Path(__file__).resolve().parent.parent
OTHER_CLIENT = {"X-Forwarded-For": "198.51.100.7"}
SCENE_SPEC = ("You are an expert at creating roleplay scene templates. Return ONLY a JSON object with the keys "
              '"scene_name", "scene_description" and "scene_prompt". No prose before or after the JSON.')


def enhance_prompt_request(prompt: str, **overrides: object) -> dict:
    """The body ``enhance-prompt`` POSTs to ``/enhance`` (no Authorization header): its own system
    message, the user's words, max_tokens 500, T 0.7, top_p 0.9."""
    return {"messages": [{"role": "system", "content": SCENE_SPEC}, {"role": "user", "content": prompt}],
            "max_tokens": 500, "temperature": 0.7, "top_p": 0.9, **overrides}


def roleplay_chat_request(system: str, user: str, sfw: bool, **overrides: object) -> dict:
    """The body ``roleplay-chat`` POSTs to ``/chat``: its system prompt, the message, ``sfw_mode``
    for the sfw tier."""
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "sfw_mode": sfw, **overrides}


def _key(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex}"  # over 32 characters


# ----------------------------------------------------------------------------- keys
async def test_each_of_several_keys_is_accepted_on_every_route(settings_for) -> None:
    first, second = _key("wan-worker-key"), _key("chat-worker-key")
    async with running(settings_for(worker_api_key=f"{first}, {second}"), jobs=False) as runtime:
        for key in (first, second):
            async with client(runtime, key=key) as http:
                assert (await http.get("/worker/info")).status_code == 200
                assert (await http.get("/v1/models")).status_code == 200
                assert (await http.get("/metrics")).status_code == 200
        for wrong in (f"{first},{second}", f"{first}, {second}", first[:-1], API_KEY, f"{first}x"):
            async with client(runtime, key=wrong) as http:
                assert (await http.get("/v1/models")).status_code == 401, wrong


async def test_short_keys_are_refused_at_start_unless_allowed_for_development(settings_for, caplog) -> None:
    for value in ("k" * 31, f"{_key('long-enough-key')},short-key"):
        runtime = Runtime(settings_for(worker_api_key=value))
        try:
            with pytest.raises(ApiConfigError, match="shorter than 32 characters"):
                await runtime.start()
            assert runtime.api_server is None
        finally:
            await runtime.stop()
    caplog.set_level(logging.WARNING, logger="bridge.api")
    async with running(settings_for(worker_api_key="dev-key", api_allow_short_keys=True), jobs=False) as runtime:
        assert any("API_ALLOW_SHORT_KEYS" in r.getMessage() for r in caplog.records)
        assert not any("dev-key" in r.getMessage() for r in caplog.records)
        async with client(runtime, key="dev-key") as http:
            assert (await http.get("/v1/models")).status_code == 200


def test_each_key_is_redacted_from_logs() -> None:
    first, second = _key("first-api-key"), _key("second-api-key")
    redact = Redactor(secrets_from_settings(Settings(worker_api_key=f"{first},{second}")))
    assert redact(f"keys {second} and {first}!") == "keys *** and ***!"


def test_serve_refuses_a_short_key_before_starting_anything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "SUPABASE_", "TRITON_", "WORKER_", "API_"))}
    env.update(WORKER_API_KEY="only-twenty-chars-ok", OUTPUT_DIR=str(tmp_path), REDIS_URL="redis://127.0.0.1:1")
    result = subprocess.run([sys.executable, "-m", "bridge", "serve"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "shorter than 32 characters" in result.stderr and "only-twenty-chars-ok" not in result.stderr + result.stdout


async def test_wrong_keys_are_limited_per_client_address(settings_for) -> None:
    async with running(settings_for(api_auth_failures_per_min=5), jobs=False) as runtime:
        async with client(runtime, key=None) as anonymous:
            for _ in range(8):  # no key at all is not a guess: not counted
                assert (await anonymous.get("/v1/models")).status_code == 401
        async with client(runtime, key="x" * 40) as wrong:
            for _ in range(5):
                assert (await wrong.get("/v1/models")).status_code == 401
            limited = await wrong.get("/v1/models")
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
            assert limited.json()["error"]["type"] == "rate_limited"
            assert (await wrong.get("/v1/models", headers=OTHER_CLIENT)).status_code == 401  # its own allowance
        async with client(runtime) as right:
            # While limited, the address's keys are not looked at (guessing cannot go on); others are served.
            assert (await right.get("/v1/models")).status_code == 429
            assert (await right.get("/v1/models", headers=OTHER_CLIENT)).status_code == 200
            assert (await right.get("/health")).status_code == 200


def test_rate_limiter_refills_and_forgets_idle_clients() -> None:
    now = [0.0]
    limiter = RateLimiter(6, max_clients=3, clock=lambda: now[0])  # 6 a minute: one every 10 s
    assert [limiter.take("a") for _ in range(6)] == [0.0] * 6
    assert limiter.take("a") == pytest.approx(10.0) and limiter.wait_s("a") == pytest.approx(10.0)
    now[0] = 4.0
    assert limiter.wait_s("a") == pytest.approx(6.0) and limiter.wait_s("b") == 0.0
    now[0] = 10.0
    assert limiter.take("a") == 0.0 and limiter.take("a") == pytest.approx(10.0)
    for name in ("b", "c", "d"):
        limiter.take(name)
    assert len(limiter) == 3  # at most max_clients remembered; "a" (least recently used) went
    now[0] = 1000.0
    limiter.take("e")
    assert len(limiter) == 1  # full buckets are the first to go


# ----------------------------------------------------------------------------- open routes
async def test_enhance_is_served_without_a_key_only_when_opened_and_is_rate_limited(settings_for, caplog) -> None:
    body = enhance_prompt_request("a knight resting in a mossy forest clearing", max_tokens=4)
    async with running(settings_for(), jobs=False) as runtime, client(runtime, key=None) as anonymous:
        assert (await anonymous.post("/enhance", json=body)).status_code == 401
    caplog.set_level(logging.WARNING, logger="bridge.api")
    opened = settings_for(api_open_routes="/enhance", api_open_rate_per_min=3)
    async with running(opened, jobs=False) as runtime:
        assert any("API_OPEN_ROUTES: /enhance" in r.getMessage() for r in caplog.records)
        async with client(runtime, key=None) as anonymous:
            answer = await anonymous.post("/enhance", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["success"] is True and isinstance(answer.json()["enhanced_prompt"], str)
            chat = await anonymous.post("/chat", json=roleplay_chat_request("You are Mia.", "Hi!", False))
            assert chat.status_code == 401  # nothing else is open
            for method, path in (("POST", "/v1/chat/completions"), ("POST", "/jobs"), ("GET", "/v1/models"),
                                 ("POST", "/enhance/legacy")):
                assert (await anonymous.request(method, path, json={})).status_code == 401, path
            for _ in range(2):
                assert (await anonymous.post("/enhance", json=body)).status_code == 200
            limited = await anonymous.post("/enhance", json=body)
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
            assert limited.json()["success"] is False  # the old contract's error shape on /enhance
            assert (await anonymous.post("/enhance", json=body, headers=OTHER_CLIENT)).status_code == 200
        async with client(runtime) as keyed:  # a caller with a key is not limited by the open route
            assert (await keyed.post("/enhance", json=body)).status_code == 200
            wrong = await keyed.post("/enhance", json=body, headers={"Authorization": "Bearer " + "y" * 40})
            assert wrong.status_code == 401  # a key that is sent is checked, open route or not


def test_open_routes_are_checked_and_shown_by_doctor() -> None:
    key = _key("doctor-test-key")
    shown = doctor.check_api_access(Settings(worker_api_key=key, api_open_routes="/enhance"))
    assert not shown.ok and shown.level == "warning" and "/enhance" in shown.detail and key not in shown.detail
    closed = doctor.check_api_access(Settings(worker_api_key=key))
    assert closed.ok and "no route open" in closed.detail
    refused = doctor.check_api_access(Settings(worker_api_key=key, api_open_routes="/enhance,/admin"))
    assert not refused.ok and refused.level == "error" and "/admin cannot be served without a key" in refused.detail
    short = doctor.check_api_access(Settings(worker_api_key="short"))
    assert not short.ok and short.level == "error" and "32 characters" in short.detail
    assert "api access" in [c.name for c in doctor.run_checks(Settings(), environ={}, models=[])]


# ----------------------------------------------------------------------------- what reaches the model
def with_minor_rule(messages: list[dict]) -> list[dict]:
    """The caller's messages as the model gets them: its system message ends with the gate's rule."""
    return [{**m, "content": f"{m['content']}\n\n{MINOR_RULE}"} if m["role"] == "system" else m for m in messages]


async def test_enhance_with_the_callers_system_message_is_a_plain_completion(http: httpx.AsyncClient, stack) -> None:
    tokenizer = stack.text.tokenizer("qwen_instruct")
    # Greedy, and 150 new tokens (the app asks 500; over the 100-token budget of our enhancement).
    body = enhance_prompt_request("a knight resting in a mossy forest clearing", temperature=0, max_tokens=150,
                                  sfw_mode=True)
    enhanced = await http.post("/enhance", json=body)
    assert enhanced.status_code == 200, enhanced.text
    result = enhanced.json()
    # The model saw the caller's two messages (no template, no rewrite request of ours), the system
    # message ending with the safety gate's rule about minors (docs/ARCHITECTURE.md).
    assert result["model_info"]["input_tokens"] == count_chat_tokens(tokenizer, with_minor_rule(body["messages"]))
    assert result["enhancement"]["mode"] == "plain_completion" and result["enhancement"]["max_tokens"] == 150
    # ...and its text comes back as the model wrote it: what a plain chat completion of the same
    # messages gives (greedy), not cleaned, squashed or cut to a prompt budget.
    plain = await http.post("/v1/chat/completions", json={"model": "qwen_instruct", "messages": body["messages"],
                                                          "max_tokens": 150, "temperature": 0, "sfw_mode": True})
    assert plain.status_code == 200, plain.text
    assert result["enhanced_prompt"] == plain.json()["choices"][0]["message"]["content"]
    assert result["tokens_generated"] == plain.json()["usage"]["completion_tokens"]
    assert plain.json()["usage"]["prompt_tokens"] == result["model_info"]["input_tokens"]  # sfw kept the prompt

    # Without a system message /enhance still enhances with its template and the target's budget.
    legacy = (await http.post("/enhance", json={"messages": body["messages"][1:], "max_tokens": 8})).json()
    assert legacy["enhancement"]["prompt_budget"] > 0
    assert legacy["model_info"]["input_tokens"] != count_chat_tokens(tokenizer, body["messages"][1:])


async def test_sfw_roleplay_keeps_the_callers_system_prompt(http: httpx.AsyncClient, stack) -> None:
    tokenizer = stack.text.tokenizer("qwen_instruct")
    body = roleplay_chat_request("You are Mia, a cheerful barista. Stay in character.", "Hi Mia!", True, max_tokens=4)
    answer = await http.post("/chat", json=body)
    assert answer.status_code == 200, answer.text
    info = answer.json()["prompt_info"]
    assert info["sfw_mode"] is True
    assert info["prompt_tokens"] == count_chat_tokens(tokenizer, with_minor_rule(body["messages"]))


# ----------------------------------------------------------------------------- a busy GPU
async def test_a_chat_turn_that_cannot_get_the_gpu_in_time_answers_503(settings_for) -> None:
    # Room for one model only: the chat model cannot come in beside a running video job.
    settings = settings_for(vram_budget_gb=1.5, chat_gpu_wait_s=1.0)
    async with running(settings) as runtime, client(runtime) as http:
        for which in ("instruct", "base", "sdxl"):  # whatever earlier tests left resident on the server
            assert (await http.post("/memory/unload", params={"which": which, "wait": "true"})).status_code == 200
        job = {"type": "video_fast", "prompt": "waves on a beach", "user_id": "user-1",
               "config": {"width": 96, "height": 96, "num_inference_steps": 100, "frame_num": 161}}
        submitted = await http.post("/jobs", json=job)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        dispatcher = runtime.worker.dispatcher
        async with asyncio.timeout(120):
            while not dispatcher.running():  # the job holds the GPU (loading WAN, or generating)
                await asyncio.sleep(0.05)
        chat = await http.post("/chat", json=roleplay_chat_request("You are Mia.", "Hi!", False, max_tokens=4))
        assert chat.status_code == 503, chat.text
        assert int(chat.headers["retry-after"]) > 0 and "GPU stayed busy for 1s" in chat.json()["error"]
        assert dispatcher.running() and (await http.get(f"/jobs/{job_id}")).json()["status"] == "processing"
        assert (await http.post(f"/jobs/{job_id}/cancel")).status_code == 202  # no need to render it all


# ----------------------------------------------------------------------------- key-less development
async def test_a_keyless_server_takes_only_json_addressed_to_a_loopback_name(settings_for) -> None:
    async with running(settings_for(worker_api_key=None), jobs=False) as runtime, client(runtime, key=None) as http:
        job = '{"type": "sdxl_image_fast", "prompt": "a red bicycle", "user_id": "u1"}'
        plain = await http.post("/jobs", content=job, headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
        form = await http.post("/memory/load", params={"which": "sdxl"})  # no body, no content type
        assert form.status_code == 415
        assert (await http.post("/jobs", content=job, headers={"Content-Type": "application/json"})).status_code == 202
        rebound = await http.get("/v1/models", headers={"Host": f"attacker.example:{runtime.api_port}"})
        assert rebound.status_code == 400 and rebound.json()["error"]["type"] == "invalid_host"
        assert (await http.post("/jobs", content=job, headers={"Host": "attacker.example",
                                                                "Content-Type": "application/json"})).status_code == 400
        for host in (f"localhost:{runtime.api_port}", "127.0.0.1", f"[::1]:{runtime.api_port}"):
            assert (await http.get("/v1/models", headers={"Host": host})).status_code == 200, host
