"""The Qwen models' Triton custom metrics (``pb_utils.MetricFamily``), on Triton's metrics port
beside its own (docs/DEPLOY.md, "Chat metrics"). Labelled by model; the engine thread reports
through :class:`ChatMetrics` (the :class:`model_kit.batching.Observer` protocol).

Each metric update is a round trip to the server; the engine thread only queues it and a thread
of its own sends them (as Triton's vLLM backend does), so a decode step never waits for one."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("model_kit.llm_metrics")

# Seconds: a token every 10 ms .. 2 s; a first token within 20 ms .. 30 s.
_GAP_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
_FIRST_BUCKETS = [0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]


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
        self._updates: queue.SimpleQueue[tuple[Callable[[float], None], float] | None] = queue.SimpleQueue()
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
        while (update := self._updates.get()) is not None:
            call, value = update
            try:
                call(value)
            except Exception as exc:  # noqa: BLE001 - a lost metric update must not stop the others
                log.warning("a metric update failed: %s", exc)

    def first_token(self, seconds: float) -> None:
        self._updates.put((self._ttft.observe, seconds))

    def token_gap(self, seconds: float) -> None:
        self._updates.put((self._itl.observe, seconds))

    def finished(self, input_tokens: int, output_tokens: int, reused_tokens: int) -> None:
        self._updates.put((self._sequences.increment, 1))
        self._updates.put((self._tokens_in.increment, input_tokens))
        self._updates.put((self._tokens_out.increment, output_tokens))
        if reused_tokens:
            self._updates.put((self._reused.increment, reused_tokens))

    def occupancy(self, running: int, waiting: int) -> None:
        self._updates.put((self._running.set, running))
        self._updates.put((self._waiting.set, waiting))

    def prefix_lookup(self, hit: bool) -> None:
        self._updates.put((self._lookups.increment, 1))
        if hit:
            self._updates.put((self._hits.increment, 1))
