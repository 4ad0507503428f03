"""How the live app's queue elements are read where they differ from what they seem to say (pure).

The app's ``queue-job`` (docs/APP_CONTRACT.md, "What the app sends") sets ``config.resolution``
from its image aspect ratio and ``config.num_inference_steps`` / ``config.guidance_scale`` from its
image sliders for **every** job, video included, and composes ``negative_prompt`` from its SDXL
negatives. For a WAN job these are image-model values the 1.3B video model must not be given.

The rule that tells the app's values from a producer's explicit ones: a WAN job that sizes itself
by ``config.resolution`` with no ``config.width``/``config.height`` is app-shaped (``queue-job``
never sends width/height; CONTRACT's older producers and our own API do). For such a job

- the resolution gives only the orientation; the size is the model's 480p size for it
  (:data:`WAN_480P_SIZES`);
- the steps and guidance come from the job-type table (the sliders' values are image values);
- the negative prompt is Wan 2.1's own default (:data:`WAN_NEGATIVE_PROMPT`).

Everything asked and used is recorded in :func:`wan_app_values`'s notes, which go into the
callback metadata. A job with explicit ``width``/``height`` keeps them (within the type's limits),
and its steps, guidance and negative prompt.
"""

from __future__ import annotations

import re
from typing import Any

#: Wan 2.1's default negative prompt (``sample_neg_prompt`` in the Wan 2.1 release's
#: ``wan/configs/shared_config.py``), what the model was tuned with.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

#: The 1.3B model's 480p sizes (width, height), multiples of 16; the square has about the area of
#: the other two (624 x 624 = 389,376 px against 832 x 480 = 399,360 px).
WAN_480P_SIZES = {"landscape": (832, 480), "portrait": (480, 832), "square": (624, 624)}

#: A raw path in one of the buckets the app keeps reference images in.
_RAW_PATH = re.compile(r"(?P<bucket>user-library|workspace-temp)/(?P<path>[^?#\s]+)")

#: Reference fields of a video job the text-to-video model cannot use.
VIDEO_REFERENCE_FIELDS = (
    ("metadata", "reference_image_url"), ("metadata", "start_reference_url"), ("metadata", "end_reference_url"),
    ("config", "image"), ("config", "first_frame"), ("config", "last_frame"),
)


def orientation(width: int, height: int) -> str:
    if width > height:
        return "landscape"
    return "portrait" if height > width else "square"


def is_app_sized(config: Any) -> bool:
    """Whether a WAN job's size comes from the app's aspect-ratio ``resolution`` (no width/height)."""
    return config.resolution is not None and config.width is None and config.height is None


def wan_app_values(config: Any, job_type: Any, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """For an app-shaped WAN job (:func:`is_app_sized`): the resolved values to replace, and the
    notes for the callback metadata (what was asked, what was used, and why)."""
    asked_w, asked_h = values["width"], values["height"]
    shape = orientation(asked_w, asked_h)
    width, height = WAN_480P_SIZES[shape]
    updates = {"width": width, "height": height, "steps": job_type.steps, "guidance_scale": job_type.guidance_scale,
               "negative_prompt": WAN_NEGATIVE_PROMPT}
    notes = {
        "requested": {"resolution": config.resolution, "num_inference_steps": config.num_inference_steps,
                      "guidance_scale": config.guidance_scale},
        "used": {"width": width, "height": height, "steps": job_type.steps,
                 "guidance_scale": job_type.guidance_scale, "orientation": shape},
        "sizing": "the app's aspect ratio on the video model's 480p size; steps and guidance from the job type",
        "negative_prompt_source": "wan2.1 default (the app's negative prompt is for the image model)",
    }
    return updates, notes


def unused_video_references(payload: Any) -> list[str]:
    """The reference fields a WAN job carries that the text-to-video model cannot use."""
    found = []
    for section, name in VIDEO_REFERENCE_FIELDS:
        holder = payload.metadata if section == "metadata" else payload.config.model_dump()
        value = holder.get(name)
        if value not in (None, ""):
            found.append(f"{section}.{name}")
    return found


def storage_path(value: str) -> tuple[str, str] | None:
    """``(bucket, path)`` of a raw storage path such as ``user-library/{user_id}/x.png``, else None."""
    match = _RAW_PATH.fullmatch(value)
    if match is None or ".." in match["path"].split("/"):
        return None
    return match["bucket"], match["path"]
