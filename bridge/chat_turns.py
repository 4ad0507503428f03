"""One chat turn's steps, shared by the routes that run a model (bridge/api_chat.py, api_legacy.py,
api_scene.py); the routes only route (docs/ARCHITECTURE.md, "HTTP API").

parse (:func:`parse_body`) → safety gate (:func:`refuse_verdict`) → template and context budget with
the model's tokenizer (:func:`prepare`, CPU work on :attr:`ApiRuntime.cpu_work`) → an interactive
GPU turn from the dispatcher (:func:`gpu_turn`) → :meth:`bridge.textgen.TextService.complete`
(:func:`complete`). Failures become :class:`ApiError` answers that say what went wrong without the
server's own words (file paths, addresses, exception names); those go to the log
(:func:`generation_error`). :func:`counted` counts each request by route and outcome
(``gpu_worker_chat_turns_total``, docs/DEPLOY.md "Chat metrics").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

from bridge import metrics
from bridge.api_common import ApiError, EventStream, unavailable
from bridge.api_types import ApiRuntime
from bridge.chat import BudgetError, ChatRequest, ChatRequestError, PreparedChat, parse_chat_request, prepare_chat
from bridge.cpu_work import CpuWorkTimeout
from bridge.model_table import job_cost_s
from bridge.prompt_data import PromptData, get_data
from bridge.residency import ResidencyError
from bridge.safety import SafetyVerdict, check_prompt, check_texts
from bridge.safety_paths import chat_texts
from bridge.textgen import TextResult
from bridge.triton_client import InferenceFailed
from bridge.dispatcher import JobFailed, Waiting

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAT_MODELS = ("qwen_instruct", "qwen_base")
DISPLAY_NAMES = {"qwen_instruct": "Qwen2.5-7B-Instruct", "qwen_base": "Qwen2.5-7B"}
#: Time limit of one non-streaming generation.
CHAT_TIMEOUT_S = 300.0
#: Seconds a client is told to wait after its CPU work ran out of time (``API_CPU_WORK_TIMEOUT_S``).
CPU_RETRY_AFTER_S = 5
#: One tokenizer call at a time (fast tokenizers are not re-entrant); the scene routes share it.
tokenizer_lock = threading.Lock()
#: A model's own refusal of a parameter names the field first (``text_input: ...``,
#: model_kit/common.py ``ParamError``); anything else it says is internal.
_PARAM_ERROR = re.compile(r"^[a-z][a-z0-9_.]*(, [a-z][a-z0-9_.]*)*: [^\n]{1,500}$")
_INTERNALS = re.compile(r"Traceback|Error\b|Exception\b|/[\w.-]+/|\b\d{1,3}(\.\d{1,3}){3}\b|:\d{2,5}\b|\bipv[46]:")


def parse_body(body: Any, status: int) -> ChatRequest:
    """A chat request body parsed; :class:`ApiError` with ``status`` naming the field otherwise."""
    try:
        return parse_chat_request(body)
    except ChatRequestError as exc:
        message = str(exc)
        param = message.split(":", 1)[0] if ":" in message.split(";")[0] else None
        raise ApiError(status, message, param=param) from None


def data_of(runtime: ApiRuntime) -> PromptData:
    """The prompt data files of ``DATA_DIR`` (cached, re-read when they change)."""
    return get_data(runtime.settings.data_dir)


async def cpu(runtime: ApiRuntime, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args)`` on the API's CPU pool (:mod:`bridge.cpu_work`); past ``API_CPU_WORK_TIMEOUT_S``
    a 503 with ``Retry-After``."""
    try:
        return await runtime.cpu_work.run(fn, *args, **kwargs)
    except CpuWorkTimeout as exc:
        log.warning("%s: CPU work of a request took over %g s (API_CPU_WORK_TIMEOUT_S)",
                    getattr(fn, "__name__", "work"), exc.timeout_s)
        raise ApiError(503, f"the request's text processing did not finish within {exc.timeout_s:g}s "
                       "(API_CPU_WORK_TIMEOUT_S): send less text, or retry later", type="cpu_timeout",
                       headers={"Retry-After": str(CPU_RETRY_AFTER_S)}) from None


def refuse_verdict(verdict: SafetyVerdict, kind: str) -> None:
    """A gate's verdict as the answer: 400 ``content_refused`` (counted in metrics under ``kind``,
    the path: ``chat``, ``chat_output``, ``enhance_output``, ...) if refused."""
    if not verdict.allowed:
        metrics.inc_safety_refusal(kind)
        raise ApiError(400, verdict.reason or "refused by the content-safety gate", type="content_refused")


async def refuse_unsafe(runtime: ApiRuntime, text: str, data: PromptData, kind: str) -> None:
    """The safety gate on ``text`` (on the CPU pool): 400 ``content_refused`` if refused."""
    refuse_verdict(await cpu(runtime, check_prompt, text, data=data), kind)


async def refuse_unsafe_texts(runtime: ApiRuntime, texts: list[str], data: PromptData, kind: str) -> None:
    """The safety gate on ``texts`` read as one unit (on the CPU pool)."""
    refuse_verdict(await cpu(runtime, check_texts, *texts, data=data), kind)


async def tokenizer_of(runtime: ApiRuntime, model: str) -> Any:
    """``runtime.text.tokenizer(model)`` off the event loop (read from disk once, then cached);
    503 when it cannot be read."""
    return await asyncio.to_thread(_tokenizer, runtime, model)


def _tokenizer(runtime: ApiRuntime, model: str) -> Any:
    try:
        return runtime.text.tokenizer(model)
    except Exception:  # noqa: BLE001 - the model's files are missing or unreadable
        log.exception("%s: its tokenizer cannot be read", model)  # the path and cause: for the log only
        raise unavailable(f"{model}: its tokenizer cannot be read (the worker's log says why)") from None


def _gate_and_prepare(runtime: ApiRuntime, chat: ChatRequest, data: PromptData,
                      template: str | None) -> PreparedChat | SafetyVerdict:
    """The safety gate (every message, as one unit), then the tokenizer, template and budget: one
    trip to the CPU pool, not three (each trip waits for a thread, then for the event loop: tens of
    ms apiece at 16 concurrent turns; docs/ARCHITECTURE.md, "What it measured"). A refusal is
    returned, not raised, to be counted on the event loop."""
    verdict = check_texts(*chat_texts(chat), data=data)
    if not verdict.allowed:
        return verdict
    tokenizer = _tokenizer(runtime, chat.model)
    with tokenizer_lock:
        return prepare_chat(chat, tokenizer, data=data, template=template)


async def prepare(runtime: ApiRuntime, chat: ChatRequest, template: str | None = None) -> PreparedChat:
    """Safety gate, then content mode, template (``template`` forces one) and the context budget
    for one request."""
    try:
        prepared = await cpu(runtime, _gate_and_prepare, runtime, chat, data_of(runtime), template)
    except BudgetError as exc:
        raise ApiError(400, str(exc), param="max_tokens") from None
    if isinstance(prepared, SafetyVerdict):
        refuse_verdict(prepared, "chat")
    return prepared


@asynccontextmanager
async def gpu_turn(runtime: ApiRuntime, model: str) -> AsyncIterator[None]:
    """Hold an interactive place granted by the worker's dispatcher for one request, so the
    scheduler gives chat latency priority and never starts a model switch under it. Without a
    worker loop (an API-only runtime) there is no dispatcher and nothing to wait for."""
    if not runtime.with_jobs:
        yield
        return
    dispatcher = runtime.worker.dispatcher
    item = Waiting(key=f"chat:{model}", models=frozenset({model}), since=time.monotonic(), interactive=True,
                   est_s=job_cost_s("chat"))
    wait_s = runtime.settings.chat_gpu_wait_s  # well below the app's 45 s (CHAT_GPU_WAIT_S)
    try:
        async with asyncio.timeout(wait_s):
            await dispatcher.acquire(item)
    except JobFailed as exc:
        raise unavailable(exc.message) from None
    except TimeoutError:
        raise unavailable(f"{model}: the GPU stayed busy for {wait_s:g}s; try again") from None
    ok = False
    try:
        yield
        ok = True
    finally:
        dispatcher.release(item)
        runtime.activity.chat_turn(time.monotonic() - item.since, ok)  # the operator's page (/ui)


async def stream_turn(runtime: ApiRuntime, model: str) -> AsyncExitStack:
    """A GPU turn for a streamed answer, its model resident before the 200 goes out (so "cannot
    load it now" is still a 503); closing the stack (when the stream ends) gives the turn back."""
    turn = AsyncExitStack()
    await turn.enter_async_context(gpu_turn(runtime, model))
    try:
        await runtime.residency.ensure({model})
    except ResidencyError as exc:
        await turn.aclose()
        raise generation_error(model, exc) from None
    return turn


def model_refusal(exc: InferenceFailed) -> str | None:
    """The model's own refusal of a parameter (``text_input: ...``), when that is what ``exc``
    says; None for anything else the server or the model said (internal: for the log only)."""
    message = exc.message.strip()
    if _PARAM_ERROR.match(message) and not _INTERNALS.search(message):
        return message
    return None


def generation_error(model: str, exc: Exception) -> ApiError:
    """A failure while generating, as an answer that says what happened; the server's own words
    (which may hold file paths, addresses and exception names) go to the log."""
    log.warning("%s: generation failed: %s", model, exc)
    if isinstance(exc, ResidencyError):
        return unavailable(exc.public)
    if isinstance(exc, TimeoutError):
        return ApiError(504, f"{model}: no answer within {CHAT_TIMEOUT_S:.0f}s", type="timeout")
    if isinstance(exc, InferenceFailed) and exc.transient:
        return unavailable(f"{model} is not available now (the worker's log says why); retry later")
    refusal = model_refusal(exc) if isinstance(exc, InferenceFailed) else None
    if refusal is not None:
        return ApiError(400, f"{model}: {refusal}", param=refusal.split(":", 1)[0])
    return ApiError(500, f"{model}: generation failed (the worker's log says why)", type="server_error")


async def complete(runtime: ApiRuntime, model: str, messages: list[dict[str, str]] | str,
                   sampling: dict[str, Any]) -> TextResult:
    """One non-streaming generation in an interactive GPU turn."""
    try:
        async with gpu_turn(runtime, model):
            return await runtime.text.complete(model, messages, sampling, timeout=CHAT_TIMEOUT_S,
                                               request_id=f"chat-{uuid.uuid4().hex}")
    except (ResidencyError, TimeoutError, InferenceFailed) as exc:
        raise generation_error(model, exc) from None


# ----------------------------------------------------------------------------- counting
def outcome_of(status: int) -> str:
    if status == 503:
        return "unavailable"
    if status == 504:
        return "timeout"
    return "bad_request" if 400 <= status < 500 else "error"


def counted(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Count each request the handler (which takes ``request``) serves; FastAPI reads the
    handler's own signature through ``functools.wraps``."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        route = kwargs["request"].url.path
        try:
            result = await handler(*args, **kwargs)
        except ApiError as exc:
            metrics.inc_chat_turn(route, outcome_of(exc.status))
            raise
        except Exception:
            metrics.inc_chat_turn(route, "error")
            raise
        if isinstance(result, EventStream):
            result.body_iterator = _watched(result.body_iterator, route)
        else:
            metrics.inc_chat_turn(route, "ok")
        return result

    return wrapper


async def _watched(events: AsyncIterator[Any], route: str) -> AsyncIterator[Any]:
    """Pass a stream's events through; count it when it ends: ``error`` if it sent an error event,
    ``cancelled`` if the client left first, else ``ok``."""
    outcome = "cancelled"
    try:
        async for event in events:
            if isinstance(event, str) and event.startswith('data: {"error"'):
                outcome = "error"
            yield event
        if outcome != "error":
            outcome = "ok"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
        metrics.inc_chat_turn(route, outcome)
