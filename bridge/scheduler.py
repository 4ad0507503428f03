"""Which job runs next, beside what, and which models that needs loaded or evicted. Pure: no
asyncio, no I/O.

Input: the waiting work, one :class:`WaitingGroup` per kind of job (the models a job of that kind
needs at once, the enqueue time of its oldest job, how many wait, whether somebody is waiting
interactively, the expected run time of one job, the models its next stage needs), the work
already granted (:class:`Running`) and a :class:`ModelView` per model (state, requests in flight,
last use). Output: a :class:`Decision` for one group, or ``None``.

Rules, in order (the time comes from an injectable clock, so a simulation can drive it):

1. A group that can never run (an unknown model, models that together exceed the budget, a model
   whose load just failed) is *rejected*, so its jobs are failed with a reason instead of waiting.
2. *Lanes*: up to ``lanes`` generations (non-interactive grants, ``GPU_LANES``) hold the GPU at
   once. With none running anything may start; beside running ones only work that does not get in
   their way (:meth:`Scheduler._may_start`): a short job whose model is resident, beside a long
   one; or a load that will end after the running work does. Interactive work (chat) is granted
   beside them and takes no lane; while it runs no second generation starts.
3. *Aging* (hard bound): a group whose oldest job has waited at least ``aging_s`` is served
   first, even when that means a model switch. Among aged groups the order is enqueue time, so
   once a job has aged only jobs enqueued before it can start before it: nothing starves.
4. Interactive groups (chat): latency priority, resident ones first (then the cheapest switch).
5. The rest by *response ratio* (:meth:`Scheduler.response_ratio`): wait over expected cost,
   where the cost is the job's expected run time plus the switch it needs (loading the missing
   models, plus reloading evicted models that other waiting jobs need; doubled when the switch
   must wait for requests in flight). Fresh work goes cheapest first — resident before a switch
   (batching), short before long — and each job's priority grows with its wait in proportion to
   its own length, so a long job is not passed forever (before rule 3's bound).

Ties go to the oldest job, then the group key: the decision is deterministic.

Evictions (:func:`plan_residency`, shared with the residency manager): ``pinned`` last; idle
before busy (a busy model is drained first, and work whose plan needs a drain is not started beside
running work); then by policy — ``on_demand`` before ``preferred`` — where a model that known work
needs next (a waiting job, the render after an enhancement) goes after the others of its policy;
then least recently used. The plan never puts more than the budget on the card.
:meth:`Scheduler.prefetch` says which pinned or preferred model to bring back when room can be made.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from bridge.model_table import POLICY_RANK, ModelTable

ModelState = Literal["unloaded", "loading", "ready", "draining", "unloading", "failed"]
Eviction = Literal["policy", "lru"]

# States in which a model holds GPU memory (an unloading model holds it until Triton frees it).
OCCUPYING: frozenset[str] = frozenset({"loading", "ready", "draining", "unloading"})
_EPS = 1e-9


@dataclass(frozen=True)
class ModelView:
    """What the scheduler needs to know about one model."""

    state: ModelState = "unloaded"
    in_flight: int = 0
    last_used: float = float("-inf")


@dataclass(frozen=True)
class Plan:
    """Loads and evictions that make ``need`` resident, or why that is impossible now."""

    need: frozenset[str]
    load: tuple[str, ...] = ()
    evict: tuple[str, ...] = ()
    feasible: bool = True
    permanent: bool = False  # infeasible whatever the card holds (too big, unknown model)
    waits_for_drain: bool = False  # an evicted model has requests in flight
    reason: str = ""


@dataclass(frozen=True)
class WaitingGroup:
    """Queued jobs of one kind: they all need ``models`` resident at once."""

    key: str
    models: frozenset[str]
    oldest: float  # clock time the oldest job of the group was enqueued
    count: int = 1
    interactive: bool = False
    est_s: float = 0.0  # expected run time of one job (0: unknown)
    then: frozenset[str] = frozenset()  # models its next stage needs (an enhancement's render)


@dataclass(frozen=True)
class Decision:
    """Run (or reject) the oldest job of group ``key``; ``load``/``evict`` is the plan for it."""

    action: Literal["run", "reject"]
    key: str
    models: frozenset[str]
    reason: str
    waited_s: float
    load: tuple[str, ...] = ()
    evict: tuple[str, ...] = ()
    waits_for_drain: bool = False
    est_s: float = 0.0  # expected seconds from the grant to the end: run time plus switch


@dataclass(frozen=True)
class Running:
    """Work granted and not yet released: what a job that would start beside it must respect."""

    key: str
    models: frozenset[str]
    since: float  # clock time of the grant
    est_s: float = 0.0  # expected seconds from the grant to the end (0: unknown)
    interactive: bool = False
    evict: tuple[str, ...] = ()  # models its plan evicts
    then: frozenset[str] = frozenset()  # models its next stage needs

    def remaining_s(self, now: float) -> float:
        """Expected seconds still to go (0 once the estimate has passed)."""
        return max(0.0, self.est_s - (now - self.since))


def wanted_next(waiting: Iterable[WaitingGroup], running: Iterable[Running] = ()) -> frozenset[str]:
    """Models that known work needs: waiting jobs, and the next stage of waiting or running ones.
    Eviction spares them where it can (``plan_residency(keep=...)``)."""
    names: set[str] = set()
    for group in waiting:
        if group.count > 0:
            names |= group.models | group.then
    for work in running:
        names |= work.then
    return frozenset(names)


def occupied_gb(table: ModelTable, models: Mapping[str, ModelView]) -> float:
    """GPU memory the table accounts to models that hold some now."""
    return sum(table.specs[name].vram_gb for name, view in models.items() if view.state in OCCUPYING and name in table.specs)


def _eviction_key(table: ModelTable, name: str, view: ModelView, eviction: Eviction, keep: frozenset[str]) -> tuple:
    """Pinned last; idle before busy (evicting a busy model waits for its requests, with the
    residency lock held); then the policy tier (a kept model after the others of its policy);
    least recently used first. Plain LRU ignores policies and ``keep``."""
    busy = view.in_flight > 0
    if eviction != "policy":
        return (0, busy, view.last_used, name)
    rank = POLICY_RANK[table.specs[name].policy]
    pinned = rank == POLICY_RANK["pinned"]
    return (pinned, busy, rank + (2 if name in keep else 0), view.last_used, name)


def plan_residency(
    table: ModelTable,
    need: Iterable[str],
    models: Mapping[str, ModelView],
    *,
    budget_gb: float | None = None,
    eviction: Eviction = "policy",
    keep: Iterable[str] = (),
) -> Plan:
    """Plan the loads and evictions that make every model of ``need`` resident within the budget.

    Models already loading or ready are not loaded again (never a reload in place). Candidates
    for eviction are ready models outside ``need``, in eviction order (see module doc); the
    fewest of them that make room are chosen. ``keep``: models known work needs next (waiting
    jobs, a running job's next stage); they go after the others of their policy.
    """
    keep = frozenset(keep)
    need = frozenset(need)
    budget = table.budget_gb if budget_gb is None else budget_gb
    unknown = sorted(name for name in need if name not in table.specs)
    if unknown:
        return Plan(need, feasible=False, permanent=True, reason=f"unknown model(s) {unknown}")
    need_gb = table.vram(need)
    if need_gb > budget + _EPS:
        return Plan(
            need,
            feasible=False,
            permanent=True,
            reason=f"{sorted(need)} need {need_gb:g} GB together; the budget is {budget:g} GB",
        )
    view = {name: models.get(name, ModelView()) for name in table.specs}
    load = tuple(sorted(name for name in need if view[name].state not in ("ready", "loading")))
    free = budget - occupied_gb(table, view)
    required = table.vram(load)
    if required <= free + _EPS:
        return Plan(need, load=load)
    candidates = sorted(
        (name for name, v in view.items() if v.state == "ready" and name not in need),
        key=lambda name: _eviction_key(table, name, view[name], eviction, keep),
    )
    chosen: list[str] = []
    for name in candidates:
        if required <= free + _EPS:
            break
        chosen.append(name)
        free += table.specs[name].vram_gb
    if required > free + _EPS:
        held = sorted(name for name, v in view.items() if v.state in OCCUPYING and name not in candidates)
        return Plan(need, load=load, feasible=False, reason=f"cannot free {required:g} GB: held by {held}")
    # Keep any earlier (cheaper) pick that the later ones made unnecessary.
    for name in list(reversed(chosen[:-1])):
        if required <= free - table.specs[name].vram_gb + _EPS:
            chosen.remove(name)
            free -= table.specs[name].vram_gb
    evict = tuple(chosen)
    drain = any(view[name].in_flight > 0 for name in evict)
    return Plan(need, load=load, evict=evict, waits_for_drain=drain)


@dataclass
class Scheduler:
    """Chooses the next job; deterministic for a given input and clock reading.

    ``lanes`` is how many non-interactive grants may run at once (``GPU_LANES``); with 1 they run
    strictly one at a time. ``beside_ratio``: a short job starts beside running generations only
    when they are expected to need at least this many times its own expected time (its load
    included). ``stretch``: how fast a waiting job's priority grows with its wait over its
    expected cost (:meth:`response_ratio`). ``aging_s``: the hard bound (``SWAP_AGING_S``).
    """

    table: ModelTable
    aging_s: float = 900.0
    clock: Callable[[], float] = time.monotonic
    eviction: Eviction = "policy"
    lanes: int = 1
    beside_ratio: float = 2.0
    stretch: float = 1.0

    def decide(
        self,
        waiting: Sequence[WaitingGroup],
        models: Mapping[str, ModelView],
        *,
        budget_gb: float | None = None,
        running: Sequence[Running] = (),
    ) -> Decision | None:
        """The next group to serve (its oldest job), or ``None`` when nothing can start now.

        ``running`` is the work granted and not yet released; it decides whether a further
        non-interactive job may start (see :meth:`_may_start`), and no work whose plan must wait
        for requests in flight starts beside it (the drain would hold the residency lock)."""
        now = self.clock()
        blocker = self._oldest_aged(waiting, now)
        best: tuple | None = None
        wanted: dict[str, int] = {}
        for group in waiting:
            for name in group.models:
                wanted[name] = wanted.get(name, 0) + max(0, group.count)
        upcoming = wanted_next(waiting, running)
        for group in sorted(waiting, key=lambda g: g.key):
            if group.count <= 0:
                continue
            waited = max(0.0, now - group.oldest)
            failed = sorted(name for name in group.models if models.get(name, ModelView()).state == "failed")
            plan = plan_residency(self.table, group.models, models, budget_gb=budget_gb, eviction=self.eviction,
                                  keep=upcoming | group.then)
            if failed or plan.permanent:
                reason = f"model(s) {failed} failed to load" if failed else plan.reason
                return Decision("reject", group.key, group.models, reason, waited)
            if not plan.feasible or (plan.waits_for_drain and running):
                continue  # a drain beside running work: decided again when that work ends
            if not group.interactive and not self._may_start(group, plan, running, now, blocker):
                continue
            switch = self.switch_cost_s(plan, wanted)
            rank = self._rank(group, switch, waited)
            if best is None or rank < best[0]:
                best = (rank, group, plan, waited, switch)
        if best is None:
            return None
        rank, group, plan, waited, switch = best
        beside = not group.interactive and any(not r.interactive for r in running)
        return Decision(
            "run",
            group.key,
            group.models,
            "beside" if beside else _REASONS[rank[0]],
            waited,
            load=plan.load,
            evict=plan.evict,
            waits_for_drain=plan.waits_for_drain,
            est_s=group.est_s + switch,
        )

    def _rank(self, group: WaitingGroup, switch: float, waited: float) -> tuple:
        if waited >= self.aging_s:
            return (0, group.oldest, group.key)
        if group.interactive:
            return (1, switch, group.oldest, group.key)
        cost = group.est_s + switch
        return (2, -self.response_ratio(cost, waited), cost, group.oldest, group.key)

    def response_ratio(self, cost_s: float, waited_s: float) -> float:
        """Highest-response-ratio-next: ``waited / cost ** stretch``, the highest goes first.
        Fresh work ties and goes cheapest first (resident and short before a switch and long),
        but every job's priority grows with its wait in proportion to its own cost (``stretch``
        1: HRRN; below 1 long jobs catch up sooner; 0: oldest first)."""
        return waited_s / max(cost_s, _MIN_LENGTH_S) ** self.stretch

    def _oldest_aged(self, waiting: Sequence[WaitingGroup], now: float) -> float | None:
        """Enqueue time of the oldest non-interactive group past the hard aging bound: while it
        waits, no younger job starts beside running work (it would only delay the aged one)."""
        aged = [g.oldest for g in waiting if g.count > 0 and not g.interactive and now - g.oldest >= self.aging_s]
        return min(aged, default=None)

    def _may_start(
        self, group: WaitingGroup, plan: Plan, running: Sequence[Running], now: float, blocker: float | None
    ) -> bool:
        """Whether a non-interactive ``group`` may start now, given the work ``running``.

        With nothing running: yes. Otherwise it needs a free lane, and it must not pass a job
        that aged before it (aging: only older jobs pass an aged one), share a model with the
        running work (each model serves one request at a time), use or evict a model that work
        holds or is about to evict, or have a switch that waits for requests in flight. Then
        (under processor sharing a long job that waits for a short one ends when it would have
        sharing the card with it, and the short one ends sooner):

        - *short beside long*: its models are resident (no load, no eviction), no chat runs, and
          it is expected to take at most ``1/beside_ratio`` of what every running generation
          still needs (an image beside a video, not behind it);
        - *load beside the end*: it only loads models (evicting idle ones) and all running work
          is expected to end before that load does: the load, which takes no compute, overlaps
          their last seconds instead of following them;
        - beside chat only: once the chat has outrun its estimate, or when the job has aged.
        """
        if not running:
            return True
        generations = [r for r in running if not r.interactive]
        if len(generations) >= max(1, self.lanes):
            return False
        if blocker is not None and group.oldest > blocker:
            return False
        for other in running:
            if group.models & (other.models | frozenset(other.evict)) or set(plan.evict) & other.models:
                return False
        if plan.load:
            load_s = sum(self.table.specs[name].typical_load_s for name in plan.load)
            if max(r.remaining_s(now) for r in running) <= load_s:
                return True
        if not generations:  # chat only: it goes first, unless it overran or this job has aged
            return all(r.remaining_s(now) <= 0 for r in running) or now - group.oldest >= self.aging_s
        if group.est_s <= 0 or len(generations) < len(running) or (plan.evict and not plan.load):
            return False
        load_s = sum(self.table.specs[name].typical_load_s for name in plan.load)
        return (group.est_s + load_s) * self.beside_ratio <= min(r.remaining_s(now) for r in generations)

    def switch_cost_s(self, plan: Plan, wanted: Mapping[str, int]) -> float:
        """Seconds a switch costs: loading what is missing, and reloading what is evicted that
        other waiting jobs need; a switch that must wait for requests in flight costs double."""
        specs = self.table.specs
        cost = sum(specs[name].typical_load_s for name in plan.load)
        cost += sum(specs[name].typical_load_s for name in plan.evict if wanted.get(name, 0) > 0)
        return cost * (2 if plan.waits_for_drain else 1)

    def prefetch(
        self, models: Mapping[str, ModelView], *, budget_gb: float | None = None, keep: Iterable[str] = ()
    ) -> tuple[str, ...]:
        """Pinned, then preferred models that are not resident and would fit: in the free room,
        or in room freed by evicting idle on-demand models that no known work needs (``keep``).

        This brings the chat model back after an enhancement borrowed its room (the render keeps
        WAN, the enhancement's Qwen Base is idle), while the render runs: the load takes no
        compute, and the next chat does not wait for it."""
        budget = self.table.budget_gb if budget_gb is None else budget_gb
        keep = frozenset(keep)
        free = budget - occupied_gb(self.table, models)
        spare = sum(
            self.table.specs[name].vram_gb
            for name, view in models.items()
            if name in self.table.specs and view.state == "ready" and view.in_flight == 0 and name not in keep
            and self.table.specs[name].policy == "on_demand"
        )
        picks: list[str] = []
        order = sorted(self.table.specs.values(), key=lambda s: (-POLICY_RANK[s.policy], s.name))
        for spec in order:
            if spec.policy == "on_demand":
                continue
            state = models.get(spec.name, ModelView()).state
            if state == "unloaded" and spec.vram_gb <= free + spare + _EPS:
                picks.append(spec.name)
                from_free = min(max(free, 0.0), spec.vram_gb)
                free -= from_free
                spare -= spec.vram_gb - from_free
        return tuple(picks)


_REASONS = {0: "aged", 1: "interactive", 2: "cost"}
_MIN_LENGTH_S = 1.0  # a job of unknown (0) length ages as a one-second job
