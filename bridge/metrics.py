"""Prometheus metrics of the bridge, served by the API at ``/metrics``.

All metrics live in their own :class:`~prometheus_client.CollectorRegistry` (never the library's
global one), so tests build a fresh :class:`Metrics` each and see only what they did. The process
uses the module-level :data:`METRICS`; the one-line helpers below (``observe_job_finished`` ...)
act on it, so call sites stay one line::

    from bridge import metrics
    metrics.observe_job_finished("sdxl_image_fast", "completed", queue_wait_s=0.4, run_s=3.1,
                                 upload_s=0.6, total_s=4.2)
    metrics.observe_model_op("wan", "load", seconds=41.0, ok=True)

    # in the API
    body, content_type = metrics.render(), metrics.CONTENT_TYPE

Label values must come from small fixed sets (job types of the job table, model names, queue
names): a label value taken from raw input would create one time series per distinct value.

Triton's own metrics (GPU utilisation, inference counts and durations per model) are on Triton's
metrics port (8002, ``/metrics``); these are the bridge's view: queues, jobs, residency, retries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# No ``*_created`` series: a timestamp per labelled series doubles what is scraped and stored for
# nothing a dashboard reads (counters and histograms reset detection does not need them).
disable_created_metrics()

NAMESPACE = "gpu_worker"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds. A job may wait in the queue behind a 10-minute video; a video run takes minutes.
_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_RUN_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 12, 20, 30, 60, 120, 240, 480, 900, 1800)
_UPLOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_TOTAL_BUCKETS = (0.5, 1, 2, 3, 5, 8, 12, 20, 30, 60, 120, 240, 480, 900, 1800, 3600)
_MODEL_OP_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


@dataclass
class Metrics:
    """Every metric of the bridge, registered in ``registry``."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        reg, ns = self.registry, NAMESPACE
        self.queue_depth = Gauge("queue_depth", "Jobs waiting in a Redis queue.", ["queue"], namespace=ns, registry=reg)
        self.jobs = Counter(
            "jobs", "Jobs that reached a terminal status.", ["job_type", "status"], namespace=ns, registry=reg
        )
        self.queue_wait = Histogram(
            "job_queue_wait_seconds", "Time from enqueue to start of work.", ["job_type"],
            namespace=ns, registry=reg, buckets=_WAIT_BUCKETS,
        )
        self.run_time = Histogram(
            "job_run_seconds", "Time spent generating (model inference, prompt enhancement included).",
            ["job_type"], namespace=ns, registry=reg, buckets=_RUN_BUCKETS,
        )
        self.upload_time = Histogram(
            "job_upload_seconds", "Time spent storing assets and sending the terminal callback.", ["job_type"],
            namespace=ns, registry=reg, buckets=_UPLOAD_BUCKETS,
        )
        self.latency = Histogram(
            "job_latency_seconds", "End-to-end time from enqueue to terminal status.", ["job_type"],
            namespace=ns, registry=reg, buckets=_TOTAL_BUCKETS,
        )
        self.model_ops = Counter(
            "model_operations", "Model loads and unloads in Triton.", ["model", "op", "outcome"],
            namespace=ns, registry=reg,
        )
        self.model_op_time = Histogram(
            "model_operation_seconds", "Duration of model loads and unloads.", ["model", "op", "outcome"],
            namespace=ns, registry=reg, buckets=_MODEL_OP_BUCKETS,
        )
        self.model_vram = Gauge(
            "model_vram_bytes", "GPU memory held by a resident model (0 when unloaded).", ["model"],
            namespace=ns, registry=reg,
        )
        self.callback_retries = Counter(
            "callback_retries", "Job-callback requests retried after a failure.", namespace=ns, registry=reg
        )
        self.upload_retries = Counter(
            "upload_retries", "Storage uploads retried after a failure.", namespace=ns, registry=reg
        )
        self.dead_letters = Counter(
            "dead_letters", "Jobs moved to the dead-letter list.", ["queue", "reason"], namespace=ns, registry=reg
        )
        self.safety_refusals = Counter(
            "safety_refusals", "Jobs or requests refused by the safety gate.", ["job_type"],
            namespace=ns, registry=reg,
        )
        self.redis_reconnects = Counter(
            "redis_reconnects", "Reconnections to Redis after a lost connection.", namespace=ns, registry=reg
        )
        self.chat_turns = Counter(
            "chat_turns", "Chat and completion requests of the HTTP API, by route and outcome.", ["route", "outcome"],
            namespace=ns, registry=reg,
        )
        self.app_status_read_failures = Counter(
            "app_status_read_failures", "Reads of the app's jobs row (cancel checks) that got no answer.",
            namespace=ns, registry=reg,
        )

    # ------------------------------------------------------------------ helpers
    def set_queue_depth(self, queue: str, depth: int) -> None:
        """Record the current length of ``queue``."""
        self.queue_depth.labels(queue=queue).set(depth)

    def observe_job_finished(
        self,
        job_type: str,
        status: str,
        queue_wait_s: float | None = None,
        run_s: float | None = None,
        upload_s: float | None = None,
        total_s: float | None = None,
    ) -> None:
        """Count a terminal status (``completed``/``failed``/``cancelled``) and record the durations
        that are known (``None`` = that stage did not happen, e.g. no upload for a failed job)."""
        self.jobs.labels(job_type=job_type, status=status).inc()
        for histogram, seconds in (
            (self.queue_wait, queue_wait_s),
            (self.run_time, run_s),
            (self.upload_time, upload_s),
            (self.latency, total_s),
        ):
            if seconds is not None:
                histogram.labels(job_type=job_type).observe(max(0.0, seconds))

    def observe_model_op(self, model: str, op: str, seconds: float, ok: bool = True) -> None:
        """Count one ``load``/``unload`` of ``model`` and record how long it took."""
        outcome = "ok" if ok else "error"
        self.model_ops.labels(model=model, op=op, outcome=outcome).inc()
        self.model_op_time.labels(model=model, op=op, outcome=outcome).observe(max(0.0, seconds))

    def set_model_vram(self, model: str, vram_bytes: float) -> None:
        """Record the GPU memory ``model`` holds (0 after it is unloaded)."""
        self.model_vram.labels(model=model).set(vram_bytes)

    def inc_callback_retry(self) -> None:
        self.callback_retries.inc()

    def inc_upload_retry(self) -> None:
        self.upload_retries.inc()

    def inc_dead_letter(self, queue: str, reason: str) -> None:
        """A job went to the dead-letter list (``reason``: e.g. ``parse_error``, ``max_attempts``)."""
        self.dead_letters.labels(queue=queue, reason=reason).inc()

    def inc_safety_refusal(self, job_type: str) -> None:
        self.safety_refusals.labels(job_type=job_type).inc()

    def inc_redis_reconnect(self) -> None:
        self.redis_reconnects.inc()

    def inc_app_status_read_failure(self) -> None:
        self.app_status_read_failures.inc()

    def render(self) -> bytes:
        """The registry in Prometheus text format (body of ``GET /metrics``; see :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


METRICS = Metrics()
"""The process-wide metrics; the module-level helpers act on it."""


def set_queue_depth(queue: str, depth: int) -> None:
    METRICS.set_queue_depth(queue, depth)


def observe_job_finished(
    job_type: str,
    status: str,
    queue_wait_s: float | None = None,
    run_s: float | None = None,
    upload_s: float | None = None,
    total_s: float | None = None,
) -> None:
    METRICS.observe_job_finished(job_type, status, queue_wait_s, run_s, upload_s, total_s)


def observe_model_op(model: str, op: str, seconds: float, ok: bool = True) -> None:
    METRICS.observe_model_op(model, op, seconds, ok)


def set_model_vram(model: str, vram_bytes: float) -> None:
    METRICS.set_model_vram(model, vram_bytes)


def inc_callback_retry() -> None:
    METRICS.inc_callback_retry()


def inc_upload_retry() -> None:
    METRICS.inc_upload_retry()


def inc_dead_letter(queue: str, reason: str) -> None:
    METRICS.inc_dead_letter(queue, reason)


def inc_safety_refusal(job_type: str) -> None:
    METRICS.inc_safety_refusal(job_type)


def inc_redis_reconnect() -> None:
    METRICS.inc_redis_reconnect()


def inc_chat_turn(route: str, outcome: str) -> None:
    """One chat / completion request ended: ``ok``, ``bad_request``, ``unavailable``, ``timeout``,
    ``error`` or ``cancelled`` (the client left a stream)."""
    METRICS.chat_turns.labels(route=route, outcome=outcome).inc()


def inc_app_status_read_failure() -> None:
    METRICS.inc_app_status_read_failure()


def render() -> bytes:
    """The process-wide metrics in Prometheus text format."""
    return METRICS.render()
