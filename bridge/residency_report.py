"""What the residency manager reports: per-model state and counters, and the events its
metric hook receives around every load and unload. Pure data (pydantic / dataclasses)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel


@dataclass(frozen=True)
class ResidencyEvent:
    """Handed to the observer before (``phase="start"``) and after (``"end"``) a load or unload."""

    op: Literal["load", "unload"]
    model: str
    phase: Literal["start", "end"]
    ok: bool = True
    seconds: float = 0.0
    error: str | None = None
    measured_gb: float | None = None


Observer = Callable[[ResidencyEvent], None]


class ModelReport(BaseModel):
    name: str
    state: str
    policy: str
    vram_gb: float
    measured_gb: float | None
    in_flight: int
    idle_s: float | None
    loads: int
    unloads: int
    load_failures: int
    last_load_s: float | None
    total_load_s: float
    last_unload_s: float | None
    total_unload_s: float
    last_error: str | None


class ResidencyReport(BaseModel):
    budget_gb: float
    configured_budget_gb: float
    accounted_gb: float
    gpu_total_gb: float | None
    gpu_free_gb: float | None
    gpu_used_gb: float | None
    loads: int
    unloads: int
    load_failures: int
    oom_evictions: int
    oom_retries: int
    models: dict[str, ModelReport]


def metrics_observer(observe_model_op: Callable[[str, str, float, bool], Any]) -> Observer:
    """Adapt ``bridge.metrics.observe_model_op(model, op, seconds, ok)`` to an observer."""

    def _observe(event: ResidencyEvent) -> None:
        if event.phase == "end":
            observe_model_op(event.model, event.op, event.seconds, event.ok)

    return _observe
