"""Real processes for fault-injection tests: ``python -m bridge serve`` as a subprocess, and helpers
to feed it jobs through a real Redis and read what reached the Supabase stand-in.

Nothing is mocked: the bridge process runs the same start-up checks, worker loop and HTTP API as
in production; the tests kill it (SIGKILL), stop its Redis, kill its tritonserver, break its spool
and make the stand-in fail, then check that every job still ends exactly once.

    bridge = BridgeProcess("a", bridge_env(...), log_dir=tmp_path)
    bridge.start().wait_ready()
    ...
    bridge.kill()            # SIGKILL, no clean-up at all
    bridge.start().wait_ready()
    bridge.terminate()       # SIGTERM: graceful shutdown

Output (stdout and stderr, one JSON object per line with ``LOG_JSON=1``) goes through a pipe, so
it is captured even when the bridge's own file writes are limited (RLIMIT_FSIZE); it is kept in
:attr:`BridgeProcess.lines` across restarts and written to ``{log_dir}/bridge-{name}.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import redis

from bridge.launcher import free_port
from bridge.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "cancelled")
SDXL_TYPES = ("sdxl_image_fast", "sdxl_image_high")


# --------------------------------------------------------------------------- environment
def bridge_env(
    *,
    models_dir: Path,
    output_dir: Path,
    redis_url: str,
    triton_url: str | None,
    supabase: Any | None = None,
    worker_id: str | None = None,
    **extra: Any,
) -> dict[str, str]:
    """The environment of one bridge process. Every variable the settings read is removed from the
    inherited environment first, so nothing of the test runner's own environment leaks in.
    ``triton_url=None``: the bridge starts (and supervises) its own tritonserver on free ports."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(
        MODELS_DIR=str(models_dir), OUTPUT_DIR=str(output_dir), REDIS_URL=redis_url,
        API_HOST="127.0.0.1", API_PORT="0", HEARTBEAT_TTL_S="2", SHUTDOWN_GRACE_S="5",
        REPORT_DEADLINE_S="10", LOG_JSON="1", LOG_LEVEL="INFO", MODEL_THREADS="1", DEVICE="cpu",
        VRAM_BUDGET_GB="47", REGISTER_WORKER="0", WORKER_ID=worker_id or f"w-{uuid.uuid4().hex[:8]}",
        PYTHONUNBUFFERED="1",
    )
    if triton_url is not None:
        env["TRITON_URL"] = triton_url
    else:
        env.update(TRITON_HTTP_PORT=str(free_port()), TRITON_GRPC_PORT=str(free_port()),
                   TRITON_METRICS_PORT=str(free_port()), TRITON_EXIT_TIMEOUT_S="3")
    if supabase is not None:
        env.update(SUPABASE_URL=supabase.url, SUPABASE_SERVICE_KEY=supabase.service_key,
                   JOB_CALLBACK_SECRET=supabase.callback_secret, STORAGE_BUCKET=supabase.bucket)
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------- the bridge process
class BridgeProcess:
    """One ``python -m bridge serve`` process (restartable), its captured output and its API."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = Path(log_dir) / f"bridge-{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.starts = 0
        self.api_port = 0
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        # tritonserver and stub processes seen under this bridge: pid -> start time (a reused pid
        # is not taken for one of them)
        self._children: dict[int, str] = {}

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "BridgeProcess":
        assert not self.alive, f"bridge {self.name} is already running"
        self.api_port = free_port()
        env = dict(self.env, API_PORT=str(self.api_port))
        self.starts += 1
        self._append(f"----- start {self.starts} of bridge {self.name} -----")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve"], cwd=REPO, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True,
                                        name=f"bridge-{self.name}-output")
        self._reader.start()
        return self

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            self._append(raw.decode("utf-8", "backslashreplace").rstrip("\n"))
        process.stdout.close()

    def _append(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)
            with open(self.log_path, "a", encoding="utf-8", errors="backslashreplace") as handle:
                handle.write(line + "\n")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 180.0) -> "BridgeProcess":
        """Poll the API's ``/ready`` until it answers 200 (Triton live, Redis answering)."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.api_port}/ready"
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(f"bridge {self.name} exited with {self.process and self.process.returncode}:\n"
                                     + self.tail())
            self._remember_children()
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"bridge {self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def health(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.api_port}/health", timeout=10.0)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (its processing list stays in Redis)."""
        if self.alive:
            self._remember_children()
            self.process.kill()  # type: ignore[union-attr]
        self._reap()

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait for the graceful shutdown; SIGKILL after ``timeout``. The exit code."""
        if self.alive:
            self._remember_children()
            self.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            try:
                self.process.wait(timeout)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                self.process.kill()  # type: ignore[union-attr]
        return self._reap()

    def _reap(self) -> int | None:
        if self.process is None:
            return None
        code = self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        return code

    # ------------------------------------------------------------------ tritonserver under it
    def _remember_children(self) -> None:
        if self.alive:
            for server in children_of(self.pid, "tritonserver"):
                for pid in (server, *children_of(server)):
                    started = start_time(pid)
                    if started is not None:
                        self._children[pid] = started

    def tritonserver_pid(self) -> int | None:
        """The tritonserver this bridge started (None with TRITON_URL set, or when none runs)."""
        if not self.alive:
            return None
        self._remember_children()
        found = children_of(self.pid, "tritonserver")
        return found[0] if found else None

    def survivors(self) -> list[str]:
        """The tritonserver and stub processes seen under this bridge that still run (with their
        command lines). The product must end them itself, SIGKILL of the bridge included: the
        harness only reads /proc."""
        out = []
        for pid, started in sorted(self._children.items()):
            if start_time(pid) == started:
                out.append(f"{pid}: {command_line(pid)[:160]}")
        return out

    # ------------------------------------------------------------------ output
    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def tail(self, count: int = 60) -> str:
        with self._lock:
            return "\n".join(self.lines[-count:])

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records (other lines, e.g. tracebacks printed by Python, are skipped)."""
        out = []
        with self._lock:
            lines = list(self.lines)
        for line in lines:
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def messages(self, contains: str, level: str | None = None) -> list[str]:
        return [r["message"] for r in self.records()
                if contains in r.get("message", "") and (level is None or r.get("level") == level)]

    def close(self) -> None:
        """Test clean-up: stop the process whatever state it is in. A tritonserver or stub left
        running after its bridge ended is a defect: it fails the test (and is then killed, so it
        does not hold ports or memory for the next test)."""
        if self.alive:
            self.terminate(timeout=20)
        deadline = time.monotonic() + 10.0
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self.survivors()
        for pid in list(self._children):
            if start_time(pid) == self._children[pid]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._children.clear()
        assert not left, f"bridge {self.name} left processes running after it ended: {left}"


def start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks); None when the process is gone
    or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def processes_with(*needles: str) -> list[int]:
    """Live (not zombie) processes whose command line contains every one of ``needles``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            line = command_line(int(entry.name))
            if line and all(n in line for n in needles) and start_time(int(entry.name)) is not None:
                out.append(int(entry.name))
    return sorted(out)


def children_of(pid: int, name: str | None = None) -> list[int]:
    """Direct child pids of ``pid`` (optionally only those whose command name is ``name``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and (name is None or comm == name):
            out.append(int(entry.name))
    return sorted(out)


# --------------------------------------------------------------------------- jobs and results
def queue_of(job: dict[str, Any]) -> str:
    return "sdxl_queue" if job.get("type") in SDXL_TYPES else "wan_queue"


def push(client: redis.Redis, job: dict[str, Any] | bytes | str, queue: str | None = None) -> None:
    """RPUSH like the producer."""
    if queue is None:
        assert isinstance(job, dict)
        queue = queue_of(job)
    payload = job if isinstance(job, (bytes, str)) else json.dumps(job)
    client.rpush(queue, payload)


class Outcomes:
    """What the Supabase stand-in received, grouped per job (parsed once per request)."""

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        self._parsed: dict[int, Any] = {}

    def _bodies(self, delivered_only: bool) -> Iterable[tuple[Any, Any]]:
        for request in self.stub.requests_for("job-callback"):
            if delivered_only and request.status != 200:
                continue  # an injected failure, or refused: the bridge had to send it again
            key = id(request)
            if key not in self._parsed:
                try:
                    self._parsed[key] = request.json()
                except ValueError:
                    self._parsed[key] = None
            body = self._parsed[key]
            if isinstance(body, dict):
                yield request, body

    def terminals(self) -> dict[str, list[dict[str, Any]]]:
        """job id -> every terminal callback the stand-in answered 200 (applied or ignored)."""
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for _request, body in self._bodies(True):
            if body.get("status") in TERMINAL:
                out[body["job_id"]].append(body)
        return out

    def applied_terminals(self) -> dict[str, list[dict[str, Any]]]:
        """job id -> terminal callbacks that changed the job's state in the app."""
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for request, body in self._bodies(True):
            if body.get("status") in TERMINAL and request.outcome == "applied":
                out[body["job_id"]].append(body)
        return out

    def generation_starts(self) -> dict[str, int]:
        """job id -> how many ``processing`` callbacks with progress 0 (each generation sends one
        first) were delivered."""
        out: dict[str, int] = defaultdict(int)
        for _request, body in self._bodies(True):
            if body.get("status") == "processing" and (body.get("metadata") or {}).get("progress") == 0:
                out[body["job_id"]] += 1
        return out


def inference_counts(grpc_url: str) -> dict[str, int]:
    """Requests each model on a tritonserver completed successfully (Triton's own statistics):
    a test takes the difference before/after to prove how many times jobs really ran."""
    import tritonclient.grpc as grpcclient  # noqa: PLC0415

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    counts: dict[str, int] = defaultdict(int)
    for model in stats.get("model_stats", []):
        counts[model["name"]] += int(model.get("inference_stats", {}).get("success", {}).get("count", 0))
    return counts


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.25,
               message: Callable[[], str] | str = "condition not met") -> Any:
    """Poll ``predicate`` until it returns something truthy; that value. Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)


def wait_terminals(stub: Any, job_ids: Iterable[str], timeout: float,
                   on_wait: Callable[[], None] | None = None,
                   explain: Callable[[], str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Wait until every job in ``job_ids`` has a delivered terminal callback; the terminals.
    ``explain`` (e.g. a bridge's log tail) is added to the failure's message."""
    wanted = list(job_ids)
    outcomes = Outcomes(stub)
    state: dict[str, Any] = {}

    def done() -> bool:
        if on_wait is not None:
            on_wait()
        terminals = outcomes.terminals()
        state["missing"] = [j for j in wanted if not terminals.get(j)]
        state["terminals"] = terminals
        return not state["missing"]

    wait_until(done, timeout, interval=0.3,
               message=lambda: f"{len(state['missing'])} of {len(wanted)} jobs have no terminal callback: "
                               f"{state['missing'][:5]}" + (f"\n{explain()}" if explain is not None else ""))
    return state["terminals"]
