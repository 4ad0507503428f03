"""What a client is told when something fails inside the worker, through the real stack: the answer
names the problem (which model, what to do), and never the internals behind it (file paths,
tracebacks, Triton's address, exception class names); those are in the worker's log
(docs/API.md, "Errors").

The failures are real: a tritonserver of the bridge's own, SIGKILLed while the API runs (Triton's
gRPC errors carry its address), and a broken data file on disk.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import socket
from pathlib import Path

import httpx

from bridge.prompt_data import PACKAGED_DATA_DIR
from bridge.settings import REPO_ROOT
from tests.stack import Recorder, client, running, stack_settings

#: An exception's class name, as Python prints it (``InferenceServerException``, ``AioRpcError``, ...).
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]+(Error|Exception)\b")


def _internals(text: str, *, paths: list[str], address: str) -> list[str]:
    """What of the worker's insides ``text`` shows."""
    found = [path for path in paths if path in text]
    found += [word for word in ("Traceback", address, "StatusCode", "ipv4:", "grpc", ".py") if word in text]
    found += [m.group(0) for m in EXCEPTION_NAME.finditer(text)]
    return found


def _message(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    return body["error"] if isinstance(body["error"], str) else body["error"]["message"]


async def test_failures_name_the_problem_without_internals(tiny_models_dir: Path, redis_server, tmp_path: Path,
                                                            caplog) -> None:
    caplog.set_level(logging.WARNING)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(PACKAGED_DATA_DIR / "templates.yaml", data_dir / "templates.yaml")
    recorder = Recorder()
    # An embedded tritonserver (TRITON_URL unset): this test kills it.
    settings = stack_settings(tiny_models_dir, None, redis_server.url, tmp_path / "out", data_dir=data_dir,
                              load_retry_backoff_s=0)
    async with running(settings, jobs=False) as runtime, client(runtime, recorder) as http:
        assert runtime.triton_server is not None
        address = runtime.triton_server.grpc_url
        loaded = await http.post("/memory/load", params={"which": "instruct", "wait": "true"})
        assert loaded.status_code == 200, loaded.text

        # A data file broken on disk: the file is named, the folder it is in is not.
        (data_dir / "templates.yaml").write_text("templates: [broken\n")
        reload = _message(await http.post("/admin", json={"action": "templates_reload"}), 409)
        assert "templates.yaml" in reload and "DATA_DIR" in reload

        runtime.triton_server.process.kill()  # type: ignore[union-attr]
        await asyncio.to_thread(runtime.triton_server.process.wait)  # type: ignore[union-attr]
        # Kept dead: with its HTTP port taken every restart fails (the launcher refuses a taken
        # port), else the bridge's restart (Runtime.restart_triton) would answer the turns below.
        # (Its gRPC port stays closed: connections to it are refused at once.)
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", int(runtime.triton_server.http_url.rsplit(":", 1)[1])))
        squatter.listen()

        # A resident model whose server is gone: 503 naming the model.
        chat = await http.post("/chat", json={"messages": [{"role": "user", "content": "Hi"}],
                                              "model": "qwen_instruct", "max_tokens": 2})
        assert "qwen_instruct" in _message(chat, 503) and chat.headers["retry-after"]
        # A model that must be loaded first: the load fails inside Triton's client.
        streamed = await http.post("/v1/chat/completions", json={
            "model": "qwen_base", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
        assert "qwen_base" in _message(streamed, 503)
        load = await http.post("/memory/load", params={"which": "base", "wait": "true"})
        assert "loading qwen_base failed" in _message(load, 503)
        completion = await http.post("/v1/completions", json={"model": "qwen_base", "prompt": "Once", "max_tokens": 2})
        assert "qwen_base" in _message(completion, 503)
        scene = await http.post("/scene/detect", json={"text": "*Luna walks into the harbour at dawn.*"})
        assert scene.status_code == 200 and "rules only" in scene.json()["note"]
        # The server's death took every model with it (unloaded; failed once a load was tried on
        # the dead server): nothing to unload.
        unload = await http.post("/emergency/operation", json={"operation": "force_unload_all_except", "keep": []})
        assert unload.status_code == 200 and unload.json()["failed"] == {}, unload.text
        status = (await http.get("/memory/status")).json()
        assert status["models"]["qwen_instruct"]["state"] in ("unloaded", "failed"), status["models"]
        assert status["models"]["qwen_base"]["last_error"] and any(
            op["state"] == "failed" and "loading qwen_base failed" in op["error"] for op in status["operations"])
        for path in ("/model/info", "/memory/report", "/chat/health", "/health", "/status"):
            await http.get(path)
        assert "triton is unreachable" in " ".join((await http.get("/health")).json()["problems"])
        squatter.close()

    paths = [str(tmp_path), str(REPO_ROOT), str(Path.home())]
    assert len(recorder.seen) >= 30
    leaks = {text[:300]: _internals(text, paths=paths, address=address) for text in recorder.seen}
    assert {text: found for text, found in leaks.items() if found} == {}
    # ... while the log holds the detail an operator needs.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert address.split(":")[-1] in logged and str(data_dir) in logged
