"""The pure parts: model table, residency planning and the scheduler (property-based included),
plus the benchmark's simulation running the real residency manager under a virtual clock."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.model_table import (
    DEFAULT_SPECS,
    ModelSpec,
    ModelTable,
    build_table,
    effective_budget,
    job_models,
    job_steps,
    parse_overrides,
    table_from_settings,
)
from bridge.scheduler import (
    ModelView,
    Scheduler,
    WaitingGroup,
    occupied_gb,
    plan_residency,
)
from bridge.settings import SettingsError, load_settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import schedule as bench


def _table(budget: float = 2.0, **policies: str) -> ModelTable:
    """Four 1 GB models; policies default as in production."""
    specs = {
        name: ModelSpec(name=name, vram_gb=1.0, policy=policies.get(name, DEFAULT_SPECS[name].policy), typical_load_s=5)
        for name in ("sdxl", "wan", "qwen_instruct", "qwen_base")
    }
    return ModelTable(specs=specs, budget_gb=budget)


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------ model table


def test_default_table_matches_the_memory_plan() -> None:
    table = build_table()
    assert table.budget_gb == 47.0
    assert {n: (s.vram_gb, s.policy) for n, s in table.specs.items()} == {
        "sdxl": (10.0, "pinned"),
        "qwen_instruct": (15.0, "preferred"),
        "qwen_base": (15.0, "on_demand"),
        "wan": (15.0, "on_demand"),
    }
    # WAN with Qwen Base for enhancement fits beside SDXL; all four do not.
    assert table.fits({"sdxl", "wan", "qwen_base"})
    assert not table.fits(table.names)


def test_overrides_and_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_TABLE", '{"wan": {"vram_gb": 20}, "sdxl": {"policy": "on_demand"}}')
    monkeypatch.setenv("VRAM_BUDGET_GB", "30")
    table = table_from_settings(load_settings())
    assert table.budget_gb == 30.0
    assert table.spec("wan").vram_gb == 20.0 and table.spec("wan").policy == "on_demand"
    assert table.spec("sdxl").policy == "on_demand" and table.spec("sdxl").vram_gb == 10.0


@pytest.mark.parametrize(
    "value, fragment",
    [
        ('{"wan": {"vram_gb": -1}}', "wan: vram_gb"),
        ('{"wan": {"policy": "sometimes"}}', "wan: policy"),
        ('{"new_model": {"policy": "pinned"}}', "new_model: vram_gb"),
        ('{"wan": {"vram": 3}}', "wan: vram"),
    ],
)
def test_bad_overrides_name_the_variable_and_model(monkeypatch: pytest.MonkeyPatch, value: str, fragment: str) -> None:
    monkeypatch.setenv("MODEL_TABLE", value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "MODEL_TABLE" in str(err.value) and fragment in str(err.value)


def test_parse_overrides_accepts_a_new_model() -> None:
    assert parse_overrides({"flux": {"vram_gb": 24}}) == {"flux": {"vram_gb": 24}}
    assert build_table({"flux": {"vram_gb": 24}}).spec("flux").policy == "on_demand"


def test_job_needs() -> None:
    table = build_table()
    assert job_steps("sdxl_image_fast") == (frozenset({"sdxl"}),)
    assert job_steps("video_high") == (frozenset({"wan"}),)
    assert job_steps("wan_video_fast") == (frozenset({"wan"}),)
    assert job_steps("video7b_fast_enhanced", table) == (frozenset({"qwen_base", "wan"}),)
    # Both do not fit together in a small budget: enhancement first, then WAN.
    assert job_steps("image7b_high_enhanced", table.with_budget(20)) == (frozenset({"qwen_base"}), frozenset({"wan"}))
    assert job_steps("chat") == (frozenset({"qwen_instruct"}),)
    assert job_steps("chat", model="qwen_base") == (frozenset({"qwen_base"}),)
    assert job_models("image7b_fast_enhanced") == {"qwen_base", "wan"}
    with pytest.raises(ValueError, match="unknown job type"):
        job_steps("gif_fast")
    with pytest.raises(ValueError, match="model must be"):
        job_steps("chat", model="wan")


def test_effective_budget_is_capped_by_the_gpu() -> None:
    assert effective_budget(47, None, 0, 1) == 47  # no GPU: as configured
    assert effective_budget(47, 40.0, 0, 1) == 39.0  # 40 free, 1 kept back
    assert effective_budget(47, 30.0, 10.0, 1) == 39.0  # our resident 10 GB count as ours
    assert effective_budget(20, 80.0, 0, 1) == 20


# ------------------------------------------------------------------------------ planning


def test_plan_loads_into_free_room_without_evicting() -> None:
    plan = plan_residency(_table(), {"wan"}, {"sdxl": ModelView("ready")})
    assert plan.feasible and plan.load == ("wan",) and plan.evict == ()


def test_plan_evicts_on_demand_then_preferred_then_pinned() -> None:
    table = _table(budget=3.0)
    views = {
        "sdxl": ModelView("ready", last_used=1),  # pinned, least recently used
        "qwen_instruct": ModelView("ready", last_used=2),  # preferred
        "qwen_base": ModelView("ready", last_used=3),  # on demand, most recently used
    }
    assert plan_residency(table, {"wan"}, views).evict == ("qwen_base",)
    assert plan_residency(table, {"wan", "qwen_base"}, views).evict == ("qwen_instruct",)
    assert plan_residency(table, {"wan", "qwen_base", "qwen_instruct"}, views).evict == ("sdxl",)
    # Plain LRU (the baseline) ignores policies.
    assert plan_residency(table, {"wan"}, views, eviction="lru").evict == ("sdxl",)


def test_plan_prefers_idle_then_least_recently_used() -> None:
    table = _table(budget=2.0, qwen_instruct="on_demand", qwen_base="on_demand")
    views = {"qwen_instruct": ModelView("ready", last_used=1), "qwen_base": ModelView("ready", last_used=5)}
    assert plan_residency(table, {"wan"}, views).evict == ("qwen_instruct",)
    busy = {**views, "qwen_instruct": ModelView("ready", in_flight=1, last_used=1)}
    plan = plan_residency(table, {"wan"}, busy)
    assert plan.evict == ("qwen_base",) and not plan.waits_for_drain
    both_busy = {n: ModelView("ready", in_flight=1, last_used=v.last_used) for n, v in views.items()}
    plan = plan_residency(table, {"wan"}, both_busy)
    assert plan.evict == ("qwen_instruct",) and plan.waits_for_drain


def test_plan_evicts_no_more_than_needed() -> None:
    specs = {
        "a": ModelSpec(name="a", vram_gb=1, policy="on_demand"),
        "b": ModelSpec(name="b", vram_gb=4, policy="preferred"),
        "c": ModelSpec(name="c", vram_gb=4, policy="on_demand"),
    }
    table = ModelTable(specs=specs, budget_gb=5)
    views = {"a": ModelView("ready"), "b": ModelView("ready")}
    # Greedy order takes a (1 GB) first, which is not enough; b alone is: a stays.
    assert plan_residency(table, {"c"}, views).evict == ("b",)


def test_plan_never_reloads_and_reports_impossible_needs() -> None:
    table = _table(budget=2.0)
    views = {"wan": ModelView("ready"), "sdxl": ModelView("loading")}
    plan = plan_residency(table, {"wan", "sdxl"}, views)
    assert plan.feasible and plan.load == () and plan.evict == ()
    too_big = plan_residency(table, {"wan", "sdxl", "qwen_base"}, {})
    assert not too_big.feasible and too_big.permanent and "budget is 2 GB" in too_big.reason
    unknown = plan_residency(table, {"flux"}, {})
    assert unknown.permanent and "flux" in unknown.reason
    # Memory still held by a model Triton has not freed yet cannot be planned away.
    stuck = plan_residency(table, {"wan"}, {"sdxl": ModelView("unloading"), "qwen_base": ModelView("unloading")})
    assert not stuck.feasible and not stuck.permanent


# ------------------------------------------------------------------------------ decisions


def _group(key: str, models: set[str], oldest: float, *, count: int = 1, interactive: bool = False, est: float = 10):
    return WaitingGroup(key, frozenset(models), oldest, count, interactive, est)


def test_resident_work_before_a_switch() -> None:
    clock = Clock(100)
    sched = Scheduler(_table(budget=1.0), aging_s=900, clock=clock)
    views = {"sdxl": ModelView("ready")}
    decision = sched.decide([_group("wan", {"wan"}, 0), _group("sdxl", {"sdxl"}, 50)], views)
    assert decision is not None and decision.key == "sdxl" and decision.load == ()
    assert decision.action == "run" and decision.waited_s == 50


def test_shortest_expected_job_first_among_resident() -> None:
    sched = Scheduler(_table(budget=4.0), clock=Clock(100))
    views = {"sdxl": ModelView("ready"), "wan": ModelView("ready")}
    waiting = [_group("video", {"wan"}, 0, est=240), _group("image", {"sdxl"}, 90, est=5)]
    assert sched.decide(waiting, views).key == "image"


def test_switch_when_the_other_model_waits_past_the_bound() -> None:
    clock = Clock(0)
    sched = Scheduler(_table(budget=1.0), aging_s=300, clock=clock)
    views = {"sdxl": ModelView("ready", last_used=0)}
    waiting = [_group("wan", {"wan"}, 0), _group("sdxl", {"sdxl"}, 10, count=50)]
    clock.now = 299
    assert sched.decide(waiting, views).key == "sdxl"
    clock.now = 300
    decision = sched.decide(waiting, views)
    assert decision.key == "wan" and decision.reason == "aged"
    assert decision.load == ("wan",) and decision.evict == ("sdxl",)


def test_chat_has_latency_priority() -> None:
    sched = Scheduler(_table(budget=4.0), clock=Clock(100))
    views = {"sdxl": ModelView("ready"), "qwen_instruct": ModelView("ready")}
    waiting = [_group("sdxl", {"sdxl"}, 0, est=4), _group("chat", {"qwen_instruct"}, 99, interactive=True)]
    assert sched.decide(waiting, views).key == "chat"
    # Even when chat needs a load, it goes before batch work.
    views = {"sdxl": ModelView("ready")}
    assert sched.decide(waiting, views).key == "chat"


def test_rejects_what_can_never_run() -> None:
    sched = Scheduler(_table(budget=1.0), clock=Clock(0))
    waiting = [_group("enhanced", {"qwen_base", "wan"}, 0), _group("sdxl", {"sdxl"}, 0)]
    decision = sched.decide(waiting, {})
    assert decision.action == "reject" and decision.key == "enhanced" and "budget" in decision.reason
    failed = sched.decide([_group("sdxl", {"sdxl"}, 0), _group("wan", {"wan"}, 5)], {"sdxl": ModelView("failed")})
    assert failed.action == "reject" and failed.key == "sdxl" and "failed to load" in failed.reason


def test_nothing_to_do() -> None:
    sched = Scheduler(_table(), clock=Clock(0))
    assert sched.decide([], {}) is None
    assert sched.decide([_group("sdxl", {"sdxl"}, 0, count=0)], {}) is None
    # A need that cannot be met while memory is still being freed: wait.
    held = {"wan": ModelView("unloading"), "qwen_base": ModelView("unloading")}
    assert sched.decide([_group("sdxl", {"sdxl"}, 0)], held) is None


def test_prefetch_pinned_then_preferred_when_they_fit() -> None:
    sched = Scheduler(_table(budget=2.0), clock=Clock(0))
    assert sched.prefetch({}) == ("sdxl", "qwen_instruct")
    assert sched.prefetch({"wan": ModelView("ready")}) == ("sdxl",)
    assert sched.prefetch({"sdxl": ModelView("failed")}) == ("qwen_instruct",)
    assert sched.prefetch({"wan": ModelView("ready"), "qwen_base": ModelView("ready")}) == ()


# ------------------------------------------------------------------------------ properties

MODELS = ("sdxl", "wan", "qwen_instruct", "qwen_base")


@dataclass
class _Job:
    id: int
    key: str
    models: frozenset[str]
    arrival: float
    run_s: float
    interactive: bool
    decided: float | None = None
    start: float | None = None
    rejected: bool = False


@st.composite
def _scenarios(draw):
    budget = draw(st.sampled_from([1.0, 2.0, 3.0]))
    vram = {m: draw(st.sampled_from([0.5, 1.0, 1.5])) for m in MODELS}
    policies = {m: draw(st.sampled_from(["pinned", "preferred", "on_demand"])) for m in MODELS}
    kinds = {
        "sdxl": frozenset({"sdxl"}),
        "wan": frozenset({"wan"}),
        "enhanced": frozenset({"qwen_base", "wan"}),
        "chat": frozenset({"qwen_instruct"}),
    }
    n = draw(st.integers(1, 40))
    jobs, now = [], 0.0
    for i in range(n):
        now += draw(st.floats(0, 30))
        kind = draw(st.sampled_from(sorted(kinds)))
        jobs.append(_Job(i, kind, kinds[kind], now, draw(st.floats(1, 120)), kind == "chat"))
    aging = draw(st.sampled_from([0.0, 30.0, 120.0, 900.0]))
    seed = draw(st.integers(0, 2**16))
    return budget, vram, policies, jobs, aging, seed


def _run_pure(budget, vram, policies, jobs, aging, seed):
    """Single GPU lane: decide, apply the plan (loads take 5 s), run; record everything."""
    specs = {m: ModelSpec(name=m, vram_gb=vram[m], policy=policies[m], typical_load_s=5) for m in MODELS}
    table = ModelTable(specs=specs, budget_gb=budget)
    clock = Clock(0.0)
    sched = Scheduler(table, aging_s=aging, clock=clock)
    rng = random.Random(seed)
    states = {m: ModelView() for m in MODELS}
    pending = sorted(jobs, key=lambda j: j.arrival)
    queues: dict[str, list[_Job]] = {}
    started: list[_Job] = []
    peak = 0.0
    steps = 0
    while pending or any(queues.values()):
        steps += 1
        assert steps < 10_000, "the scheduler made no progress"
        while pending and pending[0].arrival <= clock.now:
            job = pending.pop(0)
            queues.setdefault(job.key, []).append(job)
        waiting = [
            WaitingGroup(k, q[0].models, q[0].arrival, len(q), q[0].interactive, rng.choice([0, 5, 50]))
            for k, q in sorted(queues.items())
            if q
        ]
        decision = sched.decide(waiting, states)
        if decision is None:
            assert not waiting, "work waits but nothing was chosen (all models are idle)"
            clock.now = pending[0].arrival
            continue
        aged = [g for g in waiting if clock.now - g.oldest >= aging]
        job = queues[decision.key].pop(0)
        job.decided = clock.now
        if decision.action == "reject":
            assert not table.fits(job.models)
            job.rejected = True
            continue
        if aged:  # the aging rule: the oldest aged job goes first
            assert decision.reason == "aged"
            assert job.arrival == min(g.oldest for g in aged)
        elif any(g.interactive for g in waiting):  # chat priority
            assert job.interactive
        for name in decision.evict:
            states[name] = ModelView("unloaded")
        for name in decision.load:
            states[name] = ModelView("ready", last_used=clock.now)
        on_card = occupied_gb(table, states)
        peak = max(peak, on_card)
        assert on_card <= budget + 1e-9, f"{on_card} GB on the card, budget {budget}"
        assert job.models <= {m for m, v in states.items() if v.state == "ready"}
        clock.now += 5.0 * len(decision.load)
        job.start = clock.now
        started.append(job)
        clock.now += job.run_s
        for name in job.models:
            states[name] = ModelView("ready", last_used=clock.now)
    return table, started, peak


@settings(max_examples=300, deadline=None)
@given(_scenarios())
def test_random_streams_stay_in_budget_lose_nothing_and_age(scenario) -> None:
    budget, vram, policies, jobs, aging, seed = scenario
    table, started, _ = _run_pure(budget, vram, policies, jobs, aging, seed)
    # Every job is either run or rejected because its models can never fit together.
    assert {j.id for j in started} | {j.id for j in jobs if j.rejected} == {j.id for j in jobs}
    assert all(j.rejected == (not table.fits(j.models)) for j in jobs)
    # Aging: once a job has waited aging_s, only jobs enqueued before it are chosen before it.
    for job in started:
        for other in started:
            if job.arrival + aging <= other.decided < job.decided:
                assert other.arrival <= job.arrival, (job, other)


def test_decisions_are_deterministic() -> None:
    sched = Scheduler(_table(budget=2.0), aging_s=60, clock=Clock(100))
    views = {"sdxl": ModelView("ready", last_used=3), "wan": ModelView("ready", last_used=4)}
    waiting = [
        _group("a", {"qwen_base"}, 10, est=5),
        _group("b", {"qwen_instruct"}, 10, est=5),
        _group("c", {"sdxl"}, 80, est=5),
        _group("d", {"wan"}, 80, est=5),
    ]
    first = sched.decide(waiting, views)
    for seed in range(20):
        shuffled = list(waiting)
        random.Random(seed).shuffle(shuffled)
        assert sched.decide(shuffled, dict(reversed(list(views.items())))) == first
    assert first.key == "a" and first.reason == "aged"  # both aged at 90 s: key breaks the tie


# ------------------------------------------------------------------------------ the benchmark


def test_benchmark_runs_real_residency_on_virtual_time() -> None:
    table = build_table()
    trace = bench.make_trace(7, 300, 0.8, {"sdxl": 0.6, "chat": 0.25, "wan": 0.15}, 0.5, table)
    ours = bench.simulate(trace, table, "scheduler")
    base = bench.simulate(trace, table, "fifo")
    for outcome in (ours, base):
        assert outcome.violations == 0 and outcome.peak_gb <= 47
        assert all(j.finished is not None and j.rejected is None for j in outcome.jobs)
        assert all(j.started >= j.arrival for j in outcome.jobs)
    s_ours, s_base = bench.summarize(ours), bench.summarize(base)
    assert s_ours["lost"] == 0 and s_base["lost"] == 0
    assert s_ours["all_mean"] < s_base["all_mean"]
    assert s_ours["swaps"] <= s_base["swaps"]
    # Deterministic for a seed.
    assert bench.summarize(bench.simulate(trace, table, "scheduler")) == s_ours


def test_benchmark_counts_budget_violations_of_a_careless_control() -> None:
    """The simulated Triton frees memory 1.7 s after an unload: loading at once would overshoot."""

    table = _table(budget=1.0)

    async def careless() -> int:
        control = bench.SimControl(table, 1.0)
        await control.load("sdxl")
        await control.unload("sdxl")
        await control.load("wan")  # without waiting for the index to say "unloaded"
        return control.violations

    loop = bench.VirtualTimeLoop()
    try:
        assert loop.run_until_complete(careless()) == 1
    finally:
        loop.close()
