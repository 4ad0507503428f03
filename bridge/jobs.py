"""Job types, the queue payload, and its resolution into a runnable :class:`Job` (pure, no I/O).

One table, :data:`JOB_TYPES`, drives every job type (docs/APP_CONTRACT.md §3): its model, queue, output kind,
defaults and limits. Adding a job type is one row in ``_TYPES``; a new *kind* of model (chat) adds
a resolver to ``_RESOLVERS``.

:func:`parse_job` turns one queue element (docs/APP_CONTRACT.md §1-2: a JSON object, or a JSON array holding
one string that is the JSON object) into a :class:`Job`, or raises

- :class:`DeadLetter` when the element cannot be parsed at all or has no usable ``id`` (nobody can
  be told about it, so it goes to the dead-letter list), or
- :class:`InvalidJob` when it has an id but invalid fields; the message names each field and the
  problem in words a person can act on, e.g.
  ``config.width: must be a multiple of 16 between 32 and 1280, got 1000``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from bridge.limits import MAX_JSON_DEPTH, MAX_PAYLOAD_BYTES, json_depth
from bridge.app_payload import is_app_sized, storage_path, unused_video_references, wan_app_values

Model = Literal["sdxl", "wan", "qwen_instruct", "qwen_base"]
Output = Literal["image", "video", "text"]

#: Seeds travel through the producer (JavaScript) and back in the callback: keep them exact there.
MAX_SEED = 2**53 - 1
#: The smallest img2img strength we run (exact-copy mode floors here; 1/strength sets the steps).
MIN_STRENGTH = 0.01
EXACT_COPY_MAX_STRENGTH = 0.05

SDXL_NEGATIVE_PROMPT = (
    "blurry, low quality, distorted, deformed, bad anatomy, watermark, signature, text, logo, "
    "extra limbs, missing limbs"
)

THUMBNAIL_EDGE = 256  # docs/APP_CONTRACT.md §4: thumbnails are WEBP, longest edge 256 px, quality 85
THUMBNAIL_QUALITY = 85
# Asked of the diffusion models with every request: they make the thumbnails from the pixels they
# hold, so the bridge need not decode the PNG or MP4 again (docs/ARCHITECTURE.md, one job's path: per-job overhead).
_PREVIEWS = {"preview_edge": THUMBNAIL_EDGE, "preview_quality": THUMBNAIL_QUALITY}

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_RESOLUTION = re.compile(r"\s*(\d{1,5})\s*[xX×*]\s*(\d{1,5})\s*")


# --- errors -----------------------------------------------------------------------------------


class JobError(Exception):
    """Base of the two ways a queue element can be refused."""


class DeadLetter(JobError):
    """The element cannot be parsed or has no usable ``id``: dead-letter it, nobody to tell."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidJob(JobError):
    """The job has an id but invalid fields; ``message`` names each field and its problem."""

    def __init__(
        self,
        job_id: str,
        user_id: str | None,
        job_type: str | None,
        message: str,
        problems: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.user_id = user_id
        self.job_type = job_type
        self.message = message
        self.problems = problems or [message]


# --- the job-type table -----------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What a job of a type may ask for. Sizes are per side, in pixels."""

    size_multiple: int = 8
    min_size: int = 256
    max_size: int = 2048
    min_steps: int = 1
    max_steps: int = 150
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    num_images: tuple[int, ...] = (1,)
    min_frames: int = 1
    max_frames: int = 1
    min_fps: int = 1
    max_fps: int = 60
    max_prompt_chars: int = 10_000


SDXL_LIMITS = Limits(size_multiple=8, min_size=64, max_size=2048, max_steps=150, num_images=(1, 3, 6))
WAN_IMAGE_LIMITS = Limits(size_multiple=16, min_size=32, max_size=1280, max_steps=100)
WAN_VIDEO_LIMITS = Limits(
    size_multiple=16, min_size=32, max_size=1280, max_steps=100, min_frames=5, max_frames=161
)


@dataclass(frozen=True)
class JobType:
    """One row of the job-type table. Fields that do not apply to a model are ``None``."""

    name: str
    model: Model
    queue: str
    output: Output
    time_limit_s: float
    limits: Limits = field(default_factory=Limits)
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    enhance: bool = False
    negative_prompt: str | None = None
    template: str | None = None  # text jobs: the prompt template (None: chosen by content mode)

    @property
    def models(self) -> tuple[str, ...]:
        """Every model a job of this type uses, in order (enhancement first)."""
        return ("qwen_base", self.model) if self.enhance else (self.model,)


def _sdxl(name: str, steps: int, guidance: float, time_limit_s: float) -> JobType:
    return JobType(
        name=name, model="sdxl", queue="sdxl_queue", output="image", time_limit_s=time_limit_s,
        limits=SDXL_LIMITS, width=1024, height=1024, steps=steps, guidance_scale=guidance,
        negative_prompt=SDXL_NEGATIVE_PROMPT,
    )


def _wan(name: str, output: Output, steps: int, guidance: float, time_limit_s: float, enhance: bool = False) -> JobType:
    video = output == "video"
    return JobType(
        name=name, model="wan", queue="wan_queue", output=output, time_limit_s=time_limit_s,
        limits=WAN_VIDEO_LIMITS if video else WAN_IMAGE_LIMITS, width=480, height=832, steps=steps,
        guidance_scale=guidance, num_frames=81 if video else 1, fps=16 if video else None, enhance=enhance,
    )


def _chat(name: str, template: str | None, time_limit_s: float = 180) -> JobType:
    return JobType(name=name, model="qwen_instruct", queue="chat_queue", output="text", time_limit_s=time_limit_s,
                   template=template)


_TYPES: tuple[JobType, ...] = (
    _sdxl("sdxl_image_fast", steps=15, guidance=6.0, time_limit_s=180),
    _sdxl("sdxl_image_high", steps=25, guidance=7.5, time_limit_s=300),
    _wan("image_fast", "image", steps=25, guidance=6.5, time_limit_s=300),
    _wan("image_high", "image", steps=50, guidance=7.5, time_limit_s=600),
    _wan("video_fast", "video", steps=25, guidance=6.5, time_limit_s=900),
    _wan("video_high", "video", steps=50, guidance=7.5, time_limit_s=1800),
    _wan("image7b_fast_enhanced", "image", steps=25, guidance=6.5, time_limit_s=420, enhance=True),
    _wan("image7b_high_enhanced", "image", steps=50, guidance=7.5, time_limit_s=720, enhance=True),
    _wan("video7b_fast_enhanced", "video", steps=25, guidance=6.5, time_limit_s=1020, enhance=True),
    _wan("video7b_high_enhanced", "video", steps=50, guidance=7.5, time_limit_s=1920, enhance=True),
    _chat("chat_conversation", template=None),
    _chat("chat_unrestricted", template="unrestricted"),
    _chat("chat_enhance", template="sdxl_enhance", time_limit_s=120),
    _chat("admin_utilities", template="admin"),
)
ALIASES: dict[str, str] = {"wan_video_fast": "video_fast", "wan_video_high": "video_high"}

JOB_TYPES: dict[str, JobType] = {t.name: t for t in _TYPES}
JOB_TYPES.update({alias: JOB_TYPES[target] for alias, target in ALIASES.items()})
#: Every queue some job type is served from, in a stable order.
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(t.queue for t in _TYPES))


# --- payload models (docs/APP_CONTRACT.md §2) -------------------------------------------------------------


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode turns true into 1; a boolean where a number belongs is a producer bug.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def _none_to_empty(value: Any) -> Any:
    return {} if value is None else value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


class JobConfig(BaseModel):
    """``config`` of a payload. Unknown keys are ignored; ``None`` means "use the default"."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    num_images: Int | None = None
    num_inference_steps: Int | None = None
    guidance_scale: Float | None = None
    seed: Int | None = None
    resolution: str | None = None
    width: Int | None = None
    height: Int | None = None
    pipeline: str | None = None
    denoise_strength: Float | None = None
    frame_num: Int | None = None
    fps: Int | None = None
    image: Any = None
    first_frame: Any = None
    last_frame: Any = None
    sample_solver: str | None = None


class JobPayload(BaseModel):
    """One queue element (docs/APP_CONTRACT.md §2). Legacy duplicates (``job_id``, ``job_type``, ``quality``,
    ...) and unknown fields are ignored; ``metadata`` is passed through as it came."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    id: str
    type: str
    prompt: str | None = None
    user_id: str | None = None
    negative_prompt: str | None = None
    compel_enabled: bool = False
    compel_weights: str | None = None
    config: JobConfig = Field(default_factory=JobConfig)
    metadata: dict[str, Any] = Field(default_factory=dict)

    _empty_when_null = field_validator("config", "metadata", mode="before")(_none_to_empty)

    @field_validator("compel_enabled", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value


# --- the resolved job -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A validated job with every value resolved (defaults applied, config overrides honoured)."""

    id: str
    user_id: str
    type: JobType
    prompt: str
    negative_prompt: str | None
    compel_weights: str | None
    width: int | None
    height: int | None
    steps: int | None
    guidance_scale: float | None
    seed: int | None
    num_images: int
    num_frames: int | None
    fps: int | None
    reference_image_url: str | None
    strength: float | None
    metadata: Mapping[str, Any]
    requested_type: str = ""
    exact_copy: bool = False
    # What the worker read differently from the payload's face value, and why (bridge.app_payload):
    # merged into the callback metadata.
    notes: Mapping[str, Any] = field(default_factory=dict)
    payload: JobPayload | None = field(default=None, repr=False, compare=False)
    chat: Any = field(default=None, repr=False, compare=False)  # text jobs: a bridge.chat.ChatRequest

    @property
    def model(self) -> str:
        return self.type.model

    def triton_parameters(self) -> dict[str, Any]:
        """The ``parameters`` JSON of the Triton request (docs/ARCHITECTURE.md interface table)."""
        if self.type.model == "sdxl":
            params: dict[str, Any] = {
                "num_images": self.num_images,
                "steps": self.steps,
                "guidance_scale": self.guidance_scale,
                "width": self.width,
                "height": self.height,
                "seed": self.seed,
            }
            if self.strength is not None:
                params["strength"] = self.strength
            if self.compel_weights:
                params["compel_weights"] = self.compel_weights
            return {**params, **_PREVIEWS}
        if self.type.model == "wan":
            video = self.type.output == "video"
            return {
                "num_frames": self.num_frames if video else 1,
                **({"fps": self.fps} if video else {}),
                "steps": self.steps,
                "guidance_scale": self.guidance_scale,
                "width": self.width,
                "height": self.height,
                "seed": self.seed,
                "output": self.type.output,
                **_PREVIEWS,
            }
        raise ValueError(f"no Triton parameters for model {self.type.model!r}")


# --- parsing ----------------------------------------------------------------------------------


def parse_job(raw: bytes | str) -> Job:
    """Parse and resolve one queue element; raise :class:`DeadLetter` or :class:`InvalidJob`."""
    data = _decode(raw)
    job_id = _usable_id(data.get("id"))
    if job_id is None:
        raise DeadLetter(f"no usable id (expected a string of letters, digits, '-' or '_'), got {_show(data.get('id'))}")
    user_id = data.get("user_id") if isinstance(data.get("user_id"), str) else None
    requested_type = data.get("type") if isinstance(data.get("type"), str) else None

    def invalid(problems: list[str]) -> InvalidJob:
        return InvalidJob(job_id, user_id, requested_type, "; ".join(problems), problems)

    try:
        payload = JobPayload.model_validate({**data, "id": job_id})
    except ValidationError as exc:
        raise invalid(_describe_errors(exc)) from None

    problems: list[str] = []
    if payload.user_id is None or not payload.user_id.strip():
        problems.append("user_id: required (assets are stored under {user_id}/{job_id}/)")
    elif not _SAFE_ID.fullmatch(payload.user_id):
        problems.append(f"user_id: must be letters, digits, '-' or '_' (up to 128), got {_show(payload.user_id)}")
    job_type = JOB_TYPES.get(payload.type)
    if job_type is None:
        problems.append(f"type: unknown job type {_show(payload.type)}; known types: {', '.join(sorted(JOB_TYPES))}")
        raise invalid(problems)
    resolver = _RESOLVERS.get(job_type.model)
    if resolver is None:  # a table row whose model has no resolver yet
        raise invalid([f"type: {payload.type!r} is not supported by this worker yet"])
    values = resolver(payload, job_type, problems)
    if problems:
        raise invalid(problems)
    return Job(
        id=job_id, user_id=payload.user_id or "", type=job_type, metadata=dict(payload.metadata),
        requested_type=payload.type, payload=payload, **values,
    )


def peek_id(raw: bytes | str) -> str | None:
    """The usable job id of a queue element, or ``None``; never raises (for attempt counting)."""
    try:
        return _usable_id(_decode(raw).get("id"))
    except DeadLetter:
        return None


def _decode(raw: bytes | str) -> dict[str, Any]:
    """The payload object of a queue element: plain, or double-encoded as ``["{...}"]``."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise DeadLetter("payload is not UTF-8 text") from None
    elif isinstance(raw, str):
        text = raw
    else:
        raise DeadLetter(f"payload must be bytes or text, got {type(raw).__name__}")
    if len(text) > MAX_PAYLOAD_BYTES:  # characters: a cheap bound before the exact byte count
        raise DeadLetter(f"payload is {len(text.encode('utf-8', 'surrogatepass'))} bytes; at most "
                         f"{MAX_PAYLOAD_BYTES} are accepted")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:  # refused by name, before the parser recurses that deep
        raise DeadLetter(f"payload is JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    value: Any = text
    for _ in range(3):  # text -> object, or text -> ["text"] -> object
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as exc:
                raise DeadLetter(f"payload is not valid JSON: {_first_line(exc)}") from None
        elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, dict)):
            value = value[0]
        else:
            break
        if isinstance(value, dict):
            return value
    raise DeadLetter(f"payload must be a JSON object (or [\"<JSON object>\"]), got {_kind(value)}")


def _usable_id(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if isinstance(value, str) and _SAFE_ID.fullmatch(value):
        return value
    return None


# --- resolvers: payload + job type -> Job field values ----------------------------------------


def _resolve_visual(payload: JobPayload, jt: JobType, problems: list[str]) -> dict[str, Any]:
    """Shared by SDXL and WAN: prompt, size, steps, guidance, seed, frames."""
    cfg, limits = payload.config, jt.limits
    # An exact copy of a reference image needs no prompt (the app sends "" then: docs/APP_CONTRACT.md).
    has_reference = jt.model == "sdxl" and payload.metadata.get("reference_image_url") not in (None, "")
    prompt = _check_prompt(payload.prompt, "prompt", limits, problems, required=not has_reference)
    negative = _check_prompt(payload.negative_prompt, "negative_prompt", limits, problems, required=False)
    compel = None
    if payload.compel_enabled:
        compel = _check_prompt(payload.compel_weights, "compel_weights", limits, problems, required=False)

    width, height = jt.width, jt.height
    width_src = height_src = "type default"
    if cfg.resolution is not None and (cfg.width is None or cfg.height is None):
        size = _parse_resolution(cfg.resolution)
        if size is None:
            problems.append(f"config.resolution: expected WIDTHxHEIGHT such as '1024x1024', got {_show(cfg.resolution)}")
        else:
            (width, height), width_src, height_src = size, "config.resolution", "config.resolution"
    if cfg.width is not None:
        width, width_src = cfg.width, "config.width"
    if cfg.height is not None:
        height, height_src = cfg.height, "config.height"
    for value, source, side in ((width, width_src, "width"), (height, height_src, "height")):
        if not (limits.min_size <= value <= limits.max_size and value % limits.size_multiple == 0):
            what = f"{source}: {side}" if source == "config.resolution" else f"{source}:"
            problems.append(
                f"{what} must be a multiple of {limits.size_multiple} between {limits.min_size} "
                f"and {limits.max_size} for {jt.name}, got {value}"
            )

    steps = _in_range(cfg.num_inference_steps, jt.steps, "config.num_inference_steps",
                      limits.min_steps, limits.max_steps, problems)
    guidance = _in_range(cfg.guidance_scale, jt.guidance_scale, "config.guidance_scale",
                         limits.min_guidance, limits.max_guidance, problems)

    seed = cfg.seed
    if seed == -1:  # the common "random" sentinel of UIs
        seed = None
    elif seed is not None and not 0 <= seed <= MAX_SEED:
        problems.append(f"config.seed: must be a whole number between 0 and {MAX_SEED} (or null for random), got {seed}")

    num_frames, fps = jt.num_frames, jt.fps
    if jt.output == "video":
        num_frames = _in_range(cfg.frame_num, jt.num_frames, "config.frame_num", limits.min_frames,
                               limits.max_frames, problems)
        if num_frames is not None and (num_frames - 1) % 4 != 0:
            problems.append(f"config.frame_num: must be 4k+1 (e.g. 33, 81, 121), got {num_frames}")
        fps = _in_range(cfg.fps, jt.fps, "config.fps", limits.min_fps, limits.max_fps, problems)
    # Image outputs are one frame whatever frame_num/fps say.

    return dict(
        prompt=prompt or "", negative_prompt=negative or jt.negative_prompt, compel_weights=compel or None,
        width=width, height=height, steps=steps, guidance_scale=guidance, seed=seed, num_images=1,
        num_frames=num_frames, fps=fps, reference_image_url=None, strength=None,
    )


def _resolve_sdxl(payload: JobPayload, jt: JobType, problems: list[str]) -> dict[str, Any]:
    values = _resolve_visual(payload, jt, problems)
    num_images = payload.config.num_images
    if num_images is not None:
        if num_images not in jt.limits.num_images:
            allowed = ", ".join(map(str, jt.limits.num_images))
            problems.append(f"config.num_images: must be one of {allowed}, got {num_images}")
        values["num_images"] = num_images
    values.update(_resolve_img2img(payload, values, problems))
    return values


def _resolve_wan(payload: JobPayload, jt: JobType, problems: list[str]) -> dict[str, Any]:
    # WAN renders one output; num_images is ignored. The app's image-slider values and reference
    # frames are read as bridge.app_payload says (the text-to-video model uses no reference).
    values = _resolve_visual(payload, jt, problems)
    notes: dict[str, Any] = {}
    if is_app_sized(payload.config) and not problems:
        updates, notes = wan_app_values(payload.config, jt, values)
        values.update(updates)
    unused = unused_video_references(payload)
    if unused:
        notes["references_not_used"] = unused
        notes["references_note"] = "the text-to-video model cannot use reference images; rendered from the prompt"
    values["notes"] = notes
    return values


def _resolve_img2img(payload: JobPayload, values: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """SDXL image-to-image from ``metadata.reference_image_url`` (docs/APP_CONTRACT.md §2-3)."""
    md, cfg = payload.metadata, payload.config
    url = md.get("reference_image_url")
    if url is None or url == "":
        return {}
    if not isinstance(url, str) or len(url) > 8192 or not (re.match(r"https?://\S+$", url) or storage_path(url)):
        problems.append(f"metadata.reference_image_url: must be an http(s) URL or a storage path "
                        f"(user-library/... or workspace-temp/...), got {_show(url)}")
        return {}
    if cfg.denoise_strength is not None:
        strength, source = cfg.denoise_strength, "config.denoise_strength"
    elif md.get("denoise_strength") is not None:
        strength, source = _number(md["denoise_strength"], "metadata.denoise_strength", problems), "metadata.denoise_strength"
    else:
        reference = md.get("reference_strength")
        reference = 0.5 if reference is None else _number(reference, "metadata.reference_strength", problems)
        if reference is None:
            return {}
        if not 0.0 <= reference <= 1.0:
            problems.append(f"metadata.reference_strength: must be between 0 and 1, got {reference}")
            return {}
        strength, source = 1.0 - reference, "metadata.reference_strength"
    if strength is None:
        return {}
    if not 0.0 <= strength <= 1.0:
        problems.append(f"{source}: must be between 0 and 1, got {strength}")
        return {}
    exact = md.get("exact_copy_mode", False)
    if exact not in (True, False, None):
        problems.append(f"metadata.exact_copy_mode: must be true or false, got {_show(exact)}")
        return {}
    exact = exact or md.get("reference_mode") == "copy"  # the app says "copy" in either
    out: dict[str, Any] = {"reference_image_url": url, "exact_copy": bool(exact)}
    if exact:
        strength = min(max(strength, MIN_STRENGTH), EXACT_COPY_MAX_STRENGTH)
        out["guidance_scale"] = 1.0
    elif strength < MIN_STRENGTH:
        what = "1 - reference_strength" if source == "metadata.reference_strength" else "it"
        problems.append(f"{source}: {what} must be at least {MIN_STRENGTH} so the image changes at all "
                        f"(use metadata.exact_copy_mode for a copy), got {round(strength, 6)}")
        return {}
    steps = values["steps"]
    if isinstance(steps, int) and steps >= 1:  # strength >= MIN_STRENGTH bounds the loop
        while int(steps * strength) < 1:  # diffusers runs int(steps * strength) denoising steps
            steps += 1
        out["steps"] = steps
    out["strength"] = strength
    return out


#: Keys of a chat job's ``metadata`` that make up its chat request (bridge.chat.ChatRequest).
CHAT_METADATA_KEYS = ("messages", "system_prompt", "conversation_id", "context_type", "conversation_history",
                      "max_tokens", "temperature", "top_p", "sfw_mode")


def _resolve_chat(payload: JobPayload, jt: JobType, problems: list[str]) -> dict[str, Any]:
    """A chat job: ``prompt`` is the user's message; ``metadata`` may carry the rest of a chat
    request (system prompt, history or ``messages``, sampling, ``sfw_mode``)."""
    from bridge.chat import ChatRequestError, parse_chat_request  # noqa: PLC0415 - pure, imported lazily

    prompt = _check_prompt(payload.prompt, "prompt", jt.limits, problems, required=True)
    request = None
    if prompt is not None:
        fields = {key: payload.metadata[key] for key in CHAT_METADATA_KEYS if key in payload.metadata}
        if "messages" not in fields:
            fields["message"] = prompt
        try:
            request = parse_chat_request(fields)
        except ChatRequestError as exc:
            problems.append(f"metadata.{exc}")
    return dict(
        prompt=prompt or "", negative_prompt=None, compel_weights=None, width=None, height=None, steps=None,
        guidance_scale=None, seed=payload.config.seed, num_images=0, num_frames=None, fps=None,
        reference_image_url=None, strength=None, chat=request,
    )


_RESOLVERS = {"sdxl": _resolve_sdxl, "wan": _resolve_wan, "qwen_instruct": _resolve_chat}


# --- small helpers ----------------------------------------------------------------------------


def _check_prompt(value: str | None, name: str, limits: Limits, problems: list[str], *, required: bool) -> str | None:
    if value is None or not value.strip():
        if required:
            problems.append(f"{name}: required and must not be empty")
        return None
    if len(value) > limits.max_prompt_chars:
        problems.append(f"{name}: at most {limits.max_prompt_chars} characters, got {len(value)}")
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        problems.append(f"{name}: not valid text (it holds an unpaired UTF-16 surrogate)")
        return None
    return value.strip()


def _in_range(value: Any, default: Any, name: str, low: float, high: float, problems: list[str]) -> Any:
    if value is None:
        return default
    if not low <= value <= high:
        kind = "a whole number" if isinstance(value, int) else "a number"
        problems.append(f"{name}: must be {kind} between {low} and {high}, got {value}")
    return value


def _number(value: Any, name: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append(f"{name}: must be a number between 0 and 1, got {_show(value)}")
        return None
    return float(value)


def _parse_resolution(text: str) -> tuple[int, int] | None:
    match = _RESOLUTION.fullmatch(text)
    return (int(match[1]), int(match[2])) if match else None


_ERROR_WORDS = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "missing": "required",
}


def _describe_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        name = ".".join(str(part) for part in err["loc"]) or "payload"
        if err["type"] == "missing":
            problems.append(f"{name}: required")
            continue
        words = _ERROR_WORDS.get(err["type"])
        if words is None:
            words = err["msg"].removeprefix("Value error, ")
            words = words[:1].lower() + words[1:]
        problems.append(f"{name}: {words}, got {_show(err.get('input'))}")
    return problems


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
