"""qwen_instruct and qwen_base served by a real tritonserver over the tiny random-weight models.

Random weights produce garbage text, so these tests check structure: responses, deltas, token
counts, finish reasons, determinism, errors naming the field, process lifecycle.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from model_kit import layout
from model_kit.common import resolve_hf_folder
from model_kit.llm import TextStream
from model_kit.tiny.qwen import CONTEXT
from tests.triton_helpers import Streamed, load_model, stream, stub_pids, unload_model

MODELS = ["qwen_instruct", "qwen_base"]
REPO = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Describe a harbour at dawn."}]


@pytest.fixture(scope="module")
def url(triton) -> str:
    """The server's gRPC address with both Qwen models loaded (unloaded again afterwards)."""
    for model in MODELS:
        load_model(triton.grpc_url, model)
    yield triton.grpc_url
    for model in MODELS:
        unload_model(triton.grpc_url, model)


@pytest.fixture(scope="module")
def tokenizer(tiny_models_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_hf_folder(tiny_models_dir / layout.QWEN_INSTRUCT))


def generate(url: str, model: str, sampling: dict | str | None = None, stream_: bool = False, **prompt) -> Streamed:
    """One request; ``prompt`` is ``text_input=...`` or ``messages=...`` (default: a short text)."""
    inputs = prompt or {"text_input": "A fox runs through the snow"}
    return stream(url, model, {**inputs, "stream": stream_ if stream_ else None, "sampling_parameters": sampling})


def finished(result: Streamed) -> Streamed:
    """Check the request ended normally with a final response; return it for chaining."""
    assert result.error is None, result.error
    assert result.final
    assert result.last("finish_reason") in ("stop", "length")
    return result


def joined(result: Streamed) -> str:
    return "".join(result.strings("text_output"))


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("model", MODELS)
def test_config_names_the_layout_path_and_tiny_weights_are_an_hf_cache_folder(model: str, tiny_models_dir: Path) -> None:
    config = (REPO / "model_repository" / model / "config.pbtxt").read_text()
    assert re.search(r'key: "weights", value: \{ string_value: "([^"]+)" \}', config).group(1) == layout.WEIGHTS[model]["weights"]
    assert "decoupled: true" in config and "KIND_CPU" not in config
    cache = tiny_models_dir / layout.WEIGHTS[model]["weights"]
    assert not (cache / "config.json").exists()
    revision = (cache / "refs" / "main").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{40}", revision)
    assert resolve_hf_folder(cache) == cache / "snapshots" / revision


# ----------------------------------------------------------------------------- text released in pieces
def test_text_stream_holds_back_incomplete_utf8(tokenizer) -> None:
    text = "Grüße aus 日本 😀!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = TextStream(tokenizer, stop=[])
    deltas = []
    for token_id in ids:
        pieces.add(token_id)
        deltas.append(pieces.delta())
    deltas.append(pieces.finish())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") > 0, "some tokens end inside a character and must wait for the next"


def test_text_stream_matches_decode_with_special_tokens_and_a_cut_character(tokenizer) -> None:
    """Special tokens are skipped as decode() skips them; a reply cut inside a character (max_tokens)
    ends with what decode() makes of it."""
    ids = tokenizer("Hi <|im_end|> 日本", add_special_tokens=False)["input_ids"]
    whole = TextStream(tokenizer, stop=[])
    for token_id in ids:
        whole.add(token_id)
    assert whole.delta() + whole.finish() == tokenizer.decode(ids, skip_special_tokens=True) == "Hi  日本"
    cut = ids[:-1]  # the last character's last byte is missing
    pieces = TextStream(tokenizer, stop=[])
    for token_id in cut:
        pieces.add(token_id)
    released = pieces.delta()
    assert "\ufffd" not in released
    assert released + pieces.finish() == tokenizer.decode(cut, skip_special_tokens=True)


def test_text_stream_cuts_at_a_stop_string_and_never_releases_its_start(tokenizer) -> None:
    ids = tokenizer("Grüße aus 日本 😀!", add_special_tokens=False)["input_ids"]
    pieces = TextStream(tokenizer, stop=["xyz", "aus 日"])
    deltas = []
    for token_id in ids:
        pieces.add(token_id)
        deltas.append(pieces.delta())
        if pieces.stopped:
            break
    deltas.append(pieces.finish())
    assert pieces.stopped
    assert "".join(deltas) == pieces.text == "Grüße "
    assert not any("a" in d for d in deltas)


# ----------------------------------------------------------------------------- requests
@pytest.mark.parametrize("model", MODELS)
def test_text_input_returns_one_final_response_with_text_and_counts(url: str, model: str) -> None:
    result = finished(generate(url, model, {"seed": 3, "max_tokens": 16}))
    assert len(result.responses) == 1
    assert isinstance(result.last("text_output"), str)
    assert result.last("input_tokens") > 0
    assert 0 < result.last("output_tokens") <= 16


@pytest.mark.parametrize("model", MODELS)
def test_messages_are_rendered_with_the_chat_template(url: str, model: str, tokenizer) -> None:
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    result = finished(generate(url, model, {"seed": 3, "max_tokens": 8}, messages=MESSAGES))
    assert result.last("input_tokens") == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_max_tokens_ends_with_length(url: str) -> None:
    result = finished(generate(url, "qwen_instruct", {"seed": 3, "max_tokens": 5}))
    assert result.last("finish_reason") == "length"
    assert result.last("output_tokens") == 5


def test_an_end_of_sequence_token_ends_with_stop(url: str) -> None:
    for seed in range(20):
        result = finished(generate(url, "qwen_instruct", {"seed": seed, "max_tokens": 300}, messages=MESSAGES))
        if result.last("finish_reason") == "stop":
            assert result.last("output_tokens") < 300
            return
    pytest.fail("no seed of 20 ended on an end-of-sequence token within 300 tokens")


@pytest.mark.parametrize("model", MODELS)
def test_streamed_deltas_join_to_the_non_streamed_text(url: str, model: str) -> None:
    sampling = {"seed": 11, "max_tokens": 48, "temperature": 0.9, "top_p": 0.95, "top_k": 50}
    whole = finished(generate(url, model, sampling))
    streamed = finished(generate(url, model, sampling, stream_=True))
    assert len([d for d in streamed.strings("text_output") if d]) >= 3
    assert joined(streamed) == whole.last("text_output")
    assert streamed.last("output_tokens") == whole.last("output_tokens")
    assert streamed.last("finish_reason") == whole.last("finish_reason")


def test_same_seed_same_text_and_another_seed_another(url: str) -> None:
    texts = [finished(generate(url, "qwen_base", {"seed": s, "max_tokens": 24})).last("text_output") for s in (5, 5, 6)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_greedy_needs_no_seed(url: str) -> None:
    sampling = {"temperature": 0, "max_tokens": 12, "repetition_penalty": 1.3}
    assert finished(generate(url, "qwen_base", sampling)).last("text_output") == finished(
        generate(url, "qwen_base", sampling)
    ).last("text_output")


def _stop_candidate(text: str) -> tuple[str, int]:
    """A two-character stop string from the middle of ``text`` and where it first occurs."""
    for start in range(len(text) // 2, len(text) - 2):
        stop = text[start : start + 2]
        if "\ufffd" not in stop and stop.strip():
            return stop, text.index(stop)
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream_", [False, True])
def test_a_stop_string_ends_generation_and_is_not_returned(url: str, stream_: bool) -> None:
    sampling = {"seed": 21, "max_tokens": 40}
    full = finished(generate(url, "qwen_instruct", sampling)).last("text_output")
    stop, at = _stop_candidate(full)
    result = finished(generate(url, "qwen_instruct", {**sampling, "stop": ["never-there", stop]}, stream_=stream_))
    assert joined(result) == full[:at]
    assert result.last("finish_reason") == "stop"
    assert result.last("output_tokens") < 40


def test_max_tokens_is_capped_at_the_context(url: str, tokenizer) -> None:
    words = " ".join(f"w{i}" for i in range(CONTEXT))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][: CONTEXT - 3]
    prompt = tokenizer.decode(ids)
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == CONTEXT - 3
    result = finished(generate(url, "qwen_base", {"temperature": 0, "max_tokens": 50}, text_input=prompt))
    assert result.last("input_tokens") == CONTEXT - 3
    assert result.last("output_tokens") <= 3


def test_a_prompt_that_fills_the_context_is_refused(url: str) -> None:
    result = generate(url, "qwen_base", None, text_input="w1 " * CONTEXT)
    assert result.error is not None and result.error.startswith("text_input")
    assert "context" in result.error


def _server_log_line(triton, request_id: str, timeout: float = 15.0) -> str:
    """The model's summary line for ``request_id`` in the server log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in triton.log_path.read_text(errors="replace").splitlines():
            if f"request '{request_id}'" in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no log line for request {request_id}")


def test_cancelling_a_request_stops_generation_and_the_model_serves_the_next(url: str, triton) -> None:
    """A client that cancels its gRPC call. The request is not streamed: Triton 24.10's gRPC
    frontend can crash or keep the request for ever when a cancellation meets a response on its
    way (docs/ARCHITECTURE.md, "Stopping a stream"), and here none is on its way."""
    import tritonclient.grpc as grpcclient

    from tests.triton_helpers import infer_input

    request_id = f"cancel-{uuid.uuid4().hex[:8]}"
    # Greedy on the tiny model runs to max_tokens (several seconds) unless cancelled.
    inputs = {"text_input": "Hello", "stream": False, "sampling_parameters": {"temperature": 0, "max_tokens": 4000}}
    client = grpcclient.InferenceServerClient(url)
    answers: list = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    client.async_stream_infer("qwen_base", [infer_input(k, v) for k, v in inputs.items()], request_id=request_id)
    time.sleep(0.5)
    client.stop_stream(cancel_requests=True)
    client.close()
    assert [result for result, _ in answers if result is not None] == []  # the whole reply comes at the end: never
    summary = _server_log_line(triton, request_id)
    assert "finish_reason=cancelled" in summary
    assert int(re.search(r"output_tokens=(\d+)", summary).group(1)) < 1000
    after = finished(generate(url, "qwen_base", {"seed": 1, "max_tokens": 4}))
    assert after.last("output_tokens") <= 4


BAD_SAMPLING = [
    ({"max_tokens": 0}, "sampling_parameters.max_tokens"),
    ({"temperature": -1}, "sampling_parameters.temperature"),
    ({"top_p": 2}, "sampling_parameters.top_p"),
    ({"top_p": 0}, "sampling_parameters.top_p"),
    ({"top_k": -1}, "sampling_parameters.top_k"),
    ({"repetition_penalty": 0}, "sampling_parameters.repetition_penalty"),
    ({"seed": -1}, "sampling_parameters.seed"),
    ({"stop": [""]}, "sampling_parameters.stop"),
    ({"max_token": 5}, "sampling_parameters.max_token"),
    ("{not json", "sampling_parameters"),
    ("[1, 2]", "sampling_parameters"),
]


@pytest.mark.parametrize(("sampling", "field"), BAD_SAMPLING)
def test_bad_sampling_parameters_are_refused_naming_the_field(url: str, sampling, field: str) -> None:
    result = generate(url, "qwen_instruct", sampling)
    assert result.error is not None and result.error.startswith(f"{field}:"), result.error
    assert not result.responses


BAD_PROMPTS = [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": 3}]}, "messages.1.content"),
    ({"messages": []}, "messages"),
    ({"messages": '{"role": "user"}'}, "messages"),
    ({"messages": "not json ["}, "messages"),
    ({"text_input": "hi", "messages": MESSAGES}, "text_input, messages"),
    ({"stream": True}, "text_input, messages"),
]


@pytest.mark.parametrize(("prompt", "field"), BAD_PROMPTS)
def test_bad_prompts_are_refused_naming_the_field(url: str, prompt: dict, field: str) -> None:
    result = stream(url, "qwen_base", prompt)
    assert result.error is not None and result.error.startswith(f"{field}:"), result.error


def test_unload_ends_the_stub_process_and_reload_serves_again(url: str, triton) -> None:
    before = stub_pids(triton.process.pid, "qwen_base")
    assert len(before) == 1
    unload_model(url, "qwen_base")
    deadline = time.monotonic() + 30
    while stub_pids(triton.process.pid, "qwen_base") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stub_pids(triton.process.pid, "qwen_base")
    load_model(url, "qwen_base")
    after = stub_pids(triton.process.pid, "qwen_base")
    assert len(after) == 1 and after != before
    finished(generate(url, "qwen_base", {"seed": 1, "max_tokens": 4}))
