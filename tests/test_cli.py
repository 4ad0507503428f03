"""The CLI end to end in subprocesses: `demo`, `serve` + `submit` + `status`, `tiny-models`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bridge.launcher import free_port

pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parent.parent


def _env(**values: object) -> dict[str, str]:
    """The test process's environment without any bridge setting, plus ``values``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_", "SUPABASE_", "TRITON_", "WORKER_", "API_", "MODELS_DIR", "OUTPUT_DIR"))}
    env.update({"MODEL_THREADS": "1", "DEVICE": "cpu", "TRITON_EXIT_TIMEOUT_S": "3"})
    env.update({k: str(v) for k, v in values.items()})
    return env


def _bridge(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_runs_every_kind_of_job_with_nothing_configured(tiny_models_dir: Path, tmp_path: Path) -> None:
    """With ``--stay`` it then leaves the system running, its operator's page up, until Ctrl-C."""
    out = tmp_path / "outputs"
    api_port = free_port()
    env = _env(TRITON_HTTP_PORT=free_port(), TRITON_GRPC_PORT=free_port(), TRITON_METRICS_PORT=free_port(),
               API_PORT=api_port, PYTHONUNBUFFERED=1)
    demo = subprocess.Popen([sys.executable, "-m", "bridge", "demo", "--stay", "--models-dir", str(tiny_models_dir),
                             "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        for line in demo.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        stdout = "".join(lines)
        assert f"operator's page: http://127.0.0.1:{api_port}/ui" in stdout, stdout
        page = httpx.get(f"http://127.0.0.1:{api_port}/ui", timeout=10)
        assert page.status_code == 200 and "operator" in page.text
        demo.send_signal(signal.SIGINT)
        rest, stderr = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 0, stdout + rest + stderr
    for kind in ("sdxl_image_fast", "video_fast", "image_fast", "video7b_fast_enhanced", "chat (qwen_instruct)"):
        assert kind in stdout
    assert stdout.count("completed") == 5
    pngs = sorted(out.glob("demo/*/*.png"))
    videos = sorted(out.glob("demo/*/0.mp4"))
    assert len(pngs) == 4 and len(videos) == 2  # SDXL batch of 3 + one WAN image; two videos
    assert all(Image.open(p).size == (64, 64) for p in pngs)


def test_serve_then_submit_shows_progress_and_prints_the_outputs(tiny_models_dir: Path, triton, redis_server,
                                                                 tmp_path: Path) -> None:
    api_port = free_port()
    env = _env(TRITON_URL=triton.grpc_url, REDIS_URL=redis_server.url, MODELS_DIR=tiny_models_dir,
               OUTPUT_DIR=tmp_path / "out", API_PORT=api_port, WORKER_ID="cli-test", LOG_JSON=1)
    serve = subprocess.Popen([sys.executable, "-m", "bridge", "serve"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert serve.poll() is None, serve.stdout.read() if serve.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=2).status_code in (200, 503):
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        copies = tmp_path / "copies"
        result = _bridge("submit", "--type", "sdxl_image_fast", "--prompt", "a lighthouse", "--num-images", "3",
                         "--seed", "7", "--width", "64", "--height", "64", "--steps", "2", "--out", str(copies),
                         env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        paths = [Path(line) for line in result.stdout.split()]
        assert [p.name for p in paths] == ["0.png", "1.png", "2.png"]
        assert all(p.parent == copies and Image.open(p).size == (64, 64) for p in paths)
        assert "100%" in result.stderr  # the live progress bar reached the end
        bad = _bridge("submit", "--type", "sdxl_image_fast", "--prompt", "x", "--num-images", "4", env=env)
        assert bad.returncode == 2 and "num_images" in bad.stderr
    finally:
        serve.terminate()
        serve.wait(60)
    assert serve.returncode == 0


def test_status_prints_a_jobs_recorded_state(redis_server, tmp_path: Path) -> None:
    import asyncio

    from bridge.queue import Queue

    async def record() -> None:
        async with Queue(redis_server.url, worker_id="t") as queue:
            await queue.set_state("job-42", status="completed", progress=100)

    asyncio.run(record())
    env = _env(REDIS_URL=redis_server.url)
    result = _bridge("status", "job-42", env=env)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["status"] == "completed" and state["progress"] == 100
    missing = _bridge("status", "no-such-job", env=env)
    assert missing.returncode == 1 and "no job no-such-job" in missing.stderr


def test_invalid_setting_stops_start_up_naming_it(tmp_path: Path) -> None:
    result = _bridge("serve", env=_env(API_PORT="not-a-port"))
    assert result.returncode == 2 and "API_PORT" in result.stderr


def test_tiny_models_writes_the_production_layout(tmp_path: Path) -> None:
    from model_kit import layout

    result = _bridge("tiny-models", str(tmp_path), env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / layout.SDXL_CHECKPOINT).is_file()
    assert (tmp_path / layout.SDXL_CONFIG / "model_index.json").is_file()
    assert (tmp_path / layout.WAN_DIFFUSERS / "model_index.json").is_file()
    for folder in (layout.QWEN_INSTRUCT, layout.QWEN_BASE):
        snapshot = (tmp_path / folder / "refs" / "main").read_text().strip()
        assert (tmp_path / folder / "snapshots" / snapshot / "config.json").is_file()


def test_version_choices_and_help_name_the_environment(tmp_path: Path) -> None:
    env = _env()
    version = _bridge("--version", env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("gpu-worker ")
    typo = _bridge("submit", "--type", "sdxl_image_fsat", "--prompt", "x", env=env, timeout=60)
    assert typo.returncode == 2 and "sdxl_image_fast" in typo.stderr  # the choices are listed
    for command in ("serve", "doctor", "status", "submit", "chat", "demo", "triton", "tiny-models"):
        shown = _bridge(command, "--help", env={**env, "COLUMNS": "200"}, timeout=60)
        assert shown.returncode == 0 and "Reads" in shown.stdout, command


def test_status_against_a_stale_embedded_redis_gives_up_with_a_clear_message(tmp_path: Path) -> None:
    # A local `serve` that died leaves its redis-server's address behind under OUTPUT_DIR.
    (tmp_path / ".redis").mkdir()
    (tmp_path / ".redis" / "url").write_text(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    result = _bridge("status", "some-job", "--redis-wait", "2", env=_env(OUTPUT_DIR=tmp_path), timeout=60)
    assert result.returncode == 1
    assert "cannot be reached" in result.stderr or "did not answer" in result.stderr
    assert time.monotonic() - started < 30
