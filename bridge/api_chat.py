"""Chat routes of the HTTP API: the old contract's ``/chat``, ``/generate`` and ``/enhance``
(docs/APP_CONTRACT.md §5) and the OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``.

One path serves them all: parse → safety gate → :func:`bridge.chat.prepare_chat` (content mode,
template, context trimming with the model's real tokenizer) → an interactive turn from the
worker's dispatcher (chat latency priority) → :class:`bridge.textgen.TextService` on Triton →
sfw masking (:meth:`PreparedChat.finish`); the steps up to the generation are
:mod:`bridge.chat_turns`'s, shared with the other routes that run a model. A model that cannot be
made resident answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from bridge import metrics
from bridge.api_common import ApiError, EventStream, runtime_of, sse
from bridge.api_types import ApiRuntime
from bridge.chat import (
    MAX_MESSAGES,
    MAX_TURN_CHARS,
    ChatRequest,
    PreparedChat,
    enhancement_messages,
    finish_enhancement,
    mask_sfw,
    with_minor_rule,
)
from bridge.chat_turns import (
    CHAT_MODELS,
    DISPLAY_NAMES,
    complete,
    counted,
    cpu,
    data_of,
    generation_error,
    parse_body,
    prepare,
    stream_turn,
    refuse_unsafe,
    refuse_unsafe_texts,
    refuse_verdict,
    tokenizer_lock,
    tokenizer_of,
)
from bridge.limits import WholeNumber
from bridge.prompt_data import PromptData
from bridge.residency import ResidencyError
from bridge.safety import OUTPUT_REFUSAL_REASON, StreamGuard, check_output
from bridge.safety_paths import chat_texts
from bridge.textgen import TextResult
from bridge.triton_client import InferenceFailed

#: ``/enhance`` defaults (docs/APP_CONTRACT.md §5: like ``/chat`` with max_tokens 200).
ENHANCE_DEFAULTS = {"max_tokens": 200, "temperature": 0.7, "top_p": 0.9}

legacy_router = APIRouter()
openai_router = APIRouter(prefix="/v1")
#: Stop sequences one request may give (OpenAI's own limit is 4).
MAX_STOP = 16


def model_info(model: str, result: TextResult) -> dict[str, Any]:
    return {
        "model_name": model,
        "display_name": DISPLAY_NAMES[model],
        "served_by": "triton",
        "finish_reason": result.finish_reason,
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
    }


# ----------------------------------------------------------------------------- old contract
@legacy_router.post("/chat")
@legacy_router.post("/generate")
@counted
async def chat(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """One chat turn: ``{messages | message, max_tokens, temperature, top_p, model, sfw_mode}``
    → ``{success, response, generation_time, tokens_generated, model_info, prompt_info}``."""
    return await answer_chat(runtime_of(request), parse_body(body, 400))


async def answer_chat(runtime: ApiRuntime, parsed: ChatRequest, template: str | None = None) -> dict[str, Any]:
    """One chat turn answered in the ``/chat`` shape; ``template`` forces a template."""
    prepared = await prepare(runtime, parsed, template)
    result = await complete(runtime, parsed.model, prepared.messages, prepared.sampling)
    refuse_verdict(check_output(result.text, *chat_texts(parsed), data=data_of(runtime)), "chat_output")
    return {
        "success": True,
        "response": prepared.finish(result.text, data_of(runtime)),
        "generation_time": round(result.seconds, 3),
        "tokens_generated": result.output_tokens,
        "model_info": model_info(parsed.model, result),
        "context_trimmed": prepared.built.trimmed,
        "prompt_info": prepared.metadata(),
    }


@legacy_router.post("/enhance")
@counted
async def enhance(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Rewrite a prompt for an image (``target: "sdxl"``) or video (``"wan"``, the default) model;
    the prompt is the (last) user message. Sampling defaults: max_tokens 200, T 0.7, top_p 0.9.
    A request with its own system message is a plain completion instead (:func:`plain_enhance`)."""
    runtime = runtime_of(request)
    target = body.get("target", "wan")
    if target not in ("sdxl", "wan"):
        raise ApiError(400, f"target: must be 'sdxl' or 'wan', got {target!r}", param="target")
    parsed = parse_body(body, 400)
    if parsed.conversation().system_prompt is not None:
        return await plain_enhance(runtime, parsed)
    data = data_of(runtime)
    prompt = parsed.conversation().latest_user.strip()
    await refuse_unsafe(runtime, prompt, data, "enhance")
    sampling = {
        "max_tokens": parsed.max_tokens or ENHANCE_DEFAULTS["max_tokens"],
        "temperature": ENHANCE_DEFAULTS["temperature"] if parsed.temperature is None else parsed.temperature,
        "top_p": parsed.top_p or ENHANCE_DEFAULTS["top_p"],
    }
    result = await complete(runtime, parsed.model, enhancement_messages(target, prompt, data), sampling)
    tokenizer = await tokenizer_of(runtime, target)

    def finish() -> Any:  # the tokenizer: CPU work, off the event loop
        with tokenizer_lock:
            return finish_enhancement(target, result.text, tokenizer, original=prompt, data=data)

    enhanced = await cpu(runtime, finish)
    refuse_verdict(check_output(f"{result.text}\n{enhanced.prompt}", prompt, data=data), "enhance_output")
    text = mask_sfw(enhanced.prompt, data) if parsed.sfw_mode else enhanced.prompt
    return {
        "success": True,
        "enhanced_prompt": text,
        "original_prompt": prompt,
        "generation_time": round(result.seconds, 3),
        "tokens_generated": result.output_tokens,
        "model_info": model_info(parsed.model, result),
        "enhancement": {**enhanced.metadata(), "enhanced_prompt": text, "target": target},
    }


async def plain_enhance(runtime: ApiRuntime, parsed: ChatRequest) -> dict[str, Any]:
    """``/enhance`` with the caller's own system message (the app's ``enhance-prompt`` sends a JSON
    output specification and parses the JSON it gets back): a plain completion of the caller's
    messages, answered in ``/enhance``'s shape. No template, no cleaning or one-line squashing, no
    token budget of ours; the caller's sampling (``max_tokens`` 200 when not given) is honoured,
    and with ``sfw_mode`` the text is masked like a chat reply. The safety gate reads every
    message as one unit, then the answer, and the caller's system message ends with its rule about
    minors, as on every chat route (docs/ARCHITECTURE.md, "Content-safety gate")."""
    data = data_of(runtime)
    conversation = parsed.conversation()
    await refuse_unsafe_texts(runtime, chat_texts(parsed), data, "enhance")
    if parsed.messages is not None:
        messages = [{"role": m.role, "content": m.content} for m in parsed.messages]
    else:
        messages = [{"role": "system", "content": conversation.system_prompt or ""},
                    *({"role": t.role, "content": t.content} for t in conversation.turns)]
    messages = [{**m, "content": with_minor_rule(m["content"])} if m["role"] == "system" else m
                for m in messages]
    sampling = {
        "max_tokens": parsed.max_tokens or ENHANCE_DEFAULTS["max_tokens"],
        "temperature": ENHANCE_DEFAULTS["temperature"] if parsed.temperature is None else parsed.temperature,
        "top_p": parsed.top_p or ENHANCE_DEFAULTS["top_p"],
    }
    result = await complete(runtime, parsed.model, messages, sampling)
    refuse_verdict(check_output(result.text, *chat_texts(parsed), data=data), "enhance_output")
    text = mask_sfw(result.text, data) if parsed.sfw_mode else result.text
    return {
        "success": True,
        "enhanced_prompt": text,
        "original_prompt": conversation.latest_user,
        "generation_time": round(result.seconds, 3),
        "tokens_generated": result.output_tokens,
        "model_info": model_info(parsed.model, result),
        "enhancement": {"mode": "plain_completion", "prompt_tokens": result.input_tokens,
                        "max_tokens": sampling["max_tokens"], "sfw_mode": parsed.sfw_mode},
    }


# ----------------------------------------------------------------------------- OpenAI-compatible
def bounded_stop(value: str | list[str] | None) -> str | list[str] | None:
    """``stop`` of the OpenAI routes: at most :data:`MAX_STOP` sequences, none empty (the models
    refuse one) nor longer than a turn."""
    sequences = value if isinstance(value, list) else [] if value is None else [value]
    if len(sequences) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are accepted, got {len(sequences)}")
    if any(not sequence for sequence in sequences):
        raise ValueError("a stop sequence must not be empty")
    if any(len(sequence) > MAX_TURN_CHARS for sequence in sequences):
        raise ValueError(f"a stop sequence may have at most {MAX_TURN_CHARS} characters")
    return value


StopSequences = Annotated[str | list[str] | None, AfterValidator(bounded_stop)]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_chat(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request this server honours (others are ignored);
    ``sfw_mode`` is our extension (``extra_body={"sfw_mode": True}`` with the openai package)."""

    model_config = ConfigDict(extra="ignore")

    model: Literal["qwen_instruct", "qwen_base"]
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: WholeNumber | None = Field(None, ge=1, le=8192)
    max_completion_tokens: WholeNumber | None = Field(None, ge=1, le=8192)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: WholeNumber = Field(1, ge=1, le=1, description="Only one choice is generated.")
    stop: StopSequences = None
    seed: WholeNumber | None = Field(None, ge=0)
    sfw_mode: bool = False

    def chat_request(self) -> ChatRequest:
        return parse_body({
            "messages": [m.as_chat() for m in self.messages],
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "model": self.model, "sfw_mode": self.sfw_mode,
        }, 422)

    def sampling_extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        if self.stop:
            extras["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            extras["seed"] = self.seed
        return extras


@openai_router.get("/models")
async def list_models() -> dict[str, Any]:
    """The chat models, as OpenAI's model list."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "gpu-worker"} for name in CHAT_MODELS
    ]}


@openai_router.post("/chat/completions", response_model=None)
@counted
async def chat_completions(request: Request, body: ChatCompletionRequest) -> dict[str, Any] | EventStream:
    """OpenAI chat completion; ``stream: true`` answers server-sent ``chat.completion.chunk``
    events, then ``data: [DONE]``."""
    runtime = runtime_of(request)
    prepared = await prepare(runtime, body.chat_request())
    sampling = {**prepared.sampling, **body.sampling_extras()}
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        result = await complete(runtime, body.model, prepared.messages, sampling)
        refuse_verdict(check_output(result.text, *chat_texts(body.chat_request()), data=data_of(runtime)),
                       "chat_output")
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": prepared.finish(result.text, data_of(runtime))},
                         "finish_reason": _finish_reason(result.finish_reason)}],
            "usage": _usage(result.input_tokens, result.output_tokens),
            "prompt_info": prepared.metadata(),
        }
    turn = await stream_turn(runtime, body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    guard = StreamGuard(*chat_texts(body.chat_request()), data=data_of(runtime))
    chunks = _stream_chunks(runtime, prepared, body.model, sampling, completion_id, created, include_usage, guard)
    return EventStream(chunks, on_close=turn.aclose)


async def _stream_chunks(
    runtime: ApiRuntime, prepared: PreparedChat, model: str, sampling: dict[str, Any],
    completion_id: str, created: int, include_usage: bool, guard: StreamGuard,
) -> AsyncIterator[str]:
    """The answer's chunks; the safety gate reads it as it grows (``guard``: only text it has
    passed is sent) and, once it crosses the line, the stream ends with a ``content_filter``
    finish and a ``content_refused`` error event instead of the rest."""
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
        return sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra})

    data = data_of(runtime)
    masker = SfwStream(lambda text: prepared.finish(text, data), _holdback(data)) if prepared.sfw_mode else None
    finish, prompt_tokens, output_tokens = "stop", 0, 0
    yield chunk({"role": "assistant", "content": ""})
    try:
        # closed here, not when collected: closing it is what stops the model's request
        async with aclosing(runtime.text.stream(model, prepared.messages, sampling,
                                                request_id=f"chat-{uuid.uuid4().hex}")) as pieces:
            async for piece in pieces:
                checked = guard.feed(piece.text)
                if guard.refused:
                    break  # leaving the ``async with`` stops the model generating the rest
                text = masker.feed(checked) if masker else checked
                if text:
                    yield chunk({"content": text})
                if piece.finish_reason is not None:
                    finish = piece.finish_reason
                    prompt_tokens, output_tokens = piece.input_tokens or 0, piece.output_tokens or 0
    except (ResidencyError, InferenceFailed) as exc:
        error = generation_error(model, exc)
        yield sse({"error": {"message": error.message, "type": error.type, "param": None}})
        return
    checked = "" if guard.refused else guard.flush()
    if guard.refused:
        metrics.inc_safety_refusal("chat_stream_output")
        yield chunk({}, "content_filter")
        yield sse({"error": {"message": OUTPUT_REFUSAL_REASON, "type": "content_refused", "param": None}})
        return
    tail = (masker.feed(checked) + masker.flush()) if masker else checked
    if tail:
        yield chunk({"content": tail})
    yield chunk({}, _finish_reason(finish))
    if include_usage:
        yield chunk(None, usage=_usage(prompt_tokens, output_tokens))  # type: ignore[arg-type]
    yield sse("[DONE]")


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _holdback(data: PromptData) -> int:
    words = data.content_mode.sfw_mask.words
    return max((len(w) for w in words), default=0) + 8


class SfwStream:
    """Masks a streamed reply exactly as masking the whole reply would (``mask``): text is released
    only up to a whitespace at least ``holdback`` characters before the end (the longest masked
    phrase, with slack) where masking the two sides separately equals masking them together."""

    def __init__(self, mask: Callable[[str], str], holdback: int) -> None:
        self._mask = mask
        self._holdback = holdback
        self._pending = ""

    def feed(self, text: str) -> str:
        """Add a delta; return the masked text that is now safe to send (maybe empty)."""
        self._pending += text
        whole = None
        limit = len(self._pending) - self._holdback
        for cut in range(limit, 0, -1):
            if not self._pending[cut].isspace():
                continue
            head, tail = self._pending[:cut], self._pending[cut:]
            whole = self._mask(self._pending) if whole is None else whole
            if self._mask(head) + self._mask(tail) == whole:
                self._pending = tail
                return self._mask(head)
        return ""

    def flush(self) -> str:
        """The rest, masked (at the end of the reply)."""
        out, self._pending = self._mask(self._pending), ""
        return out


# ----------------------------------------------------------------------------- OpenAI text completion
class CompletionRequest(BaseModel):
    """OpenAI's (legacy) text completion: the model continues ``prompt`` as it is, no chat
    template; meant for ``qwen_base``. Unknown fields are ignored, as in the chat route."""

    model_config = ConfigDict(extra="ignore")

    model: Literal["qwen_base", "qwen_instruct"]
    prompt: str | list[str] = Field(description="One prompt, not empty (a list of exactly one is accepted).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: WholeNumber = Field(16, ge=1, le=8192)  # OpenAI's default
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: WholeNumber = Field(1, ge=1, le=1, description="Only one choice is generated.")
    stop: StopSequences = None
    seed: WholeNumber | None = Field(None, ge=0)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if any(not text for text in ([value] if isinstance(value, str) else value)):
            raise ValueError("must not be empty (the model continues a prompt)")
        return value

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(422, "prompt: give one prompt (a list of exactly one)", param="prompt")
        return self.prompt[0]

    def sampling(self) -> dict[str, Any]:
        sampling: dict[str, Any] = {"max_tokens": self.max_tokens}
        for key in ("temperature", "top_p", "seed"):
            if getattr(self, key) is not None:
                sampling[key] = getattr(self, key)
        if self.stop:
            sampling["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return sampling


@openai_router.post("/completions", response_model=None)
@counted
async def completions(request: Request, body: CompletionRequest) -> dict[str, Any] | EventStream:
    """OpenAI text completion; ``stream: true`` answers server-sent ``text_completion`` events,
    then ``data: [DONE]``. A prompt longer than the model's context is a 400 naming ``prompt``."""
    runtime = runtime_of(request)
    prompt = body.text()
    await refuse_unsafe(runtime, prompt, data_of(runtime), "completion")
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def event(text: str, finish: str | None, **extra: Any) -> dict[str, Any]:
        return {"id": completion_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}

    if not body.stream:
        try:
            result = await complete(runtime, body.model, prompt, body.sampling())
        except ApiError as exc:
            raise _prompt_error(exc) from None
        return event(result.text, _finish_reason(result.finish_reason),
                     usage=_usage(result.input_tokens, result.output_tokens))
    turn = await stream_turn(runtime, body.model)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        finish, usage = "stop", _usage(0, 0)
        try:
            async with aclosing(runtime.text.stream(body.model, prompt, body.sampling(),
                                                    request_id=f"cmpl-{uuid.uuid4().hex}")) as pieces:
                async for piece in pieces:
                    if piece.text:
                        yield sse(event(piece.text, None))
                    if piece.finish_reason is not None:
                        finish = piece.finish_reason
                        usage = _usage(piece.input_tokens or 0, piece.output_tokens or 0)
        except (ResidencyError, InferenceFailed) as exc:
            error = _prompt_error(generation_error(body.model, exc))
            yield sse({"error": {"message": error.message, "type": error.type, "param": error.param}})
            return
        yield sse(event("", _finish_reason(finish)))
        if include_usage:
            yield sse({**event("", None), "choices": [], "usage": usage})
        yield sse("[DONE]")

    return EventStream(events(), on_close=turn.aclose)


def _prompt_error(error: ApiError) -> ApiError:
    """The model's refusal of a too-long prompt (``text_input: ...``) as a 400 naming ``prompt``."""
    if error.param == "text_input":  # generation_error's 400 for a model's refusal by field name
        return ApiError(400, error.message.replace("text_input:", "prompt:", 1), param="prompt")
    return error
