"""The Qwen models' Triton custom metrics (``pb_utils.MetricFamily``), on Triton's metrics port
beside its own (docs/DEPLOY.md, "Chat metrics"). Labelled by model; the engine thread reports
through :class:`ChatMetrics` (the :class:`model_kit.batching.Observer` protocol).

Each metric update is a round trip to the server; the engine thread only queues it and a thread
of its own sends them (as Triton's vLLM backend does), so a decode step never waits for one. What
queued up meanwhile goes in fewer calls: a counter's increments as one, a gauge's last value only
(histogram observations one by one: a histogram takes one value per call)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Literal

log = logging.getLogger("model_kit.llm_metrics")

# Seconds: a token every 10 ms .. 2 s; a first token within 20 ms .. 30 s.
_GAP_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
_FIRST_BUCKETS = [0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]

_How = Literal["observe", "increment", "set"]  # the pb_utils.Metric method an update calls


class ChatMetrics:
    """Counters, gauges and histograms of one Qwen model instance."""

    def __init__(self, model: str) -> None:
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415 - only inside the stub

        family = pb_utils.MetricFamily
        labels = {"model": model}

        def metric(name: str, description: str, kind: Any, **extra: Any) -> Any:
            fam = family(name=name, description=description, kind=kind)
            self._families.append(fam)  # a family must outlive its metrics
            return fam.Metric(labels=labels, **extra)

        self._families: list[Any] = []
        # (how, metric, value); None ends the sender
        self._updates: queue.SimpleQueue[tuple[_How, Any, float] | None] = queue.SimpleQueue()
        self._ttft = metric("qwen_time_to_first_token_seconds", "Seconds from arrival to the first new token",
                            family.HISTOGRAM, buckets=_FIRST_BUCKETS)
        self._itl = metric("qwen_inter_token_latency_seconds", "Seconds between two new tokens of one sequence",
                           family.HISTOGRAM, buckets=_GAP_BUCKETS)
        self._tokens_in = metric("qwen_prompt_tokens_total", "Prompt tokens of finished sequences", family.COUNTER)
        self._tokens_out = metric("qwen_generated_tokens_total", "Tokens generated", family.COUNTER)
        self._reused = metric("qwen_prefix_reused_tokens_total", "Prompt tokens whose KV came from the prefix cache",
                              family.COUNTER)
        self._hits = metric("qwen_prefix_cache_hits_total", "Prompts that started from a cached prefix", family.COUNTER)
        self._lookups = metric("qwen_prefix_cache_lookups_total", "Prompts looked up in the prefix cache",
                               family.COUNTER)
        self._sequences = metric("qwen_sequences_total", "Sequences finished (any reason)", family.COUNTER)
        self._running = metric("qwen_sequences_running", "Sequences in the batch (prefilling or decoding)",
                               family.GAUGE)
        self._waiting = metric("qwen_sequences_waiting", "Sequences queued in front of the batch", family.GAUGE)
        self._thread = threading.Thread(target=self._send, name="qwen-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Send what is queued, then stop (before the model's families go)."""
        self._updates.put(None)
        self._thread.join(timeout=10)

    def _send(self) -> None:
        closing = False
        while not closing:
            updates = [self._updates.get()]  # waits for one, then takes what else is queued
            while True:
                try:
                    updates.append(self._updates.get_nowait())
                except queue.Empty:
                    break
            if None in updates:  # close(): what came before it still goes out
                closing, updates = True, updates[: updates.index(None)]
            for how, metric, value in _merged(updates):  # type: ignore[arg-type]
                try:
                    getattr(metric, how)(value)
                except Exception as exc:  # noqa: BLE001 - a lost metric update must not stop the others
                    log.warning("a metric update failed: %s", exc)

    def first_token(self, seconds: float) -> None:
        self._updates.put(("observe", self._ttft, seconds))

    def token_gap(self, seconds: float) -> None:
        self._updates.put(("observe", self._itl, seconds))

    def finished(self, input_tokens: int, output_tokens: int, reused_tokens: int) -> None:
        self._updates.put(("increment", self._sequences, 1))
        self._updates.put(("increment", self._tokens_in, input_tokens))
        self._updates.put(("increment", self._tokens_out, output_tokens))
        if reused_tokens:
            self._updates.put(("increment", self._reused, reused_tokens))

    def occupancy(self, running: int, waiting: int) -> None:
        self._updates.put(("set", self._running, running))
        self._updates.put(("set", self._waiting, waiting))

    def prefix_lookup(self, hit: bool) -> None:
        self._updates.put(("increment", self._lookups, 1))
        if hit:
            self._updates.put(("increment", self._hits, 1))


def _merged(updates: list[tuple[_How, Any, float]]) -> list[tuple[_How, Any, float]]:
    """``updates`` in fewer calls: each counter's increments summed, each gauge's last value;
    every observation kept."""
    merged: dict[int, tuple[_How, Any, float]] = {}  # one call per counter or gauge
    observations = []
    for how, metric, value in updates:
        if how == "observe":
            observations.append((how, metric, value))
            continue
        if how == "increment" and id(metric) in merged:
            value += merged[id(metric)][2]
        merged[id(metric)] = (how, metric, value)
    return observations + list(merged.values())
