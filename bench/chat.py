"""Chat benchmark: concurrent streamed chat turns through the real stack (HTTP API → bridge →
tritonserver → qwen_instruct), continuous batching against the one-at-a-time engine.

    python bench/chat.py [--streams 1,4,16,64] [--repeat 5] [--max-tokens 128] [--prompt-tokens 64,240,560] [--turns 10] [--stream-interval-ms 100] [--full-size]

Two servers, one after the other, on the same models: the batching engine (defaults, prefix
reuse on) and today's one-at-a-time engine (``QWEN_MAX_BATCH=1``, ``QWEN_PREFIX_CACHE_GB=0``,
a queue long enough for every stream). For 1/4/16/64 concurrent streams (``/v1/chat/completions``,
``stream: true``, greedy, ``--max-tokens`` new tokens, prompts of mixed length: ``--prompt-tokens``)
each prints
aggregate generated tokens/s (usage's completion tokens over the wall time of the round), time to
the first content event p50/p95, inter-token latency p50/p95 (per stream: first to last content
over its tokens), and the ratio of the two engines. Each round runs ``--repeat`` times (its own
prompts each time): tokens/s is the median round's, the latencies are taken over all of them (on a
2-core box sharing its CPUs with the bridge and the callers, one round's rate moves by a third
from run to run). Then ``--repeat`` conversations of ``--turns`` turns (a long system prompt, each
turn adding the reply and a new question): the time to the first token of turn 1 and of the last
turn (each the median over the conversations) with the prefix cache and without it.

Prompt lengths are counted in the model's own tokens, chat template included (default 64, 240
and 560 in turn: about what Qwen 2.5's tokenizer makes of a turn of 20, 150 and 400 English
words). The tiny models' tokenizer is a 512-token BPE that cuts the same words about 3.3× finer, so
prompts sized in words made every stream's prefill and KV about three times production's (142,
609 and 1508 tokens before, as the model counted them); ``--prompt-tokens 88,555,1454`` sends
that heavier mix again (the bridge's safety rule adds the rest).

Both engines run with the same ``QWEN_STREAM_INTERVAL_MS`` (``--stream-interval-ms``, default the
engine's own; deltas are joined over it while the model holds more than ``QWEN_STREAM_JOIN_ABOVE``
requests); ``--stream-interval-ms 0`` measures every delta sent on its own.

Tiny models on the CPU by default (``.cache/tiny-models``, one torch thread per model as in the
tests); ``--full-size`` writes random-weight Qwen 2.5-7B (``model_kit.fullsize``) and needs a GPU.
Greedy decoding of random weights may end a reply early: the token counts are what was generated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.launcher import TritonServer, free_port  # noqa: E402
from bridge.redis_server import RedisServer  # noqa: E402
from bridge.runtime import Runtime  # noqa: E402
from bridge.settings import Settings  # noqa: E402
from model_kit.batching import Limits  # noqa: E402

MODEL = "qwen_instruct"
KEY = f"bench-chat-{secrets.token_hex(16)}"  # the API wants 32 characters at least; passed to the callers
console = Console(width=150)
WORDS = ("harbour lantern tide rope gull anchor mast sail salt wave reef compass chart keel deck storm "
         "calm dawn dusk fog bell pier net oar crew").split()

ENGINES = {
    "batching": {},
    "one-at-a-time": {"QWEN_MAX_BATCH": "1", "QWEN_PREFIX_CACHE_GB": "0", "QWEN_MAX_WAITING": "1000"},
}


@dataclass
class Round:
    streams: int
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    failed: int = 0
    prompt_tokens: list[int] = field(default_factory=list)  # as the model counted them (usage)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @staticmethod
    def repeated(rounds: list[Round]) -> Round:
        """Repeats of one round as one: the median round's rate, everyone's latencies."""
        middle = sorted(rounds, key=lambda r: r.rate)[len(rounds) // 2]
        return Round(middle.streams, middle.tokens, middle.seconds, [t for r in rounds for t in r.ttft],
                     [g for r in rounds for g in r.gaps], sum(r.failed for r in rounds),
                     [p for r in rounds for p in r.prompt_tokens])


def _prompt(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


class Prompts:
    """Chat turns of a given length in the model's tokens (its tokenizer and chat template, as the
    model renders them: ``model_kit.llm.QwenEngine.encode_messages``)."""

    def __init__(self, models: Path, sizes: list[int]) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415

        from model_kit import layout  # noqa: PLC0415
        from model_kit.common import resolve_hf_folder  # noqa: PLC0415

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_hf_folder(models / layout.QWEN_INSTRUCT),
                                                       local_files_only=True)
        self.sizes = sizes

    def count(self, messages: list[dict]) -> int:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def turn(self, i: int, tag: str) -> list[dict]:
        """Stream ``i``'s turn: the shortest one of at least ``sizes[i % len(sizes)]`` tokens."""
        def messages(words: int) -> list[dict]:
            return [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"{tag}, turn {i}: " + _prompt(i, words)}]

        target = self.sizes[i % len(self.sizes)]
        low, high = 0, target
        while low < high:  # every word is a token at least: ``target`` words are enough
            middle = (low + high) // 2
            low, high = (middle + 1, high) if self.count(messages(middle)) < target else (low, middle)
        return messages(low)


@dataclass
class Turn:
    """One streamed turn. (Content events are coalesced on the way, so a stream's inter-token
    latency is taken as its ``span`` over its tokens, not from the gaps between events.)"""

    ttft: float  # to the first content
    span: float  # from the first content to the last
    tokens: int  # generated (usage)
    prompt_tokens: int  # as the model counted them (usage): the bridge adds its rule to the system prompt
    text: str


async def _turn(http: httpx.AsyncClient, messages: list[dict], max_tokens: int) -> Turn:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.monotonic()
    first, last, tokens, prompt_tokens, text = None, None, 0, 0, []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens, prompt_tokens = event["usage"]["completion_tokens"], event["usage"]["prompt_tokens"]
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    last = time.monotonic()
                    first = first if first is not None else last
                    text.append(piece)
    if first is None:
        return Turn(time.monotonic() - started, 0.0, tokens, prompt_tokens, "")
    return Turn(first - started, last - first, tokens, prompt_tokens, "".join(text))


async def _round(http: httpx.AsyncClient, turns: list[list[dict]], max_tokens: int) -> Round:
    result = Round(len(turns))

    async def one(i: int, messages: list[dict]) -> None:
        try:
            turn = await _turn(http, messages, max_tokens)
        except Exception as exc:  # noqa: BLE001 - counted and shown, the round goes on
            result.failed += 1
            console.print(f"[yellow]stream {i} failed: {exc}")
            return
        result.ttft.append(turn.ttft)
        if turn.tokens > 1:
            result.gaps.append(turn.span / (turn.tokens - 1))
        result.tokens += turn.tokens
        result.prompt_tokens.append(turn.prompt_tokens)

    started = time.monotonic()
    await asyncio.gather(*(one(i, messages) for i, messages in enumerate(turns)))
    result.seconds = time.monotonic() - started
    return result


async def _conversation(http: httpx.AsyncClient, turns: int, tag: str) -> list[float]:
    """TTFT of each turn of one conversation (a long system prompt, growing history)."""
    messages = [{"role": "system", "content": f"{tag}. You are the harbour master. " + _prompt(3, 300)}]
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: " + _prompt(turn, 40)})
        answer = await _turn(http, messages, 48)
        ttfts.append(answer.ttft)
        messages.append({"role": "assistant", "content": answer.text or "(nothing)"})
    return ttfts


def _in_app(port: int, key: str, what: str, *call_args) -> Round | list[float]:
    """Run a round or a conversation against the API on ``port`` (in the callers' process)."""

    async def run() -> Round | list[float]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                                     timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None)) as http:
            if what == "round":
                return await _round(http, *call_args)
            return await _conversation(http, *call_args)

    return asyncio.run(run())


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """The engine settings, read by the model processes tritonserver starts from here."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def _engine(name: str, env: dict[str, str], base: dict, args: argparse.Namespace,
                  prompts: Prompts) -> tuple[list[Round], list[float]]:
    ports = dict(triton_http_port=free_port(), triton_grpc_port=free_port(), triton_metrics_port=free_port())
    with _environment(env):
        triton = TritonServer(Settings(**base, **ports), startup_models=[MODEL]).start()
    try:
        settings = Settings(**base, **ports, triton_url=triton.grpc_url)
        async with Runtime(settings) as runtime:
            # The callers run in a process of their own, as the app does: their HTTP work is not
            # done on the bridge's event loop.
            loop = asyncio.get_running_loop()
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as app:
                def call(*call_args):
                    return loop.run_in_executor(app, _in_app, runtime.api_port, KEY, *call_args)

                await call("round", [prompts.turn(i, "warm-up") for i in range(2)], 8)
                rounds = []
                for streams in args.streams:
                    repeats = []
                    for k in range(args.repeat):
                        # every round's and engine's prompts its own (the tag): none is read by the
                        # safety gate before (bridge/safety.py remembers the last texts it read) nor
                        # found in the prefix cache
                        turns = [prompts.turn(i, f"{name} {streams} #{k}") for i in range(streams)]
                        repeats.append(await call("round", turns, args.max_tokens))
                        r = repeats[-1]
                        console.print(f"{name}: {streams} streams, {r.tokens} tokens in {r.seconds:.1f}s")
                    rounds.append(Round.repeated(repeats))
                # each its own (the tag): a conversation's turns find only its own earlier turns
                conversations = [await call("conversation", args.turns, f"{name} #{k}") for k in range(args.repeat)]
                # each turn's median over the conversations (one turn's time moves with the box)
                turns = [statistics.median(ttfts) for ttfts in zip(*conversations)]
    finally:
        triton.stop()
    return rounds, turns


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


async def main(args: argparse.Namespace) -> None:
    if args.full_size:
        from model_kit import fullsize  # noqa: PLC0415

        models, device, threads = fullsize.build(MODEL, args.models_dir or Path(".cache/fullsize-models")), "auto", 0
    else:
        from model_kit.tiny import build_all  # noqa: PLC0415

        models, device, threads = build_all(args.models_dir or Path(".cache/tiny-models")), "cpu", 1
    out = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    redis = RedisServer(data_dir=out / "redis").start()
    base = dict(models_dir=models, output_dir=out, redis_url=redis.url, api_host="127.0.0.1", api_port=0,
                worker_api_key=KEY, device=device, model_threads=threads, triton_exit_timeout_s=5)
    if not args.full_size:
        base.update(vram_budget_gb=4.0, model_table={m: {"vram_gb": 1.0} for m in ("sdxl", "wan", "qwen_instruct", "qwen_base")})
    prompts = Prompts(models, args.prompt_tokens)
    results = {}
    try:
        for name, env in ENGINES.items():
            results[name] = await _engine(name, {**env, "QWEN_STREAM_INTERVAL_MS": str(args.stream_interval_ms)}, base,
                                          args, prompts)
    finally:
        redis.stop()
    seen = [p for r in results["batching"][0] for p in r.prompt_tokens] or [0]
    table = Table(title=f"chat: {MODEL} ({'full-size, ' + device if args.full_size else 'tiny, CPU'}), "
                        f"{args.max_tokens} new tokens per stream, prompts of {'/'.join(map(str, args.prompt_tokens))} tokens "
                        f"({min(seen)}-{max(seen)} as the model counted them, the bridge's rule added), deltas joined over {args.stream_interval_ms:.0f} ms "
                        f"above {Limits().stream_join_above} requests, tokens/s of the median of {args.repeat} runs, "
                        f"load {os.getloadavg()[0]:.1f}")
    for column in ("streams", "engine", "tokens/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95", "failed", "tokens/s ×"):
        table.add_column(column, justify="right")
    for i, streams in enumerate(args.streams):
        batched, single = results["batching"][0][i], results["one-at-a-time"][0][i]
        for name, r in (("batching", batched), ("one-at-a-time", single)):
            ratio = f"{batched.rate / single.rate:.1f}" if name == "batching" and single.rate else ""
            table.add_row(str(streams), name, f"{r.rate:.0f}", f"{_q(r.ttft, .5) * 1e3:.0f} ms",
                          f"{_q(r.ttft, .95) * 1e3:.0f} ms", f"{_q(r.gaps, .5) * 1e3:.1f} ms",
                          f"{_q(r.gaps, .95) * 1e3:.1f} ms", str(r.failed), ratio)
    console.print(table)
    turns = Table(title=f"time to first token in a {args.turns}-turn conversation (median of {args.repeat})")
    for column in ("engine", "turn 1", f"turn {args.turns}", "ratio"):
        turns.add_column(column, justify="right")
    for name, label in (("batching", "prefix reuse"), ("one-at-a-time", "no prefix reuse")):
        t = results[name][1]
        turns.add_row(label, f"{t[0] * 1e3:.0f} ms", f"{t[-1] * 1e3:.0f} ms", f"{t[-1] / t[0]:.2f}")
    console.print(turns)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each round (the median round's rate is shown)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[64, 240, 560],
                        help="prompt lengths in the model's tokens, stream i gets the (i mod n)-th")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--full-size", action="store_true", help="random-weight Qwen 2.5-7B on the GPU")
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--stream-interval-ms", type=float, default=Limits().stream_interval_s * 1000,
                        help="QWEN_STREAM_INTERVAL_MS for both engines (deltas joined for this long; 0: never)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
