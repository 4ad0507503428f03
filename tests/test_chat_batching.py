"""Continuous batching in qwen_instruct / qwen_base (model_kit/batching.py) on a real tritonserver
with the tiny Qwen: concurrent streams equal their solo runs, per-sequence settings and
cancellation, joining mid-batch, the queue-full refusal, prefix reuse, the custom metrics."""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from bridge.launcher import TritonServer
from bridge.triton_client import InferenceFailed
from tests.conftest import triton_settings
from tests.triton_helpers import Live, Streamed, load_model, model_metric, stream, unload_model

LONG = {"text_input": "Hello", "stream": True}  # greedy on the tiny model runs to max_tokens


@pytest.fixture(scope="module")
def url(triton) -> str:
    for model in ("qwen_instruct", "qwen_base"):
        load_model(triton.grpc_url, model)
    yield triton.grpc_url
    for model in ("qwen_instruct", "qwen_base"):
        unload_model(triton.grpc_url, model)


@pytest.fixture(scope="module")
def one_at_a_time(solo_server: TritonServer) -> str:
    return solo_server.grpc_url


@pytest.fixture(scope="module")
def solo_server(triton, tiny_models_dir, tmp_path_factory, monkeypatch_module):
    """A second server whose engine takes one sequence at a time, queues one more and keeps no
    prefixes (the old engine's behaviour, and the cold reference for prefix reuse), and joins a
    stream's deltas for 100 ms however few requests it holds. (After the session server, which
    must not see these settings.)"""
    settings = {"QWEN_MAX_BATCH": "1", "QWEN_MAX_WAITING": "1", "QWEN_PREFIX_CACHE_GB": "0",
                "QWEN_STREAM_INTERVAL_MS": "100", "QWEN_STREAM_JOIN_ABOVE": "0"}
    for name, value in settings.items():
        monkeypatch_module.setenv(name, value)
    server = TritonServer(triton_settings(tiny_models_dir),
                          log_path=tmp_path_factory.mktemp("triton-solo") / "tritonserver.log").start()
    load_model(server.grpc_url, "qwen_instruct")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def text_of(result: Streamed) -> str:
    assert result.error is None and result.final, result.error
    return "".join(result.strings("text_output"))


def _requests(tag: str, stop: str) -> list[dict]:
    """Eight requests of mixed prompt length and settings, streamed."""
    out = []
    for i in range(8):
        sampling: dict = {"temperature": 0, "max_tokens": 12 + 5 * i}
        if i == 5:
            sampling = {"temperature": 0.9, "top_p": 0.9, "seed": 7, "max_tokens": 30}
        if i == 6:
            sampling = {"temperature": 0, "max_tokens": 60, "stop": [stop]}
        prompt = f"{tag} {i}: " + "a fox in the snow " * (1 + 6 * i)
        out.append({"text_input": prompt, "stream": True, "sampling_parameters": sampling})
    return out


def test_eight_concurrent_streams_equal_each_run_alone(url: str) -> None:
    unstopped = text_of(stream(url, "qwen_base", _requests("concurrent", "\x00")[6]))
    stop = unstopped[len(unstopped) // 2 :][:2]
    requests = _requests("concurrent", stop)
    alone = [stream(url, "qwen_base", r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: stream(url, "qwen_base", r), requests))
    assert [text_of(r) for r in together] == [text_of(r) for r in alone]
    for request, result in zip(requests, together):
        limit = request["sampling_parameters"]["max_tokens"]
        assert result.last("output_tokens") <= limit
        assert result.last("finish_reason") in ("stop", "length")
    assert text_of(together[6]) == unstopped[: unstopped.find(stop)]  # cut at the stop string
    assert together[6].last("finish_reason") == "stop"
    assert together[0].last("output_tokens") == 12 and together[0].last("finish_reason") == "length"


def test_a_full_batch_gives_each_stream_its_solo_text(url: str) -> None:
    """Twelve streams at once: the batch KV grows past 8 rows and rows leave at different steps;
    greedy rows, seeded top-k/top-p rows (sampled together) and a row with a repetition penalty
    (its own logits processors) each give the text they give alone."""
    requests = []
    for i in range(12):
        sampling: dict = {"temperature": 0, "max_tokens": 30 + 6 * i}
        if i in (3, 8):
            sampling = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 100 + i, "max_tokens": 40}
        if i == 10:
            sampling = {"temperature": 0, "repetition_penalty": 1.3, "max_tokens": 40}
        prompt = f"busy {i}: " + "the lighthouse at dusk " * (1 + 9 * (i % 4))
        requests.append({"text_input": prompt, "stream": True, "sampling_parameters": sampling})
    alone = [stream(url, "qwen_base", r) for r in requests]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda r: stream(url, "qwen_base", r), requests))
    assert [text_of(r) for r in together] == [text_of(r) for r in alone]


def test_a_busy_model_joins_a_streams_deltas(url: str) -> None:
    """With more requests held than QWEN_STREAM_JOIN_ABOVE (8 by default), a stream's deltas are
    joined over QWEN_STREAM_INTERVAL_MS (100 ms); alone, every delta is sent. The text is the same."""
    request = {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 100}}
    busy = [Live(url, "qwen_base", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 3000}})
            for _ in range(8)]
    for live in busy:
        live.wait_for(1)
    joined = stream(url, "qwen_base", request)
    for live in busy:
        live.stop()
    alone = stream(url, "qwen_base", request)
    assert text_of(joined) == text_of(alone)
    assert joined.last("output_tokens") == alone.last("output_tokens") == 100
    assert len(joined.responses) < 40 < len(alone.responses), (len(joined.responses), len(alone.responses))


def test_stopping_one_stream_leaves_the_others_running(url: str) -> None:
    sampling = {"temperature": 0, "max_tokens": 150}
    streams = [Live(url, "qwen_base", {**LONG, "sampling_parameters": sampling}) for _ in range(3)]
    streams[1].wait_for(3)
    stopped = streams[1].stop()
    assert stopped.last("output_tokens") < 150
    for live in (streams[0], streams[2]):
        result = live.finish()
        assert result.last("finish_reason") == "length" and result.last("output_tokens") == 150
    # a stop request naming no stream held says so
    assert stream(url, "qwen_base", {"stop_request_id": streams[1].request_id}).last("finish_reason") == "not_found"


def test_a_stop_request_that_comes_before_its_request_ends_it_on_arrival(url: str) -> None:
    """A client may leave before its request reached the engine: the stop is remembered."""
    request_id = f"early-{uuid.uuid4().hex}"
    assert stream(url, "qwen_base", {"stop_request_id": request_id}).last("finish_reason") == "not_found"
    late = stream(url, "qwen_base", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 3000}},
                  request_id=request_id)
    assert late.last("finish_reason") == "cancelled" and late.last("output_tokens") == 0
    # remembered once: the same id again runs
    again = stream(url, "qwen_base", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 5}},
                   request_id=request_id)
    assert again.last("finish_reason") == "length" and again.last("output_tokens") == 5


def test_a_request_arriving_mid_batch_streams_before_the_batch_ends(url: str) -> None:
    long = Live(url, "qwen_base", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 1500}})
    long.wait_for(5)
    short = Live(url, "qwen_base", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 5}})
    short_result = short.finish()
    assert short_result.last("output_tokens") == 5
    assert not long.done.is_set(), "the short request waited for the long one"
    long.stop()


def test_a_full_queue_is_refused_as_unavailable(one_at_a_time: str) -> None:
    running = Live(one_at_a_time, "qwen_instruct", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 3000}})
    running.wait_for(2)
    queued = Live(one_at_a_time, "qwen_instruct", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 3}})
    time.sleep(0.5)  # it sits in the queue behind the running one (batch of one)
    refused = stream(one_at_a_time, "qwen_instruct", {**LONG, "sampling_parameters": {"max_tokens": 3}})
    assert refused.error is not None and "queue is full" in refused.error, refused.error
    assert InferenceFailed("qwen_instruct", refused.error).transient  # the bridge answers 503 + Retry-After
    assert not queued.done.is_set()
    running.stop()
    assert queued.finish().last("output_tokens") == 3  # the queued one is served once there is room


def test_a_request_cancelled_in_the_queue_leaves_it(solo_server: TritonServer) -> None:
    """A queued request whose client goes away is dropped from the queue while the running one
    goes on (the engine checks the queue at most every 50 ms, not on every step)."""
    url = solo_server.grpc_url
    running = Live(url, "qwen_instruct", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 3000}})
    running.wait_for(2)
    queued = Live(url, "qwen_instruct", {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 3}})
    _wait_for_metric(solo_server.metrics_url, "qwen_sequences_waiting", 1)
    queued.cancel()
    _wait_for_metric(solo_server.metrics_url, "qwen_sequences_waiting", 0)
    assert not running.done.is_set()
    assert not queued.result.final
    running.stop()


def test_a_cancelled_call_leaves_a_busy_batch_and_the_others_go_on(triton, url: str) -> None:
    """Six sequences held: the courier asks the server about two of them every 50 ms, in turn
    (model_kit/batching.py, ``CANCEL_CHECKS``), so the one whose client cancelled its call is found
    and leaves while the others go on. (Not streamed: no response is on its way when the call is
    cancelled, docs/ARCHITECTURE.md "Stopping a stream".)"""
    request = {"text_input": "Hello", "stream": False, "sampling_parameters": {"temperature": 0, "max_tokens": 3000}}
    held = [Live(url, "qwen_instruct", request) for _ in range(6)]
    _wait_for_metric(triton.metrics_url, "qwen_sequences_running", 6)
    held[-1].cancel()
    _wait_for_metric(triton.metrics_url, "qwen_sequences_running", 5)
    assert not any(live.done.is_set() for live in held[:-1])
    for live in held[:-1]:
        live.stop()
    assert not held[-1].result.final


def _wait_for_metric(url: str, name: str, value: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (seen := model_metric(url, name, "qwen_instruct")) != value:
        assert time.monotonic() < deadline, f"{name} stayed {seen}, not {value}"
        time.sleep(0.02)


def test_deltas_joined_over_the_stream_interval_give_the_same_text(one_at_a_time: str) -> None:
    request = {**LONG, "sampling_parameters": {"temperature": 0, "max_tokens": 200}}
    streamed = stream(one_at_a_time, "qwen_instruct", request)
    whole = stream(one_at_a_time, "qwen_instruct", {**request, "stream": False})
    assert text_of(streamed) == text_of(whole)
    assert streamed.last("output_tokens") == 200
    assert len(streamed.responses) < 100  # far fewer responses than tokens


def _conversation(tag: str, reply: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": f"{tag}: you are a ship's cook. " + "Speak of the sea. " * 30},
                {"role": "user", "content": "What is for dinner?"}]
    if reply is not None:
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And after that?"}]
    return messages


def test_prefix_reuse_gives_the_cold_text_and_metrics_show_it(url: str, one_at_a_time: str, triton) -> None:
    greedy = {"temperature": 0, "max_tokens": 20}
    first = {"messages": _conversation("reuse"), "sampling_parameters": greedy}
    reply = text_of(stream(url, "qwen_instruct", first))
    second = {"messages": _conversation("reuse", reply), "sampling_parameters": greedy}
    reused_before = model_metric(triton.metrics_url, "qwen_prefix_reused_tokens_total", "qwen_instruct")
    warm = stream(url, "qwen_instruct", second)
    reused = model_metric(triton.metrics_url, "qwen_prefix_reused_tokens_total", "qwen_instruct") - reused_before
    assert reused >= 100, reused  # the system prompt and the first turn came from the cache
    # the same turns on the server that keeps no prefixes and runs one sequence at a time
    assert text_of(stream(one_at_a_time, "qwen_instruct", first)) == reply
    assert text_of(stream(one_at_a_time, "qwen_instruct", second)) == text_of(warm)
    for name in ("qwen_time_to_first_token_seconds_count", "qwen_inter_token_latency_seconds_count",
                 "qwen_prompt_tokens_total", "qwen_generated_tokens_total", "qwen_prefix_cache_hits_total"):
        assert model_metric(triton.metrics_url, name, "qwen_instruct") > 0, name
    for name in ("qwen_sequences_running", "qwen_sequences_waiting"):
        assert model_metric(triton.metrics_url, name, "qwen_instruct") >= 0


def test_turns_arriving_together_reuse_the_prompt_prefix_one_of_them_prefilled(url: str, triton) -> None:
    """Two turns with one long system prompt, sent at once (so both are admitted before either is
    prefilled; with the lookup at admission neither reused anything, checked): the later one to
    start its prefill starts from the other's prompt KV (the prefix cache is looked up when a
    prefill starts, not when the sequence was admitted)."""
    system = "together: you are a lighthouse keeper. " + "Watch the rocks and the tide. " * 90
    turns = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
              "sampling_parameters": {"temperature": 0, "max_tokens": 8}}
             for question in ("Is a storm coming?", "When does the ferry sail?")]
    reused_before = model_metric(triton.metrics_url, "qwen_prefix_reused_tokens_total", "qwen_instruct")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda turn: stream(url, "qwen_instruct", turn), turns))
    prompts = [r.last("input_tokens") for r in results]
    assert min(prompts) > 1000, prompts  # a few prefill steps each (QWEN_PREFILL_CHUNK 512)
    deadline = time.monotonic() + 10
    while (reused := model_metric(triton.metrics_url, "qwen_prefix_reused_tokens_total", "qwen_instruct")
           - reused_before) < min(prompts) - 50:  # all but the question and the template's end
        assert time.monotonic() < deadline, (reused, prompts)  # the system prompt was prefilled twice
        time.sleep(0.05)
    assert reused < min(prompts), (reused, prompts)  # only the shared part, the question prefilled


def test_the_metrics_count_every_sequence_and_token_of_a_busy_batch(triton, url: str) -> None:
    """The model's counters add up exactly over 8 concurrent streams (their updates are sent by a
    thread of their own, a counter's queued increments summed into one call), and the gauges come
    back to 0."""
    names = ("qwen_sequences_total", "qwen_prompt_tokens_total", "qwen_generated_tokens_total",
             "qwen_prefix_cache_lookups_total", "qwen_time_to_first_token_seconds_count")
    before = {name: model_metric(triton.metrics_url, name, "qwen_base") for name in names}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: stream(url, "qwen_base", r), _requests("counted", "zz")))
    expected = {"qwen_sequences_total": 8, "qwen_prefix_cache_lookups_total": 8,
                "qwen_time_to_first_token_seconds_count": 8,
                "qwen_prompt_tokens_total": sum(r.last("input_tokens") for r in results),
                "qwen_generated_tokens_total": sum(r.last("output_tokens") for r in results)}
    deadline = time.monotonic() + 10
    while (seen := {n: model_metric(triton.metrics_url, n, "qwen_base") - before[n] for n in names}) != expected:
        assert time.monotonic() < deadline, (seen, expected)
        time.sleep(0.05)
    for name in ("qwen_sequences_running", "qwen_sequences_waiting"):
        assert model_metric(triton.metrics_url, name, "qwen_base") == 0


# ----------------------------------------------------------------------------- through the bridge
async def _chat_stream(http, max_tokens: int) -> list:
    from tests.stack import read_sse

    body = {"model": "qwen_instruct", "messages": [{"role": "user", "content": "Tell me of the sea."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        return [e for e in await read_sse(response) if '"content":"' in e["data"] and '"content":""' not in e["data"]]


async def test_chat_turns_through_the_bridge_run_at_once_and_are_counted(http) -> None:
    import asyncio

    streams = await asyncio.gather(*(_chat_stream(http, 80) for _ in range(4)))
    assert all(len(events) >= 20 for events in streams)
    # every stream had started before any had ended: the turns shared the model, not took turns
    assert max(events[0].at for events in streams) < min(events[-1].at for events in streams)
    body = (await http.get("/metrics")).text
    match = re.search(r'^gpu_worker_chat_turns_total\{outcome="ok",route="/v1/chat/completions"\} (\S+)$', body, re.M)
    assert match and float(match.group(1)) >= 4, body[-2000:]


async def test_text_completion_on_the_base_model(http) -> None:
    from tests.stack import read_sse

    body = {"model": "qwen_base", "prompt": "The lighthouse keeper", "max_tokens": 20, "temperature": 0}
    whole = (await http.post("/v1/completions", json=body)).json()
    assert whole["object"] == "text_completion" and whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert whole["usage"]["completion_tokens"] >= 1 and whole["usage"]["prompt_tokens"] >= 3
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = await read_sse(response)
    assert events[-1]["data"] == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    too_long = await http.post("/v1/completions", json={**body, "prompt": "word " * 9000})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt", too_long.text
    missing = await http.post("/v1/completions", json={"model": "qwen_base"})
    assert missing.status_code == 422
