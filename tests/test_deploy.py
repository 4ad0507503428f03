"""The container recipe, checked without a Docker engine: Dockerfile, .dockerignore, docker/start.sh,
and the launcher combination the image relies on (the image's server and Python backend with the
wheel's stub for this interpreter), run for real on a copy laid out like the image."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from bridge.launcher import TritonServer, find_tritonserver
from bridge.settings import Settings
from tests.conftest import triton_settings

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
START = REPO / "docker" / "start.sh"
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


# ----------------------------------------------------------------------------- parsing
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _args(keyword: str) -> list[str]:
    return [rest for kw, rest in _instructions() if kw == keyword]


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    copies = []
    for rest in _args("COPY"):
        parts = [p for p in rest.split() if not p.startswith("--")]
        assert "--from" not in rest, "multi-stage COPY: extend this test"
        copies.append((parts[:-1], parts[-1]))
    return copies


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in _args("ENV"):
        for match in re.finditer(r"(\w+)=(\"[^\"]*\"|\S+)", rest):
            env[match.group(1)] = match.group(2).strip('"')
    return env


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` or a folder above it (no ``!`` patterns here)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "negated patterns: extend this test"
        pattern = pattern.lstrip("/")
        bare = pattern[3:] if pattern.startswith("**/") else pattern
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or fnmatch.fnmatch(Path(candidate).name, bare):
                return True
    return False


# ----------------------------------------------------------------------------- Dockerfile
def test_base_image_is_triton_24_10():
    (base,) = _args("FROM")
    assert base == "nvcr.io/nvidia/tritonserver:24.10-py3"


def test_copied_paths_exist_and_are_not_dockerignored():
    copies = _copies()
    sources = [src for srcs, _ in copies for src in srcs]
    for expected in ("pyproject.toml", "bridge", "model_kit", "model_repository", "docker/start.sh"):
        assert expected in sources
    patterns = _dockerignore()
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
        assert not _ignored(src, patterns), f".dockerignore excludes {src}, which the Dockerfile copies"


def test_dockerignore_excludes_local_state_and_secrets():
    patterns = _dockerignore()
    for path in (".venv", ".venv/bin/python", ".git", ".cache/tiny-models", "outputs", ".env",
                 "bridge/__pycache__/x.pyc", "tests"):
        assert _ignored(path, patterns), f"{path} would be sent to the build"


def test_python_311_venv_with_stub_from_pytriton_wheel():
    text = " ".join(rest for _, rest in _instructions())
    assert "ARG PYTHON_VERSION=3.11" in DOCKERFILE.read_text()
    assert "libpython${PYTHON_VERSION}" in text  # the stub links the shared libpython
    assert re.search(r"pip install --no-deps \$\{PYTRITON_SPEC\}", text)
    assert "ARG PYTRITON_SPEC=nvidia-pytriton==0.7.0" in DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/cu126" in DOCKERFILE.read_text()
    # Everything after torch is installed under a constraint that keeps the CUDA build.
    assert "-c /opt/venv/constraints.txt" in text


def test_image_and_ci_install_the_versions_the_tests_ran():
    # One constraints file: the image and run.sh (CI) install with it, and torch is the same release.
    text = " ".join(rest for _, rest in _instructions())
    assert "-c /app/constraints.txt" in text
    assert "constraints.txt" in [src for srcs, _ in _copies() for src in srcs]
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in ("diffusers", "transformers", "tritonclient", "redis", "fastapi", "pydantic"):
        assert name in pins, f"constraints.txt does not pin {name}"
    (torch_spec,) = re.findall(r"ARG TORCH_SPEC=torch==(\S+)", DOCKERFILE.read_text())
    assert pins["torch"] == torch_spec
    run_sh = (REPO / "run.sh").read_text()
    assert f'"torch=={torch_spec}"' in run_sh and "-c constraints.txt" in run_sh


def test_environment_binds_triton_to_localhost_and_api_publicly():
    env = _env()
    assert env["TRITONSERVER_BIN"] == "/opt/tritonserver/bin/tritonserver"
    assert env["TRITON_HOST"] == "127.0.0.1"
    assert env["API_HOST"] == "0.0.0.0"
    assert env["API_PORT"] == str(Settings.model_fields["api_port"].default)
    assert env["MODEL_REPOSITORY"] == "/app/model_repository"
    assert ("model_repository", "/app/model_repository") in [(s[0], d) for s, d in _copies()]
    # Whatever the image sets must be valid settings.
    Settings(**{k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})


def test_healthcheck_and_expose_match_the_api_port():
    default_port = Settings.model_fields["api_port"].default
    (expose,) = _args("EXPOSE")
    assert expose.split() == [str(default_port)]
    (health,) = _args("HEALTHCHECK")
    assert "http://127.0.0.1:" in health and "/health" in health
    match = re.search(r"os\.environ\.get\('API_PORT', '(\d+)'\)", health)
    assert match and int(match.group(1)) == default_port
    assert "--start-period=" in health


def test_entrypoint_runs_start_script():
    (cmd,) = _args("CMD")
    (entry,) = _args("ENTRYPOINT")
    assert "/app/docker/start.sh" in cmd
    assert (["docker/start.sh"], "/app/docker/start.sh") in _copies()
    assert "/opt/nvidia/nvidia_entrypoint.sh" in entry  # keep NVIDIA's CUDA compatibility setup


# ----------------------------------------------------------------------------- start.sh
def test_start_script_is_executable_bash():
    assert START.exists()
    assert os.access(START, os.X_OK)
    assert START.read_text().splitlines()[0] in ("#!/usr/bin/env bash", "#!/bin/bash")
    subprocess.run(["bash", "-n", str(START)], check=True)


def test_start_script_help():
    result = subprocess.run(["bash", str(START), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: start.sh")
    assert "python -m bridge serve" in result.stdout


def test_start_script_execs_bridge_serve_with_image_defaults(tmp_path: Path):
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        'echo "ARGS=$*"\n'
        'echo "API_HOST=$API_HOST API_PORT=$API_PORT TRITON_HOST=$TRITON_HOST"\n'
        'echo "TRITONSERVER_BIN=${TRITONSERVER_BIN-<unset>}"\n'
    )
    fake_python.chmod(0o755)
    fake_server = tmp_path / "tritonserver"
    fake_server.write_text("#!/bin/sh\n")
    fake_server.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("API_HOST", "API_PORT", "TRITON_HOST")}
    env.update(PYTHON=str(fake_python), TRITONSERVER_BIN=str(fake_server), OUTPUT_DIR=str(tmp_path / "out"))
    result = subprocess.run(["bash", str(START), "--log-level", "debug"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "ARGS=-m bridge serve --log-level debug" in result.stdout
    assert "API_HOST=0.0.0.0 API_PORT=7861 TRITON_HOST=127.0.0.1" in result.stdout
    assert f"TRITONSERVER_BIN={fake_server}" in result.stdout
    assert (tmp_path / "out").is_dir()
    # A TRITONSERVER_BIN that is not there is dropped, so the launcher can find another server.
    env["TRITONSERVER_BIN"] = str(tmp_path / "missing")
    result = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "TRITONSERVER_BIN=<unset>" in result.stdout
    assert "not found" in result.stderr


def test_entry_module_resolves():
    text = START.read_text()
    assert re.search(r'exec "\$\{PYTHON:-python\}" -m bridge serve "\$@"', text)
    spec = importlib.util.find_spec("bridge.__main__")
    assert spec is not None and spec.origin and Path(spec.origin).is_file()
    compile(Path(spec.origin).read_text(), spec.origin, "exec")
    result = subprocess.run([sys.executable, "-m", "bridge", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout, "start.sh runs `python -m bridge serve`: the CLI must have it"


# ----------------------------------------------------------------------------- launcher in the image
def test_launcher_locates_pytriton_without_importing_it():
    code = (
        "import sys; from bridge.launcher import find_tritonserver; from bridge.settings import Settings; "
        "i = find_tritonserver(Settings()); assert i.stub is not None, i; "
        "assert 'pytriton' not in sys.modules, 'pytriton was imported'; print(i.stub)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"python_backend_stubs/{PY_VERSION}/triton_python_backend_stub" in result.stdout


def _image_like_install(root: Path) -> Path:
    """/opt/tritonserver as in NVIDIA's image: bin/tritonserver and backends/python (copied from
    the wheel here, plus a marker file to tell them apart). Returns the binary."""
    wheel = find_tritonserver(Settings())
    assert wheel.backend_source is not None
    prefix = root / "opt" / "tritonserver"
    (prefix / "bin").mkdir(parents=True)
    binary = prefix / "bin" / "tritonserver"
    shutil.copy2(wheel.binary, binary)
    backend = prefix / "backends" / "python"
    shutil.copytree(wheel.backend_source, backend, ignore=shutil.ignore_patterns("__pycache__"))
    (backend / "IMAGE_BACKEND_MARKER").write_text("from the image")
    return binary


_ECHO_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2)]))
        return responses
'''
_ECHO_CONFIG = '''
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
'''


def test_image_server_uses_its_own_backend_with_the_wheel_stub(tmp_path: Path):
    binary = _image_like_install(tmp_path)
    install = find_tritonserver(Settings(tritonserver_bin=binary))
    assert install.binary == binary
    assert install.backend_source == binary.parent.parent / "backends" / "python"
    assert install.stub is not None and f"python_backend_stubs/{PY_VERSION}" in str(install.stub)

    # And it runs: a trivial Python model served through the assembled backend directory.
    repo = tmp_path / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(_ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(_ECHO_MODEL)
    settings = triton_settings(tmp_path / "models", tritonserver_bin=binary, model_repository=repo,
                               triton_start_timeout_s=60)
    with TritonServer(settings, startup_models=["echo"], log_path=tmp_path / "triton.log") as server:
        backend_dir = server._workdir / "backends" / "python"
        assert (backend_dir / "IMAGE_BACKEND_MARKER").exists()
        assert (backend_dir / "triton_python_backend_stub").read_bytes() == install.stub.read_bytes()
        body = {"inputs": [{"name": "IN", "shape": [1], "datatype": "FP32", "data": [1.5]}]}
        with httpx.Client(timeout=30) as client:
            answer = client.post(f"http://{server.http_url}/v2/models/echo/infer", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == [3.0]


def test_deploy_doc_matches_the_recipe():
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    for needle in ("--gpus all", "--shm-size=2g", "-v /workspace:/workspace", "-p 7861:7861",
                   "nvcr.io/nvidia/tritonserver:24.10-py3", "nvidia-pytriton==0.7.0", "8002", "/metrics"):
        assert needle in doc, needle
    # Every variable the image sets is documented.
    for name in _env():
        if name.startswith(("PIP_", "PYTHON", "DEBIAN_", "VIRTUAL_ENV", "PATH", "HF_HUB_CACHE")):
            continue
        assert f"`{name}`" in doc, f"{name} is set in the Dockerfile but not documented"
