"""The table of models the worker serves: GPU memory each needs, how long it may stay, which jobs
need which models. Pure: no I/O, no asyncio.

Policies (see docs/ARCHITECTURE.md and docs/APP_CONTRACT.md §6):

- ``pinned`` (SDXL): kept resident; evicted only when a job that needs the room cannot run
  otherwise (it is the last candidate for eviction).
- ``preferred`` (Qwen Instruct): loaded whenever it fits without evicting anything.
- ``on_demand`` (WAN, Qwen Base): loaded for the jobs that need them, the first to go.

The defaults can be overridden from the environment: ``MODEL_TABLE`` is JSON keyed by model,
e.g. ``{"wan": {"vram_gb": 20}}``, and ``VRAM_BUDGET_GB`` is the total budget. On a GPU the
budget is checked against NVML's free memory with ``VRAM_SAFETY_MARGIN_GB``
(:func:`effective_budget`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Policy = Literal["pinned", "preferred", "on_demand"]

# Eviction order: lower goes first.
POLICY_RANK: dict[str, int] = {"on_demand": 0, "preferred": 1, "pinned": 2}

DEFAULT_BUDGET_GB = 47.0


class ModelSpec(BaseModel):
    """One model: GPU memory it needs (an estimate, in GB), its policy and load time limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    vram_gb: float = Field(gt=0, description="GPU memory the model holds when loaded (GB).")
    policy: Policy = "on_demand"
    load_timeout_s: float = Field(600.0, gt=0, description="Give up on a load after this long.")
    typical_load_s: float = Field(10.0, ge=0, description="Typical load time: the scheduler's swap cost.")


DEFAULT_SPECS: dict[str, ModelSpec] = {
    "sdxl": ModelSpec(name="sdxl", vram_gb=10.0, policy="pinned", load_timeout_s=600, typical_load_s=8),
    "qwen_instruct": ModelSpec(
        name="qwen_instruct", vram_gb=15.0, policy="preferred", load_timeout_s=600, typical_load_s=10
    ),
    "qwen_base": ModelSpec(name="qwen_base", vram_gb=15.0, policy="on_demand", load_timeout_s=600, typical_load_s=10),
    "wan": ModelSpec(name="wan", vram_gb=15.0, policy="on_demand", load_timeout_s=900, typical_load_s=25),
}


class ModelTable(BaseModel):
    """The models and the total GPU memory budget they share."""

    model_config = ConfigDict(frozen=True)

    specs: dict[str, ModelSpec]
    budget_gb: float = Field(DEFAULT_BUDGET_GB, gt=0)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def spec(self, name: str) -> ModelSpec:
        """The spec of ``name``; ``KeyError`` naming the known models otherwise."""
        try:
            return self.specs[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {list(self.specs)}") from None

    def vram(self, names: Iterable[str]) -> float:
        """Total estimated GPU memory of ``names``."""
        return sum(self.specs[name].vram_gb for name in names)

    def fits(self, names: Iterable[str]) -> bool:
        """Whether ``names`` can be resident together within the budget."""
        return self.vram(names) <= self.budget_gb + 1e-9

    def with_budget(self, budget_gb: float) -> ModelTable:
        return ModelTable(specs=self.specs, budget_gb=budget_gb)


def parse_overrides(overrides: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Check an override mapping (``MODEL_TABLE``); ``ValueError`` naming the model and field.

    Keys are model names; values are partial specs (``vram_gb``, ``policy``, ``load_timeout_s``,
    ``typical_load_s``). A model not in the defaults must give at least ``vram_gb``.
    """
    if not overrides:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError("must be a JSON object keyed by model name")  # noqa: TRY004 - pydantic reports ValueErrors
    checked: dict[str, dict[str, Any]] = {}
    for name, fields in overrides.items():
        if not isinstance(fields, Mapping):
            raise ValueError(f"{name}: must be an object such as {{\"vram_gb\": 20}}")  # noqa: TRY004
        base = DEFAULT_SPECS.get(name)
        values = {**(base.model_dump() if base else {}), **dict(fields), "name": name}
        try:
            ModelSpec(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"{name}: {problems}") from None
        checked[name] = dict(fields)
    return checked


def build_table(
    overrides: Mapping[str, Any] | None = None,
    budget_gb: float = DEFAULT_BUDGET_GB,
    base: Mapping[str, ModelSpec] | None = None,
) -> ModelTable:
    """The default table (or ``base``) with ``overrides`` applied and the given budget."""
    specs = dict(DEFAULT_SPECS if base is None else base)
    for name, fields in parse_overrides(overrides).items():
        current = specs.get(name)
        values = {**(current.model_dump() if current else {}), **fields, "name": name}
        specs[name] = ModelSpec(**values)
    return ModelTable(specs=specs, budget_gb=budget_gb)


def table_from_settings(settings: Any) -> ModelTable:
    """The table per settings (``model_table`` overrides, ``vram_budget_gb``)."""
    return build_table(getattr(settings, "model_table", None), getattr(settings, "vram_budget_gb", DEFAULT_BUDGET_GB))


def effective_budget(configured_gb: float, gpu_free_gb: float | None, resident_gb: float, margin_gb: float) -> float:
    """The budget to use: the configured one, capped by what the GPU can actually give.

    ``gpu_free_gb`` is NVML's free memory (``None`` without a GPU), ``resident_gb`` what our own
    resident models are accounted for (already taken from the free memory), ``margin_gb`` a
    safety margin kept free for activations and fragmentation.
    """
    if gpu_free_gb is None:
        return configured_gb
    return max(0.0, min(configured_gb, gpu_free_gb + resident_gb - margin_gb))


# --------------------------------------------------------------------------------- job needs

_SDXL_TYPES = ("sdxl_image_fast", "sdxl_image_high")
_WAN_TYPES = ("image_fast", "image_high", "video_fast", "video_high", "wan_video_fast", "wan_video_high")
_ENHANCED_TYPES = ("image7b_fast_enhanced", "image7b_high_enhanced", "video7b_fast_enhanced", "video7b_high_enhanced")
# chat_queue job types (bridge/jobs.py): somebody waits for the reply, as for an HTTP chat turn.
_CHAT_QUEUE_TYPES = ("chat_conversation", "chat_unrestricted", "chat_enhance", "admin_utilities")
CHAT_MODELS = ("qwen_instruct", "qwen_base")
ENHANCE_SUFFIX = ":enhance"  # key of an enhanced job's first stage

# Rough run times of one job (seconds) on the production GPU, from the old system: the
# scheduler's cost hint (shortest expected job first among resident work).
_JOB_COST_S: dict[str, float] = {
    "sdxl_image_fast": 4.0,
    "sdxl_image_high": 7.0,
    "image_fast": 25.0,
    "image_high": 45.0,
    "video_fast": 120.0,
    "video_high": 240.0,
    "wan_video_fast": 120.0,
    "wan_video_high": 240.0,
    "image7b_fast_enhanced": 27.0,
    "image7b_high_enhanced": 47.0,
    "video7b_fast_enhanced": 122.0,
    "video7b_high_enhanced": 242.0,
    "chat": 10.0,
    "enhance": 2.0,
    "chat_conversation": 10.0,
    "chat_unrestricted": 10.0,
    "chat_enhance": 2.0,
    "admin_utilities": 10.0,
}


@dataclass(frozen=True)
class Stage:
    """One GPU grant of a job: the models it needs together, its scheduling key (jobs of one key
    need the same models) and its expected run time."""

    key: str
    models: frozenset[str]
    est_s: float
    then: frozenset[str] = frozenset()  # models the job's next stage needs (eviction spares them)


def job_steps(job_type: str, model: str | None = None) -> tuple[frozenset[str], ...]:
    """The model sets a job needs, step by step (one GPU grant each).

    - SDXL types → ``({sdxl},)``; WAN types → ``({wan},)``.
    - Enhanced WAN types (docs/APP_CONTRACT.md §3: "qwen_base, then wan"): ``({qwen_base}, {wan})`` — Qwen
      Base rewrites the prompt, lets go, then WAN renders. Never both at once: SDXL, Qwen
      Instruct and either of them fit the 47 GB card (40 GB), all four do not (55 GB), so holding
      both evicted the chat model for the whole render.
    - ``chat`` and the chat_queue types → ``({model},)`` with ``model`` ``qwen_instruct`` (default)
      or ``qwen_base``; ``enhance`` → ``({model},)`` with ``qwen_base`` by default.
    """
    if job_type in _SDXL_TYPES:
        return (frozenset({"sdxl"}),)
    if job_type in _WAN_TYPES:
        return (frozenset({"wan"}),)
    if job_type in _ENHANCED_TYPES:
        return (frozenset({"qwen_base"}), frozenset({"wan"}))
    if job_type in ("chat", "enhance", *_CHAT_QUEUE_TYPES):
        chosen = model or ("qwen_base" if job_type == "enhance" else "qwen_instruct")
        if chosen not in CHAT_MODELS:
            raise ValueError(f"{job_type}: model must be one of {list(CHAT_MODELS)}, not {chosen!r}")
        return (frozenset({chosen}),)
    raise ValueError(f"unknown job type {job_type!r}")


def job_stages(job_type: str, model: str | None = None) -> tuple[Stage, ...]:
    """:func:`job_steps` with a key and an expected run time per step: what a job asks the
    dispatcher for, grant by grant. An enhanced job's first stage is keyed
    ``<type>:enhance`` and costs an enhancement; its render keeps the type as key."""
    steps = job_steps(job_type, model=model)
    if len(steps) == 1:
        return (Stage(job_type, steps[0], job_cost_s(job_type)),)
    enhance_s = _JOB_COST_S["enhance"]
    render_s = max(0.0, job_cost_s(job_type) - enhance_s)
    return (Stage(job_type + ENHANCE_SUFFIX, steps[0], enhance_s, steps[1]), Stage(job_type, steps[1], render_s))


def job_cost_s(job_type: str) -> float:
    """Expected run time of one job of ``job_type`` (0.0 when unknown)."""
    return _JOB_COST_S.get(job_type, 0.0)


def is_interactive(job_type: str) -> bool:
    """Chat (HTTP turns and chat_queue jobs) and HTTP enhancement are interactive: somebody is
    waiting for the answer."""
    return job_type in ("chat", "enhance", *_CHAT_QUEUE_TYPES)
