"""Discrete-event simulation of the GPU worker's scheduling: the real dispatcher, scheduler and
residency code against a simulated Triton, a simulated GPU and a simulated clock, beside a
FIFO-with-LRU baseline.

    .venv/bin/python bench/schedule.py --seed 1 --jobs 3000 --loads 0.3,0.5,0.7,0.85

How it works. The simulation runs on an asyncio event loop whose clock is virtual: when nothing is
ready to run, the loop jumps to the next timer instead of sleeping. So ``bridge.dispatcher``'s
``Dispatcher`` (grants, lanes, bringing models back), ``bridge.scheduler``'s ``Scheduler`` and
``bridge.residency``'s ``ResidencyManager`` (its lock, its drain waits, its polling of the
repository index) run unchanged, thousands of simulated hours in seconds, deterministically for a
seed. Each job does what ``bridge/generation.py`` does: per stage (``bridge.model_table.job_stages``:
an enhanced WAN job is two, Qwen Base for the enhancement then WAN for the render) it waits for
the dispatcher's grant, holds its models resident (``residency.use``: loads and evictions happen
there), computes, and releases the grant.

The simulated Triton (``SimControl``) takes the old system's load times (SDXL ~8 s, Qwen ~10 s,
WAN ~25 s), frees an unloaded model's memory only 1.7 s after the unload call returns (as the real
server does), and counts every moment the memory on the card exceeds the budget (a *budget
violation*).

The simulated GPU (``SimGpu``) is honest about contention: *processor sharing* — with k requests
computing at once, each progresses at 1/k speed, so running work side by side gives no free
throughput, it only changes who finishes when. That holds for every kind of work, chat beside a
generation included, for the scheduler and the baseline alike. Each model serves one request at a
time (one Triton instance), later ones queue at the model. Loads take no compute share (they move
weights). Job times are the old system's, for a job alone on the card: SDXL 4-8 s, chat 5-15 s,
enhancement 1-3 s, WAN 25-240 s (image jobs short, video jobs long). Arrivals are Poisson; the load
is the GPU utilisation the jobs alone would cause (model loads come on top).

The scheduler runs with ``GPU_LANES`` (``--lanes``, default as in the settings) generations at
once, chat beside them. Baseline: FIFO (the oldest job first, whatever the model; the head of the
line waits, nobody passes it) with least-recently-used eviction and no policies, one generation at
a time with chat beside it, nothing brought back ahead of need: the old worker's behaviour with a
working memory manager. Both start with SDXL and Qwen Instruct loaded.

Printed per load: mean and p95 latency (enqueue to end) per job type and overall, model loads
(swaps), the longest wait (enqueue to first compute), budget violations, peak GB on the card, lost
jobs, grants beside a running generation, and how much of the time the GPU computed and was shared.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from bridge.model_table import ModelTable, Stage, build_table, is_interactive, job_stages
from bridge.residency import ResidencyManager
from bridge.scheduler import Decision, ModelView, Running, Scheduler, WaitingGroup, plan_residency
from bridge.settings import Settings
from bridge.dispatcher import Dispatcher, JobFailed, Waiting

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
DEFAULT_AGING_S = Settings.model_fields["swap_aging_s"].default
DEFAULT_LANES = Settings.model_fields["gpu_lanes"].default


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


# ------------------------------------------------------------------------------ simulated GPU


class _Compute:
    __slots__ = ("remaining", "done")

    def __init__(self, remaining: float, done: asyncio.Future) -> None:
        self.remaining = remaining
        self.done = done


class SimGpu:
    """The card's compute under processor sharing: with k requests computing at once, each one
    progresses at 1/k speed (no free throughput). Each model serves one request at a time (one
    Triton instance per model), later ones queue at the model in arrival order. Loads and unloads
    take no compute share (they move weights; the simulated Triton times them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._active: list[_Compute] = []
        self._last = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._instances: dict[str, asyncio.Lock] = {}
        self.busy_s = 0.0  # time with at least one request computing
        self.shared_s = 0.0  # time with two or more
        self.peak = 0

    async def run(self, model: str, work_s: float, on_start: Callable[[], None] | None = None) -> None:
        """Compute ``work_s`` seconds of ``model``'s work (seconds it would take alone on the card)."""
        async with self._instances.setdefault(model, asyncio.Lock()):
            if on_start is not None:
                on_start()
            self._advance()
            entry = _Compute(work_s, self.loop.create_future())
            self._active.append(entry)
            self.peak = max(self.peak, len(self._active))
            self._schedule()
            try:
                await entry.done
            finally:
                if entry in self._active:  # cancelled before it finished
                    self._advance()
                    self._active.remove(entry)
                    self._schedule()

    def _advance(self) -> None:
        now = self.loop.time()
        elapsed, k = now - self._last, len(self._active)
        if k:
            for entry in self._active:
                entry.remaining -= elapsed / k
            self.busy_s += elapsed
            if k > 1:
                self.shared_s += elapsed
        self._last = now

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._active:
            first = min(entry.remaining for entry in self._active)
            self._timer = self.loop.call_at(self.loop.time() + max(0.0, first) * len(self._active), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._advance()
        for entry in [e for e in self._active if e.remaining <= 1e-6]:
            self._active.remove(entry)
            if not entry.done.done():
                entry.done.set_result(None)
        self._schedule()


# ------------------------------------------------------------------------------ trace


@dataclass
class SimJob:
    id: int
    job_type: str
    category: str
    arrival: float
    run_s: float
    stages: tuple[Stage, ...]  # one GPU grant each (bridge.model_table.job_stages)
    phases: tuple[float, ...]  # run time of each stage alone on the card: (job,) or (enhancement, render)
    started: float | None = None
    finished: float | None = None
    rejected: str | None = None
    marks: list[tuple[float, float, float]] = field(default_factory=list)  # per stage: granted, computing, done


def make_trace(
    seed: int, jobs: int, load: float, mix: Mapping[str, float], enhanced_share: float, table: ModelTable | None = None
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
        stages = job_stages(job_type)
        assert len(stages) == len(durations), (job_type, stages)
        trace.append(SimJob(i, job_type, category, now, sum(durations), stages, durations))
    return trace


def _mean_service(mix: Mapping[str, float], enhanced_share: float) -> float:
    total = sum(mix.values())
    sdxl = statistics.mean(statistics.mean(r) for r in SDXL_TYPES.values())
    wan = statistics.mean(statistics.mean(r) for r in WAN_TYPES.values()) + enhanced_share * statistics.mean(ENHANCE_S)
    return (mix.get("sdxl", 0) * sdxl + mix.get("chat", 0) * statistics.mean(CHAT_S) + mix.get("wan", 0) * wan) / total


# ------------------------------------------------------------------------------ policies


@dataclass
class FifoLru:
    """The baseline: the oldest waiting job first, whatever the model (the head of the line waits,
    nobody passes it); least-recently-used eviction, no policies; one generation at a time, chat
    beside it. The dispatcher asks it as it asks the scheduler."""

    table: ModelTable
    clock: Callable[[], float]

    def decide(
        self,
        waiting: Sequence[WaitingGroup],
        models: Mapping[str, ModelView],
        *,
        budget_gb: float | None = None,
        running: Sequence[Running] = (),
    ) -> Decision | None:
        generating = any(not r.interactive for r in running)
        for group in sorted(waiting, key=lambda g: (g.oldest, g.key)):
            if generating and not group.interactive:
                continue
            plan = plan_residency(self.table, group.models, models, budget_gb=budget_gb, eviction="lru")
            if plan.permanent:
                return Decision("reject", group.key, group.models, plan.reason, 0.0)
            if plan.feasible:
                return Decision("run", group.key, group.models, "fifo", 0.0, load=plan.load, evict=plan.evict,
                                waits_for_drain=plan.waits_for_drain, est_s=group.est_s)
            return None
        return None

    def prefetch(self, models: Mapping[str, ModelView], **_: object) -> tuple[str, ...]:
        return ()  # no policies: nothing is brought back


class _Counting:
    """Counts the reasons of the decisions the dispatcher acts on."""

    def __init__(self, inner: Scheduler | FifoLru) -> None:
        self.inner = inner
        self.clock = inner.clock
        self.reasons: dict[str, int] = {}
        self.prefetch = inner.prefetch

    def decide(self, *args, **kwargs) -> Decision | None:
        decision = self.inner.decide(*args, **kwargs)
        if decision is not None:
            self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        return decision


@dataclass
class Outcome:
    jobs: list[SimJob]
    loads: int
    unloads: int
    violations: int
    peak_gb: float
    decisions: dict[str, int] = field(default_factory=dict)
    gpu_busy_s: float = 0.0
    gpu_shared_s: float = 0.0
    span_s: float = 0.0


async def _simulate(
    trace: list[SimJob], table: ModelTable, policy: str, aging_s: float, lanes: int, knobs: Mapping[str, float]
) -> Outcome:
    loop = asyncio.get_running_loop()
    control = SimControl(table, table.budget_gb)
    baseline = policy == "fifo"
    residency = ResidencyManager(control, table, clock=loop.time, gpu=None, eviction="lru" if baseline else "policy")
    chooser = FifoLru(table, loop.time) if baseline else Scheduler(
        table, aging_s=aging_s, clock=loop.time, lanes=lanes, **knobs)
    counting = _Counting(chooser)
    dispatcher = Dispatcher(counting, residency)  # type: ignore[arg-type] - the baseline is duck-typed
    gpu = SimGpu(loop)
    # Both start as the old system did: SDXL and Qwen Instruct loaded.
    await residency.ensure({"sdxl"})
    await residency.ensure({"qwen_instruct"})
    start_loads, start_unloads = control.loads, control.unloads
    offset = loop.time()
    for job in trace:  # shifted and back (monotonic rounding keeps started >= arrival exact)
        job.arrival += offset
    dispatcher.start()

    async def run_job(job: SimJob) -> None:
        """As bridge/generation.py runs a job: per stage, the dispatcher's grant, then the models held
        resident (residency.use: loads and evictions happen here) while the model computes."""
        await asyncio.sleep(job.arrival - loop.time())
        for stage, work_s in zip(job.stages, job.phases):
            item = Waiting(stage.key, stage.models, job.arrival, is_interactive(job.job_type), stage.est_s, stage.then)
            try:
                await dispatcher.acquire(item)
            except JobFailed as exc:
                job.rejected = exc.message
                break
            granted, computing = loop.time(), [math.nan]
            try:
                async with residency.use(*sorted(stage.models)):
                    (model,) = stage.models
                    await gpu.run(model, work_s, on_start=lambda: _mark_started(job, computing, loop.time()))
            finally:
                dispatcher.release(item)
            job.marks.append((granted, computing[0], loop.time()))
        job.finished = loop.time()

    await asyncio.gather(*(run_job(job) for job in trace))
    await dispatcher.stop()
    for job in trace:
        job.arrival -= offset
        job.started = None if job.started is None else job.started - offset
        job.finished = None if job.finished is None else job.finished - offset
        job.marks = [(g - offset, c - offset, d - offset) for g, c, d in job.marks]
    return Outcome(trace, control.loads - start_loads, control.unloads - start_unloads, control.violations,
                   control.peak_gb, counting.reasons, gpu.busy_s, gpu.shared_s, loop.time() - offset)


def _mark_started(job: SimJob, computing: list[float], now: float) -> None:
    computing[0] = now
    if job.started is None:
        job.started = now


def simulate(
    trace: list[SimJob],
    table: ModelTable,
    policy: str,
    aging_s: float = DEFAULT_AGING_S,
    lanes: int = DEFAULT_LANES,
    **knobs: float,
) -> Outcome:
    """Run one policy (``scheduler`` or ``fifo``) over a copy of ``trace`` on a fresh virtual-time
    loop. ``lanes`` is the scheduler's GPU_LANES; ``knobs`` set other Scheduler fields
    (``beside_ratio``, ``stretch``) for what-if runs."""
    copies = [SimJob(j.id, j.job_type, j.category, j.arrival, j.run_s, j.stages, j.phases) for j in trace]
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(_simulate(copies, table, policy, aging_s, lanes, knobs))
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
    stats["beside"] = outcome.decisions.get("beside", 0)
    span = outcome.span_s or math.nan
    stats["gpu_busy_pct"] = 100 * outcome.gpu_busy_s / span
    stats["gpu_shared_pct"] = 100 * outcome.gpu_shared_s / span
    stats["makespan"] = outcome.span_s
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
             ("budget violations", "violations"), ("peak GB on card", "peak_gb"), ("lost jobs", "lost"),
             ("grants beside a generation", "beside"), ("GPU computing %", "gpu_busy_pct"),
             ("GPU shared by 2+ %", "gpu_shared_pct"), ("makespan", "makespan")]
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
    parser.add_argument("--aging", type=float, default=DEFAULT_AGING_S, help="SWAP_AGING_S: the hard aging bound (s)")
    parser.add_argument(
        "--lanes", type=int, default=DEFAULT_LANES,
        help="GPU_LANES of the scheduler: generations at once (chat beside either way); the baseline always runs one",
    )
    parser.add_argument("--beside-ratio", type=float, default=None, help="what-if: Scheduler.beside_ratio (default 2)")
    parser.add_argument("--stretch", type=float, default=None, help="what-if: Scheduler.stretch (default 1: HRRN)")
    args = parser.parse_args(argv)
    knobs = {k: v for k, v in (("beside_ratio", args.beside_ratio), ("stretch", args.stretch)) if v is not None}
    logging.basicConfig(level=logging.WARNING)
    table = build_table(args.model_table, budget_gb=args.budget)
    results = []
    for load in (float(x) for x in args.loads.split(",")):
        trace = make_trace(args.seed, args.jobs, load, args.mix, args.enhanced_share, table)
        ours = summarize(simulate(trace, table, "scheduler", args.aging, args.lanes, **knobs))
        base = summarize(simulate(trace, table, "fifo"))
        results.append((load, ours, base))
    title = (f"{args.jobs} jobs/trace, seed {args.seed}, mix {args.mix}, enhanced {args.enhanced_share:.0%}, "
             f"budget {args.budget:g} GB{', table ' + json.dumps(args.model_table) if args.model_table else ''}, aging {args.aging:g}s, GPU_LANES {args.lanes}{' ' + json.dumps(knobs) if knobs else ''} (latencies in s)")
    render(results, Console(width=110), title)
    bad = [load for load, ours, _ in results if ours["violations"] or ours["lost"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
