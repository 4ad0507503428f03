"""Discrete-event simulation of the GPU worker's scheduling: the real scheduler and residency code
against a simulated Triton and a simulated clock, beside a FIFO-with-LRU baseline.

    .venv/bin/python bench/schedule.py --seed 1 --jobs 3000 --loads 0.5,0.7,0.85

How it works. The simulation runs on an asyncio event loop whose clock is virtual: when nothing is
ready to run, the loop jumps to the next timer instead of sleeping. So ``bridge.residency``'s
``ResidencyManager`` (its lock, its drain waits, its polling of the repository index) and
``bridge.scheduler``'s ``Scheduler`` run unchanged, thousands of simulated hours in seconds, and
deterministically for a seed. The simulated Triton (``SimControl``) takes the old system's load
times (SDXL ~8 s, Qwen ~10 s, WAN ~25 s), frees an unloaded model's memory only 1.7 s after the
unload call returns (as the real server does), and counts every moment the memory on the card
exceeds the budget (a *budget violation*).

Lanes: by default one generation job (SDXL or WAN) runs at a time while chat runs beside it
(``--lanes 2``, as ``bridge/worker.py``'s dispatcher grants work; GPU contention between the two
is not modelled); ``--lanes 1`` runs one job of any kind at a time. An enhanced WAN job holds Qwen
Base and WAN for the enhancement, then lets Qwen Base go while WAN renders. Job times (old
system): SDXL 4-8 s, chat 5-15 s, enhancement 1-3 s, WAN 25-240 s (image jobs short, video jobs
long). Arrivals are Poisson; the load is the GPU utilisation the generation jobs and chat alone
would cause (model loads come on top).

Baseline: FIFO (the oldest job first, whatever the model) with least-recently-used eviction and
no policies: the old worker's behaviour with a working memory manager.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import selectors
import statistics
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from bridge.model_table import (
    ModelTable,
    build_table,
    is_interactive,
    job_cost_s,
    job_steps,
)
from bridge.residency import ResidencyManager
from bridge.scheduler import (
    Decision,
    ModelView,
    Scheduler,
    WaitingGroup,
    plan_residency,
)

UNLOAD_LAG_S = 1.7
LOAD_S = {"sdxl": 8.0, "qwen_instruct": 10.0, "qwen_base": 10.0, "wan": 25.0}
# Job types with their run-time ranges (seconds) on the production GPU.
SDXL_TYPES = {"sdxl_image_fast": (4.0, 6.0), "sdxl_image_high": (6.0, 8.0)}
WAN_TYPES = {
    "image_fast": (25.0, 40.0),
    "image_high": (40.0, 70.0),
    "video_fast": (90.0, 150.0),
    "video_high": (160.0, 240.0),
}
ENHANCED = {"image_fast": "image7b_fast_enhanced", "image_high": "image7b_high_enhanced",
            "video_fast": "video7b_fast_enhanced", "video_high": "video7b_high_enhanced"}
CHAT_S = (5.0, 15.0)
ENHANCE_S = (1.0, 3.0)
CATEGORIES = ("sdxl", "chat", "wan", "wan_enhanced")


# ------------------------------------------------------------------------------ virtual time


class _AdvancingSelector(selectors.SelectSelector):
    """Polls real file descriptors without blocking; a wait moves the loop's virtual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None):  # type: ignore[override]
        events = super().select(0)
        if events:
            return events
        if timeout is None:
            raise RuntimeError("simulation deadlock: every task waits and no timer is set")
        assert self.loop is not None
        self.loop.now += max(0.0, timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is simulated: sleeping costs no real time."""

    def __init__(self) -> None:
        selector = _AdvancingSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


# ------------------------------------------------------------------------------ simulated Triton


class SimControl:
    """A simulated Triton model control: load times, delayed memory release, budget checks."""

    def __init__(self, table: ModelTable, budget_gb: float, load_s: Mapping[str, float] = LOAD_S) -> None:
        self.table = table
        self.budget_gb = budget_gb
        self.load_s = dict(load_s)
        self.states: dict[str, str] = {name: "UNAVAILABLE" for name in table.specs}
        self.violations = 0
        self.peak_gb = 0.0
        self.loads = 0
        self.unloads = 0
        self.log: list[tuple[float, str, str]] = []

    def _on_card_gb(self) -> float:
        return sum(self.table.specs[n].vram_gb for n, s in self.states.items() if s in ("LOADING", "READY", "UNLOADING"))

    def _check(self) -> None:
        on_card = self._on_card_gb()
        self.peak_gb = max(self.peak_gb, on_card)
        if on_card > self.budget_gb + 1e-9:
            self.violations += 1

    async def load(self, name: str, timeout_s: float | None = None) -> None:
        if self.states[name] != "UNAVAILABLE":
            raise RuntimeError(f"load of {name} while {self.states[name]} (a reload in place)")
        loop = asyncio.get_running_loop()
        self.states[name] = "LOADING"
        self.log.append((loop.time(), "load", name))
        self.loads += 1
        self._check()
        await asyncio.sleep(self.load_s[name])
        self.states[name] = "READY"

    async def unload(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        self.states[name] = "UNLOADING"
        self.log.append((loop.time(), "unload", name))
        self.unloads += 1
        loop.call_later(UNLOAD_LAG_S, self._freed, name)

    def _freed(self, name: str) -> None:
        if self.states[name] == "UNLOADING":
            self.states[name] = "UNAVAILABLE"

    async def index(self) -> dict[str, str]:
        return dict(self.states)


# ------------------------------------------------------------------------------ trace


@dataclass
class SimJob:
    id: int
    job_type: str
    category: str
    arrival: float
    run_s: float
    steps: tuple[frozenset[str], ...]  # models needed together, step by step
    phases: tuple[float, ...]  # run time of each phase: (job,) or (enhancement, render)
    step: int = 0
    started: float | None = None
    finished: float | None = None
    rejected: str | None = None


def make_trace(
    seed: int, jobs: int, load: float, mix: Mapping[str, float], enhanced_share: float, table: ModelTable
) -> list[SimJob]:
    """Poisson arrivals at GPU utilisation ``load`` with job types drawn from ``mix``."""
    rng = random.Random(seed)
    mean_s = _mean_service(mix, enhanced_share)
    rate = load / mean_s
    kinds, weights = zip(*mix.items())
    trace, now = [], 0.0
    for i in range(jobs):
        now += rng.expovariate(rate)
        kind = rng.choices(kinds, weights)[0]
        if kind == "sdxl":
            job_type = rng.choice(sorted(SDXL_TYPES))
            durations = (rng.uniform(*SDXL_TYPES[job_type]),)
            category = "sdxl"
        elif kind == "chat":
            job_type, durations, category = "chat", (rng.uniform(*CHAT_S),), "chat"
        else:
            wan_type = rng.choice(sorted(WAN_TYPES))
            wan_s = rng.uniform(*WAN_TYPES[wan_type])
            if rng.random() < enhanced_share:
                job_type, category = ENHANCED[wan_type], "wan_enhanced"
                durations = (rng.uniform(*ENHANCE_S), wan_s)
            else:
                job_type, durations, category = wan_type, (wan_s,), "wan"
        steps = job_steps(job_type, table)
        trace.append(SimJob(i, job_type, category, now, sum(durations), steps, durations))
    return trace


def _mean_service(mix: Mapping[str, float], enhanced_share: float) -> float:
    total = sum(mix.values())
    sdxl = statistics.mean(statistics.mean(r) for r in SDXL_TYPES.values())
    wan = statistics.mean(statistics.mean(r) for r in WAN_TYPES.values()) + enhanced_share * statistics.mean(ENHANCE_S)
    return (mix.get("sdxl", 0) * sdxl + mix.get("chat", 0) * statistics.mean(CHAT_S) + mix.get("wan", 0) * wan) / total


# ------------------------------------------------------------------------------ policies


def fifo_lru_decide(table: ModelTable) -> Callable[[Sequence[WaitingGroup], Mapping[str, ModelView]], Decision | None]:
    """The baseline: the oldest waiting job first; evict the least recently used models."""

    def decide(waiting: Sequence[WaitingGroup], models: Mapping[str, ModelView]) -> Decision | None:
        for group in sorted(waiting, key=lambda g: (g.oldest, g.key)):
            plan = plan_residency(table, group.models, models, eviction="lru")
            if plan.permanent:
                return Decision("reject", group.key, group.models, plan.reason, 0.0)
            if plan.feasible:
                return Decision("run", group.key, group.models, "fifo", 0.0, load=plan.load, evict=plan.evict)
            return None  # FIFO: the head of the line waits, nobody passes it
        return None

    return decide


@dataclass
class Outcome:
    jobs: list[SimJob]
    loads: int
    unloads: int
    violations: int
    peak_gb: float
    decisions: dict[str, int] = field(default_factory=dict)


async def _simulate(trace: list[SimJob], table: ModelTable, policy: str, aging_s: float, lanes: int) -> Outcome:
    loop = asyncio.get_running_loop()
    control = SimControl(table, table.budget_gb)
    baseline = policy == "fifo"
    residency = ResidencyManager(control, table, clock=loop.time, gpu=None, eviction="lru" if baseline else "policy")
    scheduler = Scheduler(table, aging_s=aging_s, clock=loop.time)
    decide = fifo_lru_decide(table) if baseline else scheduler.decide
    # Both start as the old system did: SDXL and Qwen Instruct loaded.
    await residency.ensure({"sdxl"})
    await residency.ensure({"qwen_instruct"})
    start_loads, start_unloads = control.loads, control.unloads
    offset = loop.time()
    for job in trace:
        job.arrival += offset
    queues: dict[str, deque[SimJob]] = {}
    wake = asyncio.Event()
    decisions: dict[str, int] = {}
    busy = {"gpu": False, "chat": False}
    finished: list[SimJob] = []
    tasks: set[asyncio.Task] = set()

    def lane_of(job: SimJob) -> str:
        return "chat" if lanes == 2 and is_interactive(job.job_type) else "gpu"

    async def arrivals() -> None:
        for job in trace:
            await asyncio.sleep(max(0.0, job.arrival - loop.time()))
            _enqueue(queues, job)
            wake.set()

    async def run(job: SimJob, lane: str) -> None:
        models = job.steps[job.step]
        if len(job.phases) == 2 and len(job.steps) == 1:
            # Enhancement and render in one step: both models resident for the enhancement;
            # Qwen Base is let go (evictable) while WAN renders.
            both = residency.use(*models)
            await both.__aenter__()
            job.started = loop.time()
            await asyncio.sleep(job.phases[0])
            render = residency.use("wan")
            await render.__aenter__()
            await both.__aexit__(None, None, None)
            await asyncio.sleep(job.phases[1])
            await render.__aexit__(None, None, None)
        else:
            async with residency.use(*models):
                if job.started is None:
                    job.started = loop.time()
                await asyncio.sleep(job.phases[job.step])
        job.step += 1
        if job.step < len(job.steps):
            _enqueue(queues, job)
        else:
            job.finished = loop.time()
            finished.append(job)
        busy[lane] = False
        wake.set()

    feeder = asyncio.ensure_future(arrivals())
    while len(finished) < len(trace):
        waiting = [_group(key, q) for key, q in sorted(queues.items()) if q and not busy[lane_of(q[0])]]
        decision = decide(waiting, residency.views()) if waiting else None
        if decision is None:
            idle = not any(busy.values()) and not any(queues.values())
            prefetch = scheduler.prefetch(residency.views()) if idle and not baseline else ()
            if prefetch:
                await residency.ensure({prefetch[0]})
                continue
            wake.clear()
            await wake.wait()
            continue
        decisions[decision.reason] = decisions.get(decision.reason, 0) + 1
        job = queues[decision.key].popleft()
        if decision.action == "reject":
            job.rejected, job.finished = decision.reason, loop.time()
            finished.append(job)
            continue
        lane = lane_of(job)
        busy[lane] = True
        task = asyncio.ensure_future(run(job, lane))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await feeder
    for job in trace:
        job.arrival -= offset
        job.started = None if job.started is None else job.started - offset
        job.finished = None if job.finished is None else job.finished - offset
    return Outcome(trace, control.loads - start_loads, control.unloads - start_unloads,
                   control.violations, control.peak_gb, decisions)


def _enqueue(queues: dict[str, deque[SimJob]], job: SimJob) -> None:
    key = job.job_type if job.step == 0 else f"{job.job_type}#{job.step}"
    queue = queues.setdefault(key, deque())
    queue.append(job)
    if len(queue) > 1 and queue[-2].arrival > job.arrival:  # a later step keeps its job's age
        queues[key] = deque(sorted(queue, key=lambda j: j.arrival))


def _group(key: str, queue: deque[SimJob]) -> WaitingGroup:
    head = queue[0]
    return WaitingGroup(
        key=key,
        models=head.steps[head.step],
        oldest=head.arrival,
        count=len(queue),
        interactive=is_interactive(head.job_type),
        est_s=job_cost_s(head.job_type),
    )


def simulate(
    trace: list[SimJob],
    table: ModelTable,
    policy: str,
    aging_s: float = 900.0,
    lanes: int = 2,
) -> Outcome:
    """Run one policy over a copy of ``trace`` on a fresh virtual-time loop."""
    copies = [SimJob(j.id, j.job_type, j.category, j.arrival, j.run_s, j.steps, j.phases) for j in trace]
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(_simulate(copies, table, policy, aging_s, lanes))
    finally:
        loop.close()


# ------------------------------------------------------------------------------ report


def _p95(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def summarize(outcome: Outcome) -> dict[str, float]:
    """Mean and p95 latency per category and overall, swaps, longest wait, violations, losses."""
    stats: dict[str, float] = {}
    finished = [j for j in outcome.jobs if j.finished is not None and j.rejected is None]
    for category in (*CATEGORIES, "all"):
        lat = [j.finished - j.arrival for j in finished if category in ("all", j.category)]  # type: ignore[operator]
        stats[f"{category}_mean"] = statistics.mean(lat) if lat else math.nan
        stats[f"{category}_p95"] = _p95(lat)
    stats["swaps"] = outcome.loads
    stats["longest_wait"] = max((j.started - j.arrival for j in finished), default=0.0)  # type: ignore[operator]
    stats["violations"] = outcome.violations
    stats["peak_gb"] = outcome.peak_gb
    stats["lost"] = sum(1 for j in outcome.jobs if j.finished is None)
    stats["rejected"] = sum(1 for j in outcome.jobs if j.rejected)
    return stats


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def render(results: list[tuple[float, dict[str, float], dict[str, float]]], console: Console, title: str) -> None:
    table = Table(title=title)
    table.add_column("load")
    table.add_column("metric")
    table.add_column("scheduler", justify="right")
    table.add_column("FIFO+LRU", justify="right")
    table.add_column("change", justify="right")
    rows = [(f"{c} {m}", f"{c}_{m}") for c in (*CATEGORIES, "all") for m in ("mean", "p95")]
    rows += [("model loads (swaps)", "swaps"), ("longest wait", "longest_wait"),
             ("budget violations", "violations"), ("peak GB on card", "peak_gb"), ("lost jobs", "lost")]
    for load, ours, base in results:
        for i, (label, key) in enumerate(rows):
            change = ""
            if base[key] and not math.isnan(base[key]) and not math.isnan(ours[key]):
                change = f"{100 * (ours[key] - base[key]) / base[key]:+.0f}%"
            table.add_row(f"{load:.2f}" if i == 0 else "", label, _fmt(ours[key]), _fmt(base[key]), change)
        table.add_section()
    console.print(table)


def _parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name.strip() not in ("sdxl", "chat", "wan"):
            raise argparse.ArgumentTypeError(f"unknown job kind {name!r} (sdxl, chat, wan)")
        mix[name.strip()] = float(share)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per trace")
    parser.add_argument("--loads", default="0.5,0.7,0.85", help="GPU utilisations to simulate")
    parser.add_argument("--mix", type=_parse_mix, default=_parse_mix("sdxl=0.6,chat=0.25,wan=0.15"))
    parser.add_argument("--enhanced-share", type=float, default=0.5, help="share of WAN jobs that are enhanced")
    parser.add_argument("--budget", type=float, default=47.0, help="VRAM budget (GB)")
    parser.add_argument("--model-table", type=json.loads, default={}, help='overrides, as MODEL_TABLE: {"wan": {"vram_gb": 20}}')
    parser.add_argument("--aging", type=float, default=900.0, help="swap aging bound (s)")
    parser.add_argument(
        "--lanes", type=int, choices=(1, 2), default=2,
        help="2: chat runs beside the one generation job (as bridge/worker.py grants it); 1: one job at a time",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    table = build_table(args.model_table, budget_gb=args.budget)
    results = []
    for load in (float(x) for x in args.loads.split(",")):
        trace = make_trace(args.seed, args.jobs, load, args.mix, args.enhanced_share, table)
        ours = summarize(simulate(trace, table, "scheduler", args.aging, args.lanes))
        base = summarize(simulate(trace, table, "fifo", lanes=args.lanes))
        results.append((load, ours, base))
    title = (f"{args.jobs} jobs/trace, seed {args.seed}, mix {args.mix}, enhanced {args.enhanced_share:.0%}, "
             f"budget {args.budget:g} GB{', table ' + json.dumps(args.model_table) if args.model_table else ''}, aging {args.aging:g}s, {args.lanes} lane(s) (latencies in s)")
    render(results, Console(width=110), title)
    bad = [load for load, ours, _ in results if ours["violations"] or ours["lost"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
