"""The GPU dispatcher: grants the GPU to waiting work in the order the scheduler decides.

Jobs (``bridge/worker.py``) and chat turns (``bridge/api_chat.py``) ask it for a grant and give
it back; every rule (order, lanes, what may run beside what) is the pure ``bridge/scheduler.py``'s
(docs/ARCHITECTURE.md, "Scheduling: who gets the GPU").
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from dataclasses import dataclass, field

from bridge.residency import ResidencyManager
from bridge.scheduler import Running, Scheduler, WaitingGroup, wanted_next

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job cannot succeed; ``message`` goes to the app as ``error_message``."""

    def __init__(self, message: str, error_type: str = "generation_error") -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


@dataclass
class Waiting:
    """Work waiting for the GPU: a queued job, or an interactive request."""

    key: str
    models: frozenset[str]
    since: float
    interactive: bool = False
    est_s: float = 0.0
    then: frozenset[str] = frozenset()  # models the job's next stage needs (an enhancement's render)
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Dispatcher:
    """Grants the GPU in the order the scheduler decides; all the rules are the scheduler's.

    Up to ``scheduler.lanes`` generations (``GPU_LANES``) hold a grant at once: with one running,
    the scheduler lets a second start only when it does not get in its way (a 5 s image whose
    model is resident beside a 4 min video, not behind it; or a load that ends after the running
    work). Interactive requests (chat) are granted in scheduler order too, beside the generations,
    without taking a lane. It tells the residency manager which models known work needs next
    (evictions spare them) and brings a displaced chat model back when idle models can make room.
    """

    def __init__(self, scheduler: Scheduler, residency: ResidencyManager) -> None:
        self.scheduler = scheduler
        self.residency = residency
        self._waiting: list[Waiting] = []
        self._running: list[tuple[Waiting, Running]] = []  # granted, not yet released
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._prefetch: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self) -> None:
        for task in (self._task, self._prefetch):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

    def waiting(self) -> list[Waiting]:
        return list(self._waiting)

    def running(self) -> tuple[Running, ...]:
        """What holds a grant now, as the scheduler sees it."""
        return tuple(running for _, running in self._running)

    async def acquire(self, item: Waiting) -> None:
        """Wait until ``item`` may run; raises :class:`JobFailed` if the scheduler rejects it."""
        self._waiting.append(item)
        self._changed.set()
        if len(self._waiting) == 1:
            # Nothing else waits, so there is no choice to make: ask the scheduler now rather than
            # a loop turn later in the dispatcher task (docs/ARCHITECTURE.md, one job's path: per-job overhead).
            self._grant_all()
        try:
            await item.granted
        except BaseException:
            if item in self._waiting:
                self._waiting.remove(item)
                self._changed.set()
            elif item.granted.done() and not item.granted.cancelled() and item.granted.exception() is None:
                self.release(item)  # granted just as we were cancelled: give the slot back
            raise

    def try_acquire(self, item: Waiting) -> bool:
        """Grant ``item`` now if nothing waits and the scheduler grants it at once; else leave no
        trace and return False (a later :meth:`acquire` gets the scheduler's real answer)."""
        if self._waiting:
            return False
        self._waiting.append(item)
        self._grant_all()
        if item.granted.done():
            return item.granted.exception() is None  # a rejection is retrieved here, raised by acquire
        self._waiting.remove(item)
        return False

    def release(self, item: Waiting) -> None:
        """``item`` no longer holds the GPU. What waits next is granted now, not a loop turn later
        in the dispatcher task: its request should reach the server before the releasing job goes
        on to store its results (docs/ARCHITECTURE.md, one job's path: the idle gap between two jobs' requests)."""
        self._running = [(w, r) for w, r in self._running if w is not item]
        self._changed.set()
        if self._waiting:
            self._grant_all()

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            self._grant_all()
            self._bring_back()

    def _bring_back(self) -> None:
        """Reload a pinned or preferred model that had to make room (the residency manager says
        which did, the scheduler whether idle, unneeded models can make room again), one at a
        time, in the background."""
        if self._prefetch is not None and not self._prefetch.done():
            return
        displaced = self.residency.displaced
        if not displaced:
            return
        picks = [name for name in self.scheduler.prefetch(self.residency.views(), budget_gb=self.residency.budget_gb,
                                                          keep=self.residency.wanted) if name in displaced]
        if picks:
            self._prefetch = asyncio.create_task(self._load_back(picks[0]), name=f"prefetch:{picks[0]}")

    async def _load_back(self, name: str) -> None:
        try:
            loaded = await self.residency.prefetch(name)
        except Exception as exc:  # noqa: BLE001 - a failed background load only costs the next request a wait
            log.warning("bringing %s back failed: %s", name, exc)
            return
        if loaded:  # the card changed: waiting work may fit now (a refusal changed nothing: no retry loop)
            self._changed.set()

    def _grant_all(self) -> None:
        while self._waiting:
            groups = list(_groups(self._waiting).values())
            self.residency.wanted = wanted_next(groups, self.running())
            decision = self.scheduler.decide(groups, self.residency.views(), budget_gb=self.residency.budget_gb,
                                             running=self.running())
            if decision is None:
                return
            members = sorted((w for w in self._waiting if w.key == decision.key), key=lambda w: w.since)
            if decision.action == "reject":
                for item in members:
                    self._waiting.remove(item)
                    if not item.granted.done():
                        item.granted.set_exception(JobFailed(f"cannot run now: {decision.reason}", "model_unavailable"))
                continue
            item = members[0]
            self._waiting.remove(item)
            if item.granted.done():  # cancelled while waiting: nothing to grant, nothing to hold
                continue
            item.granted.set_result(decision)
            self._running.append((item, Running(item.key, item.models, self.scheduler.clock(), decision.est_s,
                                                item.interactive, decision.evict, item.then)))
        self.residency.wanted = wanted_next((), self.running())


def _groups(items: list[Waiting]) -> dict[str, WaitingGroup]:
    groups: dict[str, WaitingGroup] = {}
    for item in items:
        group = groups.get(item.key)
        if group is None:
            groups[item.key] = WaitingGroup(item.key, item.models, item.since, 1, item.interactive, item.est_s,
                                            item.then)
        else:
            groups[item.key] = WaitingGroup(group.key, group.models, min(group.oldest, item.since),
                                            group.count + 1, group.interactive or item.interactive, group.est_s,
                                            group.then | item.then)
    return groups
