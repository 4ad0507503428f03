"""bridge.registration against the recording Supabase stand-in (harness/supabase_stub.py)."""

from __future__ import annotations

import logging

import pytest

from bridge.launcher import free_port
from bridge.registration import FUNCTIONS, public_worker_url, register_worker
from bridge.settings import Settings
from harness.supabase_stub import SupabaseStub


@pytest.fixture()
def stub():
    with SupabaseStub() as running:
        yield running


class _Sleeps:
    """Records backoff delays instead of sleeping them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _settings(stub: SupabaseStub, **overrides: object) -> Settings:
    values = {**stub.settings_values(), "worker_id": "pod-a-1", **overrides}
    return Settings(**values)


def test_public_url_sources():
    assert public_worker_url(Settings(public_url="https://w.example.com/")) == ("https://w.example.com", "PUBLIC_URL")
    assert public_worker_url(Settings(runpod_pod_id="abc123")) == (
        "https://abc123-7861.proxy.runpod.net", "RUNPOD_POD_ID"
    )
    # PUBLIC_URL wins over the pod id; the proxy URL follows API_PORT.
    assert public_worker_url(Settings(public_url="https://x", runpod_pod_id="p"))[0] == "https://x"
    assert public_worker_url(Settings(runpod_pod_id="p", api_port=9000))[0] == "https://p-9000.proxy.runpod.net"
    assert public_worker_url(Settings()) is None


async def test_registers_with_both_functions(stub: SupabaseStub):
    results = await register_worker(_settings(stub, runpod_pod_id="pod42"), sleep=_Sleeps())
    assert results == {name: True for name in FUNCTIONS}
    for route in FUNCTIONS:
        (body,) = stub.function_calls(route)
        assert body["worker_url"] == "https://pod42-7861.proxy.runpod.net"
        assert body["worker_id"] == "pod-a-1"
        assert body["worker_type"]
        assert body["detection_method"] == "RUNPOD_POD_ID"
        (request,) = stub.requests_for(route)
        assert request.headers["authorization"] == f"Bearer {stub.service_key}"
        assert request.headers["content-type"].startswith("application/json")
    assert stub.function_calls("register-chat-worker")[0]["capabilities"]["pure_inference"] is True
    assert stub.violations == []


async def test_retries_with_backoff_then_succeeds(stub: SupabaseStub):
    stub.fail_next("update-worker-url", 2, status=503)
    stub.fail_next("register-chat-worker", 1, mode="close")
    sleeps = _Sleeps()
    results = await register_worker(_settings(stub, public_url="https://w.example"), base_delay_s=0.5, sleep=sleeps)
    assert results == {name: True for name in FUNCTIONS}
    assert len(stub.requests_for("update-worker-url")) == 3
    assert len(stub.requests_for("register-chat-worker")) == 2
    assert sleeps.delays == [0.5, 1.0, 0.5]  # doubling per function, restarting for the next one
    assert len(stub.function_calls("update-worker-url")) == 1
    assert stub.violations == []


async def test_update_worker_urls_400_is_retried(stub: SupabaseStub):
    # update-worker-url answers 400 when its own health check of our URL fails (still starting).
    stub.fail_next("update-worker-url", 2, status=400)
    sleeps = _Sleeps()
    results = await register_worker(_settings(stub, public_url="https://w.example"), sleep=sleeps)
    assert results == {name: True for name in FUNCTIONS}
    assert [r.status for r in stub.requests_for("update-worker-url")] == [400, 400, 200]
    assert sleeps.delays == [1.0, 2.0]


async def test_gives_up_after_attempts_without_raising(stub: SupabaseStub, caplog: pytest.LogCaptureFixture):
    stub.fail_next("update-worker-url", 10, status=500)
    sleeps = _Sleeps()
    with caplog.at_level(logging.INFO, logger="bridge.registration"):
        results = await register_worker(
            _settings(stub, public_url="https://w.example"), attempts=3, base_delay_s=1.0, max_delay_s=1.5, sleep=sleeps
        )
    assert results == {"update-worker-url": False, "register-chat-worker": True}
    assert len(stub.requests_for("update-worker-url")) == 3
    assert sleeps.delays == [1.0, 1.5]  # capped at max_delay_s
    assert "giving up" in caplog.text
    assert stub.service_key not in caplog.text


async def test_client_error_is_not_retried(stub: SupabaseStub):
    settings = Settings(**{**stub.settings_values(), "supabase_service_key": "wrong-key-123"}, public_url="https://w")
    sleeps = _Sleeps()
    results = await register_worker(settings, sleep=sleeps)
    assert results == {name: False for name in FUNCTIONS}
    assert sleeps.delays == []
    assert [r.status for r in stub.requests_for("update-worker-url")] == [401]


async def test_unreachable_supabase_is_not_fatal():
    settings = Settings(
        supabase_url=f"http://127.0.0.1:{free_port()}", supabase_service_key="k-1234", job_callback_secret="s-1234",
        public_url="https://w",
    )
    sleeps = _Sleeps()
    results = await register_worker(settings, attempts=2, sleep=sleeps, timeout_s=2.0)
    assert results == {name: False for name in FUNCTIONS}
    assert sleeps.delays == [1.0, 1.0]


async def test_skipped_without_supabase_or_public_url(stub: SupabaseStub):
    assert await register_worker(Settings(public_url="https://w")) == {}  # local mode
    assert await register_worker(_settings(stub)) == {}  # no PUBLIC_URL, not on RunPod
    assert await register_worker(_settings(stub, public_url="https://w", register_worker=False)) == {}
    assert stub.requests == []
