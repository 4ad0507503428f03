"""Limits on what a caller controls (bridge/api_limits.py, bridge/limits.py; docs/API.md "Limits"),
against the real stack: a Runtime over the session's tritonserver (tiny models), a real
redis-server, the worker loop and uvicorn (tests/stack.py)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from bridge.chat import MAX_MESSAGE_CHARS
from bridge.limits import MAX_JSON_DEPTH
from tests.stack import api_error, client, running, wait_for_state

MB = 1024 * 1024
TINY_SDXL = {"width": 64, "height": 64, "num_inference_steps": 2, "num_images": 1, "seed": 5}


def _job(**metadata: object) -> dict:
    return {"type": "sdxl_image_fast", "prompt": "a red cube on a table", "user_id": "limits-user",
            "config": TINY_SDXL, "metadata": metadata}


async def _queued(stack) -> int:
    return sum((await stack.queue.queue_depths()).values())


def _aliases(count: int) -> list[str]:
    return [f"alias{i:05d}xxxxxxxxx" for i in range(count)]  # 20 characters each


async def test_an_alias_bomb_is_refused_at_once_while_health_answers(http: httpx.AsyncClient) -> None:
    """20 characters x 5,000 aliases (2.5 MB) is over the body limit: 413; one character with
    20,000 aliases fits in the body limit but not the alias limit: 422 naming the field. Either is
    answered at once, and /health, asked meanwhile, answers too (it used to wait for the regex)."""
    text = "*Luna smiles and walks toward the window.*"
    big = {"text": text, "use_model": False,
           "characters": [{"name": f"Name{i}", "appearance": "tall", "aliases": _aliases(5000)} for i in range(20)]}
    wide = {"text": text, "use_model": False,
            "characters": [{"name": "Luna", "appearance": "silver hair", "aliases": _aliases(20000)}]}

    async def timed(coro):
        started = time.monotonic()
        response = await coro
        return response, time.monotonic() - started

    (too_big, big_s), (too_many, many_s), (health, health_s) = await asyncio.gather(
        timed(http.post("/scene/detect", json=big)), timed(http.post("/scene/detect", json=wide)),
        timed(http.get("/health")))
    assert "MAX_REQUEST_BYTES" in api_error(too_big, 413, "body")["message"]
    error = api_error(too_many, 422)
    assert error["param"] == "characters.0.aliases" and "20" in error["message"], error
    assert health.status_code == 200, health.text
    assert max(big_s, many_s, health_s) < 1.0, (big_s, many_s, health_s)
    # A long alias is refused too; a few normal ones still work.
    long_alias = {**wide, "characters": [{"name": "Luna", "aliases": ["x" * 101]}]}
    assert api_error(await http.post("/scene/detect", json=long_alias), 422)["param"] == "characters.0.aliases.0"
    fine = {**wide, "characters": [{"name": "Luna", "appearance": "silver hair", "aliases": _aliases(20)}]}
    ok = await http.post("/scene/detect", json=fine)
    assert ok.status_code == 200 and ok.json()["characters"] == ["Luna"], ok.text


async def test_a_50_mb_body_is_refused_with_413_and_nothing_is_queued(http: httpx.AsyncClient, stack) -> None:
    """Declared (Content-Length) or streamed (chunked, no length), 50 MB of metadata is refused
    with a 413 that names the setting; no job reaches Redis. The limit is the setting's."""
    before = await _queued(stack)
    body = json.dumps(_job(blob="x" * (50 * MB))).encode()
    declared = await http.post("/jobs", content=body, headers={"content-type": "application/json"})
    assert "at most 1048576 bytes" in api_error(declared, 413, "body")["message"]

    async def chunks():
        for start in range(0, len(body), MB):
            yield body[start:start + MB]

    streamed = await http.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "MAX_REQUEST_BYTES" in api_error(streamed, 413, "body")["message"]
    legacy = await http.post("/chat", json={"message": "x" * (2 * MB)})
    assert legacy.status_code == 413 and legacy.json()["success"] is False, legacy.text
    assert await _queued(stack) == before
    fits = await http.post("/jobs", json=_job(note="x" * 1000))
    assert fits.status_code == 202, fits.text


async def test_deep_json_is_a_4xx_that_names_the_problem(http: httpx.AsyncClient) -> None:
    """100,000 levels of nesting used to raise RecursionError (a 500 and a traceback); any body
    deeper than MAX_JSON_DEPTH is now refused before a parser sees it, in the route's shape."""
    deep = b"[" * 100_000 + b"]" * 100_000
    nested_metadata = json.dumps(_job()).encode()[:-1] + b', "extra": ' + b"[" * 100 + b"]" * 100 + b"}"
    for path, body in (("/jobs", deep), ("/jobs", nested_metadata), ("/v1/chat/completions", deep),
                       ("/scene/detect", deep)):
        response = await http.post(path, content=body, headers={"content-type": "application/json"})
        assert f"at most {MAX_JSON_DEPTH}" in api_error(response, 422, "body")["message"], (path, response.text)
    legacy = await http.post("/chat", content=deep, headers={"content-type": "application/json"})
    assert legacy.status_code == 400 and "nested" in legacy.json()["error"], legacy.text


async def test_list_lengths_are_limited(http: httpx.AsyncClient) -> None:
    """messages, conversation_history and stop each have a maximum length (422/400 naming them)."""
    message = {"role": "user", "content": "hi"}
    too_many = await http.post("/v1/chat/completions", json={"model": "qwen_instruct", "messages": [message] * 201})
    assert api_error(too_many, 422, "messages")
    stops = await http.post("/v1/chat/completions",
                            json={"model": "qwen_instruct", "messages": [message], "stop": ["x"] * 17})
    assert "at most 16 stop sequences" in api_error(stops, 422, "stop")["message"]
    long_stop = await http.post("/v1/chat/completions",
                                json={"model": "qwen_instruct", "messages": [message], "stop": "x" * 2001})
    assert api_error(long_stop, 422, "stop")
    history = await http.post("/chat", json={"message": "hi", "conversation_history": [message] * 201})
    assert history.status_code == 400 and "conversation_history" in history.json()["error"], history.text
    legacy = await http.post("/chat", json={"messages": [message] * 201})
    assert legacy.status_code == 400 and "messages" in legacy.json()["error"], legacy.text


async def test_event_streams_past_the_pool_size_get_503_with_retry_after(settings_for) -> None:
    """EVENT_STREAMS_MAX=2: two open streams hold the pool; a third is a 503 with Retry-After; once
    one closes, a new stream is served again."""
    async with running(settings_for(event_streams_max=2), jobs=False) as runtime, client(runtime) as http:
        submitted = await http.post("/jobs", json=_job())
        assert submitted.status_code == 202, submitted.text
        path = f"/jobs/{submitted.json()['id']}/events"
        async with http.stream("GET", path) as first, http.stream("GET", path) as second:
            assert first.status_code == second.status_code == 200
            third = await http.get(path)
            error = api_error(third, 503)
            assert error["type"] == "too_many_streams" and third.headers["retry-after"] == "5", error
        for _ in range(50):  # the closed streams give their slots back when their responses end
            async with http.stream("GET", path) as again:
                if again.status_code == 200:
                    break
            await asyncio.sleep(0.1)
        assert again.status_code == 200


# --------------------------------------------------------------------------- the reference image
class _HeldImageServer:
    """Serves a PNG at /ref.png on 127.0.0.1, but only once :attr:`release` is set."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.release = threading.Event()
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
        png = buffer.getvalue()
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_GET(self) -> None:  # noqa: N802
                server_self.asked.set()
                server_self.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_HeldImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


async def test_the_reference_image_is_fetched_before_the_gpu_is_asked_for(settings_for) -> None:
    """While the reference download of an img2img job is held back by its server, the job neither
    holds nor waits for the GPU (it used to hold its grant through the download); released, the
    job completes."""
    with _HeldImageServer() as images:
        settings = settings_for(fetch_allowed_hosts=[f"127.0.0.1:{images.port}"])
        async with running(settings) as runtime, client(runtime) as http:
            url = f"http://127.0.0.1:{images.port}/ref.png"
            submitted = await http.post("/jobs", json=_job(reference_image_url=url, reference_strength=0.5))
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            assert await asyncio.to_thread(images.asked.wait, 60), "the reference was never asked for"
            await asyncio.sleep(0.5)  # the job would have asked for its grant by now
            dispatcher = runtime.worker.dispatcher
            assert not dispatcher.running() and not dispatcher.waiting(), (dispatcher.running(), dispatcher.waiting())
            images.release.set()
            state = await wait_for_state(http, job_id, lambda s: s.get("status") in ("completed", "failed"))
            assert state["status"] == "completed", state


# --------------------------------------------------------------------------- queued payloads
async def test_huge_or_deep_queued_payloads_are_dead_lettered_and_the_next_job_runs(http, stack) -> None:
    """Another producer pushes 2 MB and 500-deep payloads straight onto the queue: each becomes a
    dead-letter entry that says why; the worker goes on to the next job."""
    job_id = f"deep-{uuid.uuid4().hex[:8]}"
    huge = json.dumps({**_job(blob="x" * (2 * MB)), "id": f"huge-{uuid.uuid4().hex[:8]}"})
    deep = json.dumps({**_job(), "id": job_id})[:-1] + ', "extra": ' + "[" * 500 + "]" * 500 + "}"
    good = {**_job(), "id": f"good-{uuid.uuid4().hex[:8]}"}
    for raw in (huge, deep, json.dumps(good)):
        await stack.queue.push("sdxl_queue", raw.encode())
    state: dict = {}
    for _ in range(1200):  # pushed straight to Redis: no state until the worker takes it
        state = await stack.queue.get_state(good["id"]) or {}
        if state.get("status") in ("completed", "failed"):
            break
        await asyncio.sleep(0.1)
    assert state.get("status") == "completed", state
    reasons = [entry["reason"] for entry in await stack.queue.dead_letters()]
    assert any("bytes; at most 1048576" in reason for reason in reasons), reasons
    assert any("nested 501 levels deep" in reason for reason in reasons), reasons


# --------------------------------------------------------------------------- what answers leave out
async def test_info_answers_carry_no_file_paths(http: httpx.AsyncClient, stack, tiny_models_dir) -> None:
    """/enhancement/info and /model/info say which data copy and whether weights are present, not
    where they are on disk (they used to answer the data folder and each weights path)."""
    from bridge.settings import REPO_ROOT

    enhancement = await http.get("/enhancement/info")
    models = await http.get("/model/info")
    assert enhancement.status_code == models.status_code == 200
    assert enhancement.json()["source"] == "packaged"
    assert all(m["weights_present"] is True for m in models.json()["models"].values())
    for text in (enhancement.text, models.text, (await http.get("/memory/status")).text):
        for path in (str(tiny_models_dir), str(REPO_ROOT), "/bridge/data"):
            assert path not in text, path


def _heavy_scene(i: int) -> dict:
    """A scene request of 20 characters with 20 aliases each and 32,000 characters of text (the
    most allowed): about 0.1-0.5 s of CPU here (the safety gate reads it all, the rules compile
    every alias), under the test's time limit alone, far over it two dozen times."""
    words = " ".join(f"*Luna{i} walks toward the harbour window at dawn, smiling.*" for _ in range(600))
    characters = [{"name": f"Name{c}", "appearance": "tall, silver hair",
                   "aliases": [f"{c:02d}{a:02d}" + "y" * 36 for a in range(20)]} for c in range(20)]
    return {"text": words[:MAX_MESSAGE_CHARS], "use_model": False, "characters": characters}


async def test_cpu_work_past_its_time_limit_is_a_503_and_the_loop_keeps_answering(settings_for) -> None:
    """API_CPU_WORK_TIMEOUT_S bounds a request's CPU work, waiting for one of API_CPU_WORKERS
    threads included: a flood of requests at the input limits on one thread gets 503s with
    Retry-After (never a 500), /health answers while it runs, and afterwards the pool works."""
    settings = settings_for(api_cpu_workers=1, api_cpu_work_timeout_s=1.0)
    async with running(settings, jobs=False) as runtime, client(runtime) as http:
        flood = [asyncio.create_task(http.post("/scene/detect", json=_heavy_scene(i))) for i in range(24)]
        health = await http.get("/health")
        assert health.status_code == 200, health.text
        assert not all(task.done() for task in flood)  # /health did not wait for the flood
        answers = await asyncio.gather(*flood)
        assert {a.status_code for a in answers} <= {200, 503}, [a.text for a in answers if a.status_code != 200]
        refused = [a for a in answers if a.status_code == 503]
        assert refused, "24 requests of this size on one thread all finished within 1 s"
        error = api_error(refused[0], 503)
        assert error["type"] == "cpu_timeout" and "API_CPU_WORK_TIMEOUT_S" in error["message"]
        assert int(refused[0].headers["retry-after"]) > 0
        small = {"text": "*Luna walks toward the window.*", "use_model": False,
                 "characters": [{"name": "Luna", "appearance": "silver hair"}]}
        assert (await http.post("/scene/detect", json=small)).status_code == 200
