"""Which models Triton holds, within the GPU memory budget.

Every load and unload goes through one lock, with a second look after taking it. An unload first
lets the requests in flight finish (or, past ``drain_timeout_s``, cancels them through the
callbacks their :meth:`ResidencyManager.use` supplied), then asks Triton to unload and waits
until the repository index says the model is gone: Triton's unload returns before the memory is
free. Only then is anything loaded. A model is never reloaded in place; a failed load is unloaded
again, reported, and refused for ``load_retry_backoff_s`` instead of being retried forever.

The control of the server is a small protocol (:class:`ModelControl`); the real one,
:class:`bridge.triton_client.TritonModelControl`, is with the rest of the Triton client. Time
comes from an injectable clock and sleep, so the whole manager also runs under a simulated clock
(``bench/schedule.py``).

GPU memory is measured with NVML when ``pynvml`` and a GPU are present; without them the table's
estimates are all there is.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from bridge.gpu_memory import GpuMemory, GpuMemoryInfo, NvmlMemory
from bridge.model_table import (
    POLICY_RANK,
    ModelTable,
    effective_budget,
    table_from_settings,
)
from bridge.residency_report import (
    ModelReport,
    Observer,
    ResidencyEvent,
    ResidencyReport,
    metrics_observer,
)
from bridge.scheduler import Eviction, ModelView, occupied_gb, plan_residency
from bridge.triton_client import ModelProcessDied, TritonModelControl

log = logging.getLogger(__name__)

T = TypeVar("T")


class ResidencyError(RuntimeError):
    """A model cannot be made resident (or unloaded): ``what``, then ``detail`` (the server's own
    words: paths, addresses) for the log; ``public`` without it, for answers (docs/API.md, "Errors")."""

    def __init__(self, what: str, detail: object = None) -> None:
        super().__init__(what if detail is None else f"{what}: {detail}")
        self.public = what if detail is None else f"{what}; the worker's log has the server's reason"


# ------------------------------------------------------------------------------ server control


class ModelControl(Protocol):
    """Load, unload and list models on an inference server."""

    async def load(self, name: str, timeout_s: float | None = None) -> None: ...

    async def unload(self, name: str) -> None: ...

    async def index(self) -> dict[str, str]:
        """Model name → state (``READY``, ``LOADING``, ``UNLOADING``, ``UNAVAILABLE``)."""
        ...


@dataclass
class _Record:
    """What the manager knows about one model."""

    name: str
    state: str = "unloaded"
    in_flight: int = 0
    last_used: float = float("-inf")
    holders: dict[int, tuple[asyncio.Task | None, Callable[[], Any] | None]] = field(default_factory=dict)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    loads: int = 0
    unloads: int = 0
    load_failures: int = 0
    last_load_s: float | None = None
    total_load_s: float = 0.0
    last_unload_s: float | None = None
    total_unload_s: float = 0.0
    last_error: str | None = None
    failed_at: float | None = None
    measured_gb: float | None = None
    instance: int = 0  # changes with every load and reload: which model process a request met

    def __post_init__(self) -> None:
        self.idle.set()


def looks_like_oom(exc: BaseException) -> bool:
    """Whether an error from Triton (or a model) reports running out of GPU memory."""
    return "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------ the manager


class ResidencyManager:
    """Keeps the models the jobs need resident in Triton within the GPU memory budget."""

    def __init__(
        self,
        control: ModelControl,
        table: ModelTable,
        budget: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        observer: Observer | None = None,
        gpu: GpuMemory | None | Literal["auto"] = "auto",
        eviction: Eviction = "policy",
        safety_margin_gb: float = 1.0,
        drain_timeout_s: float | None = None,
        cancel_grace_s: float = 10.0,
        unload_timeout_s: float = 120.0,
        load_retry_backoff_s: float = 60.0,
        poll_s: float = 0.1,
    ) -> None:
        self.control = control
        self.configured_budget_gb = table.budget_gb if budget is None else budget
        self.table = table.with_budget(self.configured_budget_gb)
        self._clock = clock
        self._sleep = sleep
        self._observer = observer
        self._gpu = NvmlMemory.probe() if gpu == "auto" else gpu
        self.eviction: Eviction = eviction
        self.safety_margin_gb = safety_margin_gb
        self.drain_timeout_s = drain_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.unload_timeout_s = unload_timeout_s
        self.load_retry_backoff_s = load_retry_backoff_s
        self.poll_s = poll_s
        self._lock = asyncio.Lock()
        self._records = {name: _Record(name) for name in table.specs}
        self._next_token = 0
        # Models known work needs next (the dispatcher keeps it current): evictions spare them
        # after the others of their policy, as the scheduler's plans do.
        self.wanted: frozenset[str] = frozenset()
        self._displaced: set[str] = set()  # evicted to make room for other models, not loaded since
        self.oom_evictions = 0
        self.oom_retries = 0

    @classmethod
    def from_settings(cls, settings: Any, control: ModelControl | None = None, **kwargs: Any) -> ResidencyManager:
        """A manager per settings; the Triton control from ``triton_url`` unless one is given."""
        if control is None:
            if not settings.triton_url:
                raise ResidencyError("TRITON_URL is not set: pass the control of the embedded server")
            control = TritonModelControl(settings.triton_url, settings.triton_api_key)
        options: dict[str, Any] = {
            "safety_margin_gb": settings.vram_safety_margin_gb,
            "drain_timeout_s": settings.drain_timeout_s,
            "unload_timeout_s": settings.unload_timeout_s,
            "load_retry_backoff_s": settings.load_retry_backoff_s,
        }
        options.update(kwargs)
        return cls(control, table_from_settings(settings), **options)

    # -------------------------------------------------------------- views

    @property
    def budget_gb(self) -> float:
        return self.table.budget_gb

    def state(self, name: str) -> str:
        return self._record(name).state

    def in_flight(self, name: str) -> int:
        return self._record(name).in_flight

    def views(self) -> dict[str, ModelView]:
        """Per model what the scheduler needs; ``failed`` only while its load is refused."""
        now = self._clock()
        views = {}
        for name, rec in self._records.items():
            state = rec.state
            if state == "failed" and not self._in_backoff(rec, now):
                state = "unloaded"
            views[name] = ModelView(state=state, in_flight=rec.in_flight, last_used=rec.last_used)  # type: ignore[arg-type]
        return views

    @property
    def displaced(self) -> frozenset[str]:
        """Models evicted to make room for others and not loaded since (what :meth:`prefetch` may
        bring back; an explicit unload or an out-of-memory eviction is not undone)."""
        return frozenset(self._displaced)

    def accounted_gb(self) -> float:
        return occupied_gb(self.table, self.views())

    def report(self) -> ResidencyReport:
        """Per model state, budget, measured memory, in flight, last use; counts and durations."""
        now = self._clock()
        mem = self._gpu.read() if self._gpu is not None else None
        models = {}
        for name, rec in self._records.items():
            spec = self.table.specs[name]
            models[name] = ModelReport(
                name=name,
                state=rec.state,
                policy=spec.policy,
                vram_gb=spec.vram_gb,
                measured_gb=rec.measured_gb,
                in_flight=rec.in_flight,
                idle_s=None if rec.last_used == float("-inf") else max(0.0, now - rec.last_used),
                loads=rec.loads,
                unloads=rec.unloads,
                load_failures=rec.load_failures,
                last_load_s=rec.last_load_s,
                total_load_s=rec.total_load_s,
                last_unload_s=rec.last_unload_s,
                total_unload_s=rec.total_unload_s,
                last_error=rec.last_error,
            )
        return ResidencyReport(
            budget_gb=self.budget_gb,
            configured_budget_gb=self.configured_budget_gb,
            accounted_gb=self.accounted_gb(),
            gpu_total_gb=mem.total_gb if mem else None,
            gpu_free_gb=mem.free_gb if mem else None,
            gpu_used_gb=mem.used_gb if mem else None,
            loads=sum(r.loads for r in self._records.values()),
            unloads=sum(r.unloads for r in self._records.values()),
            load_failures=sum(r.load_failures for r in self._records.values()),
            oom_evictions=self.oom_evictions,
            oom_retries=self.oom_retries,
            models=models,
        )

    def snapshot(self) -> dict[str, Any]:
        """:meth:`report` as a plain dict (for the HTTP API and logs)."""
        return self.report().model_dump()

    # -------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Adopt what the server already holds, then cap the budget by the GPU's free memory."""
        await self.resync()
        mem = self._gpu.read() if self._gpu is not None else None
        if mem is not None:
            budget = effective_budget(self.configured_budget_gb, mem.free_gb, self.accounted_gb(), self.safety_margin_gb)
            if budget < self.configured_budget_gb:
                log.warning(
                    "VRAM budget %.1f GB capped to %.1f GB (NVML: %.1f GB free, margin %.1f GB)",
                    self.configured_budget_gb, budget, mem.free_gb, self.safety_margin_gb,
                )
            self.table = self.table.with_budget(budget)

    async def resync(self) -> None:
        """Take the server's word for which models it holds (at start)."""
        async with self._lock:
            await self._resync_locked()

    @asynccontextmanager
    async def replacing_server(self) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Around a restart of the server: every model is taken as unloaded at once, and the
        residency lock is held until the block ends, so a request that comes meanwhile waits and
        then loads what it needs. Before, it was sent to the new server as if its model were still
        there and failed ("unknown model"). The block calls what it is given to take the new
        server's word for which models it holds, once that server answers."""
        async with self._lock:
            for rec in self._records.values():
                if rec.state != "failed":
                    rec.state = "unloaded"
            yield self._resync_locked

    async def _resync_locked(self) -> None:
        states = await self.control.index()
        waited = 0.0
        while "LOADING" in states.values() and waited < 600:  # a load another process started
            await self._sleep(0.5)
            waited += 0.5
            states = await self.control.index()
        now = self._clock()
        for name, rec in self._records.items():
            server_state = states.get(name, "UNAVAILABLE")
            if server_state == "READY":
                if rec.state != "ready":
                    rec.state, rec.last_used = "ready", now
            elif server_state == "UNLOADING":
                rec.state = "unloading"
            elif rec.state != "failed":
                rec.state = "unloaded"

    # -------------------------------------------------------------- residency

    async def ensure(self, models: Iterable[str], *, retry_failed: bool = False) -> None:
        """Make ``models`` resident together, evicting per policy and LRU within the budget.

        Raises :class:`ResidencyError` when that is impossible (models bigger than the budget, an
        unknown model, a load that failed, requests in flight that would not end).
        """
        names = frozenset(models)
        for name in names:
            self._record(name)
        if self._all_ready(names):
            return
        task = asyncio.current_task()
        draining = sorted(n for n, r in self._records.items() if r.state == "draining" and self._held_by(n, task))
        if draining:  # their unload waits for this task, and this task would wait for the unload
            raise ResidencyError(f"{draining} are being unloaded while this task holds them; it cannot wait for {sorted(names)}")
        async with self._lock:
            if self._all_ready(names):  # second look: another task may have done it
                return
            await self._ensure_locked(names, retry_failed=retry_failed)

    async def prefetch(self, name: str) -> bool:
        """Load ``name`` back (it must be :attr:`displaced`) if that needs no wait and evicts
        nothing busy or :attr:`wanted`; ``False`` (nothing done) otherwise, or while a failed load
        is refused."""
        rec = self._record(name)
        async with self._lock:
            await self._refresh_unloading()
            if name not in self._displaced or rec.state in ("ready", "loading") or (
                rec.state == "failed" and self._in_backoff(rec, self._clock())
            ):
                return False
            plan = plan_residency(self.table, {name}, self.views(), eviction=self.eviction, keep=self.wanted)
            if not plan.feasible or plan.waits_for_drain or set(plan.evict) & self.wanted:
                return False
            log.info("bringing %s back: evicting %s", name, list(plan.evict) or "nothing")
            for other in plan.evict:
                await self._unload_locked(other, self.drain_timeout_s)
                self._displaced.add(other)
            await self._check_gpu_room(frozenset({name}), plan.load)
            for other in plan.load:
                await self._load_locked(other)
            return True

    async def load(self, name: str) -> None:
        """Load one model (HTTP ``/memory/load``): like :meth:`ensure`, even right after a failure."""
        await self.ensure({name}, retry_failed=True)

    async def unload(self, name: str, deadline_s: float | None = None) -> bool:
        """Unload one model once its requests in flight end; ``False`` if it was not loaded."""
        self._record(name)
        async with self._lock:
            await self._refresh_unloading()
            if self._records[name].state != "ready":
                return False
            await self._unload_locked(name, self.drain_timeout_s if deadline_s is None else deadline_s)
            return True

    async def restart(self, name: str) -> None:
        """Unload and load again (a crashed model process: Triton does not restart it)."""
        await self.unload(name)
        await self.ensure({name}, retry_failed=True)

    async def reload(self, name: str, instance: int | None = None) -> bool:
        """A loaded model's process died: unload it and load it again at once, without waiting
        for the unload to end (Triton's release of an instance whose process is dead waits out
        its stub timeout, ~30 s; a load of the unchanged model alone is a no-op, and a request to
        the dead instance can crash the server). ``False`` when it was not loaded, or when it was
        loaded again since ``instance`` (the load that served when the failed request began): requests
        that met the same dead process at once reload it once, not the new one after it."""
        rec = self._record(name)
        async with self._lock:
            await self._refresh_unloading()
            if rec.state != "ready" or (instance is not None and rec.instance != instance):
                return False
            rec.state = "loading"  # new requests wait for the new model process
            self._emit(ResidencyEvent("load", name, "start"))  # a load of a new process, for the metrics
            started = self._clock()
            try:
                await self.control.unload(name)
                await self.control.load(name, self.table.specs[name].load_timeout_s)
            except BaseException as exc:  # cancelled too: not left "loading" with nothing to end it
                rec.state = "unloaded"  # the next use loads it the ordinary way
                self._emit(ResidencyEvent("load", name, "end", ok=False, seconds=self._clock() - started,
                                          error=_short(str(exc)) or type(exc).__name__))
                if isinstance(exc, Exception):
                    raise ResidencyError(f"reloading {name} failed", exc) from exc
                raise
            seconds = self._clock() - started
            log.info("reloaded %s in %.2fs", name, seconds)
            self._count_load(rec, seconds)
            return True

    @asynccontextmanager
    async def use(self, *models: str, cancel: Callable[[], Any] | None = None) -> AsyncIterator[None]:
        """Hold ``models`` resident for one request: loads them if needed, counts it in flight.

        An unload waits until no request holds the model. ``cancel`` (sync or async) is called
        when an unload's drain deadline passes while this request still runs.

        When a model's process died under the request (:class:`ModelProcessDied`) the model is
        reloaded before the error goes on, so that the next request finds a live one: Triton
        still reports a model whose stub is dead as ready and fails every request to it
        (docs/ARCHITECTURE.md, process life cycle). Requests that met the same dead process, and
        the enclosing ``use`` of a request held inside another, reload it once (:meth:`reload`'s
        second look).
        """
        names = frozenset(models)
        task = asyncio.current_task()
        while not all(self._usable(name, task) for name in names):
            await self.ensure(names)
        # No await between the check above and here: nothing can unload the models in between.
        token = self._next_token
        self._next_token += 1
        instances = {}
        for name in names:
            rec = self._records[name]
            rec.in_flight += 1
            rec.holders[token] = (task, cancel)
            rec.idle.clear()
            instances[name] = rec.instance
        died: ModelProcessDied | None = None
        try:
            yield
        except ModelProcessDied as exc:
            died = exc if exc.model in names else None
            raise
        finally:
            now = self._clock()
            for name in names:
                rec = self._records[name]
                rec.in_flight -= 1
                rec.holders.pop(token, None)
                rec.last_used = now
                if rec.in_flight == 0:
                    rec.idle.set()
            if died is not None:
                await self._reload_dead(died, instances[died.model])

    async def evict_for_oom(self, *keep: str) -> list[str]:
        """After an out-of-memory error: unload every idle model not in ``keep``; returns them.

        Busy models are not cut; pinned ones go too (the job cannot otherwise run).
        """
        keep_set = frozenset(keep)
        evicted: list[str] = []
        async with self._lock:
            views = self.views()
            order = sorted(
                (n for n, r in self._records.items() if r.state == "ready" and n not in keep_set and r.in_flight == 0),
                key=lambda n: (POLICY_RANK[self.table.specs[n].policy], views[n].last_used, n),
            )
            for name in order:
                if self._records[name].in_flight == 0 and self._records[name].state == "ready":
                    await self._unload_locked(name, None)
                    evicted.append(name)
        self.oom_evictions += len(evicted)
        log.warning("out of memory beside %s: evicted %s", sorted(keep_set), evicted or "nothing")
        return evicted

    async def run_with_oom_retry(
        self,
        models: Iterable[str],
        job: Callable[[], Awaitable[T]],
        *,
        cancel: Callable[[], Any] | None = None,
        is_oom: Callable[[BaseException], bool] = looks_like_oom,
    ) -> T:
        """Run ``job`` holding ``models``; on an out-of-memory error evict and retry it once."""
        names = tuple(sorted(set(models)))
        try:
            async with self.use(*names, cancel=cancel):
                return await job()
        except Exception as exc:
            if not is_oom(exc):
                raise
            log.warning("out of memory on %s (%s): evicting and retrying once", names, exc)
        await self.evict_for_oom(*names)
        self.oom_retries += 1
        async with self.use(*names, cancel=cancel):
            return await job()

    async def _reload_dead(self, died: ModelProcessDied, instance: int) -> None:
        """:meth:`use`'s reload of a model whose process died; a failed reload is logged, and the
        request's own error goes on (the next use loads the model the ordinary way)."""
        log.warning("%s: %s (reloaded unless another request met the same process first)",
                    died.model, died.message)
        try:
            await self.reload(died.model, instance)  # its second look: one reload per dead process
        except Exception as exc:  # noqa: BLE001 - e.g. the whole server is down: its restart (bridge/runtime.py) loads afresh
            log.error("%s: reload failed: %s", died.model, exc)

    # -------------------------------------------------------------- internals (lock held)

    def _record(self, name: str) -> _Record:
        try:
            return self._records[name]
        except KeyError:
            raise ResidencyError(f"unknown model {name!r}; known: {list(self._records)}") from None

    def _all_ready(self, names: Iterable[str]) -> bool:
        return all(self._records[n].state == "ready" for n in names)

    def _in_backoff(self, rec: _Record, now: float) -> bool:
        return rec.failed_at is not None and now - rec.failed_at < self.load_retry_backoff_s

    async def _ensure_locked(self, names: frozenset[str], *, retry_failed: bool) -> None:
        now = self._clock()
        for name in sorted(names):
            rec = self._records[name]
            if rec.state == "failed" and not retry_failed and self._in_backoff(rec, now):
                raise ResidencyError(f"{name} failed to load {now - rec.failed_at:.0f}s ago and is refused for "  # type: ignore[operator]
                                     f"{self.load_retry_backoff_s:.0f}s", rec.last_error)
        await self._refresh_unloading()
        plan = plan_residency(self.table, names, self.views(), eviction=self.eviction, keep=self.wanted - names)
        if not plan.feasible:
            raise ResidencyError(f"cannot make {sorted(names)} resident: {plan.reason}")
        mine = [n for n in plan.evict if self._held_by(n, asyncio.current_task())]
        if mine:
            raise ResidencyError(f"{sorted(names)} need {mine} evicted, but this task holds them (would wait for itself)")
        if plan.evict:
            log.info("making room for %s: evicting %s", sorted(names), list(plan.evict))
        for name in plan.evict:
            await self._unload_locked(name, self.drain_timeout_s)
            self._displaced.add(name)
        await self._check_gpu_room(names, plan.load)
        for name in plan.load:
            await self._load_locked(name)

    def _held_by(self, name: str, task: asyncio.Task | None) -> bool:
        return task is not None and any(holder is task for holder, _ in self._records[name].holders.values())

    def _usable(self, name: str, task: asyncio.Task | None) -> bool:
        """Ready, or draining but already held by ``task`` (a nested use: still loaded, and its
        unload waits for this task anyway)."""
        state = self._records[name].state
        return state == "ready" or (state == "draining" and self._held_by(name, task))

    async def _check_gpu_room(self, names: frozenset[str], load: tuple[str, ...]) -> None:
        """On a GPU: if NVML says the loads will not fit, evict more idle models, else warn."""
        if self._gpu is None or not load:
            return
        need = self.table.vram(load) + self.safety_margin_gb
        for _ in range(len(self._records)):
            mem = self._gpu.read()
            if mem is None or mem.free_gb >= need:
                return
            views = self.views()
            idle = sorted(
                (n for n, r in self._records.items() if r.state == "ready" and n not in names and r.in_flight == 0),
                key=lambda n: (POLICY_RANK[self.table.specs[n].policy], views[n].last_used, n),
            )
            if not idle:
                log.warning("NVML: %.1f GB free, %.1f GB wanted for %s; loading anyway", mem.free_gb, need, list(load))
                return
            log.warning("NVML: %.1f GB free, %.1f GB wanted for %s; also evicting %s", mem.free_gb, need, list(load), idle[0])
            await self._unload_locked(idle[0], None)

    async def _refresh_unloading(self) -> None:
        """Models left ``unloading`` by an unload that timed out: see whether they are gone now."""
        stale = [n for n, r in self._records.items() if r.state == "unloading"]
        if not stale:
            return
        states = await self.control.index()
        for name in stale:
            if states.get(name, "UNAVAILABLE") not in ("READY", "LOADING", "UNLOADING"):
                self._records[name].state = "unloaded"

    async def _drain(self, rec: _Record, deadline_s: float | None) -> None:
        """Wait until no request holds ``rec``; past the deadline, cancel them, then wait a grace."""
        if rec.in_flight == 0:
            return
        log.info("unloading %s: waiting for %d request(s) in flight", rec.name, rec.in_flight)
        if deadline_s is None:
            await rec.idle.wait()
            return
        try:
            await asyncio.wait_for(rec.idle.wait(), deadline_s)
            return
        except TimeoutError:
            pass
        log.warning("unloading %s: cancelling %d request(s) still in flight after %.1fs", rec.name, rec.in_flight, deadline_s)
        for _, cancel in list(rec.holders.values()):
            if cancel is None:
                continue
            try:
                result = cancel()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("cancel callback for %s failed", rec.name)
        try:
            await asyncio.wait_for(rec.idle.wait(), self.cancel_grace_s)
        except TimeoutError:
            raise ResidencyError(
                f"{rec.name}: {rec.in_flight} request(s) still in flight {self.cancel_grace_s:.0f}s after cancelling"
            ) from None

    async def _unload_locked(self, name: str, deadline_s: float | None) -> None:
        rec = self._records[name]
        rec.state = "draining"  # new requests wait (use() → ensure() → the lock)
        try:
            await self._drain(rec, deadline_s)
        except BaseException:
            rec.state = "ready"
            raise
        rec.state = "unloading"
        self._emit(ResidencyEvent("unload", name, "start"))
        started = self._clock()
        try:
            await self.control.unload(name)
            await self._wait_unloaded(name)
        except Exception as exc:
            seconds = self._clock() - started
            self._emit(ResidencyEvent("unload", name, "end", ok=False, seconds=seconds, error=str(exc)))
            raise ResidencyError(f"unloading {name} failed", exc) from exc
        seconds = self._clock() - started
        rec.state = "unloaded"
        rec.unloads += 1
        rec.last_unload_s = seconds
        rec.total_unload_s += seconds
        log.info("unloaded %s in %.2fs", name, seconds)
        self._emit(ResidencyEvent("unload", name, "end", seconds=seconds))

    async def _wait_unloaded(self, name: str) -> None:
        """Poll the repository index until ``name`` is neither ready, loading nor unloading."""
        deadline = self._clock() + self.unload_timeout_s
        while True:
            state = (await self.control.index()).get(name, "UNAVAILABLE")
            if state not in ("READY", "LOADING", "UNLOADING"):
                return
            if self._clock() >= deadline:
                raise ResidencyError(f"{name} still {state} {self.unload_timeout_s:.0f}s after unload")
            await self._sleep(self.poll_s)

    async def _load_locked(self, name: str) -> None:
        rec = self._records[name]
        spec = self.table.specs[name]
        before = self._gpu.read() if self._gpu is not None else None
        rec.state = "loading"
        self._emit(ResidencyEvent("load", name, "start"))
        started = self._clock()
        try:
            await self.control.load(name, spec.load_timeout_s)
        except asyncio.CancelledError:
            # The caller was cancelled mid-load (its job was). Left "loading", every later use()
            # saw a load in progress that nobody ran, planned nothing and looped without ever
            # awaiting: the event loop hung. Whether the server finishes the load or not, the next
            # ensure() asks for it again (a load of a loaded, unchanged model changes nothing).
            rec.state = "unloaded"
            self._emit(ResidencyEvent("load", name, "end", ok=False, seconds=self._clock() - started,
                                      error="cancelled"))
            raise
        except Exception as exc:
            seconds = self._clock() - started
            await self._forget_failed_load(name)
            rec.state = "failed"
            rec.failed_at = self._clock()
            rec.load_failures += 1
            rec.last_error = _short(str(exc))
            log.error("loading %s failed after %.1fs: %s", name, seconds, rec.last_error)
            self._emit(ResidencyEvent("load", name, "end", ok=False, seconds=seconds, error=rec.last_error))
            raise ResidencyError(f"loading {name} failed", rec.last_error) from exc
        seconds = self._clock() - started
        after = self._gpu.read() if self._gpu is not None else None
        if before is not None and after is not None:
            rec.measured_gb = max(0.0, after.used_gb - before.used_gb)
        log.info("loaded %s in %.2fs", name, seconds)
        self._count_load(rec, seconds)

    def _count_load(self, rec: _Record, seconds: float) -> None:
        """A load (or :meth:`reload`) of ``rec`` succeeded in ``seconds``: ready, a new instance."""
        rec.state = "ready"
        self._displaced.discard(rec.name)
        rec.last_used = self._clock()
        rec.loads += 1
        rec.instance += 1
        rec.last_load_s = seconds
        rec.total_load_s += seconds
        rec.failed_at = None
        rec.last_error = None
        self._emit(ResidencyEvent("load", rec.name, "end", seconds=seconds, measured_gb=rec.measured_gb))

    async def _forget_failed_load(self, name: str) -> None:
        """After a failed (or timed-out) load: unload whatever is left and wait until it is gone."""
        try:
            await self.control.unload(name)
        except Exception as exc:  # noqa: BLE001 - nothing loaded is the usual case
            log.debug("unload after failed load of %s: %s", name, exc)
        try:
            await self._wait_unloaded(name)
        except Exception as exc:  # noqa: BLE001
            log.error("%s: state unknown after a failed load: %s", name, exc)

    def _emit(self, event: ResidencyEvent) -> None:
        if self._observer is None:
            return
        try:
            self._observer(event)
        except Exception:
            log.exception("residency observer failed on %s", event)


def _short(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "GpuMemory",
    "GpuMemoryInfo",
    "ModelControl",
    "ModelReport",
    "NvmlMemory",
    "Observer",
    "ResidencyError",
    "ResidencyEvent",
    "ResidencyManager",
    "ResidencyReport",
    "looks_like_oom",
    "metrics_observer",
]

