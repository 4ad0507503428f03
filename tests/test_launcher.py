"""The tritonserver launcher against the real server binary."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from bridge.launcher import SHM_PREFIX, TritonServer, TritonStartError, find_tritonserver
from harness.processes import start_time
from tests.conftest import triton_settings
from tests.triton_helpers import Live


def _stub_pids(shm_prefix: str = "") -> set[int]:
    """Stub processes (of the server using ``shm_prefix``: the stub's command line names it)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if b"triton_python_backend_stub" in cmdline and shm_prefix.encode() in cmdline:
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def test_finds_the_wheel_server_and_stub_for_this_python(tmp_path: Path) -> None:
    install = find_tritonserver(triton_settings(tmp_path))
    assert install.binary.exists() and os.access(install.binary, os.X_OK)
    assert install.stub is not None and install.stub.exists()
    assert install.backend_source is not None and (install.backend_source / "libtriton_python.so").exists()


def test_binds_localhost_and_applies_flags(tmp_path: Path) -> None:
    settings = triton_settings(tmp_path)
    server = TritonServer(settings)
    install = find_tritonserver(settings)
    cmd = server.command(install, backend_dir=tmp_path)
    for flag in ("--model-control-mode=explicit", "--disable-auto-complete-config", "--log-format=ISO8601",
                 "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in cmd
    assert any(arg.startswith("--backend-config=python,shm-default-byte-size=") for arg in cmd)


def test_metrics_port_binds_apart_from_model_control(tmp_path: Path) -> None:
    # A scraper may reach the metrics port while model control stays on loopback.
    settings = triton_settings(tmp_path, triton_metrics_host="0.0.0.0")
    server = TritonServer(settings)
    cmd = server.command(find_tritonserver(settings), backend_dir=tmp_path)
    assert "--metrics-address=0.0.0.0" in cmd
    assert "--http-address=127.0.0.1" in cmd and "--grpc-address=127.0.0.1" in cmd
    assert server.metrics_url == f"http://127.0.0.1:{settings.triton_metrics_port}/metrics"


def test_failed_start_reports_the_servers_own_error(tmp_path: Path) -> None:
    # A startup model whose weights are missing: the server exits, we say why.
    settings = triton_settings(tmp_path / "no-models", triton_start_timeout_s=60)
    server = TritonServer(settings, startup_models=["qwen_base"], log_path=tmp_path / "t.log")
    with pytest.raises(TritonStartError) as info:
        server.start()
    message = str(info.value)
    assert "qwen_base" in message
    assert "no model at" in message or "failed to load" in message
    assert not server.running


def test_stop_leaves_no_stub_processes_or_shared_memory(tiny_models_dir: Path, tmp_path: Path) -> None:
    settings = triton_settings(tiny_models_dir)
    server = TritonServer(settings, startup_models=["qwen_base"], log_path=tmp_path / "t.log").start()
    prefix = server._shm_prefix
    try:
        ready = httpx.get(f"http://{server.http_url}/v2/models/qwen_base/ready", timeout=5)
        assert ready.status_code == 200
        assert _stub_pids(prefix), "the model's stub process should be running"
        assert prefix.startswith(SHM_PREFIX) and list(Path("/dev/shm").glob(f"{prefix}*")), "our shm regions"
    finally:
        server.stop()
    assert not server.running
    assert not _stub_pids(prefix)
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{server.http_url}/v2/health/live", timeout=2)


def test_a_stub_streaming_when_its_server_is_killed_exits_by_itself(tiny_models_dir: Path, tmp_path: Path) -> None:
    """SIGKILL of tritonserver while a Qwen model streams to four clients (its response and metric
    threads sending to the server): the stub ends by itself within 5 s, before any stop of ours
    (the Python backend's own exit deadlocked then and left the stub running for ever)."""
    server = TritonServer(triton_settings(tiny_models_dir), startup_models=["qwen_base"],
                          log_path=tmp_path / "t.log").start()
    try:
        stubs = _stub_pids(server._shm_prefix)
        assert stubs and server.process is not None
        streams = [Live(server.grpc_url, "qwen_base", {"text_input": "Hello", "stream": True,
                                                       "sampling_parameters": {"temperature": 0, "max_tokens": 3000}})
                   for _ in range(4)]
        for live in streams:
            live.wait_for(20)
        os.kill(server.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while alive := [pid for pid in stubs if start_time(pid) is not None]:
            assert time.monotonic() < deadline, f"stubs {alive} still run 5 s after their server was killed"
            time.sleep(0.1)
    finally:
        server.stop()


def test_model_processes_get_no_secrets_and_the_triton_key_is_not_on_any_command_line(
        tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge's secrets are in its environment (as in production) and in the settings of the
    server: neither tritonserver's nor the model stub's /proc/<pid>/environ holds any of them, no
    /proc/<pid>/cmdline (what ps shows) holds the Triton key, and the key still restricts Triton's
    model control (refused without it, accepted with it)."""
    import uuid

    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from bridge.launcher import API_KEY_HEADER

    secrets = {name: f"{name.lower()}-{uuid.uuid4().hex}" for name in
               ("WORKER_API_KEY", "SUPABASE_SERVICE_KEY", "JOB_CALLBACK_SECRET", "TRITON_API_KEY")}
    secrets["REDIS_URL"] = f"redis://:pw-{uuid.uuid4().hex}@127.0.0.1:1/0"
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an allowed variable does get through
    settings = triton_settings(tiny_models_dir, triton_api_key=secrets["TRITON_API_KEY"],
                               worker_api_key=secrets["WORKER_API_KEY"],
                               supabase_service_key=secrets["SUPABASE_SERVICE_KEY"],
                               job_callback_secret=secrets["JOB_CALLBACK_SECRET"])
    server = TritonServer(settings, startup_models=["qwen_base"], log_path=tmp_path / "t.log").start()
    try:
        stubs = _stub_pids(server._shm_prefix)
        assert stubs and server.process is not None
        for pid in (server.process.pid, *stubs):
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            for name, value in secrets.items():
                assert value.encode() not in environ and f"{name}=".encode() not in environ, (pid, name)
            assert b"SECRET_ARGS_FILE" not in environ or pid == server.process.pid
        stub_environ = Path(f"/proc/{next(iter(stubs))}/environ").read_bytes().split(b"\0")
        assert b"HF_HUB_OFFLINE=1" in stub_environ and not any(e.startswith(b"LD_PRELOAD=") for e in stub_environ)
        key = secrets["TRITON_API_KEY"].encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    assert key not in (entry / "cmdline").read_bytes(), f"the key is on the command line of {entry.name}"
                except OSError:
                    continue
        assert not list(server._workdir.glob("secret-args"))  # read and removed by the shim
        control = httpclient.InferenceServerClient(server.http_url)
        with pytest.raises(InferenceServerException):
            control.get_model_repository_index()
        assert control.get_model_repository_index(headers={API_KEY_HEADER: secrets["TRITON_API_KEY"]})
        control.close()
    finally:
        server.stop()


def test_child_environment_keeps_what_the_models_read_and_no_secret() -> None:
    from bridge.launcher import child_environment

    env = {"QWEN_MAX_BATCH": "8", "QWEN_PREFIX_CACHE_GB": "1", "TORCH_COMPILE": "full", "HF_HOME": "/h",
           "WAN_WEIGHTS": "/w", "WORKER_API_KEY": "k" * 40, "SUPABASE_SERVICE_KEY": "s", "JOB_CALLBACK_SECRET": "c",
           "TRITON_API_KEY": "t", "REDIS_URL": "redis://:p@h"}
    kept = child_environment(env)
    assert set(kept) == {"QWEN_MAX_BATCH", "QWEN_PREFIX_CACHE_GB", "TORCH_COMPILE", "HF_HOME", "WAN_WEIGHTS"}


def test_a_leftover_server_of_the_same_worker_is_stopped_but_a_reused_pid_is_not(tmp_path: Path, caplog) -> None:
    """A server an earlier run left behind (its pid file names it with its start time) is stopped
    at the next start, which then answers with its own --id; a pid file naming a pid that now
    belongs to another process (other start time) stops nothing."""
    import json
    import subprocess
    import time

    pid_file = tmp_path / "run" / "w1.pid"
    settings = triton_settings(tmp_path)
    leftover = TritonServer(settings, pid_file=pid_file, log_path=tmp_path / "old.log").start()
    record = json.loads(pid_file.read_text())
    assert record["pid"] == leftover.process.pid
    successor = TritonServer(settings, pid_file=pid_file, log_path=tmp_path / "new.log")
    try:
        with caplog.at_level("WARNING", logger="bridge.launcher"):
            successor.start()  # same ports: it only binds once the leftover is gone
        assert leftover.process.wait(5) is not None
        assert any(f"pid {record['pid']} left behind" in r.getMessage() for r in caplog.records), caplog.text
        name = httpx.get(f"http://{successor.http_url}/v2", timeout=5).json()["name"]
        assert name == successor.server_id != leftover.server_id
    finally:
        successor.stop()
        leftover.stop()
    assert not pid_file.exists()

    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(json.dumps({"pid": bystander.pid, "start_time": time.time() - 3600, "shm_prefix": ""}))
        with TritonServer(triton_settings(tmp_path), pid_file=pid_file, log_path=tmp_path / "third.log"):
            assert bystander.poll() is None  # a reused pid is never killed
    finally:
        bystander.kill()
        bystander.wait()


def test_a_taken_port_is_a_start_up_error_naming_it_and_its_holder(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = TritonServer(triton_settings(tmp_path, triton_grpc_port=port), log_path=tmp_path / "t.log")
        with pytest.raises(TritonStartError) as info:
            server.start()
    assert f"TRITON_GRPC_PORT={port} is already in use by pid {os.getpid()}" in str(info.value)
    assert server.process is None  # nothing was started
