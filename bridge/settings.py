"""One settings object for the whole bridge, read from the environment.

Every field is documented here and in the README. Secrets are ``SecretStr``: they never show in
a repr, a log line or an error. A missing or malformed value stops start-up with a message that
names the variable (see :func:`load_settings`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
MODEL_NAMES = ("sdxl", "wan", "qwen_instruct", "qwen_base")


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class SettingsError(RuntimeError):
    """A setting is missing or malformed; the message names it."""


class Settings(BaseSettings):
    """Bridge settings. Environment variable = upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- Redis ------------------------------------------------------------------------------
    redis_url: SecretStr | None = Field(
        None, description="Redis URL (may carry a password). Unset: start an embedded redis-server."
    )
    queue_pop_side: Literal["left", "right"] = Field(
        "left", description="Side jobs are taken from; 'left' = oldest first for an RPUSH producer."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Runs of one job before it is failed.")
    heartbeat_ttl_s: float = Field(15.0, gt=0, description="A worker is dead this long after its last heartbeat.")
    shutdown_grace_s: float = Field(30.0, ge=0, description="SIGTERM: time running jobs get to finish.")

    # --- Supabase ---------------------------------------------------------------------------
    supabase_url: str | None = Field(None, description="Supabase project URL. Unset: local mode.")
    supabase_service_key: SecretStr | None = Field(None, description="Service-role key (Storage, callbacks).")
    job_callback_secret: SecretStr | None = Field(None, description="HMAC key of X-Callback-Signature.")
    storage_bucket: str = Field("workspace-temp", description="Storage bucket for assets.")
    report_deadline_s: float = Field(
        300.0, gt=0, description="How long one reporting round retries before the job is put back."
    )
    app_cancel_poll_s: float = Field(
        3.0, gt=0, le=60,
        description="How often a running job's app jobs row is read for a cancel (Supabase mode; docs/APP_CONTRACT.md).",
    )

    # --- Models / Triton ----------------------------------------------------------------------
    models_dir: Path = Field(Path("/workspace/models"), description="Root of the model weights.")
    model_repository: Path = Field(DEFAULT_MODEL_REPOSITORY, description="Triton model repository.")
    triton_url: str | None = Field(
        None, description="host:port of a running Triton's gRPC endpoint. Unset: start one embedded."
    )
    triton_host: str = Field("127.0.0.1", description="Address the embedded Triton binds to.")
    triton_http_port: int = Field(8000, ge=1, le=65535)
    triton_grpc_port: int = Field(8001, ge=1, le=65535)
    triton_metrics_port: int = Field(8002, ge=1, le=65535)
    triton_metrics_host: str | None = Field(
        None, description="Address Triton's metrics port binds to (unset: TRITON_HOST). Lets Prometheus scrape "
        "it from outside while model control stays on loopback.",
    )
    tritonserver_bin: Path | None = Field(None, description="tritonserver binary to use (else PATH, else pytriton).")
    triton_startup_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Models loaded when the embedded server starts (comma list)."
    )
    triton_exit_timeout_s: int = Field(10, ge=0, description="tritonserver --exit-timeout-secs.")
    triton_start_timeout_s: float = Field(120.0, gt=0, description="Wait this long for the server to be live.")
    triton_api_key: SecretStr | None = Field(
        None, description="Key for Triton's restricted model-control API when its ports are exposed."
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Device for the models.")
    # Weights on the volume (bridge/availability.py, bridge/weights.py)
    require_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models whose missing weights stop the start (comma list); the others are served when present.",
    )
    weights_recheck_s: float = Field(
        30.0, ge=0, description="Look for missing models' weights this often (s) and serve them once there; 0: never."
    )
    model_threads: int = Field(0, ge=0, description="torch threads per model process (0: torch default).")

    # --- Speed-ups (docs/DEPLOY.md: model_kit/speedups.py, bench/gpu.py) -------------------------------
    # Passed to the model processes as environment variables (bridge/launcher.py); CUDA only.
    channels_last: bool = Field(True, description="SDXL UNet in channels-last memory format (CUDA).")
    sdpa: bool = Field(
        True, description="Fused scaled-dot-product attention (diffusers' default); off: classic unfused attention."
    )
    fp16_vae: bool = Field(
        False,
        description="Run the SDXL VAE in float16. The stock SDXL VAE overflows (NaN/black images) in float16: "
        "off keeps it in float32; turn on only with an fp16-fixed VAE.",
    )
    torch_compile: Literal["off", "full", "regional"] = Field(
        "off", description="torch.compile the SDXL UNet / WAN transformer: off, full (1), or regional (repeated blocks)."
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when TORCH_COMPILE is on."
    )

    @field_validator("torch_compile", mode="before")
    @classmethod
    def _compile_words(cls, value: object) -> object:
        if isinstance(value, bool):
            return "full" if value else "off"
        if isinstance(value, (str, int)):
            word = str(value).strip().lower()
            return {"1": "full", "true": "full", "yes": "full", "on": "full",
                    "0": "off", "false": "off", "no": "off", "": "off"}.get(word, word)
        return value

    # --- end speed-ups ---------------------------------------------------------------------------

    # --- Residency / scheduling (docs/ARCHITECTURE.md, scheduling: bridge/model_table.py, scheduler.py, residency.py) ----
    vram_budget_gb: float = Field(47.0, gt=0, description="GPU memory all resident models may take (GB).")
    vram_safety_margin_gb: float = Field(
        1.0, ge=0, description="On a GPU, keep this much of NVML's free memory out of the budget (GB)."
    )
    model_table: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        description='Overrides of the model table, JSON: {"wan": {"vram_gb": 20, "policy": "on_demand"}}.',
    )
    swap_aging_s: float = Field(
        900.0,
        ge=0,
        description="Hard bound: a job waiting this long goes first (oldest first), model switch or not. "
        "Below it a job's priority already grows with its wait in proportion to its expected length.",
    )
    gpu_lanes: int = Field(
        2,
        ge=1,
        le=8,
        description="Generations that may hold the GPU at once. With one running, another starts only when "
        "its model is resident and it is short compared with what runs (an image beside a video); "
        "1: strictly one at a time. Chat runs beside them either way.",
    )
    drain_timeout_s: float | None = Field(
        None, gt=0, description="Before an unload, wait this long for requests in flight, then cancel them."
    )
    unload_timeout_s: float = Field(120.0, gt=0, description="Wait this long for Triton to free an unloaded model.")
    load_retry_backoff_s: float = Field(60.0, ge=0, description="After a failed load, refuse that model this long.")

    @field_validator("model_table")
    @classmethod
    def _check_model_table(cls, value: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
        from bridge.model_table import parse_overrides  # noqa: PLC0415 - pure module, no cycle

        parse_overrides(value)
        return value

    # --- end residency / scheduling ------------------------------------------------------------

    # --- Worker -------------------------------------------------------------------------------
    worker_id: str = Field(default_factory=_default_worker_id, description="Unique per process.")
    output_dir: Path = Field(Path("outputs"), description="Local mode results and the upload spool.")
    enhance_timeout_s: float = Field(60.0, gt=0, description="Prompt enhancement time limit.")
    fetch_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="host:port entries on private addresses that reference-image URLs may use (tests, LAN).",
    )

    # --- HTTP API -----------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="API bind address (0.0.0.0 in production).")
    api_port: int = Field(7861, ge=0, le=65535)
    worker_api_key: SecretStr | None = Field(
        None, description="Bearer key(s) required by the API: one, or several separated by commas (each accepted "
        "on every route), each at least 32 characters."
    )

    # --- Operations (docs/DEPLOY.md: bridge/doctor.py, registration.py, logs.py) ----------------------
    require_gpu: bool = Field(False, description="Start-up checks fail unless a CUDA GPU is visible.")
    public_url: str | None = Field(
        None, description="Public base URL of the API (else https://{RUNPOD_POD_ID}-{API_PORT}.proxy.runpod.net)."
    )
    runpod_pod_id: str | None = Field(None, description="Set by RunPod inside a pod; gives the proxy URL.")
    register_worker: bool = Field(True, description="Register the public URL with Supabase at start-up.")
    log_level: str = Field("INFO", description="Root log level.")
    log_json: bool | None = Field(None, description="JSON log lines (unset: JSON unless stderr is a terminal).")
    # --- end operations ---------------------------------------------------------------------------

    # --- Prompt data files (docs/ARCHITECTURE.md: bridge/prompt_data.py, chat.py, safety.py, scene.py) --------
    data_dir: Path = Field(
        Path(__file__).resolve().parent / "data",
        description="Folder of the operator-editable templates.yaml, content_mode.yaml, scene_rules.yaml and "
        "safety_terms.yaml (a file missing there falls back to the packaged copy; safety_terms.yaml only adds to "
        "the gate's built-in terms, and one that would weaken it stops the start).",
    )
    # --- end prompt data files -------------------------------------------------------------------

    # --- API access (bridge/api_auth.py; docs/API.md "Authentication") ---------------------------
    api_open_routes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Routes served without a key (comma list, e.g. /enhance; only chat/inference routes can be "
        "opened), rate-limited per client address. Logged as a warning at start.",
    )
    api_open_rate_per_min: int = Field(
        30, ge=1, description="Requests a minute one client address may send to API_OPEN_ROUTES without a key."
    )
    api_auth_failures_per_min: int = Field(
        10, ge=1, description="Wrong keys a minute one client address may send; past that its keyed requests get 429."
    )
    api_allow_short_keys: bool = Field(
        False, description="Development only: accept WORKER_API_KEY values shorter than 32 characters (a warning)."
    )
    api_trusted_proxies: str = Field(
        "127.0.0.1",
        description="Comma list of proxy addresses/networks whose X-Forwarded-For names the client (the per-address "
        "limits count that client); '*' trusts any peer.",
    )
    chat_gpu_wait_s: float = Field(
        20.0, gt=0, description="A chat turn waits this long for the GPU, then answers 503 with Retry-After."
    )
    api_docs: bool = Field(
        True, description="Serve the OpenAPI document and interactive docs (/openapi.json, /docs, /redoc), behind "
        "the key like every other route; 0 turns them off (404)."
    )

    @field_validator("api_open_routes", mode="before")
    @classmethod
    def _split_routes(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            value = [route.rstrip("/") or "/" if isinstance(route, str) else route for route in value]
        return value
    # --- end API access ----------------------------------------------------------------------------

    # --- Request limits (bridge/limits.py; docs/API.md "Limits") ------------------------------
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body the API reads (bytes); larger ones get a 413."
    )
    api_cpu_work_timeout_s: float = Field(
        10.0, gt=0, description="Longest one request's CPU work (safety reading, tokenising, scene rules) may take, "
        "waiting for a thread included; past it the request gets a 503 with Retry-After."
    )
    api_cpu_workers: int = Field(
        2, ge=1, description="Threads the API's CPU work runs on (its own pool: a flood cannot take the event "
        "loop's); requests past them wait, within API_CPU_WORK_TIMEOUT_S."
    )
    event_streams_max: int = Field(
        32, ge=1, description="Job event streams (GET /jobs/{id}/events) open at once, each holding one Redis "
        "connection of their own bounded pool; one more gets a 503 with Retry-After."
    )
    secret_args_shim: Path | None = Field(
        None, description="Prebuilt bridge/native/secret_args.c (the image's); unset: compiled with cc at each "
        "Triton start. Keeps TRITON_API_KEY off tritonserver's command line (docs/DEPLOY.md, Secrets)."
    )
    # --- end request limits ---------------------------------------------------------------------

    @field_validator("triton_startup_models", "fetch_allowed_hosts", "require_models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("triton_startup_models", "require_models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in MODEL_NAMES]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {list(MODEL_NAMES)}")
        return value

    @field_validator("supabase_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _supabase_complete(self) -> "Settings":
        if self.supabase_url:
            missing = [
                name.upper()
                for name in ("supabase_service_key", "job_callback_secret")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"SUPABASE_URL is set but {', '.join(missing)} is not")
        return self

    @property
    def local_mode(self) -> bool:
        """No Supabase configured: results stay on disk and statuses in Redis."""
        return self.supabase_url is None

    def weights_path(self, model: str, key: str = "weights", environ: Mapping[str, str] | None = None) -> Path:
        """Where ``model`` looks for ``key`` (``weights``/``config``), resolved as the model process
        does (``model_kit.common.weights_path``): ``<MODEL>_<KEY>`` from the environment (absolute,
        or relative to ``MODELS_DIR``), else the :mod:`model_kit.layout` default."""
        from model_kit import layout  # noqa: PLC0415 - constants only

        environ = os.environ if environ is None else environ
        path = Path(environ.get(f"{model}_{key}".upper()) or layout.WEIGHTS[model][key])
        return path if path.is_absolute() else self.models_dir / path

    @cached_property
    def spool_dir(self) -> Path:
        return self.output_dir / ".spool"


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning a validation error into a clear message."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "_".join(str(part) for part in err["loc"]).upper() or "settings"
            problems.append(f"{name}: {err['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
