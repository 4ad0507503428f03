"""Queue elements built the way the app's ``queue-job`` edge function builds them
(docs/APP_CONTRACT.md, "What the app sends"), for tests that feed the worker what the live app sends.

:func:`app_request` is what the app's UI posts to ``queue-job`` (its image sliders' steps and
guidance, 25 / 6.0 by default, are sent for every job, video included); :func:`queue_element`
turns it into the Redis element as ``queue-job`` does: exact-copy / modify / text-to-image
branches, the resolution from the aspect ratio, the negative prompt composed from the database's
SDXL negatives plus the user's, video reference fields, the legacy duplicates. Prompt enhancement
is never asked for here (``user_requested_enhancement`` unset), so the prompt goes through as the
user wrote it. Undefined values are left out and ``null`` kept, as ``JSON.stringify`` does.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

USER_ID = "4c1d7a52-9a43-4f0e-8d0e-2f7a7e5b1c01"
#: What the app's ``negative_prompts`` table holds for SDXL (sfw), joined with ", " by queue-job.
SDXL_NEGATIVES = {
    "txt2img": "lowres, bad anatomy, bad hands, text, error, missing fingers, cropped, worst quality",
    "i2i": "distorted face, changed identity, different person, blurry",
}
_RESOLUTIONS = {"1:1": "1024x1024", "16:9": "1024x576", "9:16": "576x1024"}
# queue-job's image-to-image constants
_DENOISE_COPY_MAX, _DENOISE_MOD_DEFAULT = 0.05, 0.20
_CFG_COPY, _CFG_MOD_DEFAULT = 1.0, 6.0
_STEPS_COPY_DEFAULT, _STEPS_MOD_DEFAULT = 15, 20


def app_request(job_type: str, prompt: str = "", *, aspect_ratio: str | None = None, steps: float | None = 25,
                guidance_scale: float | None = 6.0, **fields: Any) -> dict[str, Any]:
    """The body the app's UI posts to ``queue-job`` (the sliders' values included)."""
    metadata = dict(fields.pop("metadata", {}) or {})
    if aspect_ratio is not None:
        metadata["aspect_ratio"] = aspect_ratio
    request = {"job_type": job_type, "prompt": prompt, "steps": steps, "guidance_scale": guidance_scale,
               "metadata": metadata, **fields}
    return {k: v for k, v in request.items() if v is not None}


def queue_element(request: dict[str, Any], *, job_id: str | None = None, user_id: str = USER_ID) -> dict[str, Any]:
    """The element ``queue-job`` pushes for ``request`` (its ``jobs`` row id is ``job_id``)."""
    job_id = job_id or str(uuid.uuid4())
    job_type: str = request["job_type"]
    meta: dict[str, Any] = dict(request.get("metadata") or {})
    original = request.get("original_prompt") or request.get("prompt") or ""
    exact_copy_mode = bool(meta.get("exact_copy_mode"))
    reference = meta.get("reference_image_url") or request.get("reference_image_url")
    has_original_enhanced = bool(meta.get("originalEnhancedPrompt"))
    is_video = "video" in job_type or "wan" in job_type
    start_ref, end_ref = meta.get("start_reference_url"), meta.get("end_reference_url")
    # (Signing: a raw path comes back signed, or unchanged when signing failed; the caller passes
    # whichever it wants the worker to see.)
    trimmed = original.strip()

    denoise = request.get("denoise_strength")
    if not isinstance(denoise, (int, float)) and isinstance(request.get("reference_strength"), (int, float)):
        denoise = 1 - request["reference_strength"]
    cfg = _number(request.get("guidance_scale"), meta.get("guidance_scale"))
    steps = _number(request.get("steps"), meta.get("steps"))

    exact_copy = exact_copy_mode and bool(reference) and not has_original_enhanced and not trimmed
    modify = bool(reference) and not exact_copy and (
        meta.get("reference_mode") == "modify" or has_original_enhanced or bool(trimmed))
    enhanced_prompt = request.get("enhanced_prompt") or original
    if modify:
        enhanced_prompt = meta.get("originalEnhancedPrompt") or original if not trimmed else enhanced_prompt

    negative_input = request.get("negative_prompt")
    if exact_copy:
        denoise = denoise if isinstance(denoise, (int, float)) else _DENOISE_COPY_MAX
        cfg = _CFG_COPY
        steps = steps if isinstance(steps, (int, float)) else _STEPS_COPY_DEFAULT
        negative_input = None
    elif modify:
        denoise = denoise if isinstance(denoise, (int, float)) else _DENOISE_MOD_DEFAULT
        cfg = cfg if isinstance(cfg, (int, float)) else _CFG_MOD_DEFAULT
        steps = steps if isinstance(steps, (int, float)) else _STEPS_MOD_DEFAULT

    base_negative = SDXL_NEGATIVES["i2i" if (exact_copy or modify) else "txt2img"]
    user_negative = negative_input or meta.get("negative_prompt") or ""
    final_negative = ", ".join(part for part in (base_negative, user_negative) if part)

    is_image = "image" in job_type
    pipeline = "img2img" if (exact_copy or modify) else ("txt2img" if is_image else "video")
    batch = (request.get("num_images") or meta.get("num_images") or 1) if is_image else 1
    batch = 1 if batch <= 1 else (3 if batch <= 3 else 6)

    video_mode = "none"
    if is_video:
        if reference and not start_ref and not end_ref:
            video_mode = "single"
        elif start_ref and end_ref:
            video_mode = "both"
        elif start_ref:
            video_mode = "start"
        elif end_ref:
            video_mode = "end"

    config: dict[str, Any] = {
        "pipeline": pipeline, "num_images": batch, "num_inference_steps": steps, "guidance_scale": cfg,
        "denoise_strength": denoise, "resolution": _RESOLUTIONS.get(meta.get("aspect_ratio"), "1024x1024"),
        "seed": request.get("seed") or meta.get("seed"),
    }
    if is_video and video_mode != "none":
        config["first_frame"] = start_ref if video_mode in ("start", "both") else None
        config["last_frame"] = end_ref if video_mode in ("end", "both") else None
        config["image"] = reference if video_mode == "single" else None
        config = {k: v for k, v in config.items() if not (k in ("first_frame", "last_frame", "image") and v is None)}
    if is_video:
        config["sample_solver"] = "dpm++"

    metadata: dict[str, Any] = {
        **meta,
        "denoise_strength": denoise if reference else None,
        "reference_strength": request.get("reference_strength") if reference else None,
        "exact_copy_mode": exact_copy,
        "reference_mode": "modify" if modify else ("copy" if exact_copy else None),
        "reference_image_url": reference or None,
    }
    if is_video:
        metadata.update(video_reference_mode=video_mode, start_reference_url=start_ref, end_reference_url=end_ref)
    metadata.update(
        originalEnhancedPrompt=meta.get("originalEnhancedPrompt") or None,
        originalSeed=meta.get("seed") or None,
        reference_type=meta.get("reference_type") or ("character" if exact_copy else "style"),
        nsfw_optimization=(meta.get("contentType") or "sfw") == "nsfw",
        reference_strength_overridden=False,
    )
    element = {
        "id": job_id,
        "type": job_type.replace("wan_video_", "video_"),
        "prompt": enhanced_prompt,
        "user_id": user_id,
        "config": config,
        "metadata": metadata,
        "negative_prompt": None if exact_copy else final_negative,
        "compel_enabled": request.get("compel_enabled") or meta.get("compel_enabled") or False,
        "compel_weights": request.get("compel_weights") or meta.get("compel_weights") or None,
        "job_id": job_id,
        "job_type": job_type,
        "quality": request.get("quality") or ("high" if "high" in job_type else "fast"),
        "format": "image" if is_image else "video",
        "content_type": meta.get("contentType") or "sfw",
    }
    # JSON.stringify drops undefined (None here, for keys queue-job leaves undefined) but keeps null;
    # the fields queue-job sets to null rather than undefined are kept as None.
    return _drop_undefined(element, keep_null={("metadata", "start_reference_url"), ("metadata", "end_reference_url")})


def queue_json(element: dict[str, Any]) -> str:
    """How the element travels: Upstash RPUSH of ``[JSON.stringify(payload)]`` stores the string."""
    return json.dumps(element, ensure_ascii=False)


def _number(*values: Any) -> float | None:
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def _drop_undefined(element: dict[str, Any], keep_null: set[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in element.items():
        if isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if v is not None or (key, k) in keep_null}
        elif value is not None:
            out[key] = value
    return out
