"""Start-up checks: is everything the worker needs where it should be?

``run_checks(settings)`` returns one :class:`Check` per item; ``render_table(checks)`` shows them
with Rich; :func:`errors` is what should stop a start. Each check is independent and never raises:
an unexpected exception becomes a failed check naming it. No secret is ever put in a detail (the
Redis URL is shown with its password masked, and every detail goes through the log redactor).

Checked: each model's weights (``MODELS_DIR`` + :mod:`model_kit.layout`, or the ``<MODEL>_WEIGHTS``
/ ``SDXL_CONFIG`` override the models themselves honour), the model repository, a GPU (required
only with ``REQUIRE_GPU=1``), Redis (PING), Supabase (Storage answers with the service key), the
tritonserver binary and Python-backend stub, the output/spool directory, ``/dev/shm`` size, and the
API's access settings (key count and length, routes open without a key: :mod:`bridge.api_auth`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

from bridge.logs import Redactor, secrets_from_settings
from bridge.settings import MODEL_NAMES, Settings
from model_kit import layout

SHM_MINIMUM_BYTES = 1 << 30
_GIB = float(1 << 30)

# `python -m bridge weights` (bridge/weights.py) lifts HF_HUB_OFFLINE for its own download only.
SDXL_CONFIG_HINT = (
    "python -m bridge weights download sdxl (the config files of stabilityai/stable-diffusion-xl-base-1.0 "
    "into {path})"
)
WAN_DIFFUSERS_HINT = "python -m bridge weights download wan (Wan-AI/Wan2.1-T2V-1.3B-Diffusers into {path})"
WAN_CONVERT_HINT = "python -m bridge weights convert wan (writes {path}; the original is only read)"
QWEN_HINT = "python -m bridge weights download {model} ({repo} into the cache {cache})"
_QWEN_REPOS = {"qwen_instruct": "Qwen/Qwen2.5-7B-Instruct", "qwen_base": "Qwen/Qwen2.5-7B"}


@dataclass(frozen=True)
class Check:
    """One result. ``level`` says how much a failure matters: ``error`` stops a start,
    ``warning`` is reported and tolerated."""

    name: str
    ok: bool
    detail: str
    level: Literal["error", "warning"] = "error"


def errors(checks: Sequence[Check]) -> list[Check]:
    """The failed checks that should stop a start."""
    return [c for c in checks if not c.ok and c.level == "error"]


def run_checks(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    models: Sequence[str] = MODEL_NAMES,
    shm_path: Path = Path("/dev/shm"),
) -> list[Check]:
    """Run every check (models limited to ``models``); ``environ`` defaults to ``os.environ``."""
    env = os.environ if environ is None else environ
    steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
        ("weights", lambda: check_weights(settings, env, models)),
        ("model repository", lambda: check_model_repository(settings, models)),
        ("gpu", lambda: check_gpu(settings)),
        ("redis", lambda: check_redis(settings)),
        ("supabase", lambda: check_supabase(settings)),
        ("tritonserver", lambda: check_tritonserver(settings)),
        ("output dir", lambda: check_output_dir(settings)),
        ("shm", lambda: check_shm(shm_path)),
        ("api access", lambda: check_api_access(settings)),
        ("data files", lambda: check_data_files(settings)),
    ]
    redact = Redactor(secrets_from_settings(settings))
    results: list[Check] = []
    for name, step in steps:
        try:
            found = step()
        except Exception as exc:  # noqa: BLE001 - a check must never break start-up
            found = Check(name, False, f"check crashed: {type(exc).__name__}: {exc}")
        for check in found if isinstance(found, list) else [found]:
            results.append(replace(check, detail=redact(check.detail)))
    return results


# ----------------------------------------------------------------------------- weights
def configured_path(settings: Settings, environ: Mapping[str, str], model: str, key: str = "weights") -> tuple[Path, str]:
    """Where ``model`` will look for ``key`` (``weights``/``config``), and why: the environment
    variable ``<MODEL>_<KEY>`` (absolute, or relative to ``MODELS_DIR``) as in
    ``model_kit.common.weights_path``, else the :mod:`model_kit.layout` default."""
    env_name = f"{model}_{key}".upper()
    source = f"from {env_name}" if environ.get(env_name) else f"MODELS_DIR/{layout.WEIGHTS[model][key]}"
    return settings.weights_path(model, key, environ), source


def check_weights(settings: Settings, environ: Mapping[str, str], models: Sequence[str] = MODEL_NAMES) -> list[Check]:
    """One check per model in ``models``. Missing weights are a warning (the bridge serves the
    models that are there: ``bridge.availability``) unless the model is in ``REQUIRE_MODELS``."""
    per_model = {"sdxl": _check_sdxl, "wan": _check_wan, "qwen_instruct": _check_qwen, "qwen_base": _check_qwen}
    checks = []
    for model in models:
        check = per_model[model](settings, environ, model)
        if not check.ok and model not in settings.require_models:
            check = replace(check, level="warning", detail=f"{check.detail}. Not fatal: {model}'s jobs stay queued "
                            "until its weights appear (REQUIRE_MODELS makes it fatal)")
        checks.append(check)
    return checks


def _check_sdxl(settings: Settings, environ: Mapping[str, str], model: str) -> Check:
    name = f"weights: {model}"
    weights, weights_src = configured_path(settings, environ, model, "weights")
    config, config_src = configured_path(settings, environ, model, "config")
    problems = []
    if weights.is_file():
        if weights.stat().st_size == 0:
            problems.append(f"checkpoint {weights} is empty")
    elif not (weights / "model_index.json").is_file():
        problems.append(f"checkpoint missing: looked for {weights} ({weights_src}; set SDXL_WEIGHTS to override)")
    if not (config / "model_index.json").is_file():
        problems.append(
            f"SDXL base config folder missing: looked for {config}/model_index.json ({config_src}; "
            f"set SDXL_CONFIG to override); the single-file checkpoint cannot load offline without it. "
            f"Get it with: {SDXL_CONFIG_HINT.format(path=config)}"
        )
    if problems:
        return Check(name, False, "; ".join(problems))
    size = weights.stat().st_size if weights.is_file() else 0
    return Check(name, True, f"{weights} ({size / _GIB:.1f} GiB), config {config}")


def _check_wan(settings: Settings, environ: Mapping[str, str], model: str) -> Check:
    name = f"weights: {model}"
    weights, source = configured_path(settings, environ, model, "weights")
    if (weights / "model_index.json").is_file():
        return Check(name, True, f"diffusers layout at {weights}")
    original = settings.models_dir / layout.WAN_ORIGINAL
    get_it = WAN_DIFFUSERS_HINT.format(path=settings.models_dir / layout.WAN_DIFFUSERS)
    if original.is_dir() and any(original.iterdir()):
        return Check(
            name,
            False,
            f"only the original Wan release layout is present ({original}); diffusers' WanPipeline cannot "
            f"read it. Looked for the diffusers layout (model_index.json) at {weights} ({source}). "
            f"Convert it with: {WAN_CONVERT_HINT.format(path=weights)}, or get it with: {get_it} "
            "(or set WAN_WEIGHTS to where it is)",
        )
    return Check(
        name,
        False,
        f"missing: looked for {weights}/model_index.json ({source}; set WAN_WEIGHTS to override) "
        f"and for the original layout at {original}. Get it with: {get_it}",
    )


def _check_qwen(settings: Settings, environ: Mapping[str, str], model: str) -> Check:
    from model_kit.common import resolve_hf_folder  # noqa: PLC0415 - same resolution the model uses

    name = f"weights: {model}"
    weights, source = configured_path(settings, environ, model, "weights")
    hint = QWEN_HINT.format(model=model, repo=_QWEN_REPOS[model], cache=settings.models_dir / "huggingface_cache")
    env_name = f"{model.upper()}_WEIGHTS"
    try:
        folder = resolve_hf_folder(weights)
    except FileNotFoundError:
        return Check(
            name,
            False,
            f"missing: looked for {weights} ({source}; set {env_name} to override): no config.json there "
            f"nor in a snapshots/<hash>/ folder. Get it with: {hint}",
        )
    files = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    broken = [f.name for f in files if not f.exists()]  # dangling cache symlinks: incomplete download
    if not files or broken:
        what = f"broken links {broken[:3]}" if broken else "no *.safetensors / *.bin"
        return Check(name, False, f"{folder}: {what} (incomplete download?). Get it with: {hint}")
    size = sum(f.stat().st_size for f in files)
    return Check(name, True, f"{folder} ({len(files)} file(s), {size / _GIB:.1f} GiB)")


def check_model_repository(settings: Settings, models: Sequence[str] = MODEL_NAMES) -> Check:
    """Each model has ``config.pbtxt`` and ``1/model.py`` in the Triton model repository."""
    repo = settings.model_repository
    missing = [
        f"{model}/{part}"
        for model in models
        for part in ("config.pbtxt", "1/model.py")
        if not (repo / model / part).is_file()
    ]
    if missing:
        return Check("model repository", False, f"{repo}: missing {', '.join(missing)} (set MODEL_REPOSITORY)")
    return Check("model repository", True, f"{repo} ({len(models)} models)")


# ----------------------------------------------------------------------------- gpu
def _nvidia_smi() -> list[str] | None:
    """GPU lines from nvidia-smi (name, total memory), [] when it finds none, None without it."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [binary, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def _torch_gpus() -> int | None:
    """CUDA devices torch sees (no context is created), None when torch is not installed."""
    try:
        import torch  # noqa: PLC0415 - heavy; only when a GPU is required
    except ImportError:
        return None
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpu(settings: Settings) -> Check:
    """A CUDA GPU is visible (an error only with ``REQUIRE_GPU=1``)."""
    gpus = _nvidia_smi()
    if gpus:
        return Check("gpu", True, "; ".join(gpus))
    if not settings.require_gpu:
        return Check("gpu", True, "no GPU visible (not required: REQUIRE_GPU=0)")
    count = _torch_gpus()
    if count:
        return Check("gpu", True, f"{count} CUDA device(s) visible to torch")
    why = "nvidia-smi not found" if gpus is None else "nvidia-smi lists no GPU"
    torch_says = "torch not installed" if count is None else "torch.cuda.is_available() is False"
    return Check(
        "gpu", False,
        f"REQUIRE_GPU=1 but no GPU is visible ({why}; {torch_says}): run the container with --gpus all "
        "on a host with the NVIDIA container toolkit",
    )


# ----------------------------------------------------------------------------- services
def masked_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def check_redis(settings: Settings, timeout: float = 3.0) -> Check:
    """Redis answers PING (or, with no REDIS_URL, a redis-server binary exists to embed)."""
    import redis  # noqa: PLC0415

    if settings.redis_url is None:
        from bridge.redis_server import find_redis_server  # noqa: PLC0415

        try:
            return Check("redis", True, f"REDIS_URL unset: an embedded {find_redis_server()} will be started")
        except RuntimeError as exc:
            return Check("redis", False, str(exc))
    url = settings.redis_url.get_secret_value()
    shown = masked_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError as exc:
        return Check("redis", False, f"REDIS_URL is not a valid Redis URL ({shown}): {exc}")
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", False, f"{shown} does not answer PING: {type(exc).__name__}: {exc}")
    finally:
        client.close()
    return Check("redis", True, f"{shown} answers PING")


def check_supabase(settings: Settings, timeout: float = 5.0) -> Check:
    """Supabase answers, and Storage accepts the service key for the bucket (local mode: skipped)."""
    if settings.supabase_url is None:
        return Check("supabase", True, "not configured: local mode (results stay on disk)")
    key = settings.supabase_service_key.get_secret_value() if settings.supabase_service_key else ""
    url = f"{settings.supabase_url}/storage/v1/bucket/{settings.storage_bucket}"
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {key}", "apikey": key}, timeout=timeout)
    except httpx.HTTPError as exc:
        # A network blip must not keep the worker from starting (reports are retried and spooled).
        return Check("supabase", False, f"{settings.supabase_url} unreachable: {type(exc).__name__}: {exc}",
                     level="warning")
    code = response.status_code
    if code == 200:
        return Check("supabase", True, f"{settings.supabase_url} answers; bucket {settings.storage_bucket!r} found")
    if code in (401, 403):
        return Check("supabase", False, f"{settings.supabase_url} rejected SUPABASE_SERVICE_KEY (HTTP {code})")
    if code >= 500:
        return Check("supabase", False, f"{settings.supabase_url} answers HTTP {code}: {response.text[:200]}",
                     level="warning")
    return Check(
        "supabase", False,
        f"{settings.supabase_url} answers, but bucket {settings.storage_bucket!r} could not be confirmed "
        f"(HTTP {code}: {response.text[:200]})",
        level="warning",
    )


def check_tritonserver(settings: Settings) -> Check:
    """With TRITON_URL: its port accepts connections. Else a tritonserver binary and a Python-backend
    stub for this interpreter are found (:func:`bridge.launcher.find_tritonserver`)."""
    from bridge.launcher import TritonStartError, find_tritonserver  # noqa: PLC0415

    if settings.triton_url:
        host, _, port = settings.triton_url.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3.0):
                pass
        except (OSError, ValueError) as exc:
            return Check("tritonserver", False, f"TRITON_URL={settings.triton_url} does not accept connections: {exc}")
        return Check("tritonserver", True, f"external server at {settings.triton_url}")
    try:
        install = find_tritonserver(settings)
    except TritonStartError as exc:
        return Check("tritonserver", False, str(exc))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if install.stub is None:
        return Check(
            "tritonserver", False,
            f"{install.binary}; no Python-backend stub for Python {version} found (install "
            f"`nvidia-pytriton==0.7.0 --no-deps`): the server's own stub must then be built for {version}",
            level="warning",
        )
    return Check(
        "tritonserver", True,
        f"{install.binary}; Python backend {install.backend_source}; stub for Python {version}",
    )


def check_output_dir(settings: Settings) -> Check:
    """The output / upload spool directory can be created and written."""
    directory = settings.output_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("output dir", False, f"OUTPUT_DIR={directory} is not writable: {exc}")
    return Check("output dir", True, f"{directory.resolve()} writable")


def check_shm(path: Path = Path("/dev/shm"), minimum_bytes: int = SHM_MINIMUM_BYTES) -> Check:
    """/dev/shm is big enough for the Python backend's tensors (a warning: small jobs still work)."""
    try:
        stats = os.statvfs(path)
    except OSError as exc:
        return Check("shm", False, f"{path}: {exc}", level="warning")
    size = stats.f_frsize * stats.f_blocks
    detail = f"{path} is {size / _GIB:.2f} GiB"
    if size < minimum_bytes:
        return Check(
            "shm", False,
            f"{detail}, below {minimum_bytes / _GIB:.0f} GiB: video outputs will fail; run the container "
            "with --shm-size=2g (Docker's default is 64 MB)",
            level="warning",
        )
    return Check("shm", True, detail)


# ----------------------------------------------------------------------------- API access
def check_api_access(settings: Settings) -> Check:
    """The API's keys (how many, never a value), its limits, and the routes open without a key
    (a warning: each is served to anyone); an error when ``serve`` would refuse the settings."""
    from bridge.api_auth import describe  # noqa: PLC0415 - the API layer, only for this check

    verdict, detail = describe(settings)
    return Check("api access", verdict == "ok", detail, level="warning" if verdict == "open" else "error")


# ----------------------------------------------------------------------------- output
def render_table(checks: Sequence[Check]):
    """A Rich table of ``checks`` (print it with a ``rich.console.Console``)."""
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    table = Table(title="gpu-worker start-up checks", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in checks:
        if check.ok:
            status = Text("ok", style="green")
        elif check.level == "warning":
            status = Text("WARN", style="yellow")
        else:
            status = Text("FAIL", style="bold red")
        table.add_row(check.name, status, Text(check.detail))
    return table


def check_data_files(settings: Settings) -> Check:
    """``DATA_DIR``'s files valid; a ``safety_terms.yaml`` that would weaken the gate is an error."""
    from bridge.prompt_data import DataFileError, load_data

    try:
        load_data(settings.data_dir)
    except DataFileError as exc:
        return Check("data files", False, str(exc))
    return Check("data files", True, f"{settings.data_dir}: valid")
