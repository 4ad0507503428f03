"""Scene routes of the HTTP API ("one-click generation").

- ``POST /scene/detect`` ``{text, characters: [{name, appearance, aliases?}], use_model?}`` →
  ``{has_scene, characters, actions, setting, prompt, prompt_tokens, prompt_budget,
  prompt_trimmed, used_model, note}``. :func:`bridge.scene.detect_scene` combines the rules of
  ``scene_rules.yaml`` with one ``qwen_instruct`` pass that runs through the same interactive
  chat path as ``/chat`` (the dispatcher's GPU turn, then ``runtime.text.complete``). When the
  model is unavailable (cannot be made resident, rejected by the scheduler, a failure, no answer
  within :data:`MODEL_TIMEOUT_S`, or not the JSON asked for) the rules alone answer and ``note``
  says so. The prompt keeps each character's stated appearance and fits the ``scene_detect``
  budget (75 CLIP tokens) counted with SDXL's own CLIP tokenizer.
- ``POST /scene/generate``: the same, plus ``user_id``, ``job_type`` (an SDXL type,
  ``sdxl_image_fast`` by default), ``config`` and ``negative_prompt``; the prompt is queued as an
  SDXL job through the code of ``POST /jobs`` → 202 ``{job_id, status, queue, position, prompt,
  ...}``. No scene → 422 saying so.

The safety gate runs on the reply and the character descriptions before anything else, and on
the finished prompt: a refusal is a 400 ``content_refused`` with a non-graphic reason, counted in
the ``safety_refusals`` metric (``job_type="scene"``).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridge import metrics
from bridge.api_common import ApiError, runtime_of
from bridge.api_jobs import queue_job
from bridge.api_types import ApiRuntime
from bridge.chat import MAX_MESSAGE_CHARS
from bridge.chat_turns import complete, cpu, data_of, refuse_unsafe, tokenizer_lock, tokenizer_of
from bridge.prompt_data import PromptData
from bridge.safety import REFUSAL_REASON
from bridge.scene import CharacterDesc, Generate, SceneResult, detect_scene, detect_scene_rules

router = APIRouter(prefix="/scene")

SCENE_MODEL = "qwen_instruct"
#: The model pass (GPU wait included) gives way to the rules after this long.
MODEL_TIMEOUT_S = 30.0
MAX_CHARACTERS = 20
_SAFETY_KIND = "scene"


class ModelUnavailable(RuntimeError):
    """The scene model could not answer; ``public`` (the API's answer for it) says why, and the
    rules answer instead."""

    def __init__(self, public: str) -> None:
        super().__init__(public)
        self.public = public


class SceneRequest(BaseModel):
    """``POST /scene/detect``. ``use_model: false`` skips the model pass (rules only)."""

    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    characters: list[CharacterDesc] = Field(default_factory=list, max_length=MAX_CHARACTERS)
    use_model: bool = True

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def safety_text(self) -> str:
        """Everything a generation would be made from, checked together."""
        return "\n".join([self.text, *(f"{c.name}: {c.appearance}" for c in self.characters)])


class SceneGenerateRequest(SceneRequest):
    """``POST /scene/generate``: a scene request plus what the SDXL job needs."""

    user_id: str = Field(min_length=1, max_length=200)
    job_type: Literal["sdxl_image_fast", "sdxl_image_high"] = "sdxl_image_fast"
    config: dict[str, Any] = Field(default_factory=dict)
    negative_prompt: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


def _generator(runtime: ApiRuntime, data: PromptData) -> Generate:
    """``generate(messages)`` for :func:`detect_scene`: one ``qwen_instruct`` completion through the
    interactive chat path, with the ``scene_detect`` template's sampling."""
    sampling = data.template("scene_detect").sampling()

    async def generate(messages: list[dict[str, str]]) -> str:
        try:
            result = await complete(runtime, SCENE_MODEL, messages, sampling)
        except ApiError as exc:
            raise ModelUnavailable(exc.message) from None
        return result.text

    return generate


async def _detect(runtime: ApiRuntime, body: SceneRequest) -> SceneResult:
    """Safety gate, then detection (model pass unless disabled); the result's prompt passed the gate."""
    data = data_of(runtime)
    await refuse_unsafe(runtime, body.safety_text(), data, _SAFETY_KIND)
    tokenizer = await tokenizer_of(runtime, "sdxl")
    if body.use_model:
        result = await detect_scene(body.text, body.characters, _generator(runtime, data), tokenizer, data=data,
                                    timeout_s=MODEL_TIMEOUT_S, lock=tokenizer_lock,
                                    run=functools.partial(cpu, runtime))
    else:
        # Regular expressions and the CLIP tokenizer: CPU work, kept off the event loop.
        def rules() -> SceneResult:
            with tokenizer_lock:
                return detect_scene_rules(body.text, body.characters, tokenizer=tokenizer, data=data,
                                          note="use_model is false: rules only")

        result = await cpu(runtime, rules)
    if result.refused:
        metrics.inc_safety_refusal(_SAFETY_KIND)
        raise ApiError(400, REFUSAL_REASON, type="content_refused")
    return result


def _answer(result: SceneResult, data: PromptData) -> dict[str, Any]:
    return {
        "success": True,
        "has_scene": result.has_scene,
        "characters": result.characters_found,
        "actions": result.actions,
        "setting": result.setting,
        "prompt": result.prompt,
        "prompt_tokens": result.prompt_tokens,
        "prompt_budget": data.template("scene_detect").prompt_budget,
        "prompt_trimmed": result.prompt_trimmed,
        "used_model": result.used_model,
        "note": result.note,
    }


@router.post("/detect")
async def scene_detect(request: Request, body: SceneRequest) -> dict[str, Any]:
    """Whether ``text`` holds a visual scene, who and what is in it, and an SDXL prompt for it."""
    runtime = runtime_of(request)
    result = await _detect(runtime, body)
    return _answer(result, data_of(runtime))


@router.post("/generate", status_code=202)
async def scene_generate(request: Request, body: SceneGenerateRequest) -> JSONResponse:
    """Detect the scene, then queue its SDXL job (as ``POST /jobs`` would); 202 with the job id."""
    runtime = runtime_of(request)
    result = await _detect(runtime, body)
    if not result.has_scene or not result.prompt:
        raise ApiError(422, "text: no visual scene was found in the text, so there is nothing to generate",
                       type="no_scene", param="text")
    payload: dict[str, Any] = {
        "type": body.job_type, "prompt": result.prompt, "user_id": body.user_id, "config": body.config,
        "metadata": {"source": "scene", "scene_characters": result.characters_found,
                     "scene_used_model": result.used_model},
    }
    if body.negative_prompt:
        payload["negative_prompt"] = body.negative_prompt
    queued = await queue_job(runtime, json.dumps(payload).encode("utf-8"))
    answer = {"job_id": queued["id"], **queued, **_answer(result, data_of(runtime))}
    return JSONResponse(answer, status_code=202, headers={"Location": f"/jobs/{queued['id']}"})
