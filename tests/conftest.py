"""Shared fixtures: tiny models, a real tritonserver, real redis-server processes.

Nothing here replaces tritonserver, Redis or the model code: the session's server runs the real
model repository over tiny random-weight models built offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.launcher import TritonServer, free_port
from bridge.redis_server import RedisServer
from bridge.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """Tiny models, built once and cached (deterministic) under .cache/tiny-models."""
    from model_kit.tiny import build_all

    root = Path(os.environ.get("TINY_MODELS_DIR", REPO / ".cache" / "tiny-models"))
    return build_all(root)


def triton_settings(models_dir: Path, **overrides: object) -> Settings:
    """Settings for a test tritonserver on free ports with a short exit timeout."""
    values: dict[str, object] = dict(
        models_dir=models_dir,
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        triton_exit_timeout_s=3,
        model_threads=1,
        device="cpu",
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def triton(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real tritonserver for the session (explicit model control, nothing preloaded)."""
    settings = triton_settings(tiny_models_dir)
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(settings, log_path=log_path).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_server(tmp_path: Path):
    """A fresh redis-server process per test (tests may stop and restart it)."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture()
def supabase():
    """A fresh Supabase stand-in (harness/supabase_stub.py); the test must leave no contract violation."""
    from harness.supabase_stub import SupabaseStub

    with SupabaseStub() as stub:
        yield stub
        assert stub.violations == []


# --------------------------------------------------------------------------- in-process bridge + API
@pytest.fixture()
def settings_for(tiny_models_dir: Path, triton, redis_server, tmp_path: Path):
    """Settings of an in-process bridge over the session Triton and this test's Redis."""
    from tests.stack import stack_settings

    def make(**overrides):
        return stack_settings(tiny_models_dir, triton.grpc_url, redis_server.url, tmp_path / "out", **overrides)

    return make


@pytest.fixture()
async def stack(settings_for):
    """A running bridge (worker loop and API) with the default test settings."""
    from tests.stack import running

    async with running(settings_for()) as runtime:
        yield runtime


@pytest.fixture()
async def http(stack, request):
    """An HTTP client for ``stack``; a module's ``RECORDER`` (if any) keeps every answer."""
    from tests.stack import client

    async with client(stack, getattr(request.module, "RECORDER", None)) as http_client:
        yield http_client
