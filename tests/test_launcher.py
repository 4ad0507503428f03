"""The tritonserver launcher against the real server binary."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from bridge.launcher import SHM_PREFIX, TritonServer, TritonStartError, find_tritonserver
from tests.conftest import triton_settings


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
