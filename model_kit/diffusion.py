"""What the two diffusion models (``sdxl``, ``wan``) share: parameters, seeds, loading helpers.

Kept apart from :mod:`model_kit.common` (which every model uses) so that the LLM models never
import diffusers, and apart from the model files so that those stay thin.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_kit.common import Cancelled, Request, progress_callback, strings
from model_kit.media import thumbnail_webp

log = logging.getLogger(__name__)

# Seeds are reported as INT64 and image i of a batch uses base + i: leave room for 8 images.
MAX_SEED = 2**63 - 1 - 8
RANDOM_SEED_BOUND = 2**31  # random bases stay small enough for every UI to show and re-enter


class DiffusionParams(BaseModel):
    """Fields both diffusion models accept. Subclasses set defaults, bounds and ``size_multiple``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field must not silently fall back to a default
    size_multiple: ClassVar[int] = 8

    steps: int = Field(25, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # > 0: the response also has ``previews``, a WEBP of each image (of a video: its middle frame)
    # whose longest edge is this many pixels; made from the pixels in memory, so a caller that
    # wants thumbnails need not decode the PNG or MP4 again.
    preview_edge: int = Field(0, ge=0, le=1024)
    preview_quality: int = Field(85, ge=1, le=100)

    @field_validator("width", "height", check_fields=False)
    @classmethod
    def _size_multiple(cls, value: int) -> int:
        if value % cls.size_multiple:
            raise ValueError(f"must be a multiple of {cls.size_multiple}, got {value}")
        return value


def previews(images: list[Any], params: DiffusionParams) -> dict[str, Any]:
    """``{"previews": [WEBP, ...]}`` of ``images`` (PIL images or HxWx3 arrays) as ``params`` ask;
    ``{}`` when they ask for none."""
    if not params.preview_edge:
        return {}
    return {"previews": strings([thumbnail_webp(image, params.preview_edge, params.preview_quality)
                                 for image in images])}


def seeds_for(base: int | None, count: int) -> list[int]:
    """``count`` seeds ``base, base + 1, ...``; a random base when ``base`` is None (0 is a seed)."""
    if base is None:
        base = secrets.randbelow(RANDOM_SEED_BOUND)
    return [base + i for i in range(count)]


def generators(seeds: list[int]) -> list[Any]:
    """One CPU ``torch.Generator`` per seed: the same seed gives the same noise on CPU and GPU."""
    import torch  # noqa: PLC0415

    return [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The loader keyword for a dtype: ``dtype`` where diffusers has it (0.36+), else ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401, PLC0415
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def require_paths(model: str, *paths: Path) -> None:
    """Fail loading with a message naming the first missing weights path."""
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(
                f"{model}: weights not found at {path} (MODELS_DIR or {model.upper()}_WEIGHTS points elsewhere?)"
            )


def cuda_speedups(pipe: Any, device: str) -> list[str]:
    """The speed-up switches (channels-last, SDPA, SDXL VAE precision, ``torch.compile``), on
    CUDA only, as the environment sets them: see :mod:`model_kit.speedups`. Returns what was done."""
    from model_kit import speedups  # noqa: PLC0415

    return speedups.apply(pipe, device)


# The shapes production jobs run (bridge/jobs.py's job table; the app's 1:1, 16:9 and 9:16 sizes):
# (width, height, images per prompt for SDXL / frames for WAN). torch.compile compiles per shape.
WARMUP_SHAPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "sdxl": ((1024, 1024, 1), (1024, 1024, 3), (1024, 576, 1), (576, 1024, 1)),
    "wan": ((832, 480, 81), (480, 832, 81), (832, 480, 1), (480, 832, 1)),
}


def warm_up(name: str, run: Callable[[int, int, int], Any], shapes: tuple[tuple[int, int, int], ...],
            enabled: bool) -> list[tuple[int, int, int]]:
    """Run each production shape once at load, two steps, so that no job pays torch.compile's
    first-request compilation (minutes per shape). ``enabled``: the denoiser was compiled.

    Triton's own ``model_warmup`` is not used: it does not apply to decoupled models, and it
    would send the same sample whatever ``TORCH_COMPILE`` says.
    """
    if not enabled:
        return []
    done = []
    for width, height, count in shapes:
        started = time.perf_counter()
        run(width, height, count)
        log.info("%s: warm-up %dx%d x%d took %.1f s", name, width, height, count, time.perf_counter() - started)
        done.append((width, height, count))
    return done


def compiled(applied: list[str]) -> bool:
    """Whether :func:`cuda_speedups` compiled the denoiser (what it returned says so)."""
    return any("compiled" in item for item in applied)


class _CountingCallback:
    """:func:`model_kit.common.progress_callback` that also records how many steps ran."""

    def __init__(self, request: Request, total_steps: int) -> None:
        self.total_steps = total_steps
        self.done = 0
        self._progress = progress_callback(request, total_steps)

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.done = step + 1
        return self._progress(pipe, step, timestep, callback_kwargs)


def run_pipeline(model: str, pipe: Any, request: Request, total_steps: int, **kwargs: Any) -> Any:
    """Call a diffusers pipeline with progress streaming and cancellation (``total_steps`` = the
    denoising steps it will run). A cancelled run stops after the step in progress, logs how far
    it got (``<model>: cancelled after k of n steps``) and raises :class:`Cancelled`."""
    callback = _CountingCallback(request, total_steps)
    try:
        return pipe(callback_on_step_end=callback, **kwargs)
    except Cancelled:
        log.warning("%s: cancelled after %d of %d steps", model, callback.done, total_steps)
        raise
