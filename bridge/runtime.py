"""Assemble and run the whole bridge: Redis (embedded when REDIS_URL is unset), Triton (embedded
when TRITON_URL is unset), residency, reporting, the worker loop and the HTTP API.

:class:`Runtime` starts the parts in order and stops them in reverse; ``serve`` runs it until
SIGTERM/SIGINT. The tests, the demo and ``python -m bridge serve`` all use it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import io
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import metrics
from bridge.aio import cancel_until_done
from bridge.availability import Availability
from bridge.activity import Activity
from bridge.cpu_work import CpuWork
from bridge.launcher import TritonServer
from bridge.memory_ops import MemoryOps
from bridge.prompt_data import get_data
from bridge.queue import Queue
from bridge.redis_server import RedisServer
from bridge.reporting import RecordingReporter, make_reporter, record_state, supabase_io_of
from bridge.residency import ResidencyManager, metrics_observer
from bridge.settings import Settings
from bridge.spool import Spool
from bridge.stub_watch import StubWatch
from bridge.textgen import Enhancer, TextService
from bridge.triton_client import TritonClient, TritonModelControl
from bridge.worker import Worker

log = logging.getLogger(__name__)


class Runtime:
    """Every long-lived part of one bridge process."""

    def __init__(self, settings: Settings, *, api: bool = True, jobs: bool = True) -> None:
        self.settings = settings
        self.with_api = api
        self.with_jobs = jobs
        self.redis_server: RedisServer | None = None
        self.triton_server: TritonServer | None = None
        self.queue: Queue
        self.triton: TritonClient
        self.residency: ResidencyManager
        self.text: TextService
        self.worker: Worker
        self.api_server: Any = None
        self._api_task: asyncio.Task | None = None
        self._triton_restart = asyncio.Lock()
        # Weights on the volume: serve what is there, pick up the rest when it appears (docs/DEPLOY.md).
        self.availability = Availability(settings, on_change=self._weights_appeared)
        self.memory_ops = MemoryOps(record=self._record_operation)
        self._background: list[asyncio.Task] = []
        self.activity = Activity()  # what the operator's page shows (bridge/api_ui.py)
        # The API's CPU work (safety reading, tokenising): its own threads, bounded in time (docs/API.md).
        self.cpu_work = CpuWork(settings.api_cpu_workers, settings.api_cpu_work_timeout_s)

    # ------------------------------------------------------------------ start
    async def start(self) -> "Runtime":
        s = self.settings
        # The data files first: one that would weaken the safety gate (or any malformed one)
        # stops the start with its DataFileError naming the file and entry (docs/ARCHITECTURE.md).
        # Through the cache: a file broken on disk later leaves this good copy in use.
        get_data(s.data_dir)
        await asyncio.to_thread(self.availability.check_start)  # MissingRequiredModels: REQUIRE_MODELS
        redis_url = s.redis_url
        if redis_url is None:
            self.redis_server = RedisServer(data_dir=s.output_dir / ".redis")
            await asyncio.to_thread(self.redis_server.start)
            log.info("REDIS_URL is not set: started an embedded redis-server on 127.0.0.1:%d", self.redis_server.port)
            redis_url = self.redis_server.url  # type: ignore[assignment]
            (s.output_dir / ".redis" / "url").write_text(self.redis_server.url)  # for `bridge status`
        triton_url = s.triton_url
        if triton_url is None:
            # TRITON_STARTUP_MODELS load in the background once the API is up (_load_startup_models):
            # from a network volume they take longer than any fixed start-up timeout.
            self.triton_server = TritonServer(s, startup_models=[],
                                              log_path=s.output_dir / "logs" / "tritonserver.log",
                                              pid_file=triton_pid_file(s))
            await asyncio.to_thread(self.triton_server.start)
            triton_url = self.triton_server.grpc_url
            log.info("TRITON_URL is not set: started tritonserver (grpc %s)", triton_url)
        self.queue = Queue.from_settings(s, url=redis_url)
        self.triton = TritonClient(triton_url, s.triton_api_key)
        self.triton.watch = StubWatch(self.triton, server_pid=self._triton_pid)
        self.residency = ResidencyManager.from_settings(
            s, TritonModelControl(triton_url, s.triton_api_key),
            observer=self.activity.observer(metrics_observer(metrics.observe_model_op)),
        )
        await self.residency.start()
        self.text = TextService(s, self.triton, self.residency,
                                on_server_down=self.restart_triton if self.triton_server is not None else None)
        reporter = make_reporter(s, partial(record_state, self.queue), on_retry=_count_retry)
        if not s.local_mode:
            reporter = RecordingReporter(reporter, self.queue)
        self.worker = Worker(
            s, queue=self.queue, triton=self.triton, residency=self.residency, reporter=reporter,
            spool=Spool(s.spool_dir), enhancer=Enhancer(self.text, s.enhance_timeout_s),
            on_triton_failure=self.restart_triton if self.triton_server is not None else None,
            activity=self.activity,
            supabase=supabase_io_of(reporter),
        )
        self.worker.missing_models = lambda: self.availability.missing
        if self.with_jobs:
            await self.worker.start_jobs(self.availability.queues())
        if self.with_api:
            await self._start_api()
        self._background.append(asyncio.create_task(self.availability.watch(), name="weights-watch"))
        if self.triton_server is not None:
            self._background.append(asyncio.create_task(self._watch_triton(), name="triton-watch"))
        self._load_startup_models()
        return self

    async def _record_operation(self, job_id: str, status: str, **fields: Any) -> None:
        """A memory operation's state, kept like a job's (bridge/memory_ops.py)."""
        queue = getattr(self, "queue", None)  # set by start()
        if queue is not None:
            await record_state(queue, job_id, status, **fields)

    def _load_startup_models(self) -> None:
        """``TRITON_STARTUP_MODELS`` whose weights are present, loaded in the background (progress
        in ``/memory/status``'s ``operations``)."""
        models = [name for name in self.settings.triton_startup_models if name in self.availability.present]
        skipped = sorted(set(self.settings.triton_startup_models) - set(models))
        if skipped:
            log.warning("TRITON_STARTUP_MODELS: not loading %s (weights missing)", ", ".join(skipped))
        if models:
            self.memory_ops.start("load", "startup", models, self.residency.ensure(models, retry_failed=True))

    async def _weights_appeared(self, models: list[str]) -> None:
        """Weights arrived while running: take jobs from the queues they complete."""
        if self.with_jobs and hasattr(self, "worker"):
            self.worker.open_queues(self.availability.queues())

    async def _start_api(self) -> None:
        import uvicorn  # noqa: PLC0415

        from bridge.api import create_app  # noqa: PLC0415 - the API sits on top of the runtime

        config = uvicorn.Config(create_app(self), host=self.settings.api_host, port=self.settings.api_port,
                                log_config=None, access_log=False, lifespan="off",
                                forwarded_allow_ips=self.settings.api_trusted_proxies)  # client address: api_auth
        self.api_server = uvicorn.Server(config)
        self._api_task = asyncio.create_task(self.api_server.serve(), name="api")
        while not self.api_server.started:
            if self._api_task.done():
                self._api_task.result()  # raises the bind error
                raise RuntimeError("API server stopped during start-up")
            await asyncio.sleep(0.02)
        log.info("HTTP API on http://%s:%d", self.settings.api_host, self.api_port)

    @property
    def api_port(self) -> int:
        """The bound port (``API_PORT=0`` picks a free one)."""
        if self.api_server is not None and self.api_server.servers:
            return self.api_server.servers[0].sockets[0].getsockname()[1]
        return self.settings.api_port

    def _triton_pid(self) -> int | None:
        """The embedded server's pid while it runs (None: an external server, TRITON_URL)."""
        server = self.triton_server
        return server.process.pid if server is not None and server.running else None  # type: ignore[union-attr]

    async def restart_triton(self) -> None:
        """The embedded server died: start it again and re-sync which models it holds."""
        if self.triton_server is None:
            return
        async with self._triton_restart:
            if await self.triton.is_live():
                return
            # (docs/ARCHITECTURE.md, process life cycle, tests/test_faults.py) After a restart the gRPC channels back off before they
            # reconnect, so "not live" over gRPC may only mean "not reconnected yet": a running server
            # that answers its HTTP health check is not restarted again (that killed a healthy server
            # per retry), and the resync waits for the channels (one made during the backoff failed,
            # burning the job's attempts and failing the next model load).
            # Requests that come meanwhile wait for the new server's word on its models.
            async with self.residency.replacing_server() as resync:
                if not (self.triton_server.running and await self._triton_http_live()):
                    log.error("tritonserver is not live; restarting it")
                    await asyncio.to_thread(self.triton_server.stop)
                    await asyncio.to_thread(self.triton_server.start)
                await self._resync_when_reachable(resync)

    async def _watch_triton(self) -> None:
        """Restart the embedded server as soon as its process has exited, not when the next job
        fails on it: chat turns alone (the API) never restart it, and answered 503 until a job came."""
        while True:
            await asyncio.sleep(TRITON_WATCH_S)
            if self.triton_server is not None and not self.triton_server.running:
                try:
                    await self.restart_triton()
                except Exception:  # noqa: BLE001 - tried again at the next look; /health says it is down
                    log.exception("restarting tritonserver failed")

    async def _triton_http_live(self) -> bool:
        import httpx  # noqa: PLC0415

        assert self.triton_server is not None
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.get(f"http://{self.triton_server.http_url}/v2/health/live")
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def _resync_when_reachable(self, resync: Callable[[], Awaitable[None]]) -> None:
        deadline = time.monotonic() + self.settings.triton_start_timeout_s
        while True:
            try:
                if await self.triton.is_live():
                    await resync()
                    return
                problem = "its gRPC endpoint is not live"
            except Exception as exc:  # noqa: BLE001 - the model-control channel may still be backing off
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver restarted but not reachable: {problem}")
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ stop
    async def stop(self) -> None:
        """Stop every part, in reverse order of start. Each step is logged with its duration (at
        DEBUG; WARNING when it took over :data:`SLOW_STEP_S`), so a shutdown that hangs shows
        which step it hangs in."""
        await cancel_until_done(self._background)
        await self.memory_ops.close()
        if self.api_server is not None:
            self.api_server.should_exit = True
            if self._api_task is not None:
                async with _step("HTTP API"):
                    with suppress(Exception):
                        await self._api_task
        self.cpu_work.close()
        if hasattr(self, "worker"):
            if self.with_jobs:
                async with _step("worker"):
                    await self.worker.stop()
            async with _step("reporter"):
                await self.worker.reporter.aclose()
        for closer in ("triton", "queue"):
            part = getattr(self, closer, None)
            if part is not None:
                async with _step(f"{closer} client"):
                    with suppress(Exception):
                        await part.close()
        async with _step("model control client"):
            with suppress(Exception):
                await self.residency.control.close()  # type: ignore[attr-defined]
        if self.triton_server is not None:
            async with _step("tritonserver"):
                await asyncio.to_thread(self.triton_server.stop)
        if self.redis_server is not None:
            async with _step("redis-server"):
                await asyncio.to_thread(self.redis_server.stop)

    async def __aenter__(self) -> "Runtime":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


if TYPE_CHECKING:  # a type checker confirms the API's view of the runtime (tests/test_api.py does at run time)
    from bridge.api_types import ApiRuntime

    def _serves_the_api(runtime: Runtime) -> ApiRuntime:
        return runtime


def triton_pid_file(settings: Settings) -> Path:
    """Where the embedded tritonserver of this worker is named (bridge/launcher.py)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.worker_id)
    return settings.output_dir / ".tritonserver" / f"{safe}.pid"


#: How often the embedded tritonserver's process is looked at (``Runtime._watch_triton``).
TRITON_WATCH_S = 1.0

SLOW_STEP_S = 5.0
"""A shutdown step that takes longer than this is logged as a warning."""

SHUTDOWN_SLACK_S = 15.0
"""How much longer than its known waits (jobs' grace period, tritonserver's exit timeout) a
shutdown may take before :func:`serve` gives up on it (see :func:`_arm_shutdown_watchdog`)."""


@asynccontextmanager
async def _step(name: str) -> AsyncIterator[None]:
    started = time.monotonic()
    log.debug("shutdown: stopping %s", name)
    try:
        yield
    finally:
        took = time.monotonic() - started
        log.log(logging.WARNING if took > SLOW_STEP_S else logging.DEBUG,
                "shutdown: %s stopped in %.2f s", name, took)


def _arm_shutdown_watchdog(settings: Settings) -> None:
    """A shutdown must end. Past the longest its waits allow (plus :data:`SHUTDOWN_SLACK_S`),
    log what every asyncio task is awaiting, then dump every thread's stack and exit with status 1
    (``faulthandler``, so a hang after the event loop, in interpreter exit, is covered too). Jobs
    this worker still held are recovered by the reaper, as after a SIGKILL. Stacks name code
    locations only, never values, so no secret can be in them."""
    limit = settings.shutdown_grace_s + settings.triton_exit_timeout_s + SHUTDOWN_SLACK_S
    faulthandler.dump_traceback_later(limit, exit=True)
    asyncio.get_running_loop().call_later(max(limit - 1.0, 0.0), _log_stuck_tasks, limit)


def _log_stuck_tasks(limit: float) -> None:
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=stacks)
    log.error("shutdown has not finished after %.0f s; pending asyncio tasks:\n%s"
              "exiting after the threads' stacks are dumped", limit - 1.0, stacks.getvalue())


def freeze_startup_heap() -> None:
    """Collect, then move every object alive after start-up (modules, settings, clients: about
    100,000) to the collector's permanent generation. A full collection then looks only at what was
    made since: it paused the event loop for 45 ms before (measured here), which a job that arrived
    meanwhile waited out (docs/ARCHITECTURE.md, one job's path: pickup and idle-gap outliers). What is alive after start-up is
    almost all modules, classes and clients that live as long as the process; the price is that
    one of them that later becomes cyclic garbage is not reclaimed. For the one process ``serve``
    runs, not for a process that starts runtimes again and again (the tests)."""
    gc.collect()
    gc.freeze()


def _count_retry(route: str, _reason: str) -> None:
    """Reporter retries into the metrics (uploads and callbacks counted apart)."""
    if route == "storage":
        metrics.inc_upload_retry()
    else:
        metrics.inc_callback_retry()


async def serve(settings: Settings) -> None:
    """Run the bridge until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = Runtime(settings)
    try:
        await runtime.start()
        freeze_startup_heap()
        log.info("bridge %s serving", settings.worker_id)
        if not settings.local_mode and settings.register_worker:
            from bridge.registration import register_worker  # noqa: PLC0415

            asyncio.create_task(register_worker(settings), name="register")  # retried, never fatal
        await stop.wait()
        log.info("shutting down")
    finally:
        _arm_shutdown_watchdog(settings)
        await runtime.stop()
