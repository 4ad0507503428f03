"""The pure parts: model table, residency planning and the scheduler (property-based included),
plus the benchmark's simulation running the real residency manager under a virtual clock."""

from __future__ import annotations

import asyncio
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.jobs import JOB_TYPES
from bridge.model_table import (
    DEFAULT_SPECS,
    ModelSpec,
    ModelTable,
    Stage,
    build_table,
    effective_budget,
    is_interactive,
    job_stages,
    job_steps,
    parse_overrides,
    table_from_settings,
)
from bridge.scheduler import (
    ModelView,
    Running,
    Scheduler,
    WaitingGroup,
    occupied_gb,
    plan_residency,
    wanted_next,
)
from bridge.settings import SettingsError, load_settings
from bridge.dispatcher import Dispatcher, Waiting

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
    assert job_steps("sdxl_image_fast") == (frozenset({"sdxl"}),)
    assert job_steps("video_high") == (frozenset({"wan"}),)
    assert job_steps("wan_video_fast") == (frozenset({"wan"}),)
    # docs/APP_CONTRACT.md §3 "qwen_base, then wan": never both at once (beside SDXL and chat that is 55 GB).
    assert job_steps("video7b_fast_enhanced") == (frozenset({"qwen_base"}), frozenset({"wan"}))
    assert job_steps("chat") == (frozenset({"qwen_instruct"}),)
    assert job_steps("chat", model="qwen_base") == (frozenset({"qwen_base"}),)
    assert job_steps("chat_conversation") == (frozenset({"qwen_instruct"}),)
    assert job_steps("image7b_fast_enhanced") == (frozenset({"qwen_base"}), frozenset({"wan"}))
    with pytest.raises(ValueError, match="unknown job type"):
        job_steps("gif_fast")
    with pytest.raises(ValueError, match="model must be"):
        job_steps("chat", model="wan")


def test_job_stages_key_and_cost_each_grant() -> None:
    enhance, render = job_stages("video7b_high_enhanced")
    assert (enhance.key, enhance.models, enhance.est_s) == ("video7b_high_enhanced:enhance", {"qwen_base"}, 2.0)
    assert enhance.then == {"wan"} and render.then == frozenset()
    assert (render.key, render.models, render.est_s) == ("video7b_high_enhanced", {"wan"}, 240.0)
    assert job_stages("sdxl_image_fast") == (Stage("sdxl_image_fast", frozenset({"sdxl"}), 4.0),)
    assert is_interactive("chat_conversation") and is_interactive("chat") and not is_interactive("video_fast")


def test_every_generation_job_type_has_stages_ending_on_its_model() -> None:
    """bridge/worker.py asks job_stages for every image/video job: the two tables must agree."""
    for name, job_type in JOB_TYPES.items():
        stages = job_stages(job_type.name)
        assert stages[-1].models == {job_type.model}, name
        assert frozenset().union(*(s.models for s in stages)) == set(job_type.models), name
        assert all(s.est_s > 0 for s in stages), name


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
    assert sched.prefetch({"sdxl": ModelView("failed")}) == ("qwen_instruct",)
    # Room held by idle on-demand models that no known work needs can be taken back...
    assert sched.prefetch({"wan": ModelView("ready")}) == ("sdxl", "qwen_instruct")
    assert sched.prefetch({"wan": ModelView("ready"), "qwen_base": ModelView("ready")}) == ("sdxl", "qwen_instruct")
    # ...but not from a model that is busy or that waiting work (or a next stage) needs.
    assert sched.prefetch({"wan": ModelView("ready")}, keep={"wan"}) == ("sdxl",)
    assert sched.prefetch({"wan": ModelView("ready", in_flight=1)}) == ("sdxl",)
    assert sched.prefetch({"wan": ModelView("ready", in_flight=1), "qwen_base": ModelView("ready")},
                          keep={"qwen_base"}) == ()


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
    # "Waited" as the scheduler reckons it (now - enqueue time): arrival + aging rounded up to a
    # decision time 1 ulp before the job had waited aging_s by that reckoning (a CI run hit it).
    for job in started:
        for other in started:
            if other.decided - job.arrival >= aging and other.decided < job.decided:
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


# ------------------------------------------------------------------------------ response ratio


def test_a_long_job_passed_by_short_ones_gets_its_turn_in_proportion_to_its_length() -> None:
    clock = Clock(0)
    sched = Scheduler(_table(budget=4.0), aging_s=10_000, clock=clock)
    views = {"wan": ModelView("ready")}
    # Fresh work goes cheapest first...
    assert sched.decide([_group("video", {"wan"}, 0, est=240), _group("image", {"wan"}, 0, est=25)], views).key == "image"
    video = _group("video", {"wan"}, 0, est=240)
    # ...but a job's priority grows with its wait over its own length: the video, waiting
    # 240 s (one length), goes before an image that waited 20 s (almost one length of its own)...
    clock.now = 240
    assert sched.decide([video, _group("image", {"wan"}, 220, est=25)], views).key == "video"
    # ...and after an image that waited 30 s (more than its length) it does not.
    assert sched.decide([video, _group("image", {"wan"}, 210, est=25)], views).key == "image"


# ------------------------------------------------------------------------------ lanes


def _running(key: str, models: set[str], since: float, est: float, **kw) -> Running:
    return Running(key, frozenset(models), since, est, **kw)


def test_a_short_resident_job_starts_beside_a_long_one() -> None:
    clock = Clock(100)
    sched = Scheduler(_table(budget=4.0), clock=clock, lanes=2)
    views = {"sdxl": ModelView("ready"), "wan": ModelView("ready", in_flight=1)}
    video = _running("video", {"wan"}, 90, 240)
    decision = sched.decide([_group("image", {"sdxl"}, 99, est=5)], views, running=[video])
    assert decision is not None and decision.key == "image" and decision.reason == "beside"
    # Not when lanes are full, nor with one lane...
    image = _running("image", {"sdxl"}, 100, 5)
    assert sched.decide([_group("image2", {"sdxl"}, 99, est=5)], views, running=[video, image]) is None
    one = Scheduler(_table(budget=4.0), clock=clock, lanes=1)
    assert one.decide([_group("image", {"sdxl"}, 99, est=5)], views, running=[video]) is None
    # ...nor a long job beside a short one, nor one for the same model (one request at a time).
    short = _running("image", {"sdxl"}, 99, 5)
    assert sched.decide([_group("video", {"wan"}, 50, est=240)], {"sdxl": ModelView("ready"), "wan": ModelView("ready")},
                        running=[short]) is None
    assert sched.decide([_group("image", {"wan"}, 99, est=5)], views, running=[video]) is None
    # Not when the running work is nearly done (it would not save the short job much).
    clock.now = 90 + 235
    assert sched.decide([_group("image", {"sdxl"}, 99, est=5)], views, running=[video]) is None


def test_chat_goes_first_and_nothing_passes_an_aged_job_beside() -> None:
    clock = Clock(1000)
    sched = Scheduler(_table(budget=4.0), aging_s=900, clock=clock, lanes=2)
    views = {m: ModelView("ready") for m in ("sdxl", "wan", "qwen_instruct")}
    video = _running("video", {"wan"}, 990, 240)
    image = _group("image", {"sdxl"}, 999, est=5)
    chat = _running("chat", {"qwen_instruct"}, 995, 10, interactive=True)
    assert sched.decide([image], views, running=[video, chat]) is None
    # Beside a chat alone a generation waits for it (it ends no later than sharing the card
    # would make it, and the chat ends sooner)...
    assert sched.decide([image], views, running=[chat]) is None
    # ...unless the chat outran its estimate, or the job aged, or its load would outlast the chat.
    clock.now = 1006
    assert sched.decide([image], views, running=[chat]).key == "image"
    clock.now = 1000
    assert sched.decide([_group("old", {"sdxl"}, 99, est=5)], views, running=[chat]).key == "old"
    unloaded = {"sdxl": ModelView("ready"), "qwen_instruct": ModelView("ready", in_flight=1)}
    assert sched.decide([_group("video", {"wan"}, 999, est=240)], unloaded,
                        running=[_running("chat", {"qwen_instruct"}, 999, 3, interactive=True)]).load == ("wan",)
    # An aged job (here one that needs WAN, busy) blocks younger work from starting beside.
    aged = _group("video2", {"wan"}, 50, est=240)
    assert sched.decide([aged, image], views, running=[video]) is None
    older = _group("image0", {"sdxl"}, 40, est=5)
    assert sched.decide([aged, older], views, running=[video]).key == "image0"


def test_a_load_starts_beside_work_that_ends_before_it() -> None:
    clock = Clock(100)
    sched = Scheduler(_table(budget=3.0), clock=clock, lanes=2)
    views = {"sdxl": ModelView("ready", in_flight=1), "qwen_base": ModelView("ready")}
    image = _running("image", {"sdxl"}, 98, 5)  # 3 s to go; WAN loads in 5
    decision = sched.decide([_group("video", {"wan"}, 90, est=240)], views, running=[image])
    assert decision is not None and decision.load == ("wan",) and decision.reason == "beside"
    long_image = _running("image", {"sdxl"}, 98, 60)
    assert sched.decide([_group("video", {"wan"}, 90, est=240)], views, running=[long_image]) is None
    # Never by evicting what the running work holds.
    full = {"sdxl": ModelView("ready", in_flight=1), "qwen_base": ModelView("ready"), "qwen_instruct": ModelView("ready")}
    assert sched.decide([_group("video", {"wan"}, 90, est=240)], full,
                        running=[image, _running("chat", {"qwen_base"}, 99, 5, interactive=True)]) is None


# ------------------------------------------------------------------------------ eviction spares what comes next


def test_eviction_spares_the_model_the_next_stage_needs() -> None:
    table = build_table()
    views = {"sdxl": ModelView("ready"), "qwen_instruct": ModelView("ready"), "wan": ModelView("ready")}
    # Policy alone evicts WAN (on demand) for the enhancement, and the render must reload it.
    assert plan_residency(table, {"qwen_base"}, views).evict == ("wan",)
    # Knowing the render comes next, the chat model (preferred) makes room instead...
    assert plan_residency(table, {"qwen_base"}, views, keep={"wan"}).evict == ("qwen_instruct",)
    # ...unless chat is waiting too: then policy decides again. SDXL (pinned) stays either way.
    assert plan_residency(table, {"qwen_base"}, views, keep={"wan", "qwen_instruct"}).evict == ("wan",)
    # Plain LRU (the baseline) ignores it.
    lru = {n: ModelView("ready", last_used=i) for i, n in enumerate(("wan", "qwen_instruct", "sdxl"))}
    assert plan_residency(table, {"qwen_base"}, lru, eviction="lru", keep={"wan"}).evict == ("wan",)


def test_the_scheduler_plans_with_what_comes_next() -> None:
    sched = Scheduler(build_table(), clock=Clock(10))
    views = {"sdxl": ModelView("ready"), "qwen_instruct": ModelView("ready"), "wan": ModelView("ready")}
    enhance = WaitingGroup("video_fast_enhanced:enhance", frozenset({"qwen_base"}), 0, 1, False, 2.0, frozenset({"wan"}))
    decision = sched.decide([enhance], views)
    assert decision.load == ("qwen_base",) and decision.evict == ("qwen_instruct",)
    render = _running("video_fast", {"wan"}, 5, 120, then=frozenset())
    assert wanted_next([enhance], [render]) == {"qwen_base", "wan"}
    assert wanted_next([], [_running("x:enhance", {"qwen_base"}, 5, 2, then=frozenset({"wan"}))]) == {"wan"}


# ------------------------------------------------------------------------------ the dispatcher


class _Residency:
    """What the dispatcher reads from the residency manager: views, budget, the wanted hint."""

    def __init__(self, views: dict[str, ModelView], budget_gb: float = 4.0) -> None:
        self._views = views
        self.budget_gb = budget_gb
        self.wanted: frozenset[str] = frozenset()
        self.displaced = frozenset({"qwen_instruct", "refused"})
        self.prefetched: list[str] = []

    def views(self) -> dict[str, ModelView]:
        return dict(self._views)

    async def prefetch(self, name: str) -> bool:
        self.prefetched.append(name)
        if name == "refused":
            return False
        self._views[name] = ModelView("ready")
        return True


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_dispatcher_grants_a_short_job_beside_a_long_one_and_takes_the_lane_back() -> None:
    clock = Clock(100)
    residency = _Residency({m: ModelView("ready") for m in ("sdxl", "wan", "qwen_instruct", "qwen_base")})
    dispatcher = Dispatcher(Scheduler(_table(budget=4.0), clock=clock, lanes=2), residency)  # type: ignore[arg-type]
    dispatcher.start()
    try:
        video = Waiting("video_high", frozenset({"wan"}), 90, est_s=240)
        await asyncio.wait_for(dispatcher.acquire(video), 1)
        image = Waiting("sdxl_image_fast", frozenset({"sdxl"}), 99, est_s=5)
        await asyncio.wait_for(dispatcher.acquire(image), 1)  # beside the video
        assert [r.key for r in dispatcher.running()] == ["video_high", "sdxl_image_fast"]
        # Both lanes are taken: a third generation waits; chat does not take a lane.
        third = Waiting("sdxl_image_high", frozenset({"sdxl"}), 99.5, est_s=7)
        pending = asyncio.ensure_future(dispatcher.acquire(third))
        chat = Waiting("chat", frozenset({"qwen_instruct"}), 100, interactive=True, est_s=10)
        await asyncio.wait_for(dispatcher.acquire(chat), 1)
        await _settle()
        assert not pending.done() and [w.key for w in dispatcher.waiting()] == ["sdxl_image_high"]
        dispatcher.release(chat)
        dispatcher.release(image)
        await asyncio.wait_for(pending, 1)  # the lane came back
        assert {r.key for r in dispatcher.running()} == {"video_high", "sdxl_image_high"}
    finally:
        await dispatcher.stop()


async def test_dispatcher_with_one_lane_runs_generations_one_at_a_time() -> None:
    residency = _Residency({m: ModelView("ready") for m in ("sdxl", "wan")})
    dispatcher = Dispatcher(Scheduler(_table(budget=4.0), clock=Clock(100), lanes=1), residency)  # type: ignore[arg-type]
    dispatcher.start()
    try:
        video = Waiting("video_high", frozenset({"wan"}), 90, est_s=240)
        await asyncio.wait_for(dispatcher.acquire(video), 1)
        image = asyncio.ensure_future(dispatcher.acquire(Waiting("sdxl_image_fast", frozenset({"sdxl"}), 99, est_s=5)))
        await _settle()
        assert not image.done()
        dispatcher.release(video)
        await asyncio.wait_for(image, 1)
    finally:
        await dispatcher.stop()


async def test_a_cancelled_wait_holds_no_lane_and_the_hint_names_the_next_stage() -> None:
    residency = _Residency({m: ModelView("ready") for m in ("sdxl", "wan", "qwen_base")})
    dispatcher = Dispatcher(Scheduler(_table(budget=4.0), clock=Clock(100), lanes=1), residency)  # type: ignore[arg-type]
    dispatcher.start()
    try:
        enhance = Waiting("video_fast_enhanced:enhance", frozenset({"qwen_base"}), 90, est_s=2, then=frozenset({"wan"}))
        await asyncio.wait_for(dispatcher.acquire(enhance), 1)
        assert residency.wanted == {"wan"}  # eviction spares what the render will need
        waiter = asyncio.ensure_future(dispatcher.acquire(Waiting("image", frozenset({"sdxl"}), 95, est_s=5)))
        await _settle()
        waiter.cancel()
        await _settle()
        assert dispatcher.waiting() == []
        dispatcher.release(enhance)
        await _settle()
        assert dispatcher.running() == () and residency.wanted == frozenset()
        render = Waiting("video_fast_enhanced", frozenset({"wan"}), 90, est_s=120)
        await asyncio.wait_for(dispatcher.acquire(render), 1)
    finally:
        await dispatcher.stop()


async def test_dispatcher_brings_the_chat_model_back_when_an_idle_model_can_make_room() -> None:
    views = {"sdxl": ModelView("ready"), "wan": ModelView("ready", in_flight=1), "qwen_base": ModelView("ready")}
    residency = _Residency(views, budget_gb=3.0)
    dispatcher = Dispatcher(Scheduler(_table(budget=3.0), clock=Clock(100), lanes=2), residency)  # type: ignore[arg-type]
    dispatcher.start()
    try:
        render = Waiting("video_fast_enhanced", frozenset({"wan"}), 90, est_s=120)
        await asyncio.wait_for(dispatcher.acquire(render), 1)
        await _settle()
        assert residency.prefetched == ["qwen_instruct"]  # once: then it is resident
    finally:
        await dispatcher.stop()


async def test_a_refused_prefetch_is_not_retried_in_a_loop() -> None:
    class Refusing(Scheduler):
        def prefetch(self, models, **kwargs):  # type: ignore[override]
            return ("refused",)

    residency = _Residency({"sdxl": ModelView("ready")})
    dispatcher = Dispatcher(Refusing(_table(budget=4.0), clock=Clock(0)), residency)  # type: ignore[arg-type]
    dispatcher.start()
    try:
        item = Waiting("sdxl_image_fast", frozenset({"sdxl"}), 0, est_s=4)
        await asyncio.wait_for(dispatcher.acquire(item), 1)
        for _ in range(20):
            await asyncio.sleep(0)
        assert residency.prefetched == ["refused"]
    finally:
        await dispatcher.stop()


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


def test_simulated_gpu_shares_its_time_and_serves_one_request_per_model() -> None:
    """Processor sharing: two requests side by side each take twice as long (no free
    throughput); two for one model queue (one Triton instance)."""

    async def run() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        gpu = bench.SimGpu(loop)
        ends: dict[str, float] = {}

        async def one(name: str, model: str, work: float, delay: float = 0.0) -> None:
            await asyncio.sleep(delay)
            await gpu.run(model, work)
            ends[name] = loop.time()

        await asyncio.gather(one("video", "wan", 10), one("image", "sdxl", 4, delay=2), one("image2", "sdxl", 1, delay=3))
        ends["busy"] = gpu.busy_s
        return ends

    loop = bench.VirtualTimeLoop()
    try:
        ends = loop.run_until_complete(run())
    finally:
        loop.close()
    # The image (4 s of work from t=2) runs at half speed beside the video: done at 10, the video
    # has 4 s left. image2 (arrived at 3) queued behind the image at SDXL, then 1 s of work at half
    # speed: done at 12; the video's last 3 s run alone: done at 15.
    assert ends["image"] == pytest.approx(10.0)
    assert ends["image2"] == pytest.approx(12.0)
    assert ends["video"] == pytest.approx(15.0)
    assert ends["busy"] == pytest.approx(15.0)  # 10 + 4 + 1 s of work, never idle


def test_benchmark_lanes_let_short_jobs_pass_long_ones_without_breaking_the_budget() -> None:
    table = build_table()
    trace = bench.make_trace(3, 300, 0.7, {"sdxl": 0.6, "chat": 0.25, "wan": 0.15}, 0.5)
    two = bench.simulate(trace, table, "scheduler", lanes=2)
    one = bench.simulate(trace, table, "scheduler", lanes=1)
    for outcome in (one, two):
        assert outcome.violations == 0
        # Never an enhancement's Qwen Base and WAN at once: SDXL, Qwen Instruct and one of them.
        assert outcome.peak_gb <= 40
        assert all(j.finished is not None and j.rejected is None for j in outcome.jobs)
    s_two, s_one = bench.summarize(two), bench.summarize(one)
    assert s_two["beside"] > 0 and s_one["beside"] == 0
    assert s_two["sdxl_mean"] < s_one["sdxl_mean"] / 2
    # The same work was done: sharing moves finishing times, it adds no throughput.
    assert s_two["makespan"] == pytest.approx(s_one["makespan"], rel=0.05)


def test_residency_spares_wanted_models_and_brings_the_chat_model_back() -> None:
    from bridge.residency import ResidencyManager  # noqa: PLC0415

    table = build_table()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        control = bench.SimControl(table, table.budget_gb)
        manager = ResidencyManager(control, table, clock=loop.time, gpu=None)
        for name in ("sdxl", "qwen_instruct", "wan"):
            await manager.ensure({name})
        manager.wanted = frozenset({"wan"})  # an enhancement's render comes next
        await manager.ensure({"qwen_base"})
        assert manager.state("wan") == "ready" and manager.state("qwen_instruct") == "unloaded"
        assert manager.displaced == {"qwen_instruct"}  # made room: may come back
        # Qwen Base is still wanted (more enhancements wait): the chat model is not brought back.
        manager.wanted = frozenset({"wan", "qwen_base"})
        assert not await manager.prefetch("qwen_instruct")
        async with manager.use("wan"):  # the render runs; the enhancements are done
            manager.wanted = frozenset()
            assert await manager.prefetch("qwen_instruct")
            assert manager.state("qwen_base") == "unloaded" and manager.state("wan") == "ready"
        assert manager.state("qwen_instruct") == "ready" and not await manager.prefetch("qwen_instruct")
        assert manager.displaced == {"qwen_base"}
        # An explicit unload is not undone.
        await manager.unload("sdxl")
        assert "sdxl" not in manager.displaced and not await manager.prefetch("sdxl")
        assert control.violations == 0

    loop = bench.VirtualTimeLoop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()


def test_gpu_lanes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().gpu_lanes == 2
    monkeypatch.setenv("GPU_LANES", "1")
    assert load_settings().gpu_lanes == 1
    monkeypatch.setenv("GPU_LANES", "0")
    with pytest.raises(SettingsError, match="GPU_LANES"):
        load_settings()
