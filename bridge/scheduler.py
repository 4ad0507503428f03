"""Which job runs next, and which models that needs loaded or evicted. Pure: no asyncio, no I/O.

Input: the waiting work, one :class:`WaitingGroup` per kind of job (the models a job of that kind
needs at once, the enqueue time of its oldest job, how many wait, whether somebody is waiting
interactively, the expected run time of one job) and a :class:`ModelView` per model (state,
requests in flight, last use). Output: a :class:`Decision` for one group, or ``None``.

Rules, in order (the time comes from an injectable clock, so a simulation can drive it):

1. A group that can never run (an unknown model, models that together exceed the budget, a model
   whose load just failed) is *rejected*, so its jobs are failed with a reason instead of waiting.
2. *Aging*: a group whose oldest job has waited at least ``aging_s`` is served first, even when
   that means a model switch. Among aged groups the order is enqueue time, so once a job has aged
   only jobs enqueued before it can start before it: nothing starves.
3. Interactive groups (chat): latency priority, resident ones first (then the cheapest switch).
4. The rest by expected cost: the job's expected run time plus the switch it needs (loading the
   missing models, plus reloading evicted models that other waiting jobs need; doubled when the
   switch must wait for requests in flight). Jobs for resident models cost no switch, so they are
   preferred and batched, and short jobs are not stuck behind long ones (until rule 2 says so).

Ties go to the oldest job, then the group key: the decision is deterministic.

Evictions (:func:`plan_residency`, shared with the residency manager) go by policy — ``on_demand``
first, then ``preferred``, ``pinned`` last — then idle before busy, then least recently used. The
plan never puts more than the budget on the card.
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


def occupied_gb(table: ModelTable, models: Mapping[str, ModelView]) -> float:
    """GPU memory the table accounts to models that hold some now."""
    return sum(table.specs[name].vram_gb for name, view in models.items() if view.state in OCCUPYING and name in table.specs)


def _eviction_key(table: ModelTable, name: str, view: ModelView, eviction: Eviction) -> tuple:
    rank = POLICY_RANK[table.specs[name].policy] if eviction == "policy" else 0
    return (rank, view.in_flight > 0, view.last_used, name)


def plan_residency(
    table: ModelTable,
    need: Iterable[str],
    models: Mapping[str, ModelView],
    *,
    budget_gb: float | None = None,
    eviction: Eviction = "policy",
) -> Plan:
    """Plan the loads and evictions that make every model of ``need`` resident within the budget.

    Models already loading or ready are not loaded again (never a reload in place). Candidates
    for eviction are ready models outside ``need``, in eviction order (see module doc); the
    fewest of them that make room are chosen.
    """
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
        key=lambda name: _eviction_key(table, name, view[name], eviction),
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
    """Chooses the next job; deterministic for a given input and clock reading."""

    table: ModelTable
    aging_s: float = 900.0
    clock: Callable[[], float] = time.monotonic
    eviction: Eviction = "policy"

    def decide(
        self,
        waiting: Sequence[WaitingGroup],
        models: Mapping[str, ModelView],
        *,
        budget_gb: float | None = None,
    ) -> Decision | None:
        """The next group to serve (its oldest job), or ``None`` when nothing can start."""
        now = self.clock()
        best: tuple | None = None
        wanted: dict[str, int] = {}
        for group in waiting:
            for name in group.models:
                wanted[name] = wanted.get(name, 0) + max(0, group.count)
        for group in sorted(waiting, key=lambda g: g.key):
            if group.count <= 0:
                continue
            waited = max(0.0, now - group.oldest)
            failed = sorted(name for name in group.models if models.get(name, ModelView()).state == "failed")
            plan = plan_residency(self.table, group.models, models, budget_gb=budget_gb, eviction=self.eviction)
            if failed or plan.permanent:
                reason = f"model(s) {failed} failed to load" if failed else plan.reason
                return Decision("reject", group.key, group.models, reason, waited)
            if not plan.feasible:
                continue
            rank = self._rank(group, plan, waited, wanted)
            if best is None or rank < best[0]:
                best = (rank, group, plan, waited)
        if best is None:
            return None
        rank, group, plan, waited = best
        return Decision(
            "run",
            group.key,
            group.models,
            _REASONS[rank[0]],
            waited,
            load=plan.load,
            evict=plan.evict,
            waits_for_drain=plan.waits_for_drain,
        )

    def _rank(self, group: WaitingGroup, plan: Plan, waited: float, wanted: Mapping[str, int]) -> tuple:
        if waited >= self.aging_s:
            return (0, group.oldest, group.key)
        switch = self.switch_cost_s(plan, wanted)
        if group.interactive:
            return (1, switch, group.oldest, group.key)
        return (2, group.est_s + switch, group.oldest, group.key)

    def switch_cost_s(self, plan: Plan, wanted: Mapping[str, int]) -> float:
        """Seconds a switch costs: loading what is missing, and reloading what is evicted that
        other waiting jobs need; a switch that must wait for requests in flight costs double."""
        specs = self.table.specs
        cost = sum(specs[name].typical_load_s for name in plan.load)
        cost += sum(specs[name].typical_load_s for name in plan.evict if wanted.get(name, 0) > 0)
        return cost * (2 if plan.waits_for_drain else 1)

    def prefetch(self, models: Mapping[str, ModelView], *, budget_gb: float | None = None) -> tuple[str, ...]:
        """Pinned, then preferred models that are not resident and fit in the free room as is.

        (Evicting idle on-demand models to bring a preferred one back was tried in the benchmark:
        it caused more swaps and slower chat, so the room must be free.)"""
        budget = self.table.budget_gb if budget_gb is None else budget_gb
        free = budget - occupied_gb(self.table, models)
        picks: list[str] = []
        order = sorted(self.table.specs.values(), key=lambda s: (-POLICY_RANK[s.policy], s.name))
        for spec in order:
            if spec.policy == "on_demand":
                continue
            state = models.get(spec.name, ModelView()).state
            if state == "unloaded" and spec.vram_gb <= free + _EPS:
                picks.append(spec.name)
                free -= spec.vram_gb
        return tuple(picks)


_REASONS = {0: "aged", 1: "interactive", 2: "cost"}
