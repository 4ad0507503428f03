"""bridge.doctor: start-up checks against real files, a real redis-server and a local HTTP server."""

from __future__ import annotations

import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from bridge import doctor
from bridge.doctor import Check, errors, render_table, run_checks
from bridge.launcher import free_port
from bridge.redis_server import RedisServer
from bridge.settings import Settings
from model_kit import layout

SERVICE_KEY = "doctor-service-key-31337"


# ----------------------------------------------------------------------------- helpers
def _write(path: Path, data: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _fake_models(root: Path, *, wan: str = "diffusers") -> Path:
    """Files in the production layouts, just enough for the checks (not loadable models)."""
    _write(root / layout.SDXL_CHECKPOINT, b"\0" * 1024)
    _write(root / layout.SDXL_CONFIG / "model_index.json", "{}")
    if wan == "diffusers":
        _write(root / layout.WAN_DIFFUSERS / "model_index.json", "{}")
    elif wan == "original":
        _write(root / layout.WAN_ORIGINAL / "Wan2.1_VAE.pth")
        _write(root / layout.WAN_ORIGINAL / "config.json", "{}")
    for cache in (layout.QWEN_INSTRUCT, layout.QWEN_BASE):
        snapshot = root / cache / "snapshots" / "abc123"
        _write(snapshot / "config.json", "{}")
        _write(snapshot / "model.safetensors", b"\0" * 2048)
        _write(root / cache / "refs" / "main", "abc123")
    return root


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"models_dir": tmp_path / "models", "output_dir": tmp_path / "out"}
    values.update(overrides)
    return Settings(**values)


class _Storage(BaseHTTPRequestHandler):
    """Answers GET /storage/v1/bucket/<name>: 200 for the known bucket with the right key."""

    bucket = "workspace-temp"
    seen: list[tuple[str, str]] = []

    def log_message(self, *args: object) -> None:
        return None

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization", "")))
        if self.headers.get("Authorization") != f"Bearer {SERVICE_KEY}":
            code, body = 403, {"error": "invalid signature"}
        elif self.path == f"/storage/v1/bucket/{self.bucket}":
            code, body = 200, {"id": self.bucket, "name": self.bucket}
        else:
            code, body = 400, {"statusCode": "404", "error": "Bucket not found"}
        payload = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def storage_server():
    _Storage.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Storage)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- weights
def test_tiny_models_pass_every_weight_check(tiny_models_dir: Path, tmp_path: Path):
    checks = doctor.check_weights(_settings(tmp_path, models_dir=tiny_models_dir), environ={})
    assert [c.name for c in checks] == [f"weights: {m}" for m in ("sdxl", "wan", "qwen_instruct", "qwen_base")]
    assert all(c.ok for c in checks), [c.detail for c in checks if not c.ok]


def test_missing_weights_say_where_they_looked(tmp_path: Path):
    settings = _settings(tmp_path)
    checks = _by_name(doctor.check_weights(settings, environ={}))
    assert not any(c.ok for c in checks.values())
    sdxl = checks["weights: sdxl"].detail
    assert str(settings.models_dir / layout.SDXL_CHECKPOINT) in sdxl and "SDXL_WEIGHTS" in sdxl
    assert str(settings.models_dir / layout.SDXL_CONFIG) in sdxl and "stable-diffusion-xl-base-1.0" in sdxl
    wan = checks["weights: wan"].detail
    assert str(settings.models_dir / layout.WAN_DIFFUSERS) in wan and "Wan2.1-T2V-1.3B-Diffusers" in wan
    qwen = checks["weights: qwen_base"].detail
    assert str(settings.models_dir / layout.QWEN_BASE) in qwen and "QWEN_BASE_WEIGHTS" in qwen
    assert "Qwen/Qwen2.5-7B" in qwen


def test_wan_original_layout_only_is_explained(tmp_path: Path):
    settings = _settings(tmp_path)
    _fake_models(settings.models_dir, wan="original")
    checks = _by_name(doctor.check_weights(settings, environ={}))
    wan = checks["weights: wan"]
    assert not wan.ok
    assert "only the original Wan release layout" in wan.detail
    assert str(settings.models_dir / layout.WAN_ORIGINAL) in wan.detail
    assert "python -m bridge weights convert wan" in wan.detail and wan.level == "warning"
    assert checks["weights: sdxl"].ok and checks["weights: qwen_instruct"].ok


def test_env_overrides_are_honoured(tmp_path: Path):
    settings = _settings(tmp_path)
    _fake_models(settings.models_dir)
    moved = tmp_path / "elsewhere" / "wan-diffusers"
    shutil.move(settings.models_dir / layout.WAN_DIFFUSERS, moved)
    assert not _by_name(doctor.check_weights(settings, environ={}))["weights: wan"].ok
    # Absolute override.
    assert _by_name(doctor.check_weights(settings, environ={"WAN_WEIGHTS": str(moved)}))["weights: wan"].ok
    # Relative override: relative to MODELS_DIR, as model_kit.common.weights_path does.
    relative = "../elsewhere/wan-diffusers"
    assert _by_name(doctor.check_weights(settings, environ={"WAN_WEIGHTS": relative}))["weights: wan"].ok
    # An override pointing nowhere fails and names the variable.
    bad = _by_name(doctor.check_weights(settings, environ={"SDXL_CONFIG": "/nope"}))["weights: sdxl"]
    assert not bad.ok and "from SDXL_CONFIG" in bad.detail and "/nope" in bad.detail


def test_qwen_plain_folder_and_broken_cache_links(tmp_path: Path):
    settings = _settings(tmp_path)
    plain = tmp_path / "qwen-plain"
    _write(plain / "config.json", "{}")
    _write(plain / "model-00001-of-00002.safetensors", b"\0" * 10)
    ok = doctor.check_weights(settings, environ={"QWEN_INSTRUCT_WEIGHTS": str(plain)}, models=["qwen_instruct"])[0]
    assert ok.ok and str(plain) in ok.detail
    # A cache snapshot whose weight file is a dangling link (an interrupted download).
    snapshot = settings.models_dir / layout.QWEN_BASE / "snapshots" / "h1"
    _write(snapshot / "config.json", "{}")
    (snapshot / "model.safetensors").symlink_to(tmp_path / "blobs" / "missing")
    broken = doctor.check_weights(settings, environ={}, models=["qwen_base"])[0]
    assert not broken.ok and "broken links" in broken.detail and "incomplete download" in broken.detail


# ----------------------------------------------------------------------------- services
def test_redis_answers(redis_server: RedisServer, tmp_path: Path):
    check = doctor.check_redis(_settings(tmp_path, redis_url=redis_server.url))
    assert check.ok and "answers PING" in check.detail


def test_redis_password_never_shown(tmp_path: Path):
    with RedisServer(data_dir=tmp_path / "r", password="pw-correct-999") as server:
        good = doctor.check_redis(_settings(tmp_path, redis_url=server.url))
        assert good.ok and "pw-correct-999" not in good.detail and ":***@" in good.detail
        wrong_url = server.url.replace("pw-correct-999", "pw-wrong-4242")
        checks = _by_name(run_checks(_settings(tmp_path, redis_url=wrong_url), environ={}, models=[]))
    bad = checks["redis"]
    assert not bad.ok and bad.level == "error"
    assert "pw-wrong-4242" not in bad.detail and "does not answer PING" in bad.detail


def test_redis_down(tmp_path: Path):
    check = doctor.check_redis(_settings(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0"), timeout=1.0)
    assert not check.ok and "does not answer PING" in check.detail


def test_redis_unset_means_embedded(tmp_path: Path):
    check = doctor.check_redis(_settings(tmp_path))
    assert check.ok and "embedded" in check.detail


def test_supabase_checks(storage_server: str, tmp_path: Path):
    values = {"supabase_url": storage_server, "job_callback_secret": "cb-secret-1"}
    good = doctor.check_supabase(_settings(tmp_path, supabase_service_key=SERVICE_KEY, **values))
    assert good.ok and "workspace-temp" in good.detail
    assert _Storage.seen[-1] == ("/storage/v1/bucket/workspace-temp", f"Bearer {SERVICE_KEY}")
    rejected = doctor.check_supabase(_settings(tmp_path, supabase_service_key="not-the-key", **values))
    assert not rejected.ok and rejected.level == "error" and "SUPABASE_SERVICE_KEY" in rejected.detail
    no_bucket = doctor.check_supabase(
        _settings(tmp_path, supabase_service_key=SERVICE_KEY, storage_bucket="other", **values)
    )
    assert not no_bucket.ok and no_bucket.level == "warning" and "'other'" in no_bucket.detail
    local = doctor.check_supabase(_settings(tmp_path))
    assert local.ok and "local mode" in local.detail


def test_supabase_unreachable(tmp_path: Path):
    settings = _settings(
        tmp_path, supabase_url=f"http://127.0.0.1:{free_port()}", supabase_service_key=SERVICE_KEY,
        job_callback_secret="cb-secret-1",
    )
    check = doctor.check_supabase(settings, timeout=2.0)
    assert not check.ok and "unreachable" in check.detail and SERVICE_KEY not in check.detail
    # A blip is a warning, not a start-up failure: reports are spooled and retried.
    assert check.level == "warning" and check not in doctor.errors([check])


# ----------------------------------------------------------------------------- machine
def test_tritonserver_found_and_missing(tmp_path: Path):
    found = doctor.check_tritonserver(_settings(tmp_path))
    assert found.ok and "tritonserver" in found.detail and "stub for Python 3." in found.detail
    missing = doctor.check_tritonserver(_settings(tmp_path, tritonserver_bin=tmp_path / "no-such-binary"))
    assert not missing.ok and "TRITONSERVER_BIN" in missing.detail
    external = doctor.check_tritonserver(_settings(tmp_path, triton_url=f"127.0.0.1:{free_port()}"))
    assert not external.ok and "TRITON_URL" in external.detail


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the failure path cannot run")
def test_gpu_required_but_absent(tmp_path: Path):
    required = doctor.check_gpu(_settings(tmp_path, require_gpu=True))
    assert not required.ok and required.level == "error"
    assert "REQUIRE_GPU=1" in required.detail and "--gpus all" in required.detail
    optional = doctor.check_gpu(_settings(tmp_path, require_gpu=False))
    assert optional.ok and "not required" in optional.detail


def test_shm_threshold(tmp_path: Path):
    assert doctor.check_shm(Path("/dev/shm"), minimum_bytes=1).ok
    small = doctor.check_shm(Path("/dev/shm"), minimum_bytes=1 << 60)
    assert not small.ok and small.level == "warning" and "--shm-size=2g" in small.detail
    assert not doctor.check_shm(tmp_path / "absent").ok


def test_output_dir(tmp_path: Path):
    assert doctor.check_output_dir(_settings(tmp_path)).ok
    blocker = _write(tmp_path / "file")
    bad = doctor.check_output_dir(_settings(tmp_path, output_dir=blocker / "sub"))
    assert not bad.ok and "OUTPUT_DIR" in bad.detail


def test_model_repository(tmp_path: Path):
    repo = tmp_path / "repo"
    for model in ("sdxl", "wan"):
        _write(repo / model / "config.pbtxt", "")
        _write(repo / model / "1" / "model.py", "")
    assert doctor.check_model_repository(_settings(tmp_path, model_repository=repo), ["sdxl", "wan"]).ok
    bad = doctor.check_model_repository(_settings(tmp_path, model_repository=repo), ["sdxl", "qwen_base"])
    assert not bad.ok and "qwen_base/config.pbtxt" in bad.detail and "qwen_base/1/model.py" in bad.detail


# ----------------------------------------------------------------------------- whole run
def test_run_checks_and_table(redis_server: RedisServer, tmp_path: Path):
    repo = tmp_path / "repo"
    for model in ("sdxl", "wan", "qwen_instruct", "qwen_base"):
        _write(repo / model / "config.pbtxt", "")
        _write(repo / model / "1" / "model.py", "")
    settings = _settings(tmp_path, redis_url=redis_server.url, model_repository=repo)
    _fake_models(settings.models_dir)
    checks = run_checks(settings, environ={})
    names = [c.name for c in checks]
    for expected in ("weights: sdxl", "weights: wan", "weights: qwen_instruct", "weights: qwen_base",
                     "model repository", "gpu", "redis", "supabase", "tritonserver", "output dir", "shm"):
        assert expected in names
    by_name = _by_name(checks)
    assert by_name["redis"].ok and by_name["weights: wan"].ok and by_name["supabase"].ok
    assert errors(checks) == [], errors(checks)  # everything is in place (shm may only warn)
    # Break one thing: exactly that check fails; a warning (the rest is served) unless REQUIRE_MODELS names it.
    (settings.models_dir / layout.SDXL_CHECKPOINT).unlink()
    assert errors(run_checks(settings, environ={})) == []
    assert [c.name for c in run_checks(settings, environ={}) if not c.ok and c.level == "warning"][:1] == ["weights: sdxl"]
    required = settings.model_copy(update={"require_models": ["sdxl"]})
    assert [c.name for c in errors(run_checks(required, environ={}))] == ["weights: sdxl"]
    out = io.StringIO()
    Console(file=out, width=200).print(render_table(checks + [Check("demo", False, "half broken", "warning")]))
    text = out.getvalue()
    assert "weights: sdxl" in text and "redis" in text and "WARN" in text and "half broken" in text


def test_errors_keeps_only_failed_errors():
    checks = [Check("a", True, ""), Check("b", False, "x"), Check("c", False, "y", "warning")]
    assert [c.name for c in errors(checks)] == ["b"]
