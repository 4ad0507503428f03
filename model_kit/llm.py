"""Qwen 2.5 (instruct and base) as a decoupled Triton Python model, shared by both model folders.

The interface follows Triton's vLLM backend (docs/ARCHITECTURE.md): ``text_input`` or ``messages``
(JSON list of ``{role, content}``, rendered with the tokenizer's chat template), ``stream`` and
``sampling_parameters`` (JSON). Generation is the continuous-batching step loop of
:mod:`model_kit.batching` (many sequences decoded together, each token seen as it is made):

- streaming sends one response per new piece of text (pieces joined over
  ``QWEN_STREAM_INTERVAL_MS`` while the model is busy: ``Limits``), holding back an incomplete
  UTF-8 sequence and anything that may be the start of a stop string;
- cancellation is asked of the server every 50 ms (by the engine's courier thread, which also sends
  the responses) and a stop request (``stop_request_id``) ends a stream at the next step;
- a stop string, an end-of-sequence token or ``max_tokens`` ends the loop, and the final response
  (always sent) says why, with the token counts.

Only :class:`TritonPythonModel` touches Triton; :class:`QwenEngine` is plain torch + transformers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from model_kit.batching import BatchEngine, Limits, QueueFull, Sequence
from model_kit.common import (
    Cancelled,
    ParamError,
    Request,
    StreamingModel,
    resolve_hf_folder,
    scalar,
    strings,
    _error_code,
    weights_path,
)
from model_kit.llm_metrics import ChatMetrics

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"
# Qwen's end-of-turn token: ends generation for the base model too when it is given chat messages.
END_OF_TURN = "<|im_end|>"
_SEED_MAX = 2**63 - 1


# ----------------------------------------------------------------------------- request parameters
class SamplingParameters(BaseModel):
    """``sampling_parameters`` (vLLM names). Unknown keys are refused, as vLLM does."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, description="New tokens at most (capped at what the context leaves).")
    temperature: float = Field(1.0, ge=0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 means no top-k filtering.")
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = Field(None, ge=0, le=_SEED_MAX, description="Same seed, same text; null: random.")
    stop: list[str] = Field(default_factory=list, description="Strings that end generation (not returned).")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


_MESSAGES = TypeAdapter(Annotated[list[Message], Field(min_length=1)])


def _json_field(name: str, raw: bytes | None) -> Any:
    """Decode a JSON input; errors name the input."""
    try:
        return json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParamError(f"{name}: not valid JSON ({exc})") from None


def parse_sampling_parameters(raw: bytes | None) -> SamplingParameters:
    """``sampling_parameters`` as validated settings; errors read ``sampling_parameters.<field>: ...``."""
    data = _json_field("sampling_parameters", raw)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamError("sampling_parameters: must be a JSON object")
    try:
        return SamplingParameters.model_validate(data)
    except ValidationError as exc:
        raise ParamError(_field_errors("sampling_parameters", exc)) from None


def parse_messages(raw: bytes | None) -> list[dict[str, str]]:
    """``messages`` as a list of ``{role, content}``; errors read ``messages.<i>.<field>: ...``."""
    data = _json_field("messages", raw)
    try:
        return [m.model_dump() for m in _MESSAGES.validate_python(data)]
    except ValidationError as exc:
        raise ParamError(_field_errors("messages", exc)) from None


def _field_errors(name: str, exc: ValidationError) -> str:
    """``<name>.<field path>: <problem>`` for each problem pydantic found."""
    return "; ".join(".".join([name, *map(str, err["loc"])]) + f": {err['msg']}" for err in exc.errors())


# ----------------------------------------------------------------------------- text out
class TextStream:
    """Text of the generated tokens, released in pieces that will not change.

    Tokens are decoded incrementally by the tokenizers library's ``DecodeStream`` (a token that
    ends inside a UTF-8 sequence yields nothing until the sequence is complete; a step costs a few
    microseconds where decoding the tokens since the last complete piece through the tokenizer's
    Python ``decode`` cost 15, once per token of every row of the batch). Stable text is searched
    for stop strings (generation ends at the first one, which is cut off), and a tail that could be
    the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        from tokenizers.decoders import DecodeStream  # noqa: PLC0415

        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._pending: list[int] = []  # ids not in _text yet: an incomplete UTF-8 sequence
        self._text = ""
        self._released = 0  # characters of _text handed out
        self.stopped = False  # a stop string was found

    def add(self, token_id: int) -> None:
        """Append one generated token."""
        piece = self._stream.step(self._backend, token_id)
        if piece is None:
            self._pending.append(token_id)
        else:
            self._pending.clear()
            self._extend(piece)

    def _extend(self, piece: str) -> None:
        start = len(self._text)
        self._text += piece
        self._cut_at_stop(start)

    def _cut_at_stop(self, start: int) -> None:
        hits = [
            i for i in (self._text.find(s, max(0, start - len(s) + 1)) for s in self._stop) if i >= 0
        ]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        if self.stopped:
            return 0
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def delta(self) -> str:
        """Text that became final since the last call (possibly empty)."""
        limit = max(len(self._text) - self._held_back(), self._released)
        piece = self._text[self._released : limit]
        self._released = limit
        return piece

    def finish(self) -> str:
        """Generation ended: fold in whatever is pending and return all text not yet released."""
        if not self.stopped and self._pending:  # an incomplete sequence at the end: as decode() shows it
            self._extend(self._tokenizer.decode(self._pending, skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False))
            self._pending.clear()
        piece = self._text[self._released :]
        self._released = len(self._text)
        return piece

    @property
    def text(self) -> str:
        return self._text


# ----------------------------------------------------------------------------- the engine
@dataclass
class Generation:
    """The outcome of one request. ``tail`` is the text not yet sent as a delta."""

    text: str
    tail: str
    finish_reason: str
    input_tokens: int
    output_tokens: int


class QwenEngine:
    """A causal LM and its tokenizer, generating one sequence at a time, token by token."""

    def __init__(self, folder: Any, device: str, dtype: Any, context: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        hf_logging.disable_progress_bar()  # a bar per load is noise in the server log
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map=device, local_files_only=True
        ).eval()
        self.context = int(context or self.model.config.max_position_embeddings)
        self.vocab_size = len(self.tokenizer)  # the model's rows past this are padding
        self.eos_ids = self._eos_ids()
        self._cache_arg = _cache_argument(self.model)

    def _eos_ids(self) -> set[int]:
        """End-of-sequence ids: the generation config's, the tokenizer's and Qwen's end of turn."""
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(self.tokenizer.eos_token_id)
        end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if end_of_turn is not None and end_of_turn != self.tokenizer.unk_token_id:
            ids.add(end_of_turn)
        return {i for i in ids if i is not None}

    # prompts
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode_text(prompt)

    # one forward, for model_kit/batching.py's step loop
    def forward(self, input_ids: Any, cache: Any, attention_mask: Any = None, position_ids: Any = None) -> tuple[Any, Any]:
        """Logits of each row's last position ([rows, vocab]), and the KV cache to continue from."""
        kwargs = {self._cache_arg: cache}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values  # transformers before 5.2x names it so
        return out.logits[:, -1, : self.vocab_size], cache

    @staticmethod
    def pick(logits: Any, ids: Any, processors: Any, rng: Any, temperature: float) -> Any:
        """The next token (shape [1]): greedy at temperature 0, else sampled with ``rng``."""
        import torch  # noqa: PLC0415

        scores = processors(ids, logits.float())
        if temperature == 0:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=rng)[0]


def _processors(params: SamplingParameters) -> Any:
    """transformers' logits processors for these settings (same semantics as ``generate``)."""
    from transformers.generation.logits_process import (  # noqa: PLC0415
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


def _cache_argument(model: Any) -> str:
    """The forward() keyword for the KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    import inspect  # noqa: PLC0415

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ----------------------------------------------------------------------------- the Triton model
class TritonPythonModel(StreamingModel):
    """``qwen_instruct`` and ``qwen_base``: the model name comes from config.pbtxt.

    ``execute`` only validates each request and queues it on the :class:`BatchEngine`, whose
    thread generates and sends every response (as Triton's vLLM backend does), so a request never
    waits for another to finish before it joins the batch."""

    def load(self) -> None:
        import torch  # noqa: PLC0415

        self.name = self.model_config["name"]
        if self.device == "cuda":
            self.dtype = torch.bfloat16
        folder = resolve_hf_folder(weights_path(self.name, self.parameters))
        self.pipe = QwenEngine(folder, self.device, self.dtype, context=int(self.parameters.get("max_model_len") or 0))
        self.metrics = ChatMetrics(self.name)
        self.batcher = BatchEngine(self.pipe, engine_limits(self.pipe), self.metrics)

    def execute(self, requests: list) -> None:
        for raw in requests:
            request = Request(raw)
            try:
                request.check_cancelled()
                stop = request.string("stop_request_id")
                if stop is not None:
                    self._stop(request, stop)
                    continue
                self._submit(request)
            except ParamError as exc:
                request.fail(str(exc), "INVALID_ARG")
            except QueueFull as exc:
                request.fail(f"{self.name}: the queue is full ({exc}); try again shortly", "UNAVAILABLE")
            except Cancelled:
                request.close()
            except Exception as exc:  # noqa: BLE001 - every error must end the stream
                request.fail(f"{type(exc).__name__}: {exc}", _error_code(exc))
        return None

    def _stop(self, request: Request, request_id: str) -> None:
        """A stop request: the stream ``request_id`` ends at the next step with its final answer
        (``cancelled``); this request's own answer says whether one was held."""
        found = self.batcher.stop_request(request_id)
        _log_info(f"{self.name} stop request for '{request_id}': {'stopped' if found else 'not held'}")
        request.send({"text_output": strings([""]), "finish_reason": strings(["cancelled" if found else "not_found"])},
                     final=True)

    def _submit(self, request: Request) -> None:
        params = parse_sampling_parameters(request.bytes("sampling_parameters"))
        field, prompt_ids = self._prompt(request)
        if len(prompt_ids) >= self.pipe.context:
            raise ParamError(f"{field}: the prompt is {len(prompt_ids)} tokens; the context holds {self.pipe.context}")
        stream = request.bool("stream")
        started = time.monotonic()

        def on_delta(piece: str) -> None:
            request.send({"text_output": strings([piece])})

        def on_done(result: Generation) -> None:
            request.send(_final_outputs(result, stream), final=True)
            _log_info(
                f"{self.name} request '{request.request.request_id()}': finish_reason={result.finish_reason} "
                f"input_tokens={result.input_tokens} output_tokens={result.output_tokens} "
                f"seconds={time.monotonic() - started:.3f}"
            )

        def on_error(exc: Exception) -> None:
            request.fail(f"{type(exc).__name__}: {exc}", _error_code(exc))

        self.batcher.submit(Sequence(prompt_ids, params, request.cancelled, on_delta if stream else None,
                                     on_done, on_error, request_id=request.request.request_id()))

    def _prompt(self, request: Request) -> tuple[str, list[int]]:
        """Which input holds the prompt, and its token ids."""
        text = request.string("text_input")
        raw_messages = request.bytes("messages")
        if (text is None) == (raw_messages is None):
            raise ParamError("text_input, messages: give exactly one of them")
        if text is not None:
            return "text_input", self.pipe.encode_text(text)
        return "messages", self.pipe.encode_messages(parse_messages(raw_messages))

    def unload(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.stop()  # every request still held gets its final response
        self.batcher = None
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        self.pipe = None


def engine_limits(engine: QwenEngine) -> Limits:
    """The engine's bounds from the model process's environment (README, settings): memory
    budgets in GB are turned into KV positions with the model's own size per position."""
    config = engine.model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * engine.model.dtype.itemsize
    batching = os.environ.get("QWEN_BATCHING", "on").lower() not in ("off", "0", "false", "no")
    defaults = Limits()
    return Limits(
        max_batch=_env_int("QWEN_MAX_BATCH", defaults.max_batch) if batching else 1,
        max_waiting=_env_int("QWEN_MAX_WAITING", defaults.max_waiting),
        kv_tokens=int(_env_float("QWEN_KV_CACHE_GB", 6.0) * 1e9 // per_token),
        prefix_tokens=int(_env_float("QWEN_PREFIX_CACHE_GB", 2.0) * 1e9 // per_token),
        prefill_chunk=_env_int("QWEN_PREFILL_CHUNK", defaults.prefill_chunk),
        stream_interval_s=_env_float("QWEN_STREAM_INTERVAL_MS", defaults.stream_interval_s * 1000) / 1000,
        stream_join_above=_env_int("QWEN_STREAM_JOIN_ABOVE", defaults.stream_join_above),
    )


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def _final_outputs(result: Generation, stream: bool) -> dict[str, np.ndarray]:
    return {
        "text_output": strings([result.tail if stream else result.text]),
        "finish_reason": strings([result.finish_reason]),
        "input_tokens": scalar(result.input_tokens, np.int32),
        "output_tokens": scalar(result.output_tokens, np.int32),
    }


def _log_info(message: str) -> None:
    """A line in the server's log (Triton's logger inside the stub)."""
    import triton_python_backend_utils as pb_utils  # noqa: PLC0415

    pb_utils.Logger.log_info(message)
