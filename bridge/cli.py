"""Command line: ``python -m bridge <command>`` (Typer + Rich)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import enum

import typer
from rich.console import Console

from bridge.jobs import JOB_TYPES
from bridge.settings import SettingsError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="GPU inference worker: Triton + Redis + Supabase.")
console = Console(stderr=True)

# What each command reads from the environment, shown in its --help (bridge/settings.py has them all).
_REDIS_ENV = "Reads REDIS_URL (unset: the embedded redis-server of a local `serve`, found under OUTPUT_DIR)."
REDIS_WAIT_S = 5.0  # a CLI call to Redis gives up after this long with a clear message

# Choice lists for --help and for a clear error on a typo (Typer takes choices as an Enum).
JobTypeName = enum.Enum("JobTypeName", {name: name for name in sorted(JOB_TYPES)}, type=str)
ChatModel = enum.Enum("ChatModel", {name: name for name in ("qwen_instruct", "qwen_base")}, type=str)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"gpu-worker {version('gpu-worker')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """GPU inference worker: Triton + Redis + Supabase."""


def _settings(**overrides: object):
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command("tiny-models", epilog="Reads no environment variable.")
def tiny_models(
    directory: Path = typer.Argument(..., help="Where to write the tiny models (use it as MODELS_DIR)."),
    force: bool = typer.Option(False, help="Rebuild even if present."),
) -> None:
    """Write tiny random-weight versions of all four models in the production layouts."""
    from model_kit.tiny import BUILDERS, build

    started = time.perf_counter()
    for name in BUILDERS:
        t0 = time.perf_counter()
        build(name, directory, force=force)
        console.print(f"{name}: ready in {time.perf_counter() - t0:.1f}s")
    console.print(f"tiny models in {directory} ({time.perf_counter() - started:.1f}s); run with MODELS_DIR={directory}")


@app.command(epilog="Reads MODELS_DIR, MODEL_REPOSITORY, TRITON_* (host, ports, binary, startup models, API key), "
                     "DEVICE, MODEL_THREADS and the speed-up switches (README's settings table).")
def triton(
    models: Optional[str] = typer.Option(None, help="Comma list of models to load at start (default: settings)."),
    models_dir: Optional[Path] = typer.Option(None, help="MODELS_DIR override."),
) -> None:
    """Run tritonserver over model_repository/ in the foreground until Ctrl-C / SIGTERM."""
    from bridge.launcher import TritonStartError, start_triton
    from bridge.logs import setup_logging

    setup_logging()
    settings = _settings(models_dir=models_dir, triton_startup_models=models)
    try:
        server = start_triton(settings)
    except TritonStartError as exc:
        console.print(f"[red]tritonserver failed to start:[/red]\n{exc}")
        raise typer.Exit(1) from None
    console.print(f"tritonserver live: grpc {server.grpc_url}, http {server.http_url}, metrics {server.metrics_url}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and server.running:
        stop.wait(0.5)
    server.stop()
    console.print("tritonserver stopped")
    if not stop.is_set():
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console script entry
    logging.basicConfig(level=logging.INFO)
    app()


@app.command(epilog="Reads every setting in README's settings table (bridge/settings.py).")
def serve() -> None:
    """Run the worker: Redis jobs → Triton → Supabase (or local files), and the HTTP API."""
    import asyncio

    from bridge.logs import setup_logging
    from bridge.runtime import serve as serve_runtime

    from bridge.doctor import errors, render_table, run_checks
    from bridge.logs import secrets_from_settings

    settings = _settings()
    setup_logging(settings.log_level, settings.log_json, secrets=secrets_from_settings(settings))
    from bridge.api_auth import ApiConfigError, check_config

    try:
        check_config(settings)  # no key beyond loopback, a short key, a route that cannot be opened
    except ApiConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    checks = run_checks(settings)
    if errors(checks):
        console.print(render_table(checks))
        console.print("[red]start-up checks failed; fix the items marked above (python -m bridge doctor).[/red]")
        raise typer.Exit(1)
    asyncio.run(serve_runtime(settings))


@app.command(epilog="Reads MODELS_DIR and the *_WEIGHTS overrides, REDIS_URL, SUPABASE_URL, SUPABASE_SERVICE_KEY, "
                     "TRITONSERVER_BIN, REQUIRE_GPU, DEVICE.")
def doctor() -> None:
    """Check weights, GPU, Redis, Supabase and tritonserver; print a table."""
    from bridge.doctor import errors, render_table, run_checks

    checks = run_checks(_settings())
    Console().print(render_table(checks))
    raise typer.Exit(1 if errors(checks) else 0)


@app.command(epilog=f"{_REDIS_ENV} Reads OUTPUT_DIR.")
def status(
    job_id: str = typer.Argument(..., help="The job id."),
    redis_wait: float = typer.Option(REDIS_WAIT_S, help="Give up on Redis after this many seconds."),
) -> None:
    """Print a job's state as the bridge recorded it in Redis."""
    import asyncio
    import json

    from bridge.queue import Queue

    settings = _settings()
    url = settings.redis_url or _embedded_redis_url(settings)

    async def _read() -> dict | None:
        await _reach_redis(url, redis_wait)
        async with Queue.from_settings(settings, url=url) as queue:
            return await _bounded(queue.get_state(job_id), redis_wait, url)

    state = asyncio.run(_read())
    if state is None:
        console.print(f"no job {job_id} known to Redis at {settings.redis_url and 'REDIS_URL' or url}")
        raise typer.Exit(1)
    typer.echo(json.dumps(state, indent=2, default=str))


async def _reach_redis(url, wait_s: float) -> None:
    """One PING within ``wait_s``: the queue's own client retries an outage for ever (right for the
    worker, whose jobs wait in Redis), which a person at a terminal must not sit through."""
    import redis.asyncio as aioredis

    raw = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url)
    client = aioredis.from_url(raw, socket_connect_timeout=wait_s, socket_timeout=wait_s)
    try:
        await _bounded(client.ping(), wait_s, url)
    except (OSError, aioredis.RedisError) as exc:
        console.print(f"[red]Redis at {_where(url)} cannot be reached ({type(exc).__name__}); "
                      f"is `python -m bridge serve` running, and is REDIS_URL right?[/red]")
        raise typer.Exit(1) from None
    finally:
        await client.aclose()


async def _bounded(awaitable, wait_s: float, url):
    import asyncio

    try:
        return await asyncio.wait_for(awaitable, wait_s)
    except asyncio.TimeoutError:
        console.print(f"[red]Redis at {_where(url)} did not answer within {wait_s:g} s; "
                      f"is `python -m bridge serve` running, and is REDIS_URL right?[/red]")
        raise typer.Exit(1) from None


def _where(url) -> str:
    """host:port of a Redis URL, never its password."""
    from urllib.parse import urlsplit

    raw = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url)
    parts = urlsplit(raw)
    return f"{parts.hostname}:{parts.port or 6379}"


def _embedded_redis_url(settings) -> str:
    """The URL of the redis-server a local ``serve`` started (its port is kept in OUTPUT_DIR)."""
    marker = settings.output_dir / ".redis" / "url"
    if not marker.exists():
        console.print("REDIS_URL is not set and no local bridge is running (start `python -m bridge serve`).")
        raise typer.Exit(1)
    return marker.read_text().strip()


# ---------------------------------------------------------------------------- submit / demo
def _copy_outputs(settings, state: dict, out: Path | None) -> list[Path]:
    """Local mode: the job's files under OUTPUT_DIR (copied to ``out`` when given)."""
    import shutil

    paths = []
    for asset in state.get("assets") or []:
        source = settings.output_dir / asset["url"]
        if out is not None and source.exists():
            out.mkdir(parents=True, exist_ok=True)
            target = out / source.name
            shutil.copy2(source, target)
            source = target
        paths.append(source)
    return paths


@app.command(epilog=f"{_REDIS_ENV} Reads OUTPUT_DIR (local mode: where the outputs are).")
def submit(
    job_type: JobTypeName = typer.Option(..., "--type", help="Job type (the job table, bridge/jobs.py)."),
    prompt: str = typer.Option(..., help="The prompt."),
    num_images: Optional[int] = typer.Option(None, help="SDXL: 1, 3 or 6."),
    seed: Optional[int] = typer.Option(None, help="Seed (0 is a seed)."),
    width: Optional[int] = typer.Option(None, help="Width in pixels (default: the job type's)."),
    height: Optional[int] = typer.Option(None, help="Height in pixels (default: the job type's)."),
    steps: Optional[int] = typer.Option(None, help="num_inference_steps."),
    frames: Optional[int] = typer.Option(None, help="WAN video: frame_num (4k+1)."),
    user_id: str = typer.Option("cli-user", help="user_id of the job (storage folder)."),
    out: Optional[Path] = typer.Option(None, help="Copy the outputs here."),
    timeout: float = typer.Option(1800, help="Give up waiting after this many seconds."),
    redis_wait: float = typer.Option(REDIS_WAIT_S, help="Give up on reaching Redis after this many seconds."),
) -> None:
    """Queue a job, show its live progress, and print where its outputs are."""
    import asyncio
    import json

    from bridge.demo import job_payload, progress_bar, submit_and_follow
    from bridge.jobs import DeadLetter, InvalidJob, parse_job
    from bridge.queue import Queue

    settings = _settings()
    config = {k: v for k, v in {"num_images": num_images, "seed": seed, "width": width, "height": height,
                                 "num_inference_steps": steps, "frame_num": frames}.items() if v is not None}
    payload = job_payload(job_type.value, prompt, user_id, config)
    try:
        parse_job(json.dumps(payload))
    except (InvalidJob, DeadLetter) as exc:
        console.print(f"[red]invalid job:[/red] {exc}")
        raise typer.Exit(2) from None
    url = settings.redis_url or _embedded_redis_url(settings)

    async def _run() -> dict:
        await _reach_redis(url, redis_wait)
        async with Queue.from_settings(settings, url=url) as queue:
            with progress_bar(console) as progress:
                return await submit_and_follow(queue, payload, progress, timeout)

    state = asyncio.run(_run())
    if state.get("status") != "completed":
        console.print(f"[red]job {payload['id']} {state.get('status')}:[/red] {state.get('error')}")
        raise typer.Exit(1)
    for path in _copy_outputs(settings, state, out):
        typer.echo(str(path))


@app.command(epilog="Reads WORKER_API_KEY (the first key, sent as the bearer token).")
def chat(
    url: str = typer.Option("http://127.0.0.1:7861", help="The bridge's HTTP API."),
    model: ChatModel = typer.Option(ChatModel.qwen_instruct, help="The chat model."),
    system: Optional[str] = typer.Option(None, help="A system prompt."),
    max_tokens: int = typer.Option(512, help="Longest answer, in tokens."),
) -> None:
    """Interactive terminal chat that streams tokens (needs `python -m bridge serve`)."""
    import json

    import httpx

    settings = _settings()
    headers = {"Authorization": f"Bearer {settings.worker_api_key.get_secret_value()}"} if settings.worker_api_key else {}
    messages = [{"role": "system", "content": system}] if system else []
    console.print("Chat: empty line or Ctrl-D quits.")
    with httpx.Client(base_url=url, headers=headers, timeout=None) as client:
        while True:
            try:
                text = console.input("[bold]you>[/bold] ")
            except EOFError:
                break
            if not text.strip():
                break
            messages.append({"role": "user", "content": text})
            reply = []
            body = {"model": model.value, "messages": messages, "stream": True, "max_tokens": max_tokens}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    console.print(f"[red]{response.status_code}: {response.read().decode()}[/red]")
                    messages.pop()
                    continue
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    reply.append(delta)
                    typer.echo(delta, nl=False)
            typer.echo()
            messages.append({"role": "assistant", "content": "".join(reply)})


@app.command(epilog="Reads nothing that changes where it runs: embedded Triton and Redis, local mode "
                     "(TRITON_*_PORT pick the ports).")
def demo(
    models_dir: Optional[Path] = typer.Option(None, help="Weights (default: tiny models in .cache/tiny-models)."),
    out: Path = typer.Option(Path("outputs"), help="Where the outputs go."),
    stay: bool = typer.Option(False, "--stay", help="Keep the system (and its operator's page) running "
                              "after the jobs, on API_PORT, until Ctrl-C."),
) -> None:
    """Run the whole system locally (embedded Triton + Redis, local mode) on one job of each kind.
    Prints the operator's page's address (``/ui``) as it starts."""
    import asyncio

    from bridge.demo import run_demo
    from bridge.logs import setup_logging

    setup_logging("ERROR")
    if models_dir is None:
        from model_kit.tiny import build_all

        models_dir = Path(".cache/tiny-models")
        console.print(f"building tiny models in {models_dir} (if missing)…")
        build_all(models_dir)
    settings = _settings(models_dir=models_dir, output_dir=out, redis_url=None, triton_url=None,
                         supabase_url=None, model_threads=1)
    out_console = Console() if Console().is_terminal else Console(width=140)  # whole table in a log file
    ok = asyncio.run(run_demo(settings, out_console, stay=stay))
    raise typer.Exit(0 if ok else 1)


# ---------------------------------------------------------------------------- weights
weights_app = typer.Typer(help="The weights on the volume: what is there, convert the original WAN release, download.")
app.add_typer(weights_app, name="weights")


@weights_app.callback(invoke_without_command=True)
def weights(
    ctx: typer.Context,
    any_present: bool = typer.Option(False, "--any", help="Exit 0 when at least one model's weights are there "
                                     "(what `serve` can start with; run.sh runs the demo otherwise)."),
) -> None:
    """Per model: the layout found, its size, and exactly what is missing (exit 1 if anything is)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from bridge.weights import inspect_weights

    found = inspect_weights(_settings())
    table = Table(title="weights")
    for column in ("model", "layout", "path", "size", "missing / what to do"):
        table.add_column(column, overflow="fold")
    for item in found.values():
        todo = "ok" if item.present else "; ".join(item.missing) + f". {item.fix}"
        table.add_row(item.model, item.layout, str(item.path), f"{item.size_bytes / (1 << 30):.2f} GiB", todo)
    Console(width=200 if not Console().is_terminal else None).print(table)
    present = [item.present for item in found.values()]
    raise typer.Exit(0 if (any(present) if any_present else all(present)) else 1)


@weights_app.command("convert")
def weights_convert(
    model: str = typer.Argument(..., help="Only 'wan': the original Wan 2.1 release layout → diffusers."),
    text_encoder: Optional[Path] = typer.Option(
        None, help="An HF-layout UMT5 encoder folder to use (else text_encoder/ of the diffusers release is downloaded)."),
    config_dir: Optional[Path] = typer.Option(
        None, help="A diffusers WAN folder whose transformer/vae/scheduler configs to use (default: Wan 2.1 1.3B's)."),
) -> None:
    """Write the diffusers layout next to the original Wan release (the original is only read)."""
    from bridge.weights import WeightsError, convert_wan

    if model != "wan":
        console.print(f"[red]only 'wan' can be converted (got {model!r}); use `weights download {model}`[/red]")
        raise typer.Exit(2)
    try:
        target = convert_wan(_settings(), text_encoder=text_encoder, config_dir=config_dir, say=console.print)
    except WeightsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    typer.echo(str(target))


@weights_app.command("download")
def weights_download(model: str = typer.Argument(..., help="sdxl (its base config), wan, qwen_instruct or qwen_base.")) -> None:
    """Fetch a model's diffusers/HF layout from the Hugging Face hub (HF_HUB_OFFLINE is lifted for it)."""
    from bridge.weights import WeightsError, download

    try:
        target = download(_settings(), model, say=console.print)
    except WeightsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    typer.echo(str(target))
