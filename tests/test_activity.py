"""bridge.activity: what the operator's page shows of this process (pure bookkeeping)."""

from __future__ import annotations

from bridge.activity import Activity
from bridge.residency_report import ResidencyEvent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_jobs_stages_and_their_end() -> None:
    clock = Clock()
    activity = Activity(clock)
    changed = activity.changed
    activity.begin("a", "sdxl_image_fast", "sdxl", "sdxl_queue")
    activity.begin("b", "video_fast", "wan", "wan_queue")
    assert changed.is_set() and activity.running["a"].stage == "waiting for GPU"
    changed.clear()
    activity.stage("a", "generating")
    assert changed.is_set() and activity.running["a"].stage == "generating"
    activity.stage("gone", "uploading")  # a job this worker does not run: nothing happens
    clock.now += 5
    activity.end("a")
    activity.end("b", requeued=True)  # it runs again later: not listed as ended
    activity.end("a")  # twice: once only
    assert activity.running == {}
    assert [(j["id"], j["ended"] - j["started"]) for j in activity.finished] == [("a", 5.0)]


async def test_model_operations_pass_through_to_the_inner_observer() -> None:
    seen = []
    activity = Activity(Clock())
    observe = activity.observer(seen.append)
    observe(ResidencyEvent("load", "wan", "start"))
    observe(ResidencyEvent("load", "wan", "end", ok=False, seconds=2.345, error="out of memory"))
    assert len(seen) == 2
    assert [(o["op"], o["model"], o["phase"], o["seconds"], o["error"]) for o in activity.model_ops] == [
        ("load", "wan", "failed", 2.35, "out of memory"), ("load", "wan", "started", None, None)]


async def test_chat_turns_per_minute_and_latency() -> None:
    clock = Clock()
    activity = Activity(clock)
    assert activity.chat_stats() == {"turns_per_minute": 0, "mean_s": None, "max_s": None, "failed": 0, "total": 0}
    activity.chat_turn(3.0)
    clock.now += 61
    activity.chat_turn(1.0)
    activity.chat_turn(2.0, ok=False)
    assert activity.chat_stats() == {"turns_per_minute": 2, "mean_s": 1.5, "max_s": 2.0, "failed": 1, "total": 3}
