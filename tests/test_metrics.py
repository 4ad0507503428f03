"""bridge.metrics: what the helpers record shows up in the Prometheus text output."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge import metrics
from bridge.metrics import Metrics


def _samples(m: Metrics) -> dict[tuple[str, frozenset], float]:
    """Parse ``m.render()`` the way Prometheus would: {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_registry_is_isolated():
    a, b = Metrics(), Metrics()
    a.observe_job_finished("sdxl_image_fast", "completed", run_s=1.0)
    assert ("gpu_worker_jobs_total", frozenset({("job_type", "sdxl_image_fast"), ("status", "completed")})) in _samples(a)
    assert not any(name == "gpu_worker_jobs_total" for name, _ in _samples(b))


def test_job_finished_counts_and_histograms():
    m = Metrics()
    m.observe_job_finished("video_fast", "completed", queue_wait_s=0.3, run_s=95.0, upload_s=1.5, total_s=97.0)
    m.observe_job_finished("video_fast", "completed", queue_wait_s=2.0, run_s=100.0, upload_s=0.5, total_s=103.0)
    m.observe_job_finished("video_fast", "failed", queue_wait_s=1.0, run_s=3.0)  # no upload, no total
    s = _samples(m)
    assert _value(s, "gpu_worker_jobs_total", job_type="video_fast", status="completed") == 2
    assert _value(s, "gpu_worker_jobs_total", job_type="video_fast", status="failed") == 1
    assert _value(s, "gpu_worker_job_run_seconds_count", job_type="video_fast") == 3
    assert _value(s, "gpu_worker_job_run_seconds_sum", job_type="video_fast") == pytest.approx(198.0)
    assert _value(s, "gpu_worker_job_queue_wait_seconds_sum", job_type="video_fast") == pytest.approx(3.3)
    # Stages that did not happen are not observed.
    assert _value(s, "gpu_worker_job_upload_seconds_count", job_type="video_fast") == 2
    assert _value(s, "gpu_worker_job_latency_seconds_count", job_type="video_fast") == 2
    # Buckets are cumulative: 95 s and 100 s both fall at or below 120 s, neither at or below 60 s.
    assert _value(s, "gpu_worker_job_run_seconds_bucket", job_type="video_fast", le="60.0") == 1
    assert _value(s, "gpu_worker_job_run_seconds_bucket", job_type="video_fast", le="120.0") == 3
    assert _value(s, "gpu_worker_job_run_seconds_bucket", job_type="video_fast", le="+Inf") == 3


def test_model_ops_and_vram():
    m = Metrics()
    m.observe_model_op("wan", "load", 40.0, ok=True)
    m.observe_model_op("wan", "load", 2.0, ok=False)
    m.observe_model_op("wan", "unload", 1.7)
    m.set_model_vram("wan", 30e9)
    m.set_model_vram("sdxl", 10e9)
    m.set_model_vram("sdxl", 0)
    s = _samples(m)
    assert _value(s, "gpu_worker_model_operations_total", model="wan", op="load", outcome="ok") == 1
    assert _value(s, "gpu_worker_model_operations_total", model="wan", op="load", outcome="error") == 1
    assert _value(s, "gpu_worker_model_operations_total", model="wan", op="unload", outcome="ok") == 1
    assert _value(s, "gpu_worker_model_operation_seconds_sum", model="wan", op="load", outcome="ok") == 40.0
    assert _value(s, "gpu_worker_model_vram_bytes", model="wan") == 30e9
    assert _value(s, "gpu_worker_model_vram_bytes", model="sdxl") == 0


def test_counters_and_gauges():
    m = Metrics()
    m.set_queue_depth("sdxl_queue", 7)
    m.set_queue_depth("wan_queue", 2)
    m.set_queue_depth("sdxl_queue", 5)
    for _ in range(3):
        m.inc_callback_retry()
    m.inc_upload_retry()
    m.inc_dead_letter("wan_queue", "parse_error")
    m.inc_safety_refusal("sdxl_image_high")
    m.inc_safety_refusal("sdxl_image_high")
    m.inc_redis_reconnect()
    s = _samples(m)
    assert _value(s, "gpu_worker_queue_depth", queue="sdxl_queue") == 5
    assert _value(s, "gpu_worker_queue_depth", queue="wan_queue") == 2
    assert _value(s, "gpu_worker_callback_retries_total") == 3
    assert _value(s, "gpu_worker_upload_retries_total") == 1
    assert _value(s, "gpu_worker_dead_letters_total", queue="wan_queue", reason="parse_error") == 1
    assert _value(s, "gpu_worker_safety_refusals_total", job_type="sdxl_image_high") == 2
    assert _value(s, "gpu_worker_redis_reconnects_total") == 1


def test_render_is_prometheus_text_with_types():
    m = Metrics()
    m.observe_job_finished("image_fast", "cancelled", run_s=0.1)
    text = m.render().decode()
    assert "# TYPE gpu_worker_jobs_total counter" in text
    assert "# TYPE gpu_worker_job_run_seconds histogram" in text
    assert "# TYPE gpu_worker_queue_depth gauge" in text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["gpu_worker_jobs"] == "counter"
    assert types["gpu_worker_model_vram_bytes"] == "gauge"
    assert types["gpu_worker_job_latency_seconds"] == "histogram"
    assert metrics.CONTENT_TYPE.startswith("text/plain")


def test_module_helpers_use_process_metrics():
    before = _samples(metrics.METRICS).get(
        ("gpu_worker_jobs_total", frozenset({("job_type", "test_helper"), ("status", "completed")})), 0.0
    )
    metrics.observe_job_finished("test_helper", "completed", total_s=1.0)
    metrics.observe_model_op("test_model", "load", 0.5, ok=False)
    text = metrics.render().decode()
    after = _samples(metrics.METRICS)
    assert _value(after, "gpu_worker_jobs_total", job_type="test_helper", status="completed") == before + 1
    assert 'model="test_model",op="load",outcome="error"' in text


def test_no_created_timestamps_are_exported():
    m = Metrics()
    m.observe_job_finished("sdxl_image_fast", "completed", queue_wait_s=0.1, run_s=1.0, upload_s=0.2, total_s=1.3)
    m.observe_model_op("sdxl", "load", seconds=2.0, ok=True)
    text = m.render().decode()
    assert "gpu_worker_jobs_total" in text
    assert "_created" not in text


# Triton publishes these only where it sees a GPU.
GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}


def test_dashboard_queries_only_metrics_that_exist(triton) -> None:
    """docs/grafana-dashboard.json reads the bridge's and Triton's metrics by their real names."""
    import json
    import re
    from pathlib import Path

    import httpx

    from tests.triton_helpers import load_model, unload_model

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    names = {name for expr in exprs for name in re.findall(r"\b((?:gpu_worker|nv|qwen)_[a-z_]+)\b", expr)}
    assert any(n.startswith("gpu_worker_") for n in names) and any(n.startswith("nv_") for n in names)

    bridge = {family.name for family in text_string_to_metric_families(Metrics().render().decode())}
    load_model(triton.grpc_url, "qwen_base")  # Triton lists a model's metrics (ours too) once it is loaded
    try:
        served = httpx.get(triton.metrics_url, timeout=10).text
    finally:
        unload_model(triton.grpc_url, "qwen_base")
    triton_names = {family.name for family in text_string_to_metric_families(served)}
    for name in names:
        base = re.sub(r"_(bucket|total|count|sum)$", "", name)
        if name.startswith("gpu_worker_"):
            assert base in bridge, f"{name} is not a metric of the bridge"
        elif name not in GPU_ONLY:
            assert name in triton_names or base in triton_names, f"{name} is not served by Triton"
