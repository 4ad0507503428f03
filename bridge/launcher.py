"""Find, start and stop a tritonserver over our model repository.

Used by ``python -m bridge triton``, by ``serve`` when no ``TRITON_URL`` is set, and by the tests.

The binary is, in order: ``TRITONSERVER_BIN``; a ``tritonserver`` on ``PATH`` (NVIDIA's image);
the one inside the ``nvidia-pytriton`` wheel. When the wheel is installed its Python backend and
the stub built for the running interpreter are copied into a fresh backend directory on every
start (a stale ``__pycache__`` there breaks later starts), and its shared libraries plus the
interpreter's own ``libpython`` go first on ``LD_LIBRARY_PATH``.

The server never outlives the process that started it (docs/ARCHITECTURE.md, "Process life
cycle"): it is forked from one long-lived thread with ``PR_SET_PDEATHSIG`` (SIGKILL), so the kernel
kills it when the bridge dies, SIGKILL included; its stubs end with it (each watches for its
server: ``model_kit.common.exit_with_server``). A pid file (``pid_file``) names the server with
its start time: the next start of the same worker stops a server an earlier run left behind, and
never a process that merely reuses the pid. A port already taken is a start-up error naming the
process holding it, and readiness is only believed from the server this launcher started (its
unique ``--id`` read back from the server metadata).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bridge.settings import MODEL_NAMES, Settings

log = logging.getLogger(__name__)

SHM_PREFIX = "gpuworker_"
# Python backend shared memory: start with 64 MiB and grow in 64 MiB steps (video outputs).
SHM_DEFAULT_BYTES = 64 * 1024 * 1024
SHM_GROWTH_BYTES = 64 * 1024 * 1024
API_KEY_HEADER = "triton-api-key"
# Over gRPC, Triton reads a restricted-protocol key from metadata under this prefixed name.
GRPC_API_KEY_HEADER = f"triton-grpc-protocol-{API_KEY_HEADER}"


class TritonStartError(RuntimeError):
    """The server did not become live; the message carries its own error lines."""


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls prctl after fork
# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: the
# server is forked from this one thread, which lives as long as the interpreter (a thread of
# asyncio's default executor, which Runtime starts the server from, may be retired earlier).
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tritonserver-spawn")


def _die_with(parent: int) -> None:
    """``preexec_fn`` of the server: SIGKILL it when its parent thread ends. (A parent that died
    before the prctl took effect would never deliver the signal: exit at once instead.)"""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _start_time(pid: int) -> float | None:
    """The process's start time (psutil's ``create_time``, from ``/proc/<pid>/stat``); None when
    no such process runs (a zombie counts as gone)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.Error:
        return None


def port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` (any address): ``"pid 123 (tritonserver)"``, ``"an unknown
    process"`` when it cannot be told, or None when the port is free."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        connections = []
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "an unknown process"
            try:
                name = " ".join(psutil.Process(conn.pid).cmdline()[:1]) or psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            return f"pid {conn.pid} ({name})"
    return None


@dataclass(frozen=True)
class TritonInstall:
    """Where the server binary and its pieces are."""

    binary: Path
    lib_dirs: tuple[Path, ...] = ()
    backend_source: Path | None = None  # pytriton's backends/python
    stub: Path | None = None  # triton_python_backend_stub for this Python


def _pytriton_root() -> Path | None:
    # Located, not imported (docs/DEPLOY.md): the image installs nvidia-pytriton with --no-deps only for
    # its stub, and `import pytriton` needs its own dependencies (zmq, wrapt, typing_inspect).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def find_tritonserver(settings: Settings) -> TritonInstall:
    """Locate a tritonserver and what it needs to run the Python backend here."""
    root = _pytriton_root()
    backend_source = stub = None
    lib_dirs: list[Path] = []
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        lib_dirs.append(Path(libdir))
    if root is not None:
        server_dir = root / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        candidate_stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        if candidate_stub.exists():
            backend_source = server_dir / "backends" / "python"
            stub = candidate_stub
        libs = root.parent / "nvidia_pytriton.libs"
        if libs.is_dir():
            lib_dirs.append(libs)
    if settings.tritonserver_bin is not None:
        if not settings.tritonserver_bin.exists():
            raise TritonStartError(f"TRITONSERVER_BIN={settings.tritonserver_bin} does not exist")
        binary = settings.tritonserver_bin
    elif shutil.which("tritonserver"):
        binary = Path(shutil.which("tritonserver"))  # type: ignore[arg-type]
    elif root is not None and (root / "tritonserver" / "bin" / "tritonserver").exists():
        binary = root / "tritonserver" / "bin" / "tritonserver"
    else:
        raise TritonStartError(
            "no tritonserver found: set TRITONSERVER_BIN, put tritonserver on PATH, "
            "or `pip install nvidia-pytriton==0.7.0`"
        )
    # A full install (NVIDIA's image: /opt/tritonserver/{bin,backends}) runs the Python backend
    # built with it; only the stub comes from the wheel, for this interpreter (docs/DEPLOY.md). The wheel's
    # libtriton_python.so links the wheel's own libtritonserver and does not belong in that server.
    own_backend = binary.resolve().parent.parent / "backends" / "python"
    if stub is not None and (own_backend / "libtriton_python.so").exists():
        backend_source = own_backend
    return TritonInstall(binary=binary, lib_dirs=tuple(lib_dirs), backend_source=backend_source, stub=stub)


def speedup_environment(settings: Settings) -> dict[str, str]:
    """The speed-up settings as the model processes read them (``model_kit.speedups``)."""
    return {
        "CHANNELS_LAST": "1" if settings.channels_last else "0",
        "SDPA": "1" if settings.sdpa else "0",
        "FP16_VAE": "1" if settings.fp16_vae else "0",
        "TORCH_COMPILE": settings.torch_compile,
        "TORCH_COMPILE_MODE": settings.torch_compile_mode,
    }


#: Variables tritonserver and the model stubs keep from the bridge's environment: what Triton,
#: torch, CUDA, Hugging Face and the C runtime read. Everything else (the bridge's secrets:
#: WORKER_API_KEY, SUPABASE_SERVICE_KEY, JOB_CALLBACK_SECRET, TRITON_API_KEY, REDIS_URL, ...)
#: stays out of processes that run model code (docs/DEPLOY.md, "Secrets").
CHILD_ENV_NAMES = frozenset({
    "PATH", "LD_LIBRARY_PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ",
    "TMPDIR", "TEMP", "TMP", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "VIRTUAL_ENV", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
})
CHILD_ENV_PREFIXES = (
    "CUDA_", "NVIDIA_", "CUBLAS_", "CUBLASLT_", "CUDNN_", "NCCL_", "TORCH", "PYTORCH_",
    "TRITON_CACHE_DIR", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TOKENIZERS_", "SAFETENSORS_",
    "OMP_", "MKL_", "KMP_", "OPENBLAS_", "LC_", "XDG_",
    # <MODEL>_<KEY>: a model's weights or config folder (model_kit.common.weights_path)
    *(f"{name.upper()}_" for name in MODEL_NAMES),
    "QWEN_",  # the Qwen engine's batching and cache limits (model_kit/llm.py, engine_limits)

)


#: What tritonserver's command line shows in place of a secret argument (bridge/native/secret_args.c).
SECRET_ARG = "--secret-arg-from-file"
_SHIM_SOURCE = Path(__file__).resolve().parent / "native" / "secret_args.c"


def secret_args_shim(settings: Settings, workdir: Path) -> Path | None:
    """The LD_PRELOAD library that hands tritonserver its secret arguments from a file: the
    prebuilt ``SECRET_ARGS_SHIM``, else ``bridge/native/secret_args.c`` compiled with ``cc`` into
    ``workdir``; ``None`` when neither is possible."""
    if settings.secret_args_shim is not None:
        return settings.secret_args_shim if settings.secret_args_shim.exists() else None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    target = workdir / "secret_args.so"
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(target), str(_SHIM_SOURCE)],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        log.warning("compiling %s failed: %s", _SHIM_SOURCE.name, done.stderr.strip()[-500:])
        return None
    return target


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``environ`` a model process may see (:data:`CHILD_ENV_NAMES`, names starting
    with :data:`CHILD_ENV_PREFIXES`)."""
    return {name: value for name, value in environ.items()
            if name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)}


def free_port() -> int:
    """A TCP port nobody listens on right now (for tests and ad-hoc servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TritonServer:
    """A running tritonserver process and the means to stop it cleanly."""

    settings: Settings
    startup_models: list[str] = field(default_factory=list)
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Where this server's pid and start time are kept, so that the next start of the same worker
    # stops a server an earlier run left behind (Runtime: OUTPUT_DIR/.tritonserver/WORKER_ID.pid).
    pid_file: Path | None = None

    process: subprocess.Popen | None = field(default=None, init=False)
    server_id: str = field(default="", init=False)  # passed with --id, read back from /v2
    _workdir: Path | None = field(default=None, init=False)
    _shm_prefix: str = field(default="", init=False)
    _secret_env: dict[str, str] = field(default_factory=dict, init=False)

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.settings.triton_host in ("0.0.0.0", "") else self.settings.triton_host

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.settings.triton_grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.settings.triton_http_port}"

    @property
    def metrics_host(self) -> str:
        bind = self.settings.triton_metrics_host or self.settings.triton_host
        return "127.0.0.1" if bind in ("0.0.0.0", "") else bind

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_host}:{self.settings.triton_metrics_port}/metrics"

    # ------------------------------------------------------------------ start
    def command(self, install: TritonInstall, backend_dir: Path | None) -> list[str]:
        s = self.settings
        cmd = [
            str(install.binary),
            f"--model-repository={s.model_repository.resolve()}",
            "--model-control-mode=explicit",
            "--disable-auto-complete-config",
            f"--http-address={s.triton_host}",
            f"--http-port={s.triton_http_port}",
            f"--grpc-address={s.triton_host}",
            f"--grpc-port={s.triton_grpc_port}",
            f"--metrics-address={s.triton_metrics_host or s.triton_host}",
            f"--metrics-port={s.triton_metrics_port}",
            f"--exit-timeout-secs={s.triton_exit_timeout_s}",
            "--log-format=ISO8601",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
        ]
        if backend_dir is not None:
            cmd.append(f"--backend-directory={backend_dir}")
        if s.triton_api_key is not None:
            # Restrict model control (load/unload/index) to callers that send the key.
            restricted = f"model-repository:{API_KEY_HEADER}={s.triton_api_key.get_secret_value()}"
            cmd += self._secret_args([f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"])
        cmd += [f"--load-model={name}" for name in self.startup_models]
        return cmd

    def _secret_args(self, args: list[str]) -> list[str]:
        """``args`` as tritonserver's command line shows them: placeholders, the real ones in a
        0600 file of the private working directory that the shim reads (and removes) before
        tritonserver's main(); as they are, with a warning, when no shim can be had."""
        shim = secret_args_shim(self.settings, self._workdir) if self._workdir is not None else None
        if shim is None:
            log.warning("no secret-args shim (set SECRET_ARGS_SHIM or install cc): TRITON_API_KEY is on "
                        "tritonserver's command line, visible to local users (docs/DEPLOY.md, Secrets)")
            return args
        assert self._workdir is not None
        if any("\n" in arg for arg in args):
            raise TritonStartError("TRITON_API_KEY must not contain a line break")
        path = self._workdir / "secret-args"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("".join(f"{arg}\n" for arg in args))
        self._secret_env = {"LD_PRELOAD": str(shim), "SECRET_ARGS_FILE": str(path)}
        return [SECRET_ARG] * len(args)

    def environment(self, install: TritonInstall) -> dict[str, str]:
        """What tritonserver and its model stubs run with: the bridge's environment filtered by
        :func:`child_environment` (never its secrets), plus what the models read."""
        env = child_environment(os.environ)
        lib_path = [str(p) for p in install.lib_dirs] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        env["LD_LIBRARY_PATH"] = ":".join(lib_path)
        # The stub runs the first `python3` it finds: make it ours (venv packages included).
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env["MODELS_DIR"] = str(self.settings.models_dir.resolve())
        env["DEVICE"] = self.settings.device
        env["MODEL_THREADS"] = str(self.settings.model_threads)
        env.update(speedup_environment(self.settings))  # model_kit.speedups reads these
        env.update(self.extra_env)
        env.update(self._secret_env)  # the shim and its file (no secret itself)
        return env

    def _prepare_backend_dir(self, install: TritonInstall) -> Path | None:
        if install.backend_source is None or install.stub is None:
            return None
        assert self._workdir is not None
        python_dir = self._workdir / "backends" / "python"
        shutil.copytree(install.backend_source, python_dir, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(install.stub, python_dir / "triton_python_backend_stub")
        return python_dir.parent

    def start(self) -> "TritonServer":
        """Start the server and wait until it is live (and the startup models ready)."""
        install = find_tritonserver(self.settings)
        self._stop_leftover()
        self._check_ports()
        # A fresh working directory: no stray `triton/` folder can shadow the triton package.
        self._workdir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        self._shm_prefix = f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}_"
        backend_dir = self._prepare_backend_dir(install)
        if self.log_path is None:
            self.log_path = self._workdir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.info("starting tritonserver %s (grpc %s, http %s)", install.binary, self.grpc_url, self.http_url)
        self.server_id = f"gpuworker-{uuid.uuid4().hex[:12]}"
        try:
            self.process = _SPAWNER.submit(
                subprocess.Popen,
                [*self.command(install, backend_dir), f"--id={self.server_id}"],
                cwd=self._workdir,
                env=self.environment(install),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its stubs share its process group: one killpg reaches all
                preexec_fn=functools.partial(_die_with, os.getpid()),
            ).result()
        finally:
            log_file.close()
        self._write_pid_file()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.triton_start_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise TritonStartError(
                        f"tritonserver exited with code {self.process.returncode}:\n{self.error_lines()}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        self._check_identity(client)
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise TritonStartError(
            f"tritonserver not ready after {self.settings.triton_start_timeout_s:.0f}s:\n{self.error_lines()}"
        )

    def _check_identity(self, client: httpx.Client) -> None:
        """The server answering is the one this launcher started (its ``--id``), never another
        one on the same ports (a leftover, or another worker's)."""
        name = client.get(f"http://{self.http_url}/v2").json().get("name")
        if name != self.server_id:
            raise TritonStartError(f"the server answering on {self.http_url} is {name!r}, not the one "
                                   f"this bridge started ({self.server_id}); refusing to use it")

    def _check_ports(self) -> None:
        """Each port is free, else a start-up error naming it and its holder (never adopted)."""
        s = self.settings
        for what, port in (("TRITON_HTTP_PORT", s.triton_http_port), ("TRITON_GRPC_PORT", s.triton_grpc_port),
                           ("TRITON_METRICS_PORT", s.triton_metrics_port)):
            holder = port_holder(port)
            if holder is not None:
                raise TritonStartError(f"{what}={port} is already in use by {holder}; "
                                       f"stop it or choose another port")

    def _write_pid_file(self) -> None:
        if self.pid_file is None or self.process is None:
            return
        record = {"pid": self.process.pid, "start_time": _start_time(self.process.pid), "shm_prefix": self._shm_prefix}
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(json.dumps(record))

    def _stop_leftover(self) -> None:
        """Stop the server an earlier run of this worker left behind (named by the pid file, and
        only if that pid is still the same process: same start time)."""
        path = self.pid_file
        if path is None or not path.exists():
            return
        try:
            record = json.loads(path.read_text())
            pid, started, prefix = int(record["pid"]), record["start_time"], str(record.get("shm_prefix") or "")
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring the unreadable tritonserver pid file %s", path)
            path.unlink(missing_ok=True)
            return
        if started is not None and _start_time(pid) == started:
            log.warning("stopping tritonserver pid %d left behind by an earlier run of this worker (%s)", pid, path)
            self._kill_group(pid)
            deadline = time.monotonic() + 10.0
            while _start_time(pid) == started and time.monotonic() < deadline:
                time.sleep(0.05)
            if _start_time(pid) == started:
                raise TritonStartError(f"the leftover tritonserver pid {pid} did not exit after SIGKILL")
        if prefix.startswith(SHM_PREFIX):
            for region in Path("/dev/shm").glob(f"{prefix}*"):
                region.unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    def error_lines(self, limit: int = 30) -> str:
        """The server's own error lines (ISO8601 format: `<time> E <pid> file:line] msg`)."""
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if " E " in ln[:40] or "error" in ln.lower()]
        return "\n".join((errors or lines)[-limit:])

    # ------------------------------------------------------------------ stop
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, wait for the exit timeout, then SIGKILL the whole group; clean /dev/shm."""
        proc = self.process
        if proc is not None:
            wait = timeout if timeout is not None else self.settings.triton_exit_timeout_s + 5
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(wait)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not exit in %.0fs; killing it", wait)
            self._kill_group(proc.pid, proc)
            if self.pid_file is not None:
                self.pid_file.unlink(missing_ok=True)
        self._remove_shm()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @staticmethod
    def _kill_group(pgid: int, leader: subprocess.Popen | None = None) -> None:
        """Kill what is left of the server's process group (stubs it could not stop); ``leader``:
        the server as our child, reaped here (a zombie still counts as a member)."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        finally:
            if leader is not None:
                leader.wait()
        deadline = time.monotonic() + 5.0  # SIGKILL is not instant: return once the group is gone
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.02)

    def _remove_shm(self) -> None:
        if not self._shm_prefix:
            return
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_triton(settings: Settings, startup_models: list[str] | None = None, **kwargs: object) -> TritonServer:
    """Start tritonserver per ``settings`` and return the live handle."""
    models = settings.triton_startup_models if startup_models is None else startup_models
    return TritonServer(settings, startup_models=list(models), **kwargs).start()  # type: ignore[arg-type]
