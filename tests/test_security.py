"""Secrets stay secret, Triton stays private: the whole flow in real processes.

A ``python -m bridge serve`` subprocess (its own embedded tritonserver, a password-protected
redis-server, the Supabase stand-in) runs with distinctive secret values: a few jobs (completed,
refused, one whose callback had to be retried), registration, and API calls with and without the
key. Then everything captured is scanned for each secret: the bridge's stdout/stderr (DEBUG
level), the tritonserver log, every request body the stand-in received, every HTTP answer and
every value left in Redis. Triton's ports are checked in /proc/net/tcp to be loopback-only, and
its model-control API to refuse a caller without TRITON_API_KEY (while the bridge, which sends it,
loads models fine).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from bridge.launcher import TritonServer, find_tritonserver, free_port
from bridge.redis_server import RedisServer
from tests.bridge_stack import sdxl_job
from tests.conftest import triton_settings
from harness.processes import REPO, BridgeProcess, Outcomes, bridge_env, push, wait_terminals
from harness.supabase_stub import SupabaseStub

pytestmark = pytest.mark.timeout(420)

SECRETS = {
    "SUPABASE_SERVICE_KEY": f"svc-key-{uuid.uuid4().hex}",
    "JOB_CALLBACK_SECRET": f"cb-secret-{uuid.uuid4().hex}",
    "WORKER_API_KEY": f"api-key-{uuid.uuid4().hex}",
    "TRITON_API_KEY": f"triton-key-{uuid.uuid4().hex}",
    "redis password": f"redispw{uuid.uuid4().hex}",
}


def leaks(name: str, data: bytes | str) -> list[str]:
    """Which secrets (raw or URL-encoded) occur in ``data``."""
    blob = data if isinstance(data, bytes) else data.encode("utf-8", "backslashreplace")
    found = []
    for label, secret in SECRETS.items():
        if secret.encode() in blob or quote(secret, safe="").encode() in blob:
            found.append(f"{label} in {name}")
    return found


def listening_addresses(pid: int) -> dict[int, str]:
    """Port -> local address of every TCP socket ``pid`` listens on (from /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found: dict[int, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            found[int(port, 16)] = _address(address, width)
    return found


def _address(hex_address: str, width: int) -> str:
    """/proc/net/tcp{,6} addresses are 32-bit words in host (little-endian) byte order."""
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, width, 8))
    address = ipaddress.ip_address(raw)
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket bound to ::ffff:127.0.0.1
    return str(mapped or address)


LOOPBACK = {"127.0.0.1", "::1"}


def test_no_secret_reaches_logs_callbacks_answers_or_redis(tiny_models_dir, stub_and_redis, tmp_path):
    stub, server = stub_and_redis
    out = tmp_path / "out"
    env = bridge_env(models_dir=tiny_models_dir, output_dir=out, redis_url=server.url, triton_url=None,
                     supabase=stub, worker_api_key=SECRETS["WORKER_API_KEY"], log_level="DEBUG", register_worker=1,
                     public_url="https://worker.example.test")
    bridge = BridgeProcess("secrets", env, tmp_path / "logs")
    answers: list[tuple[str, str]] = []
    try:
        bridge.start().wait_ready()
        client = redis.Redis.from_url(server.url)
        good, bad, retried = sdxl_job(seed=1), sdxl_job(num_inference_steps=-3), sdxl_job(seed=2)
        push(client, good)
        push(client, bad)
        push(client, b'{"not": "a job"}', queue="sdxl_queue")  # dead-lettered
        wait_terminals(stub, [good["id"], bad["id"]], timeout=240)
        stub.fail_next("job-callback", 2, status=500)
        stub.fail_next("storage", 1, mode="close")
        push(client, retried)
        wait_terminals(stub, [retried["id"]], timeout=120)

        # The HTTP API, with the right key, a wrong one and none.
        base = f"http://127.0.0.1:{bridge.api_port}"
        keyed = {"Authorization": f"Bearer {SECRETS['WORKER_API_KEY']}"}
        wrong = {"Authorization": f"Bearer {SECRETS['WORKER_API_KEY']}x"}
        calls = [("GET", "/health", {}), ("GET", "/worker/info", keyed), ("GET", "/memory/status", keyed),
                 ("GET", "/debug/env", keyed), ("GET", f"/jobs/{good['id']}", keyed), ("GET", f"/jobs/{bad['id']}", keyed),
                 ("POST", "/admin", keyed), ("GET", "/metrics", keyed), ("GET", "/worker/info", wrong),
                 ("GET", "/debug/env", {}), ("GET", "/no/such/route", keyed)]
        with httpx.Client(base_url=base, timeout=30) as http:
            for method, path, headers in calls:
                body = {"action": "dead_letters"} if path == "/admin" else None
                response = http.request(method, path, headers=headers, json=body)
                answers.append((f"{method} {path} -> {response.status_code}",
                                f"{response.headers}\n{response.text}"))
            assert http.get("/worker/info", headers=wrong).status_code == 401
            assert http.get("/debug/env").status_code == 401
            assert http.get("/debug/env", headers=keyed).status_code == 200

        # The tritonserver the bridge started, and the bridge's API, listen on loopback only.
        triton_pid = bridge.tritonserver_pid()
        assert triton_pid is not None
        ports = {int(env[name]) for name in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT")}
        listening = listening_addresses(triton_pid)
        assert ports <= set(listening), (ports, listening)
        assert set(listening.values()) <= LOOPBACK, listening
        assert listening_addresses(bridge.pid) == {bridge.api_port: "127.0.0.1"}

        assert bridge.terminate() == 0, bridge.tail()
        redis_values = dump_redis(client)
    finally:
        bridge.close()

    outcomes = Outcomes(stub)
    terminals = outcomes.terminals()
    assert terminals[good["id"]][0]["status"] == terminals[retried["id"]][0]["status"] == "completed"
    assert terminals[bad["id"]][0]["status"] == "failed"
    assert stub.function_calls("update-worker-url"), "registration ran (and is scanned)"
    assert stub.violations == [], stub.violations[:5]

    found = leaks("bridge output", bridge.text())
    triton_log = out / "logs" / "tritonserver.log"
    assert triton_log.stat().st_size > 0
    found += leaks("tritonserver log", triton_log.read_bytes())
    for request in stub.requests:
        found += leaks(f"{request.method} {request.path} body", request.body)
    for name, text in answers:
        found += leaks(name, text)
    found += leaks("redis", redis_values)
    for path in out.rglob("*"):
        if path.is_file() and path != triton_log:
            found += leaks(str(path.relative_to(out)), path.read_bytes())
    # Start-up checks and a start that fails (Redis unreachable: its URL, password included, is
    # exactly what an error message would want to show).
    away = f"redis://:{SECRETS['redis password']}@127.0.0.1:{free_port()}/0"
    for name, command, overrides in (("doctor", "doctor", {}), ("doctor, Redis away", "doctor", {"REDIS_URL": away}),
                                     ("serve, Redis away", "serve", {"REDIS_URL": away})):
        result = subprocess.run([sys.executable, "-m", "bridge", command], cwd=REPO, env={**env, **overrides},
                                capture_output=True, timeout=180)
        assert (result.returncode == 0) == (overrides == {}), (name, result.stdout[-2000:], result.stderr[-2000:])
        found += leaks(name, result.stdout + result.stderr)
    assert found == []
    # The scan could have found them: each secret really was in use.
    assert any(r.headers.get("authorization") == f"Bearer {SECRETS['SUPABASE_SERVICE_KEY']}" for r in stub.requests)


GRPC_KEY_HEADER = "triton-grpc-protocol-triton-api-key"  # what Triton's gRPC frontend expects
HTTP_KEY_HEADER = "triton-api-key"


def test_triton_api_key_restricts_model_control_and_the_bridge_still_works(tiny_models_dir, stub_and_redis, tmp_path):
    stub, server = stub_and_redis
    # 1. A tritonserver started with TRITON_API_KEY refuses model control without it (gRPC and HTTP).
    settings = triton_settings(tiny_models_dir, triton_api_key=SECRETS["TRITON_API_KEY"])
    with TritonServer(settings, log_path=tmp_path / "triton-alone.log") as alone:
        raw = grpcclient.InferenceServerClient(alone.grpc_url)
        plain = httpclient.InferenceServerClient(alone.http_url)
        try:
            for call in (lambda: raw.load_model("sdxl"), lambda: raw.unload_model("sdxl"),
                         lambda: raw.get_model_repository_index(), lambda: plain.load_model("sdxl"),
                         lambda: plain.get_model_repository_index()):
                with pytest.raises(InferenceServerException, match="restricted"):
                    call()
            assert not raw.is_model_ready("sdxl")
            assert raw.is_server_live()  # health and inference stay open
            names = {m["name"] for m in raw.get_model_repository_index(
                headers={GRPC_KEY_HEADER: SECRETS["TRITON_API_KEY"]}, as_json=True)["models"]}
            assert names >= {"sdxl", "wan"}
            assert {m["name"] for m in plain.get_model_repository_index(
                headers={HTTP_KEY_HEADER: SECRETS["TRITON_API_KEY"]})} >= {"sdxl", "wan"}
        finally:
            raw.close()
            plain.close()
    assert leaks("tritonserver log", (tmp_path / "triton-alone.log").read_bytes()) == []

    # 2. The bridge with TRITON_API_KEY sends it and works.
    out = tmp_path / "out"
    env = bridge_env(models_dir=tiny_models_dir, output_dir=out, redis_url=server.url, triton_url=None,
                     supabase=stub, worker_api_key=SECRETS["WORKER_API_KEY"],
                     triton_api_key=SECRETS["TRITON_API_KEY"], log_level="DEBUG")
    bridge = BridgeProcess("triton-key", env, tmp_path / "logs")
    try:
        bridge.start()
        bridge.wait_ready()
        job = sdxl_job(seed=3)
        push(redis.Redis.from_url(server.url), job)
        (body,) = wait_terminals(stub, [job["id"]], timeout=240)[job["id"]]
        assert body["status"] == "completed", body
        assert bridge.terminate() == 0, bridge.tail()
    finally:
        bridge.close()
    assert leaks("bridge output", bridge.text()) == []
    assert leaks("tritonserver log", (out / "logs" / "tritonserver.log").read_bytes()) == []


def dump_redis(client: redis.Redis) -> bytes:
    """Every key and value in Redis, as bytes (strings, hashes, lists, sets, streams)."""
    parts = []
    for key in client.scan_iter():
        kind = client.type(key).decode()
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = json.dumps({k.decode(): v.decode("utf-8", "replace") for k, v in client.hgetall(key).items()})
        elif kind == "list":
            value = b"\n".join(client.lrange(key, 0, -1))
        elif kind == "set":
            value = b"\n".join(sorted(client.smembers(key)))
        elif kind == "stream":
            value = repr(client.xrange(key)).encode()
        else:
            value = b""
        parts.append(key + b"=" + (value if isinstance(value, bytes) else str(value).encode()))
    return b"\n".join(parts)


@pytest.fixture()
def stub_and_redis(tmp_path):
    with SupabaseStub(service_key=SECRETS["SUPABASE_SERVICE_KEY"], callback_secret=SECRETS["JOB_CALLBACK_SECRET"]) as stub:
        server = RedisServer(data_dir=tmp_path / "redis", password=SECRETS["redis password"]).start()
        try:
            yield stub, server
        finally:
            server.stop()


def test_embedded_triton_binds_where_configured(tiny_models_dir):
    """Loopback unless TRITON_HOST says otherwise; the API key turns on the restricted model control."""
    install = find_tritonserver(triton_settings(tiny_models_dir))
    default = TritonServer(triton_settings(tiny_models_dir)).command(install, None)
    assert {f"--{kind}-address=127.0.0.1" for kind in ("http", "grpc", "metrics")} <= set(default)
    assert not [arg for arg in default if "restricted" in arg]
    exposed = TritonServer(triton_settings(tiny_models_dir, triton_host="0.0.0.0", triton_api_key="k" * 12)).command(install, None)
    assert {f"--{kind}-address=0.0.0.0" for kind in ("http", "grpc", "metrics")} <= set(exposed)
    assert [arg for arg in exposed if arg.startswith(("--http-restricted-api=model-repository:triton-api-key=",
                                                      "--grpc-restricted-protocol=model-repository:triton-api-key="))]
