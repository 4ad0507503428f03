"""Text generation on the Qwen models through Triton: chat turns, and prompt enhancement.

:class:`TextService` streams or completes one request on ``qwen_instruct`` / ``qwen_base``,
holding the model resident (``ResidencyManager.use``) for the duration. :class:`Enhancer`
rewrites a job's prompt with ``qwen_base`` under a time limit, falling back to the original
prompt on any failure, and fits the result into the target model's token budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

from bridge.chat import EnhancedPrompt, enhancement_messages, finish_enhancement, load_tokenizer
from bridge.residency import ResidencyManager
from bridge.settings import Settings
from bridge.triton_client import InferenceFailed, ModelProcessDied, TritonClient

log = logging.getLogger(__name__)

TextModel = Literal["qwen_instruct", "qwen_base"]
EnhanceKind = Literal["sdxl", "wan"]


@dataclass(frozen=True)
class TextChunk:
    """One streamed response: a text delta; the last one carries the finish reason and counts."""

    text: str
    finish_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True)
class TextResult:
    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    seconds: float


def _first(outputs: dict, name: str) -> Any:
    value = outputs.get(name)
    if value is None or len(value) == 0:
        return None
    item = value.reshape(-1)[0]
    return item.decode("utf-8", errors="replace") if isinstance(item, bytes) else item


class TextService:
    """Chat / completion requests on the Qwen models."""

    def __init__(self, settings: Settings, triton: TritonClient, residency: ResidencyManager,
                 on_server_down: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.triton = triton
        self.residency = residency
        self._on_server_down = on_server_down  # restarts the embedded server (bridge/runtime.py)
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, model: str) -> Any:
        """The model's own tokenizer (for context budgets), or a diffusion model's text tokenizer:
        ``sdxl`` → CLIP, ``wan`` → UMT5. Kept once read: finding the folder is a dozen file
        system calls, each giving up the GIL, which a busy bridge's threads took back only after
        each other's turns (a third of a chat turn's CPU pool time at 16 concurrent turns;
        docs/ARCHITECTURE.md, "Chat at scale"). A model's weights missing raise, and are looked
        for again next time."""
        tokenizer = self._tokenizers.get(model)
        if tokenizer is None:
            if model == "sdxl":
                tokenizer = load_tokenizer(self.settings.weights_path("sdxl", "config") / "tokenizer")
            elif model == "wan":
                tokenizer = load_tokenizer(self.settings.weights_path("wan") / "tokenizer")
            else:
                tokenizer = load_tokenizer(self.settings.weights_path(model))
            self._tokenizers[model] = tokenizer
        return tokenizer

    async def stream(
        self, model: TextModel, messages: list[dict[str, str]] | str, sampling: dict[str, Any], *, request_id: str = ""
    ) -> AsyncIterator[TextChunk]:
        """Stream a reply token by token (``messages`` a plain string: a text completion of it);
        leaving early stops the request on the server (``TritonClient.responses``)."""
        inputs = {**_prompt(messages), "stream": True, "sampling_parameters": sampling}
        async with self.residency.use(model), \
                aclosing(self.triton.responses(model, inputs, request_id=request_id, stoppable=True)) as responses:
            async for outputs in responses:
                yield TextChunk(
                    text=_first(outputs, "text_output") or "",
                    finish_reason=_first(outputs, "finish_reason"),
                    input_tokens=_int(_first(outputs, "input_tokens")),
                    output_tokens=_int(_first(outputs, "output_tokens")),
                )

    async def complete(
        self, model: TextModel, messages: list[dict[str, str]] | str, sampling: dict[str, Any], *,
        timeout: float | None = None, request_id: str = "",
    ) -> TextResult:
        """One non-streaming request; the whole reply at once."""
        started = time.monotonic()
        inputs = {**_prompt(messages), "stream": False, "sampling_parameters": sampling}

        async def attempt() -> dict:
            async with self.residency.use(model):
                return await self.triton.run(model, inputs, timeout=timeout, request_id=request_id, stoppable=True)

        try:
            outputs = await attempt()
        except InferenceFailed as exc:
            if not await self._recovered(exc):
                raise
            outputs = await attempt()  # nothing of this reply reached anyone: once more
        return TextResult(
            text=_first(outputs, "text_output") or "",
            finish_reason=_first(outputs, "finish_reason") or "stop",
            input_tokens=_int(_first(outputs, "input_tokens")) or 0,
            output_tokens=_int(_first(outputs, "output_tokens")) or 0,
            seconds=time.monotonic() - started,
        )

    async def _recovered(self, failed: InferenceFailed) -> bool:
        """After a failed request: whether what failed under it is running again. A model process
        that died was reloaded by ``ResidencyManager.use``; a server that died (Triton itself may
        abort when requests reach a dead stub: docs/ARCHITECTURE.md, process life cycle) is
        restarted here, as a job's retry would, rather than the turn answering 503."""
        if not failed.transient:
            return False
        if self._on_server_down is not None and not await self.triton.is_live():
            log.warning("%s: the server is down (%s); restarting it for this request", failed.model, failed.message)
            try:
                await self._on_server_down()
            except Exception as exc:  # noqa: BLE001 - the request's own error is the answer; the watch tries again
                log.error("restarting tritonserver failed: %s", exc)
                return False
            return True
        return isinstance(failed, ModelProcessDied)


def _prompt(messages: list[dict[str, str]] | str) -> dict[str, Any]:
    """Chat messages, or a plain text to continue (``/v1/completions``)."""
    return {"text_input": messages} if isinstance(messages, str) else {"messages": messages}


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


# Sampling of the old worker's enhancement (docs/APP_CONTRACT.md §3): ~150 new tokens, T 0.7, top_p 0.9.
ENHANCE_SAMPLING = {"max_tokens": 150, "temperature": 0.7, "top_p": 0.9}


class Enhancer:
    """Prompt enhancement with ``qwen_base``; never fails a job: falls back to the original."""

    def __init__(self, text: TextService, timeout_s: float) -> None:
        self.text = text
        self.timeout_s = timeout_s

    async def enhance(self, prompt: str, kind: EnhanceKind = "wan", sampling: dict[str, Any] | None = None,
                      model: TextModel = "qwen_base") -> EnhancedPrompt:
        """The enhanced prompt fitted to ``kind``'s token budget, or the original on failure."""
        target_tokenizer = await asyncio.to_thread(self.text.tokenizer, kind)
        messages = enhancement_messages(kind, prompt)
        raw, note = None, None
        try:
            result = await self.text.complete(model, messages, {**ENHANCE_SAMPLING, **(sampling or {})},
                                              timeout=self.timeout_s)
            raw = result.text
        except TimeoutError:
            note = f"enhancement timed out after {self.timeout_s:.0f}s; the original prompt was used"
        except (InferenceFailed, Exception) as exc:  # noqa: BLE001 - any failure falls back
            note = f"enhancement failed ({exc}); the original prompt was used"
        enhanced = finish_enhancement(kind, raw, target_tokenizer, original=prompt)
        if note is not None:
            log.warning("%s", note)
            enhanced = EnhancedPrompt(enhanced.prompt, prompt, enhanced.trimmed, True, enhanced.tokens,
                                      enhanced.budget, note)
        return enhanced

    async def without_model(self, prompt: str, kind: EnhanceKind, note: str) -> EnhancedPrompt:
        """The original prompt fitted to ``kind``'s budget, as :meth:`enhance` falls back, without
        asking the model (its weights are not on the volume: ``bridge.availability``)."""
        target_tokenizer = await asyncio.to_thread(self.text.tokenizer, kind)
        enhanced = finish_enhancement(kind, None, target_tokenizer, original=prompt)
        log.warning("%s", note)
        return EnhancedPrompt(enhanced.prompt, prompt, enhanced.trimmed, True, enhanced.tokens, enhanced.budget, note)
