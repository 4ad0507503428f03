"""GPU benchmark: the production jobs on full-size random-weight models, through tritonserver and
the bridge, with peak VRAM per model and the effect of each speed-up setting.

    python bench/gpu.py --quick                 # an H200: under 10 minutes, weights included
    python bench/gpu.py                         # the whole set (SDXL fast+high x 1/3/6, WAN 25 steps)
    python bench/gpu.py --dry-run               # CPU: tiny models, small requests, the same code path
    options: --out bench/gpu_results.md  --models-dir DIR  --budget-s S  --skip-speedups  --json PATH

What it does, in order (each step checks the time budget first and is skipped with a note when it
would not fit, so the tables are always written):

1. Weights: ``model_kit.fullsize`` writes SDXL base, WAN 2.1 T2V 1.3B (+ UMT5-XXL) and Qwen 2.5-7B
   Instruct at their real sizes with random weights into ``--models-dir`` (about 37 GB; reused
   when present). Each build runs in a child process (on the GPU: seconds of compute, the rest is
   writing files), so this process holds no GPU memory of its own. ``qwen_base`` is not built:
   no benchmarked job uses it. ``--dry-run`` uses the tiny models (``model_kit.tiny``) instead.
2. One tritonserver (``bridge.launcher``) with the production settings, an embedded redis-server
   and an in-process bridge (``bridge.runtime.Runtime``, local mode, no HTTP API). Per model, one
   at a time: load it through the bridge's residency manager (timed), send a warm-up request (the
   "first request" column), then each production job: pushed to the real queue and waited for
   until ``completed`` (the bridge figure: queue pickup, safety gate, Triton, PNG/MP4 spool writes,
   thumbnails, local "upload", state records) and the same Triton request sent directly (the
   bridge's own cost is the difference). Then the model is unloaded.
   - SDXL: ``sdxl_image_fast`` and ``sdxl_image_high`` at 1024x1024, batches 1/3/6
     (``--quick``: fast only, batches 1 and 3).
   - WAN: ``image_fast`` and ``video_fast`` at 480x832, 81 frames (``--quick``: video with 10 steps).
   - Qwen 2.5-7B Instruct: a ``chat_conversation`` job of 256 new tokens (greedy, so that random
     weights do not stop early on a sampled end token), and the same messages streamed directly:
     time to first token and decode tokens/s.
3. Speed-ups: for each setting of ``model_kit.speedups`` a fresh tritonserver with that one setting
   changed from the production defaults, the model loaded, a warm-up and a measured run of one
   representative request, compared with the same request under the defaults (measured in step 2).

Peak VRAM: the model runs inside Triton's Python-backend stub, another process, so it is read from
outside with NVML (``pynvml``, from ``nvidia-ml-py``: ``pip install .[gpu]``), polled every 50 ms
in a background thread while each model loads and serves: the device's used memory minus what was
used before the model was loaded (one model is resident at a time, nothing else runs on the GPU).
This is what the model really takes from the 48 GB budget: weights, activations, the CUDA context
and whatever PyTorch's caching allocator keeps reserved, which ``torch.cuda.max_memory_allocated``
in the model would not show. When NVML also reports the stub processes themselves (no PID
namespace in between), their own figure is used. Without pynvml, ``torch.cuda.mem_get_info`` gives
the same device-wide reading (this process then holds a CUDA context, which the baseline removes).

The weights are random: images and videos are noise and the text is gibberish, but every shape,
step and byte moved is the production one, so times and memory are realistic.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bridge.jobs import JOB_TYPES, parse_job  # noqa: E402
from bridge.launcher import TritonServer, free_port  # noqa: E402
from bridge.redis_server import RedisServer  # noqa: E402
from bridge.runtime import Runtime  # noqa: E402
from bridge.settings import REPO_ROOT, Settings  # noqa: E402
from bridge.triton_client import TritonClient  # noqa: E402

MODELS = ("sdxl", "wan", "qwen_instruct")
TINY_FAMILY = {"sdxl": "sdxl", "wan": "wan", "qwen_instruct": "qwen"}
PROMPT = "A cinematic shot of a lighthouse on a cliff at dawn, waves crashing below, seagulls circling"
CHAT_PROMPT = "Tell me about the history of lighthouses and how their lenses work, in detail."
DEFAULT_BUDGET_S = {"dry": 600.0, "quick": 540.0, "full": 3000.0}
RESERVE_S = 20.0  # kept back for stopping the servers and writing the tables
# Rough costs (seconds) used before anything is measured: H200 / dry run on a small CPU.
BUILD_EST_S = {"sdxl": 60.0, "wan": 90.0, "qwen_instruct": 90.0}
WEIGHTS_GB = {"sdxl": 7.0, "wan": 15.0, "qwen_instruct": 15.5}  # full size, on disk
LOAD_EST_S = {"gpu": {"sdxl": 60.0, "wan": 90.0, "qwen_instruct": 60.0}, "dry": {"sdxl": 30.0, "wan": 30.0, "qwen_instruct": 20.0}}
COMPILE_EST_S = {"sdxl": 240.0, "wan": 300.0}  # first request under TORCH_COMPILE (default mode)
SERVER_START_EST_S = 15.0

console = Console(width=None if sys.stdout.isatty() else 160)


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Case:
    """One production job: its queue payload (the bridge) and what to call it in the table."""

    model: str
    job_type: str
    describe: str
    config: dict[str, Any] = field(default_factory=dict)
    _: KW_ONLY
    metadata: dict[str, Any] = field(default_factory=dict)
    est_s: float = 10.0  # one run, rough
    units: int = 1  # images / frames / tokens (for the rate column)
    steps: int | None = None

    def payload(self) -> dict[str, Any]:
        """A fresh queue element (a new id each time: the bridge acknowledges repeated ids as done)."""
        prompt = CHAT_PROMPT if self.model.startswith("qwen") else PROMPT
        return {"id": str(uuid.uuid4()), "type": self.job_type, "prompt": prompt, "user_id": "bench",
                "config": {"seed": 1, **self.config}, "metadata": dict(self.metadata)}


@dataclass(frozen=True)
class Toggle:
    """One speed-up setting changed from the production defaults."""

    model: str
    field: str  # Settings field
    value: Any
    env: str  # how it reads in the environment
    _: KW_ONLY
    default_on: bool  # the production default has the speed-up on (the toggle turns it off)
    extra_est_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    cases: dict[str, list[Case]]
    representative: dict[str, Case]  # per model: the request the warm-up and the speed-ups use
    warmup: dict[str, Case]
    toggles: list[Toggle]


def make_plan(mode: str) -> Plan:
    """What to run: the production jobs (``bridge.jobs.JOB_TYPES`` defaults) per mode."""
    chat_of = lambda tokens, describe, est_s: Case(  # noqa: E731
        "qwen_instruct", "chat_conversation", describe, metadata={"max_tokens": tokens, "temperature": 0},
        est_s=est_s, units=tokens)
    if mode == "dry":
        sdxl_small = {"width": 64, "height": 64, "num_inference_steps": 2, "num_images": 1}
        wan_small = {"width": 32, "height": 32, "num_inference_steps": 2}
        sdxl = [Case("sdxl", "sdxl_image_fast", "64x64, batch 1, 2 steps", sdxl_small, est_s=5, units=1, steps=2)]
        wan = [
            Case("wan", "image_fast", "32x32, 1 frame, 2 steps", wan_small, est_s=5, units=1, steps=2),
            Case("wan", "video_fast", "32x32, 5 frames, 2 steps", {**wan_small, "frame_num": 5}, est_s=5, units=5,
                 steps=2),
        ]
        chat = [chat_of(16, "≤16 new tokens, greedy", 5)]
        representative = {"sdxl": sdxl[0], "wan": wan[1], "qwen_instruct": chat[0]}
        # One setting exercises the restart-with-a-setting path; on CPU the settings change nothing.
        toggles = [Toggle("sdxl", "sdpa", False, "SDPA=0", default_on=True)]
        return Plan({"sdxl": sdxl, "wan": wan, "qwen_instruct": chat}, representative, dict(representative), toggles)

    quick = mode == "quick"
    sdxl = []
    for job_type in ("sdxl_image_fast",) if quick else ("sdxl_image_fast", "sdxl_image_high"):
        steps = JOB_TYPES[job_type].steps or 0
        for batch in (1, 3) if quick else (1, 3, 6):
            sdxl.append(Case("sdxl", job_type, f"1024x1024, batch {batch}, {steps} steps", {"num_images": batch},
                             est_s=2.0 + 0.15 * steps * batch, units=batch, steps=steps))
    image_steps = JOB_TYPES["image_fast"].steps or 0
    video_steps = 10 if quick else JOB_TYPES["video_fast"].steps or 0
    wan = [
        Case("wan", "image_fast", f"480x832, 1 frame, {image_steps} steps", est_s=10, units=1, steps=image_steps),
        Case("wan", "video_fast", f"480x832, 81 frames, {video_steps} steps",
             {"num_inference_steps": video_steps} if quick else {}, est_s=25 + 3.0 * video_steps, units=81,
             steps=video_steps),
    ]
    chat = [chat_of(256, "256 new tokens, greedy", 20)]
    # The speed-ups' request: SDXL fast at batch 1; a WAN video with 10 steps (--quick: 33 frames).
    wan_frames = 33 if quick else 81
    wan_rep = Case("wan", "video_fast", f"480x832, {wan_frames} frames, 10 steps",
                   {"num_inference_steps": 10, "frame_num": wan_frames}, est_s=10 + 0.5 * wan_frames,
                   units=wan_frames, steps=10)
    representative = {"sdxl": sdxl[0], "wan": wan_rep, "qwen_instruct": chat[0]}
    warmup = {"sdxl": sdxl[0], "wan": wan_rep, "qwen_instruct": chat_of(16, "warm-up, 16 tokens", 5)}
    toggles = [
        Toggle("sdxl", "channels_last", False, "CHANNELS_LAST=0", default_on=True),
        Toggle("sdxl", "sdpa", False, "SDPA=0", default_on=True),
        Toggle("sdxl", "fp16_vae", True, "FP16_VAE=1", default_on=False),
        Toggle("wan", "sdpa", False, "SDPA=0", default_on=True, extra_est_s=30.0),
        Toggle("sdxl", "torch_compile", "full", "TORCH_COMPILE=full", default_on=False,
               extra_est_s=COMPILE_EST_S["sdxl"]),
        Toggle("wan", "torch_compile", "full", "TORCH_COMPILE=full", default_on=False,
               extra_est_s=COMPILE_EST_S["wan"]),
    ]
    return Plan({"sdxl": sdxl, "wan": wan, "qwen_instruct": chat}, representative, warmup, toggles)


# ----------------------------------------------------------------------------- results
@dataclass
class ModelRow:
    model: str
    build_s: float | None = None
    load_s: float | None = None
    first_request_s: float | None = None
    peak_vram_gib: float | None = None
    vram_source: str = ""
    unload_s: float | None = None
    note: str = ""


@dataclass
class RequestRow:
    model: str
    job_type: str
    request: str
    bridge_s: list[float] = field(default_factory=list)
    direct_s: list[float] = field(default_factory=list)
    rate: str = ""
    ttft_s: float | None = None
    tokens: int | None = None
    note: str = ""


@dataclass
class SpeedupRow:
    model: str
    setting: str
    request: str
    default: str
    off_s: float | None = None
    on_s: float | None = None
    vram_off_gib: float | None = None
    vram_on_gib: float | None = None
    first_request_s: float | None = None
    load_s: float | None = None
    note: str = ""


@dataclass
class Report:
    title: str
    environment: dict[str, str]
    models: list[ModelRow] = field(default_factory=list)
    requests: list[RequestRow] = field(default_factory=list)
    speedups: list[SpeedupRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vram_unavailable: str = ""
    started: float = field(default_factory=time.monotonic)

    def model(self, name: str) -> ModelRow:
        row = next((r for r in self.models if r.model == name), None)
        if row is None:
            row = ModelRow(name)
            self.models.append(row)
        return row


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gib(report: Report, value: float | None) -> str:
    if value is not None:
        return f"{value:.2f}"
    return report.vram_unavailable or "-"


def tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table, shared by the console and the Markdown file."""
    models = [
        [r.model, _s(r.build_s, 1), _s(r.load_s, 1), _s(r.first_request_s), _gib(report, r.peak_vram_gib),
         r.vram_source or "-", _s(r.unload_s, 1), r.note]
        for r in report.models
    ]
    requests = []
    for r in report.requests:
        bridge, direct = _mean(r.bridge_s), _mean(r.direct_s)
        overhead = None if bridge is None or direct is None else bridge - direct
        requests.append([
            r.model, r.job_type, r.request, _s(bridge, 3), _s(direct, 3), _s(overhead, 3), r.rate or "-",
            _s(r.ttft_s, 3), r.note,
        ])
    speedups = []
    for r in report.speedups:
        effect = "-"
        if r.off_s and r.on_s:
            effect = f"{r.off_s / r.on_s:.2f}x"
        speedups.append([
            r.model, r.setting, r.request, r.default, _s(r.off_s, 3), _s(r.on_s, 3), effect,
            _gib(report, r.vram_off_gib), _gib(report, r.vram_on_gib), _s(r.first_request_s, 1), r.note,
        ])
    return [
        ("Per model", ["model", "build s", "load s", "first request s", "peak VRAM GiB", "VRAM source", "unload s",
                       "note"], models),
        ("Per request (bridge = queued job end to end; direct = the same Triton request)",
         ["model", "job", "request", "bridge s", "direct s", "bridge overhead s", "rate", "TTFT s", "note"], requests),
        ("Speed-ups (one setting changed from the defaults; speed-up = time off / time on)",
         ["model", "setting", "request", "default", "off s", "on s", "speed-up", "VRAM off GiB", "VRAM on GiB",
          "first request on s", "note"], speedups),
    ]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    lines += [f"- {key}: {value}" for key, value in report.environment.items()]
    lines.append(f"- elapsed: {time.monotonic() - report.started:.0f} s")
    lines.append("")
    for title, header, rows in tables(report):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
        if not rows:
            lines.append("| " + " | ".join(["(none)"] + [""] * (len(header) - 1)) + " |")
        lines.append("")
    if report.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
    return "\n".join(lines)


def render(report: Report) -> None:
    console.print(f"[bold]{report.title}[/]")
    for key, value in report.environment.items():
        console.print(f"  {key}: {value}")
    for title, header, rows in tables(report):
        table = Table(title=title)
        for column in header:
            table.add_column(column, justify="left" if column in ("model", "job", "request", "setting", "default", "note",
                                                                  "VRAM source") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in report.notes:
        console.print(f"- {note}")


# ----------------------------------------------------------------------------- time budget
class Budget:
    """A deadline for the whole run; each step asks before it starts."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    def skip_note(self, what: str, estimate_s: float) -> str:
        return f"skipped {what}: needs ~{estimate_s:.0f} s, {max(self.left(), 0):.0f} s left of --budget-s {self.seconds:.0f}"

    def timeout(self) -> float:
        """How long one step may still run before the deadline."""
        return max(self.left(), 1.0)


# ----------------------------------------------------------------------------- VRAM
class VramSampler:
    """Peak GPU memory from outside the model processes, polled in a background thread.

    ``begin(pids)`` starts a measurement: the device's used memory now is the baseline; ``peak()``
    is the highest reading since, minus the baseline, in GiB. When NVML lists ``pids`` (the
    tritonserver process tree) among the GPU's processes, their own memory is reported instead.
    """

    def __init__(self, interval_s: float = 0.05, enabled: bool = True) -> None:
        self.interval_s = interval_s
        self.source = ""
        self.unavailable = ""
        self._read: Callable[[], int] | None = None
        self._processes: Callable[[], dict[int, int]] | None = None
        self._lock = threading.Lock()
        self._baseline = 0
        self._peak = 0
        self._proc_peak = 0
        self._pids: Callable[[], set[int]] = set
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            self._probe()
        else:
            self.unavailable, self.source = "n/a (no GPU)", "none (the dry run is on CPU)"

    def _probe(self) -> None:
        try:
            import pynvml  # noqa: PLC0415

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self._processes = lambda: {
                p.pid: int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            }
            self.source = "NVML"
            return
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError (no driver / GPU)
            nvml_problem = f"{type(exc).__name__}: {exc}"
        try:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                def read() -> int:
                    free, total = torch.cuda.mem_get_info(0)
                    return int(total - free)

                self._read = read
                self.source = "torch.cuda.mem_get_info"
                return
        except Exception:  # noqa: BLE001, S110
            pass
        self.unavailable = "n/a (no GPU)"
        self.source = f"none ({nvml_problem})"

    @property
    def available(self) -> bool:
        return self._read is not None

    def start(self) -> VramSampler:
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vram-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def begin(self, pids: Callable[[], set[int]] = set) -> None:
        if not self.available:
            return
        used = self._read()  # type: ignore[misc]
        with self._lock:
            self._baseline = self._peak = used
            self._proc_peak = 0
            self._pids = pids

    def peak(self) -> tuple[float | None, str]:
        """(GiB, how it was measured) since :meth:`begin`."""
        if not self.available:
            return None, ""
        try:
            self._sample(with_processes=True)
        except Exception:  # noqa: BLE001, S110 - the thread's readings stand
            pass
        with self._lock:
            if self._proc_peak > 0:
                return self._proc_peak / 2**30, "NVML per process"
            return (self._peak - self._baseline) / 2**30, f"{self.source}, device used - baseline"

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(self.interval_s):
            ticks += 1
            try:
                self._sample(with_processes=ticks % 4 == 0)
            except Exception:  # noqa: BLE001, S112 - a missed reading is not worth stopping for
                continue

    def _sample(self, with_processes: bool) -> None:
        used = self._read()  # type: ignore[misc]
        own = 0
        if with_processes and self._processes is not None:
            pids = self._pids()
            if pids:
                own = sum(mem for pid, mem in self._processes().items() if pid in pids)
        with self._lock:
            self._peak = max(self._peak, used)
            self._proc_peak = max(self._proc_peak, own)


def server_pids(server: TritonServer) -> Callable[[], set[int]]:
    """The tritonserver's child processes (the model stubs), as NVML would list them."""

    def pids() -> set[int]:
        import psutil  # noqa: PLC0415

        if server.process is None:
            return set()
        try:
            return {child.pid for child in psutil.Process(server.process.pid).children(recursive=True)}
        except psutil.Error:
            return set()

    return pids


# ----------------------------------------------------------------------------- weights
def build_weights(models: list[str], root: Path, mode: str, budget: Budget, report: Report) -> list[str]:
    """Build (or reuse) each model's weights in a child process; return the models that are ready."""
    ready = []
    for model in models:
        row = report.model(model)
        if mode == "dry":
            marker = root / ".tiny" / f"{TINY_FAMILY[model]}.json"
            code = f"from model_kit import tiny; tiny.build({TINY_FAMILY[model]!r}, {str(root)!r})"
        else:
            marker = root / ".fullsize" / f"{model}.json"
            code = f"from model_kit import fullsize; fullsize.build({model!r}, {str(root)!r})"
        if marker.exists():
            console.print(f"weights of {model}: present in {root}")
            row.build_s = 0.0
            ready.append(model)
            continue
        estimate = BUILD_EST_S[model] if mode != "dry" else 30.0
        if not budget.fits(estimate):
            row.note = budget.skip_note("building the weights", estimate)
            continue
        if mode != "dry":
            root.mkdir(parents=True, exist_ok=True)
            free_gb = shutil.disk_usage(root).free / 1e9
            if free_gb < WEIGHTS_GB[model] + 1:
                row.note = f"not built: {WEIGHTS_GB[model]:.0f} GB needed, {free_gb:.0f} GB free under {root}"
                continue
        console.print(f"building {'tiny' if mode == 'dry' else 'full-size'} {model} into {root} ...")
        started = time.monotonic()
        try:
            subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=budget.timeout(),
                           stdout=subprocess.DEVNULL if mode == "dry" else None)
        except subprocess.TimeoutExpired:
            row.note = f"weights not built within the budget ({time.monotonic() - started:.0f} s)"
            continue
        except subprocess.CalledProcessError as exc:
            row.note = f"building the weights failed (exit {exc.returncode}; see the log above)"
            continue
        row.build_s = time.monotonic() - started
        console.print(f"  {model} built in {row.build_s:.0f} s")
        ready.append(model)
    return ready


# ----------------------------------------------------------------------------- requests
class BenchError(RuntimeError):
    pass


def direct_inputs(runtime: Runtime | None, case: Case, payload: dict[str, Any]) -> dict[str, Any]:
    """The Triton request the worker would send for ``payload`` (chat: the same messages and
    sampling as the worker's, streamed; the runtime gives the tokenizer)."""
    job = parse_job(json.dumps(payload))
    if case.model.startswith("qwen"):
        from bridge.chat import prepare_chat  # noqa: PLC0415

        if runtime is None:
            raise BenchError("a chat request needs the bridge's tokenizer")
        tokenizer = cached_tokenizer(runtime, case.model)
        prepared = prepare_chat(job.chat, tokenizer, template=job.type.template)
        return {"messages": prepared.messages, "stream": True, "sampling_parameters": prepared.sampling}
    return {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "parameters": job.triton_parameters()}


def cached_tokenizer(runtime: Runtime, model: str) -> Any:
    """The model's tokenizer, loaded once (the bridge caches it too)."""
    cache = _TOKENIZERS.get(model)
    if cache is None:
        cache = _TOKENIZERS[model] = runtime.text.tokenizer(model)
    return cache


_TOKENIZERS: dict[str, Any] = {}


@dataclass
class Timing:
    seconds: float
    ttft_s: float | None = None
    tokens: int | None = None
    decode_tok_s: float | None = None


async def run_direct(client: TritonClient, model: str, inputs: dict[str, Any], timeout: float) -> Timing:
    """One request straight to Triton; LLM streams give time to first token and decode rate."""
    started = time.perf_counter()
    first = last = None
    final: dict[str, Any] = {}

    async def consume() -> None:
        nonlocal first, last
        async for outputs in client.responses(model, inputs):
            if "text_output" in outputs and outputs["text_output"].size and bytes(outputs["text_output"][0]):
                now = time.perf_counter()
                first = now if first is None else first
                last = now
            final.update(outputs)

    await asyncio.wait_for(consume(), timeout)
    elapsed = time.perf_counter() - started
    if not any(name in final for name in ("images", "video", "output_tokens")):
        raise BenchError(f"{model}: the stream ended without results")
    timing = Timing(elapsed)
    if "output_tokens" in final:
        timing.tokens = int(final["output_tokens"][0])
        if first is not None:
            timing.ttft_s = first - started
            if last is not None and last > first and timing.tokens > 1:
                timing.decode_tok_s = (timing.tokens - 1) / (last - first)
    return timing


async def run_bridge(runtime: Runtime, payload: dict[str, Any], timeout: float) -> tuple[float, dict[str, Any]]:
    """Push one job to its queue and wait for its terminal state; (seconds, state)."""
    job_id = payload["id"]
    started = time.perf_counter()
    await runtime.queue.push(JOB_TYPES[payload["type"]].queue, json.dumps(payload))
    last, deadline = "0", time.monotonic() + timeout
    status = None
    while status is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished within {timeout:.0f} s")
        for last, event in await runtime.queue.events(job_id, last, block_ms=500):
            if event.get("status") in ("completed", "failed", "cancelled"):
                status = event["status"]
    elapsed = time.perf_counter() - started
    state = await runtime.queue.get_state(job_id) or {}
    if status != "completed":
        raise BenchError(f"job {status}: {state.get('error', '?')}")
    return elapsed, state


def _rate(case: Case, seconds: float | None, timing: Timing | None = None) -> str:
    if seconds is None:
        return ""
    if case.model == "sdxl":
        return f"{case.units / seconds:.2f} img/s"
    if case.model == "wan":
        return f"{seconds / max(case.steps or 1, 1):.2f} s/step (incl. text enc. + VAE)"
    if timing is not None and timing.decode_tok_s is not None:
        return f"{timing.decode_tok_s:.1f} tok/s decode ({timing.tokens} tokens)"
    return ""


def _problem(exc: BaseException, budget: Budget) -> str:
    """A row's note for an exception: a cut at the deadline is not a failure."""
    if isinstance(exc, TimeoutError) and budget.left() <= 1.0:
        return f"cut off at the --budget-s {budget.seconds:.0f} deadline"
    return f"failed: {type(exc).__name__}: {str(exc)[:300]}"


# ----------------------------------------------------------------------------- step 2
@dataclass
class Baseline:
    """A model's representative request under the default settings (for the speed-up table)."""

    seconds: float
    vram_gib: float | None
    load_s: float
    first_s: float


async def bench_models(runtime: Runtime, server: TritonServer, ready: list[str], plan: Plan, mode: str,
                       repeats: int, budget: Budget, sampler: VramSampler, report: Report, flush: Callable[[], None],
                       ) -> dict[str, Baseline]:
    baselines: dict[str, Baseline] = {}
    device_kind = "dry" if mode == "dry" else "gpu"
    for model in MODELS:
        if model not in ready:
            continue
        row = report.model(model)
        cases = plan.cases[model]
        estimate = LOAD_EST_S[device_kind][model] + plan.warmup[model].est_s + plan.representative[model].est_s
        if not budget.fits(estimate):
            row.note = budget.skip_note(f"{model}", estimate)
            for case in cases:
                report.requests.append(RequestRow(model, case.job_type, case.describe, note="skipped (budget)"))
            flush()
            continue
        console.print(f"[bold]{model}[/]: loading ...")
        sampler.begin(server_pids(server))
        started = time.monotonic()
        try:
            await asyncio.wait_for(runtime.residency.load(model), budget.timeout())
        except Exception as exc:  # noqa: BLE001 - one model's failure is a row
            row.note = "load " + _problem(exc, budget)
            flush()
            continue
        row.load_s = time.monotonic() - started
        console.print(f"  loaded in {row.load_s:.1f} s")
        try:
            await _bench_loaded(runtime, model, cases, plan, repeats, budget, sampler, report, row, baselines, flush)
        finally:
            row.peak_vram_gib, row.vram_source = sampler.peak()
            started = time.monotonic()
            try:
                await asyncio.wait_for(runtime.residency.unload(model), 300)
                row.unload_s = time.monotonic() - started
            except Exception as exc:  # noqa: BLE001
                row.note = (row.note + f"; unload failed: {exc}").strip("; ")
            flush()
    return baselines


async def _bench_loaded(runtime: Runtime, model: str, cases: list[Case], plan: Plan, repeats: int, budget: Budget,
                        sampler: VramSampler, report: Report, row: ModelRow, baselines: dict[str, Baseline],
                        flush: Callable[[], None]) -> None:
    client = runtime.triton
    warm = plan.warmup[model]
    try:
        timing = await run_direct(client, model, direct_inputs(runtime, warm, warm.payload()), budget.timeout())
        row.first_request_s = timing.seconds
        console.print(f"  first request ({warm.describe}): {timing.seconds:.2f} s")
        if model in {toggle.model for toggle in plan.toggles}:
            # The speed-ups' reference: the representative request, warm, before any bigger request
            # has grown the allocator's reserve (so its VRAM compares with the speed-up runs').
            rep = plan.representative[model]
            timing = await run_direct(client, model, direct_inputs(runtime, rep, rep.payload()), budget.timeout())
            vram, _ = sampler.peak()
            baselines[model] = Baseline(timing.seconds, vram, row.load_s or 0.0, row.first_request_s or 0.0)
    except Exception as exc:  # noqa: BLE001
        row.note = "warm-up " + _problem(exc, budget)
    flush()
    for case in cases:
        result = RequestRow(model, case.job_type, case.describe)
        report.requests.append(result)
        estimate = 2 * repeats * case.est_s
        if not budget.fits(estimate):
            result.note = budget.skip_note("this request", estimate)
            flush()
            continue
        console.print(f"  {case.job_type} {case.describe} ...")
        try:
            timing = None
            for _ in range(repeats):
                seconds, state = await run_bridge(runtime, case.payload(), budget.timeout())
                result.bridge_s.append(seconds)
                timing = await run_direct(client, model, direct_inputs(runtime, case, case.payload()), budget.timeout())
                result.direct_s.append(timing.seconds)
            if timing is not None and timing.tokens is not None:
                result.ttft_s, result.tokens = timing.ttft_s, timing.tokens
                bridge_tokens = (state.get("metadata") or {}).get("output_tokens")
                wanted = case.metadata.get("max_tokens")
                if wanted and min(timing.tokens, bridge_tokens or wanted) < wanted:
                    result.note = (f"stopped early: {timing.tokens} tokens direct, {bridge_tokens} via the bridge "
                                   "(an end token: random weights)")
            result.rate = _rate(case, _mean(result.direct_s), timing)
            console.print(f"    bridge {_mean(result.bridge_s):.3f} s, direct {_mean(result.direct_s):.3f} s")
        except Exception as exc:  # noqa: BLE001 - one request's failure is a row
            result.note = _problem(exc, budget)
            console.print(f"    [red]{result.note}[/]")
        flush()


# ----------------------------------------------------------------------------- step 3
async def bench_speedups(base_settings: Settings, ready: list[str], plan: Plan, baselines: dict[str, Baseline],
                         mode: str, budget: Budget, sampler: VramSampler, report: Report, log_dir: Path,
                         flush: Callable[[], None]) -> None:
    for toggle in plan.toggles:
        rep = plan.representative[toggle.model]
        row = SpeedupRow(toggle.model, toggle.env, rep.describe, _default(toggle, base_settings))
        report.speedups.append(row)
        base = baselines.get(toggle.model)
        if toggle.model not in ready or base is None:
            row.note = "skipped: no baseline (the model was not measured)"
            flush()
            continue
        if toggle.default_on:
            row.on_s, row.vram_on_gib = base.seconds, base.vram_gib
        else:
            row.off_s, row.vram_off_gib = base.seconds, base.vram_gib
        estimate = SERVER_START_EST_S + base.load_s + base.first_s + base.seconds + toggle.extra_est_s + 10
        if not budget.fits(estimate):
            row.note = budget.skip_note("this setting", estimate)
            flush()
            continue
        console.print(f"speed-up {toggle.model} {toggle.env} ...")
        try:
            await _one_toggle(base_settings, toggle, rep, row, budget, sampler, log_dir)
        except Exception as exc:  # noqa: BLE001 - one setting's failure is a row
            row.note = _problem(exc, budget)
            console.print(f"  [red]{row.note}[/]")
        if mode == "dry":
            row.note = (row.note + "; CPU: the settings apply on CUDA only").strip("; ")
        flush()


def _default(toggle: Toggle, settings: Settings | None = None) -> str:
    """``SDPA=1``: the setting as the run's defaults have it (the production default)."""
    value = getattr(settings, toggle.field) if settings is not None else Settings.model_fields[toggle.field].default
    word = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return f"{toggle.field.upper()}={word}"


async def _one_toggle(base_settings: Settings, toggle: Toggle, rep: Case, row: SpeedupRow, budget: Budget,
                      sampler: VramSampler, log_dir: Path) -> None:
    settings = base_settings.model_copy(update={toggle.field: toggle.value, "triton_http_port": free_port(),
                                                "triton_grpc_port": free_port(), "triton_metrics_port": free_port()})
    server = TritonServer(settings, log_path=log_dir / f"tritonserver-{toggle.model}-{toggle.field}.log")
    await asyncio.to_thread(server.start)
    client = TritonClient(server.grpc_url)
    try:
        sampler.begin(server_pids(server))
        started = time.monotonic()
        await asyncio.wait_for(client.raw.load_model(toggle.model, client_timeout=budget.timeout()), budget.timeout())
        row.load_s = time.monotonic() - started
        first = await run_direct(client, toggle.model, direct_inputs(None, rep, rep.payload()), budget.timeout())
        row.first_request_s = first.seconds
        timing = await run_direct(client, toggle.model, direct_inputs(None, rep, rep.payload()), budget.timeout())
        vram, _ = sampler.peak()
        if toggle.default_on:
            row.off_s, row.vram_off_gib = timing.seconds, vram
        else:
            row.on_s, row.vram_on_gib = timing.seconds, vram
        console.print(f"  load {row.load_s:.1f} s, first {first.seconds:.2f} s, measured {timing.seconds:.3f} s")
    finally:
        await client.close()
        await asyncio.to_thread(server.stop)


# ----------------------------------------------------------------------------- main
def _environment(mode: str, device: str, root: Path, sampler: VramSampler, budget: Budget) -> dict[str, str]:
    env = {"mode": mode, "models dir": str(root), "device": device, "time budget": f"{budget.seconds:.0f} s",
           "python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "nvidia-ml-py"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = "not installed"
    env["gpu"] = "none"
    if mode != "dry" and _has_cuda():
        import torch  # noqa: PLC0415

        props = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    env["VRAM readings"] = sampler.source or "none"
    return env


def _has_cuda() -> bool:
    try:
        import torch  # noqa: PLC0415

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the reduced set that fits 10 minutes on an H200")
    mode.add_argument("--dry-run", action="store_true", help="CPU: tiny models, small requests, the same code path")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "gpu_results.md", help="Markdown tables")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--models-dir", type=Path, help="weights (default .cache/fullsize-models; dry run: the tiny models)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of models (default: all three)")
    parser.add_argument("--budget-s", type=float, help="time budget in seconds (default: quick 540, full 3000, dry 600)")
    parser.add_argument("--repeats", type=int, default=1, help="bridge + direct runs per request")
    parser.add_argument("--skip-speedups", action="store_true", help="no speed-up comparisons")
    parser.add_argument("--threads", type=int, help="torch threads per model process (default: dry 1, else 0 = all)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the full-size models without a GPU (tens of GB of RAM, hours)")
    args = parser.parse_args(argv)
    args.mode = "dry" if args.dry_run else "quick" if args.quick else "full"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


async def _run(args: argparse.Namespace, report: Report, budget: Budget, sampler: VramSampler, root: Path,
               flush: Callable[[], None]) -> None:
    plan = make_plan(args.mode)
    ready = build_weights(args.models, root, args.mode, budget, report)
    flush()
    if not ready:
        report.notes.append("no model could be benchmarked (see the per-model notes)")
        return
    kind = "dry" if args.mode == "dry" else "gpu"
    if not budget.fits(SERVER_START_EST_S + min(LOAD_EST_S[kind][m] for m in ready)):
        for model in ready:  # nothing fits: start nothing, say so per row
            report.model(model).note = budget.skip_note(model, SERVER_START_EST_S + LOAD_EST_S[kind][model])
            report.requests += [RequestRow(model, c.job_type, c.describe, note="skipped (budget)")
                                for c in plan.cases[model]]
        report.speedups += [SpeedupRow(t.model, t.env, plan.representative[t.model].describe, _default(t),
                                       note="skipped: no baseline (the model was not measured)") for t in plan.toggles]
        return
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        redis = RedisServer(data_dir=work / "redis").start()
        try:
            settings = Settings(
                models_dir=root, output_dir=work / "outputs", redis_url=redis.url, api_port=0,
                triton_http_port=free_port(), triton_grpc_port=free_port(), triton_metrics_port=free_port(),
                triton_exit_timeout_s=5, triton_start_timeout_s=180, shutdown_grace_s=5,
                model_threads=args.threads if args.threads is not None else (1 if args.mode == "dry" else 0),
                device="cpu" if args.mode == "dry" else "auto",
                # The production defaults of every speed-up, whatever this shell's environment says.
                channels_last=True, sdpa=True, fp16_vae=False, torch_compile="off", torch_compile_mode="default",
            )
            server = TritonServer(settings, log_path=work / "logs" / "tritonserver.log")
            await asyncio.to_thread(server.start)
            try:
                bridge_settings = settings.model_copy(update={"triton_url": server.grpc_url})
                async with Runtime(bridge_settings, api=False) as runtime:
                    baselines = await bench_models(runtime, server, ready, plan, args.mode, args.repeats, budget,
                                                   sampler, report, flush)
            finally:
                await asyncio.to_thread(server.stop)
            if args.skip_speedups:
                report.notes.append("speed-up comparisons skipped (--skip-speedups)")
            else:
                await bench_speedups(settings, ready, plan, baselines, args.mode, budget, sampler, report,
                                     work / "logs", flush)
        finally:
            redis.stop()
    finally:
        if _failures(report) and (work / "logs").is_dir():
            logs = args.out.parent / f"{args.out.stem}-logs"
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(work / "logs", logs)
            report.notes.append(f"something failed: the tritonserver logs are in {logs}")
        if os.environ.get("BENCH_KEEP_WORKDIR"):
            report.notes.append(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _failures(report: Report) -> list[str]:
    """The notes that say something failed (not skipped)."""
    notes = [r.note for r in report.models] + [r.note for r in report.requests] + [r.note for r in report.speedups]
    return [note for note in notes if "failed" in note]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network
    budget = Budget(args.budget_s or DEFAULT_BUDGET_S[args.mode])
    if args.mode == "dry":
        root = args.models_dir or Path(os.environ.get("TINY_MODELS_DIR", REPO_ROOT / ".cache" / "tiny-models"))
    else:
        root = args.models_dir or REPO_ROOT / ".cache" / "fullsize-models"
    root = root.resolve()
    if args.mode != "dry" and not args.allow_cpu and not _has_cuda():
        console.print("[red]no CUDA GPU here:[/] the full-size models need one (or --allow-cpu and tens of GB of "
                      "RAM). On a CPU machine, `--dry-run` runs the same code on the tiny models.")
        return 2
    sampler = VramSampler(enabled=args.mode != "dry").start()
    device = "cpu" if args.mode == "dry" else "auto (cuda when present)"
    titles = {"dry": "GPU benchmark -- dry run (tiny models, CPU)", "quick": "GPU benchmark -- quick",
              "full": "GPU benchmark"}
    report = Report(titles[args.mode], _environment(args.mode, device, root, sampler, budget),
                    vram_unavailable=sampler.unavailable)
    report.notes.append(
        "Peak VRAM: NVML (or torch.cuda.mem_get_info) polled every 50 ms from the bench process while each model "
        "loads and serves, device used memory minus the reading before the load (one model resident at a time); "
        "'NVML per process' when NVML lists the model's stub process itself."
    )
    report.notes.append("Weights are random (model_kit.fullsize / model_kit.tiny): outputs are noise; shapes, steps "
                        "and bytes moved are the production ones.")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        args.out.write_text(markdown(report))
        if args.json:
            args.json.write_text(json.dumps({"title": report.title, "environment": report.environment,
                                             "models": [asdict(r) for r in report.models],
                                             "requests": [asdict(r) for r in report.requests],
                                             "speedups": [asdict(r) for r in report.speedups],
                                             "notes": report.notes}, indent=2))

    code = 0
    try:
        asyncio.run(_run(args, report, budget, sampler, root, flush))
    except KeyboardInterrupt:
        report.notes.append("interrupted")
        code = 130
    except Exception as exc:  # noqa: BLE001 - the tables are written whatever happened
        report.notes.append(f"stopped early: {type(exc).__name__}: {str(exc)[:500]}")
        console.print_exception()
        code = 1
    finally:
        sampler.stop()
        flush()
        render(report)
        console.print(f"tables written to {args.out}")
    return code or (1 if _failures(report) else 0)


if __name__ == "__main__":
    sys.exit(main())
