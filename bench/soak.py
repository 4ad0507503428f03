"""Soak: N jobs through two bridge processes while faults are injected at random.

    python bench/soak.py [--jobs 500] [--seed 1] [--fault-every 6] [--faults kill,term,supabase,redis]

Everything is real and local: a tritonserver on the tiny models (CPU), a redis-server with an
append-only file, two ``python -m bridge serve`` processes sharing them, and the Supabase
stand-in (``harness/supabase_stub.py``, which checks every upload and callback against the
contract). Jobs are pushed as a stream (mostly SDXL 64x64 and WAN 32x32 images, some WAN videos,
~5% invalid ones that must fail); meanwhile, every ``--fault-every`` seconds on average, one fault:

- ``kill``: SIGKILL a bridge, start it again (every other time under a new WORKER_ID);
- ``term``: SIGTERM a bridge (graceful: running jobs requeued), start it again;
- ``supabase``: Storage and/or job-callback answer 500, drop the connection or hang, for a while;
- ``redis``: redis-server stopped for 2-6 s, restarted on the same data;
- ``stub`` (opt-in): SIGKILL one model's Triton stub process mid-job.

Prints completed, failed (by reason), lost (no terminal callback: must be 0), duplicated
terminals (a job whose state the app saw change to a terminal twice: must be 0), terminal re-sends
the app ignored (the same result sent again after a crash between the callback and its
acknowledgement), and throughput. Exits 1 when anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bridge.launcher import TritonServer, free_port  # noqa: E402
from bridge.redis_server import RedisServer  # noqa: E402
from bridge.settings import Settings  # noqa: E402
from harness.processes import BridgeProcess, Outcomes, bridge_env, children_of, queue_of  # noqa: E402
from harness.supabase_stub import SupabaseStub  # noqa: E402

FAULTS = ("kill", "term", "supabase", "redis", "stub")
console = Console()


def make_jobs(count: int, rng: random.Random) -> list[dict]:
    jobs = []
    for i in range(count):
        roll = rng.random()
        job_id = str(uuid.uuid4())
        if roll < 0.55:
            job = {"type": "sdxl_image_fast", "config": {"width": 64, "height": 64, "num_inference_steps": 2,
                                                         "num_images": rng.choice([1, 1, 3]), "seed": i}}
        elif roll < 0.80:
            job = {"type": "image_fast", "config": {"width": 32, "height": 32, "num_inference_steps": 2, "seed": i}}
        elif roll < 0.95:
            job = {"type": "video_fast", "config": {"width": 32, "height": 32, "num_inference_steps": 2,
                                                    "frame_num": 5, "fps": 8, "seed": i}}
        else:  # must fail, naming the field
            job = {"type": "sdxl_image_fast", "config": {"width": 65, "height": 64, "num_inference_steps": 2}}
        job.update(id=job_id, prompt="a lighthouse in a storm", user_id="soak", metadata={})
        jobs.append(job)
    return jobs


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = root
        self.models = Path(args.models_dir)
        self.faults: Counter = Counter()
        self.triton = TritonServer(Settings(
            models_dir=self.models, triton_http_port=free_port(), triton_grpc_port=free_port(),
            triton_metrics_port=free_port(), triton_exit_timeout_s=3, model_threads=1, device="cpu",
        ), log_path=root / "tritonserver.log")
        self.redis = RedisServer(data_dir=root / "redis")
        self.stub = SupabaseStub()
        self.bridges: list[BridgeProcess] = []
        self.ids = 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        console.print(f"[dim]workspace {self.root}[/dim]")
        from model_kit.tiny import build_all

        build_all(self.models)
        self.triton.start()
        self.redis.start()
        self.stub.start()
        for name in ("a", "b"):
            env = bridge_env(models_dir=self.models, output_dir=self.root / f"out-{name}", redis_url=self.redis.url,
                             triton_url=self.triton.grpc_url, supabase=self.stub, worker_id=self._worker_id(name),
                             report_deadline_s=5)
            self.bridges.append(BridgeProcess(name, env, self.root / "logs"))
        for bridge in self.bridges:
            bridge.start()
        for bridge in self.bridges:
            bridge.wait_ready()
        # Warm-up (not counted): load both models, so the figures are about the steady state.
        warm = [job for job in make_jobs(40, random.Random(0)) if job["config"].get("width") != 65]
        warm = [next(j for j in warm if j["type"] == t) for t in ("sdxl_image_fast", "image_fast")]
        client = redis.Redis.from_url(self.redis.url)
        for job in warm:
            client.rpush(queue_of(job), json.dumps(job))
        outcomes = Outcomes(self.stub)
        deadline = time.monotonic() + 600
        while not all(outcomes.terminals().get(j["id"]) for j in warm) and time.monotonic() < deadline:
            time.sleep(0.3)
        self.stub.reset()

    def stop(self) -> None:
        for bridge in self.bridges:
            bridge.close()
        self.stub.stop()
        self.redis.stop()
        self.triton.stop()

    def restart(self, bridge: BridgeProcess) -> None:
        """Start ``bridge`` again like a supervisor would: a start that fails its checks (e.g.
        Supabase unreachable during a fault) is counted and retried."""
        for attempt in range(10):
            try:
                bridge.start().wait_ready()
                return
            except AssertionError:
                self.faults["failed start (retried)"] += 1
                last = [line for line in bridge.lines if "FAIL" in line or "rror" in line][-1:]
                console.print(f"[red]bridge {bridge.name} failed to start[/red] {last}; retrying")
                bridge.kill()
                time.sleep(1.0 + attempt)
        raise RuntimeError(f"bridge {bridge.name} would not start")

    def _worker_id(self, name: str) -> str:
        self.ids += 1
        return f"soak-{name}-{self.ids}"

    # ------------------------------------------------------------------ faults
    def inject(self) -> str:
        kind = self.rng.choice(self.args.faults)
        bridge = self.rng.choice(self.bridges)
        if kind == "kill":
            bridge.kill()
            if self.faults["kill"] % 2:
                bridge.env["WORKER_ID"] = self._worker_id(bridge.name)
            self.restart(bridge)
            what = f"SIGKILL bridge {bridge.name}, restarted as {bridge.env['WORKER_ID']}"
        elif kind == "term":
            code = bridge.terminate()
            self.restart(bridge)
            what = f"SIGTERM bridge {bridge.name} (exit {code}), restarted"
        elif kind == "supabase":
            mode = self.rng.choice(["status", "close", "hang"])
            routes = self.rng.choice([["storage"], ["job-callback"], ["storage", "job-callback"]])
            count = self.rng.randint(3, 15)
            for route in routes:
                self.stub.fail_next(route, count, mode=mode, status=self.rng.choice([500, 502, 503, 429]), hang_s=2.0)
            what = f"Supabase {'+'.join(routes)}: next {count} requests {mode}"
        elif kind == "redis":
            down = self.rng.uniform(2.0, 6.0)
            self.redis.stop()
            time.sleep(down)
            self.redis.start()
            what = f"redis-server stopped for {down:.1f} s"
        else:
            stubs = [pid for pid in children_of(self.triton.process.pid)  # type: ignore[union-attr]
                     if "model.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
            if not stubs:
                return "no model stub running"
            pid = self.rng.choice(stubs)
            os.kill(pid, signal.SIGKILL)
            what = f"SIGKILL Triton model stub {pid}"
        self.faults[kind] += 1
        return what

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        args = self.args
        jobs = make_jobs(args.jobs, self.rng)
        ids = [job["id"] for job in jobs]
        invalid = {job["id"] for job in jobs if job["config"].get("width") == 65}
        client = redis.Redis.from_url(self.redis.url)
        outcomes = Outcomes(self.stub)
        pushed = 0
        started = time.monotonic()
        next_fault = started + self.rng.expovariate(1 / args.fault_every)
        deadline = started + args.timeout
        done = 0
        last_report = 0.0
        while time.monotonic() < deadline:
            if pushed < len(jobs):
                chunk = jobs[pushed:pushed + self.rng.randint(1, max(1, args.jobs // 20))]
                try:
                    pipe = client.pipeline(transaction=False)
                    for job in chunk:
                        pipe.rpush(queue_of(job), json.dumps(job))
                    pipe.execute()
                    pushed += len(chunk)
                except redis.ConnectionError:
                    pass  # Redis is being restarted by a fault; push again next tick
            terminals = outcomes.terminals()
            done = sum(1 for job_id in ids if terminals.get(job_id))
            if done >= len(jobs):
                break
            now = time.monotonic()
            if args.faults and now >= next_fault and done < len(jobs) * 0.95:
                what = self.inject()
                console.print(f"[yellow]{now - started:6.1f}s fault:[/yellow] {what}")
                next_fault = time.monotonic() + self.rng.expovariate(1 / args.fault_every)
            for bridge in self.bridges:
                if not bridge.alive:
                    console.print(f"[red]bridge {bridge.name} exited by itself[/red]; restarting")
                    self.faults["unexpected exit"] += 1
                    self.restart(bridge)
            if now - last_report > 10:
                console.print(f"[dim]{now - started:6.1f}s pushed {pushed}, finished {done}[/dim]")
                last_report = now
            time.sleep(0.3)
        elapsed = time.monotonic() - started
        return self.report(jobs, ids, invalid, elapsed, client)

    def report(self, jobs: list[dict], ids: list[str], invalid: set[str], elapsed: float, client: redis.Redis) -> int:
        outcomes = Outcomes(self.stub)
        delivered, applied = outcomes.terminals(), outcomes.applied_terminals()
        completed = [j for j in ids if delivered.get(j) and delivered[j][0]["status"] == "completed"]
        failed = [j for j in ids if delivered.get(j) and delivered[j][0]["status"] == "failed"]
        lost = [j for j in ids if not delivered.get(j)]
        duplicated = [j for j in ids if len(applied.get(j, [])) > 1 or len({b["status"] for b in delivered.get(j, [])}) > 1]
        resent = sum(len(delivered[j]) - 1 for j in ids if len(delivered.get(j, [])) > 1 and j not in duplicated)
        reasons = Counter()
        for job_id in failed:
            body = delivered[job_id][0]
            expected = "expected: invalid payload" if job_id in invalid else "unexpected"
            reasons[f"{body['metadata'].get('error_type')}: {(body.get('error_message') or '')[:90]} ({expected})"] += 1
        in_redis = {name: client.llen(name) for name in ("sdxl_queue", "wan_queue", "dead_letter")}
        table = Table(title=f"soak: {len(jobs)} jobs, 2 bridges, seed {self.args.seed}")
        table.add_column("figure")
        table.add_column("value", justify="right")
        table.add_row("jobs completed", str(len(completed)))
        table.add_row("jobs failed", f"{len(failed)} ({len(invalid)} invalid on purpose)")
        table.add_row("jobs lost (must be 0)", str(len(lost)))
        table.add_row("duplicated terminals (must be 0)", str(len(duplicated)))
        table.add_row("terminal re-sends ignored by the app", str(resent))
        table.add_row("contract violations seen by the stand-in", str(len(self.stub.violations)))
        table.add_row("faults injected", ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none")
        table.add_row("wall time", f"{elapsed:.1f} s")
        table.add_row("throughput", f"{len(completed) / elapsed:.2f} jobs/s completed")
        table.add_row("left in Redis", json.dumps(in_redis))
        console.print(table)
        for reason, count in reasons.most_common():
            console.print(f"  failed x{count}: {reason}")
        for job_id in lost[:10]:
            console.print(f"  [red]lost[/red] {job_id}")
        for violation in self.stub.violations[:10]:
            console.print(f"  [red]violation[/red] {violation}")
        return 1 if lost or duplicated else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500, help="jobs to push (default 500)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault-every", type=float, default=6.0, help="mean seconds between faults")
    parser.add_argument("--faults", default="kill,term,supabase,redis",
                        help=f"comma list of {', '.join(FAULTS)} (empty: no faults)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--models-dir", default=str(Path(__file__).resolve().parent.parent / ".cache" / "tiny-models"))
    parser.add_argument("--keep", action="store_true", help="keep the workspace (logs) after the run")
    args = parser.parse_args()
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}")
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(args, root)
    code = 1
    try:
        soak.start()
        code = soak.run()
    finally:
        soak.stop()
        if not args.keep and code == 0:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            console.print(f"logs kept in {root}")
    sys.exit(code)


if __name__ == "__main__":
    main()
