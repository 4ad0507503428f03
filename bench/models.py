"""Per-model load time and per-request time through a real tritonserver.

    .venv/bin/python bench/models.py                                   # tiny weights (CPU is fine)
    .venv/bin/python bench/models.py --models qwen_base,qwen_instruct --requests 5
    .venv/bin/python bench/models.py --full-size --models-dir /scratch/fullsize   # GPU machine

Each model is loaded alone into an embedded tritonserver (``bridge.launcher``), sent the same
request ``--requests`` times through the worker's own gRPC client (``bridge.triton_client``), and
unloaded; the table shows load time, request times, time to the first streamed response, tokens
per second for the LLMs, memory, and unload time.

Tiny mode uses the deterministic tiny random-weight models (``model_kit.tiny``) with small
requests. ``--full-size`` writes every model at its real architecture size with random weights
(``model_kit.fullsize``: SDXL base, WAN 2.1 T2V 1.3B, Qwen 2.5-7B; tens of GB, built once into
``--models-dir``) and sends production-sized requests (the ``*_fast`` job defaults, a 150-token
prompt enhancement). That is meant for a GPU machine; on CPU it needs tens of GB of RAM and a
long wait.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import psutil  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bridge.launcher import TritonServer, free_port  # noqa: E402
from bridge.settings import REPO_ROOT, Settings  # noqa: E402
from bridge.triton_client import TritonClient  # noqa: E402

MODELS = ("sdxl", "wan", "qwen_instruct", "qwen_base")
FAMILY = {"sdxl": "sdxl", "wan": "wan", "qwen_instruct": "qwen", "qwen_base": "qwen"}
PROMPT = "A cinematic shot of a lighthouse on a cliff at dawn, waves crashing below, seagulls circling"
LOAD_TIMEOUT_S = 1800.0
REQUEST_TIMEOUT_S = 1800.0

console = Console(width=None if sys.stdout.isatty() else 150)


# ----------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """One request per model and mode, and how to describe it in the table."""

    inputs: dict[str, Any]
    describe: str


def _sdxl(steps: int, size: int) -> Workload:
    parameters = {"num_images": 1, "steps": steps, "width": size, "height": size, "seed": 1}
    return Workload({"prompt": PROMPT, "parameters": parameters}, f"1 image {size}x{size}, {steps} steps")


def _wan(steps: int, frames: int, width: int, height: int) -> Workload:
    parameters = {"num_frames": frames, "steps": steps, "width": width, "height": height, "seed": 1, "output": "video"}
    return Workload({"prompt": PROMPT, "parameters": parameters}, f"{frames} frames {width}x{height}, {steps} steps")


def _qwen(max_tokens: int) -> Workload:
    sampling = {"max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9, "seed": 1}
    messages = [{"role": "user", "content": f"Rewrite as a detailed cinematic video prompt: {PROMPT}"}]
    return Workload({"messages": messages, "stream": True, "sampling_parameters": sampling}, f"≤{max_tokens} tokens, streamed")


WORKLOADS = {
    "tiny": {"sdxl": _sdxl(3, 64), "wan": _wan(2, 5, 32, 32), "qwen_instruct": _qwen(32), "qwen_base": _qwen(32)},
    # The *_fast job defaults (docs/APP_CONTRACT.md §3) and a prompt enhancement.
    "full": {"sdxl": _sdxl(15, 1024), "wan": _wan(25, 81, 832, 480), "qwen_instruct": _qwen(150), "qwen_base": _qwen(150)},
}


# ----------------------------------------------------------------------------- results
@dataclass
class Result:
    """What was measured for one model (seconds; None when not measured)."""

    model: str
    request: str = ""
    load_s: float | None = None
    request_s: list[float] = field(default_factory=list)
    first_response_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    memory_gb: float | None = None
    unload_s: float | None = None
    note: str = ""


# ----------------------------------------------------------------------------- preparing weights
def _available(model: str) -> str | None:
    """Why ``model`` cannot be benchmarked here, or None."""
    folder = REPO_ROOT / "model_repository" / model
    if not (folder / "config.pbtxt").exists() or not (folder / "1" / "model.py").exists():
        return f"skipped: model_repository/{model} is not there yet"
    if importlib.util.find_spec(f"model_kit.tiny.{FAMILY[model]}") is None:
        return f"skipped: model_kit/tiny/{FAMILY[model]}.py is not there yet"
    return None


def _prepare_weights(models: list[str], root: Path, full_size: bool) -> dict[str, str]:
    """Build the weights the models need under ``root``; return a note per model that failed."""
    failed: dict[str, str] = {}
    for model in models:
        started = time.monotonic()
        try:
            if full_size:
                from model_kit import fullsize  # noqa: PLC0415

                console.print(f"building full-size {model} into {root} (once) ...")
                fullsize.build(model, root)
            else:
                from model_kit import tiny  # noqa: PLC0415

                tiny.build(FAMILY[model], root)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other models
            failed[model] = f"weights failed: {type(exc).__name__}: {exc}"
            continue
        console.print(f"  {model} weights ready ({time.monotonic() - started:.1f} s)")
    return failed


# ----------------------------------------------------------------------------- measuring
async def _wait_unloaded(client: TritonClient, model: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        index = await client.raw.get_model_repository_index(as_json=True)
        state = next((m.get("state", "") for m in index.get("models", []) if m["name"] == model), "")
        if state in ("UNAVAILABLE", ""):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{model} not unloaded after {timeout:.0f} s")


async def _one_request(client: TritonClient, model: str, workload: Workload, result: Result) -> None:
    """Send one request, timing the whole stream and its first response."""
    started = time.monotonic()
    first: float | None = None
    final: dict[str, Any] = {}
    async for outputs in client.responses(model, workload.inputs):
        first = first if first is not None else time.monotonic() - started
        final.update(outputs)
    elapsed = time.monotonic() - started
    result.request_s.append(elapsed)
    if first is not None:
        result.first_response_s.append(first)
    if "output_tokens" in final:
        result.tokens_per_s.append(int(final["output_tokens"][0]) / elapsed)


def _memory_gb(server: TritonServer, model: str) -> float | None:
    """GPU memory in use (Triton's metric, all models) on a GPU, else the model stub's RSS."""
    try:
        text = httpx.get(server.metrics_url, timeout=5).text
    except httpx.HTTPError:
        text = ""
    used = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("nv_gpu_memory_used_bytes")]
    if used:
        return sum(used) / 1e9
    assert server.process is not None
    for child in psutil.Process(server.process.pid).children():
        if "triton_python_backend_stub" in child.name() and any(f"/{model}/" in arg for arg in child.cmdline()):
            return child.memory_info().rss / 1e9
    return None


async def _bench_model(server: TritonServer, client: TritonClient, model: str, workload: Workload, requests: int) -> Result:
    result = Result(model, request=workload.describe)
    started = time.monotonic()
    await client.raw.load_model(model, client_timeout=LOAD_TIMEOUT_S)
    result.load_s = time.monotonic() - started
    try:
        for _ in range(requests):
            await asyncio.wait_for(_one_request(client, model, workload, result), REQUEST_TIMEOUT_S)
        result.memory_gb = _memory_gb(server, model)
    finally:
        started = time.monotonic()
        await client.raw.unload_model(model)
        await _wait_unloaded(client, model)
        result.unload_s = time.monotonic() - started
    return result


async def _bench_all(server: TritonServer, models: list[str], mode: str, requests: int, notes: dict[str, str]) -> list[Result]:
    client = TritonClient(server.grpc_url)
    results = []
    try:
        for model in models:
            if model in notes:
                results.append(Result(model, note=notes[model]))
                continue
            console.print(f"benchmarking {model} ...")
            try:
                results.append(await _bench_model(server, client, model, WORKLOADS[mode][model], requests))
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row
                results.append(Result(model, note=f"failed: {type(exc).__name__}: {str(exc)[:300]}"))
    finally:
        await client.close()
    return results


# ----------------------------------------------------------------------------- output
def _seconds(values: list[float] | float | None) -> str:
    if values is None or values == []:
        return "-"
    if isinstance(values, list):
        return f"{statistics.mean(values):.3f}"
    return f"{values:.2f}"


def render(results: list[Result], title: str) -> None:
    table = Table(title=title)
    for column in ("model", "request", "load s", "first req s", "mean req s", "first resp s", "tok/s", "mem GB", "unload s", "note"):
        table.add_column(column, justify="left" if column in ("model", "request", "note") else "right")
    for r in results:
        table.add_row(
            r.model,
            r.request,
            _seconds(r.load_s),
            _seconds(r.request_s[0] if r.request_s else None),
            _seconds(r.request_s[1:] or r.request_s),
            _seconds(r.first_response_s),
            f"{statistics.mean(r.tokens_per_s):.1f}" if r.tokens_per_s else "-",
            f"{r.memory_gb:.2f}" if r.memory_gb is not None else "-",
            _seconds(r.unload_s),
            r.note,
        )
    console.print(table)


# ----------------------------------------------------------------------------- main
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of models (default: all four)")
    parser.add_argument("--requests", type=int, default=3, help="requests per model (the first may include warm-up)")
    parser.add_argument("--full-size", action="store_true", help="real architecture sizes, random weights (GPU)")
    parser.add_argument("--models-dir", type=Path, help="where the weights are built (default: .cache/tiny-models or .cache/fullsize-models)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument(
        "--threads", type=int, help="torch threads per model process (0: torch's default; default: 1 for tiny, 0 full size)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.threads is None:  # tiny models gain nothing from threads, and several oversubscribe the CPU
        args.threads = 0 if args.full_size else 1
    return args


def _warn_full_size_on_cpu(device: str) -> None:
    import torch  # noqa: PLC0415

    if device == "cpu" or not torch.cuda.is_available():
        console.print(
            "[yellow]warning:[/] --full-size without a GPU: building needs tens of GB of RAM and disk, "
            "and each request may take many minutes (meant for a GPU machine)."
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    mode = "full" if args.full_size else "tiny"
    root = args.models_dir or REPO_ROOT / ".cache" / ("fullsize-models" if args.full_size else "tiny-models")
    if args.full_size:
        _warn_full_size_on_cpu(args.device)
    notes = {m: why for m in args.models if (why := _available(m))}
    notes.update(_prepare_weights([m for m in args.models if m not in notes], root, args.full_size))
    settings = Settings(
        models_dir=root,
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        triton_exit_timeout_s=5,
        model_threads=args.threads,
        device=args.device,
    )
    with TritonServer(settings) as server:
        results = asyncio.run(_bench_all(server, args.models, mode, args.requests, notes))
    render(results, f"{mode} models, device {args.device}, {args.threads or 'default'} thread(s), {args.requests} request(s) each")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(not r.note or r.note.startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
