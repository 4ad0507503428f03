"""Fault injection against real processes: ``python -m bridge serve`` subprocesses, real
redis-server and tritonserver processes, and the Supabase stand-in (which checks every request
against the contract). Each test breaks one thing for real and then checks that every job ends
with exactly one terminal state in the app, none is lost and the bridge stays up.

Sizes are tiny (SDXL 64x64 2 steps, WAN 32x32) so the suite fits a 2-core CI box.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.bridge_stack import sdxl_job, wan_job
from harness.processes import (
    BridgeProcess,
    Outcomes,
    bridge_env,
    children_of,
    inference_counts,
    processes_with,
    push,
    wait_terminals,
    wait_until,
)
from harness.supabase_stub import SupabaseStub

pytestmark = pytest.mark.timeout(420)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture()
def stub():
    with SupabaseStub() as s:
        yield s
        assert s.violations == [], s.violations[:10]


@pytest.fixture()
def spawn(tmp_path: Path):
    """``spawn(name, env)`` -> a BridgeProcess that is stopped (and its tritonserver killed) at the end."""
    made: list[BridgeProcess] = []

    def make(name: str, env: dict[str, str]) -> BridgeProcess:
        bridge = BridgeProcess(name, env, tmp_path / "logs")
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        bridge.close()


def small_wan(job_type: str = "image_fast", **config) -> dict:
    return wan_job(job_type, width=32, height=32, **config)


def assert_no_unexpected_errors(bridge: BridgeProcess) -> None:
    """No job hit the worker's catch-all ("unexpected error") and Python printed no traceback."""
    assert bridge.messages("unexpected error") == [], bridge.messages("unexpected error")[:3]
    raw = [line for line in bridge.lines if line.startswith("Traceback")]
    assert raw == [], bridge.tail()


def assert_exactly_once(stub: SupabaseStub, job_ids: list[str], status: str | dict[str, str] = "completed") -> dict:
    """Every job has exactly one terminal callback that the app applied, with the expected status;
    any further terminal callback it received is an identical re-send of the same spooled result
    (same assets, same metadata, incl. generation_time), i.e. nothing ran to completion twice.
    Returns the number of re-sends per job."""
    outcomes = Outcomes(stub)
    applied, delivered = outcomes.applied_terminals(), outcomes.terminals()
    resent = {}
    for job_id in job_ids:
        want = status if isinstance(status, str) else status[job_id]
        got = applied.get(job_id, [])
        assert len(got) == 1, f"job {job_id}: {len(got)} applied terminal callbacks: {got}"
        assert got[0]["status"] == want, f"job {job_id}: {got[0]['status']} ({got[0].get('error_message')})"
        first, *others = delivered[job_id]
        for other in others:
            assert (other["status"], other["assets"], other["metadata"]) == \
                   (first["status"], first["assets"], first["metadata"]), f"job {job_id} reported two results"
        if others:
            resent[job_id] = len(others)
    return resent


def redis_leftovers(client: redis.Redis) -> dict[str, int]:
    """Jobs still queued or held anywhere (must be empty once everything finished)."""
    left = {name: client.llen(name) for name in ("sdxl_queue", "wan_queue")}
    for key in client.scan_iter("processing:*"):
        left[key.decode()] = client.llen(key)
    left["dead_letter"] = client.llen("dead_letter")
    return {k: v for k, v in left.items() if v}


# --------------------------------------------------------------------------- SIGKILL the bridge
def test_sigkill_bridge_at_random_moments_during_50_jobs(tiny_models_dir, triton, redis_server, stub, spawn, tmp_path):
    seed = int(os.environ.get("FAULT_SEED") or random.randrange(2**31))
    rng = random.Random(seed)
    client = redis.Redis.from_url(redis_server.url)
    env = bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / "out", redis_url=redis_server.url,
                     triton_url=triton.grpc_url, supabase=stub, worker_id="killed-0")
    bridge = spawn("killed", env).start().wait_ready()

    jobs = []
    for i in range(50):
        roll = rng.random()
        if roll < 0.6:
            jobs.append(sdxl_job(seed=i, num_images=rng.choice([1, 1, 3])))
        elif roll < 0.85:
            jobs.append(small_wan("image_fast", seed=i))
        else:
            jobs.append(small_wan("video_fast", seed=i, frame_num=5))
    ids = [job["id"] for job in jobs]
    outcomes = Outcomes(stub)
    pushed = kills = new_ids = 0
    while pushed < len(jobs) or kills < 7:
        chunk = rng.randint(4, 10)
        for job in jobs[pushed:pushed + chunk]:
            push(client, job)
        pushed = min(len(jobs), pushed + chunk)
        time.sleep(rng.uniform(0.2, 2.5))  # a random moment: taking, generating, spooling, uploading, ...
        if len(outcomes.terminals()) >= len(jobs):
            break
        bridge.kill()
        kills += 1
        if kills % 3 == 0:  # production restarts get a new WORKER_ID (host + pid): reaped, not recovered
            new_ids += 1
            bridge.env["WORKER_ID"] = f"killed-{new_ids}"
        bridge.start().wait_ready()

    terminals = wait_terminals(stub, ids, timeout=240)
    # A job a killed worker had reported but not yet acknowledged stays in that worker's processing
    # list until the live bridge reaps it (heartbeat TTL 2 s) and acknowledges it as finished.
    try:
        wait_until(lambda: not {k: v for k, v in redis_leftovers(client).items() if k != "dead_letter"}, 15)
    except AssertionError:
        held = {key.decode(): [json.loads(raw).get("id") for raw in client.lrange(key, 0, -1)]
                for key in client.scan_iter("processing:*")}
        pytest.fail(f"seed {seed}: jobs never reaped: {held}; workers {client.smembers('workers')}; "
                    f"their queues { {w: client.smembers(f'worker_queues:{w.decode()}') for w in client.smembers('workers')} }")
    assert bridge.terminate() == 0, bridge.tail()
    # A SIGKILL during a run counts as an attempt (a job that crashes its worker must not loop
    # forever), so a job caught running by MAX_ATTEMPTS (3) kills fails, dead-lettered, saying so.
    # Only runs count: a job that was merely taken (prefetched, waiting for the GPU) when its
    # worker was killed costs nothing, so every failed job really started three times.
    exhausted = {j for j, bodies in terminals.items() if bodies[0]["status"] == "failed"}
    for job_id in exhausted:
        body = terminals[job_id][0]
        assert body["metadata"]["error_type"] == "attempts_exhausted", body
        assert body["error_message"].startswith("gave up after 3 attempts"), body
        assert len(bridge.messages(f"job {job_id} started")) >= 3, f"seed {seed}: {job_id} failed for attempts " \
                                                                    f"it did not use: {bridge.messages(job_id)}"
    resent = assert_exactly_once(stub, ids, {j: "failed" if j in exhausted else "completed" for j in ids})
    assert sum(resent.values()) <= kills, f"seed {seed}: {resent}"
    letters = [json.loads(entry) for entry in client.lrange("dead_letter", 0, -1)]
    assert sorted(entry["job_id"] for entry in letters) == sorted(exhausted), f"seed {seed}"
    client.delete("dead_letter")
    assert redis_leftovers(client) == {}, f"seed {seed}"
    # Attempts are counted when a job starts on the GPU: a kill costs only the jobs then running
    # one attempt each (taken but waiting ones cost nothing).
    assert len(exhausted) <= 4 * kills // 3, f"seed {seed}: {len(exhausted)} jobs exhausted by {kills} kills"
    assert kills >= 3, f"seed {seed}: only {kills} kills happened"
    assert_no_unexpected_errors(bridge)
    print(f"seed {seed}: {kills} SIGKILLs ({new_ids} restarts under a new id); {len(exhausted)} job(s) "
          f"failed after 3 killed runs; {len(resent)} terminal re-sends of spooled results (ignored by the app)")


def test_a_job_that_kills_its_worker_at_every_start_fails_after_max_attempts(tiny_models_dir, triton, redis_server,
                                                                             stub, spawn, tmp_path):
    """A poison job: its worker dies (SIGKILL) each time it starts on the GPU. Its third start is
    its last; the next delivery fails it, dead-lettered, without a fourth run."""
    client = redis.Redis.from_url(redis_server.url)
    env = bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / "out", redis_url=redis_server.url,
                     triton_url=triton.grpc_url, supabase=stub, worker_id="poisoned", max_attempts=3)
    bridge = spawn("poisoned", env).start().wait_ready()
    job = sdxl_job(num_inference_steps=150)
    push(client, job)
    for run in range(1, 4):
        wait_until(lambda: len(bridge.messages(f"job {job['id']} started")) >= run, 120, message=bridge.tail)
        bridge.kill()
        bridge.start().wait_ready()
    body = wait_terminals(stub, [job["id"]], timeout=120)[job["id"]][0]
    assert body["status"] == "failed" and body["metadata"]["error_type"] == "attempts_exhausted", body
    assert body["error_message"].startswith("gave up after 3 attempts"), body
    assert bridge.messages(f"job {job['id']} started") == [f"job {job['id']} started (attempt {n})" for n in (1, 2, 3)]
    assert bridge.terminate() == 0, bridge.tail()  # (the dead-letter entry follows the callback: read it after the stop)
    assert [json.loads(e)["job_id"] for e in client.lrange("dead_letter", 0, -1)] == [job["id"]]
    assert_no_unexpected_errors(bridge)


def test_sigkill_of_a_bridge_leaves_no_tritonserver_and_its_ports_are_never_shared(tiny_models_dir, redis_server,
                                                                                   stub, spawn, tmp_path):
    """A bridge with its own tritonserver: a second bridge given its ports fails at start-up naming
    the port (the first keeps working); SIGKILL of the first mid-job leaves no tritonserver or stub
    behind within 5 s; restarted, it runs exactly one server on its ports and the job completes once."""
    client = redis.Redis.from_url(redis_server.url)
    env = bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / "out", redis_url=redis_server.url,
                     triton_url=None, supabase=stub, worker_id="own-0")
    bridge = spawn("own", env).start().wait_ready()
    ports = {key: env[key] for key in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT")}
    intruder = spawn("intruder", bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / "other",
                                            redis_url=redis_server.url, triton_url=None, supabase=stub,
                                            worker_id="intruder", **ports)).start()
    wait_until(lambda: not intruder.alive, 60, message=intruder.tail)
    assert intruder.process.returncode != 0
    assert f"TRITON_HTTP_PORT={ports['TRITON_HTTP_PORT']} is already in use by pid" in intruder.text(), intruder.tail()

    job = sdxl_job(num_inference_steps=150)
    push(client, job)
    wait_until(lambda: bridge.messages(f"job {job['id']} started"), 180, message=bridge.tail)
    # "started" is logged when the job gets the GPU, beside its model's load: wait for the stub
    wait_until(lambda: bridge.tritonserver_pid() is not None
               and any("triton_python_backend_stub" in line for line in bridge.survivors()), 120, message=bridge.tail)
    server = bridge.tritonserver_pid()
    assert server is not None
    bridge.kill()
    wait_until(lambda: not bridge.survivors(), 5,
               message=lambda: f"left running 5 s after the SIGKILL: {bridge.survivors()}")
    assert processes_with("tritonserver", f"--grpc-port={ports['TRITON_GRPC_PORT']}") == []

    bridge.start().wait_ready()
    servers = processes_with("tritonserver", f"--grpc-port={ports['TRITON_GRPC_PORT']}")
    assert servers == [bridge.tritonserver_pid()], servers
    wait_terminals(stub, [job["id"]], timeout=240)
    assert_exactly_once(stub, [job["id"]])
    assert bridge.terminate() == 0
    assert processes_with("tritonserver", f"--grpc-port={ports['TRITON_GRPC_PORT']}") == []
    assert redis_leftovers(client) == {}


def test_restart_under_the_same_worker_id_while_another_pod_waits(tiny_models_dir, triton, redis_server, stub, spawn,
                                                                   tmp_path):
    """A pod killed and restarted under the same WORKER_ID (a container's host name and pid 1)
    before its heartbeat expires returns its own orphans to the queue; another pod, idle on the
    queues, takes them at once. The orphans' claims still name the (alive again) worker id: they
    must not make the other pod drop the jobs as duplicates."""
    client = redis.Redis.from_url(redis_server.url)
    common = dict(models_dir=tiny_models_dir, redis_url=redis_server.url, triton_url=triton.grpc_url, supabase=stub)
    # pod-b's heartbeat outlives its restart (15 s, the production default): nobody reaps it.
    restarted = spawn("restarted", bridge_env(output_dir=tmp_path / "b", worker_id="pod-b", heartbeat_ttl_s=15,
                                              **common)).start().wait_ready()
    jobs = [sdxl_job(seed=1, num_inference_steps=150), sdxl_job(seed=2, num_inference_steps=150)]
    for job in jobs:
        push(client, job)
    wait_until(lambda: len(client.lrange("processing:pod-b:sdxl_queue", 0, -1)) == 2, 120)
    wait_until(lambda: any((b.get("metadata") or {}).get("progress", 0) > 0
                           for b in stub.callbacks(jobs[0]["id"], outcome=None)), 180, message=restarted.tail)
    other = spawn("waiting", bridge_env(output_dir=tmp_path / "a", worker_id="pod-a", **common)).start().wait_ready()
    restarted.kill()
    restarted.start().wait_ready()  # returns its two orphans; pod-a is blocked on the queue
    ids = [job["id"] for job in jobs]
    wait_terminals(stub, ids, timeout=180)
    assert_exactly_once(stub, ids)
    dropped = [m for m in other.messages("duplicate delivery acknowledged")]
    assert not dropped, dropped
    for bridge in (other, restarted):
        assert bridge.terminate() == 0
    assert redis_leftovers(client) == {}


# --------------------------------------------------------------------------- SIGKILL tritonserver / a stub
def test_sigkill_tritonserver_while_idle_is_restarted_without_a_job_and_chat_answers(
        tiny_models_dir, redis_server, stub, spawn, tmp_path):
    """No job comes after the embedded server dies, only chat turns: the bridge restarts the
    server by itself (it watches the process) and the next turn is answered; before, every turn
    got a 503 until a job failed on the dead server."""
    env = bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / "out", redis_url=redis_server.url,
                     triton_url=None, supabase=stub)
    bridge = spawn("idle", env).start().wait_ready()
    chat = f"http://127.0.0.1:{bridge.api_port}/v1/chat/completions"
    body = {"model": "qwen_instruct", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    assert httpx.post(chat, json=body, timeout=120).status_code == 200
    old_server = bridge.tritonserver_pid()
    assert old_server is not None
    os.kill(old_server, signal.SIGKILL)
    # Nothing is sent until the new server runs: the restart is the bridge's own doing.
    new_server = wait_until(lambda: bridge.tritonserver_pid() not in (None, old_server) and bridge.tritonserver_pid(),
                            30, message=bridge.tail)
    wait_until(lambda: bridge.health().status_code == 200, 60, message=bridge.tail)
    answer = httpx.post(chat, json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    assert bridge.tritonserver_pid() == new_server
    assert len(bridge.messages("tritonserver is not live; restarting it")) == 1, bridge.tail()
    assert_no_unexpected_errors(bridge)
    assert bridge.terminate() == 0


def test_sigkill_tritonserver_and_a_model_stub_mid_job(tiny_models_dir, redis_server, stub, spawn, tmp_path):
    client = redis.Redis.from_url(redis_server.url)
    env = bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / "out", redis_url=redis_server.url,
                     triton_url=None, supabase=stub)
    bridge = spawn("own-triton", env).start().wait_ready()
    outcomes = Outcomes(stub)

    def generating(job_id: str) -> bool:
        """The model is stepping (a progress callback above 0 arrived)."""
        return any(body["job_id"] == job_id and (body.get("metadata") or {}).get("progress", 0) > 0
                   for body in stub.callbacks(job_id, outcome=None))

    # 1. tritonserver itself dies mid-job: the bridge restarts it and retries the job.
    first = sdxl_job(num_inference_steps=150)
    push(client, first)
    wait_until(lambda: generating(first["id"]), 180, message=lambda: f"never generating:\n{bridge.tail()}")
    old_server = bridge.tritonserver_pid()
    assert old_server is not None
    os.kill(old_server, signal.SIGKILL)
    wait_terminals(stub, [first["id"]], timeout=240)
    new_server = wait_until(bridge.tritonserver_pid, 30)
    assert new_server != old_server

    # 2. one model's stub process dies mid-job: that job is retried, another model keeps serving.
    warm = small_wan()
    push(client, warm)
    wait_terminals(stub, [warm["id"]], timeout=240)  # wan resident before the sdxl stub dies
    # Long enough to be killed mid-run (60 steps ended within a second with SDXL resident, before
    # the kill landed), short enough to rerun after the reload within the bound below.
    second = sdxl_job(num_inference_steps=100)
    push(client, second)
    wait_until(lambda: generating(second["id"]), 180, message=lambda: f"never generating:\n{bridge.tail()}")
    stubs = [pid for pid in children_of(new_server)
             if "/sdxl/1/model.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert len(stubs) == 1, stubs
    os.kill(stubs[0], signal.SIGKILL)
    # Noticed within a second or two, by the bridge's watch ("exited mid-request") or by Triton's own
    # health check ("Stub process ... is not healthy"), whichever answers first, and the model is
    # reloaded (an unload alone waits out the dead stub's timeout): reload and rerun take 5-20 s
    # here; 45 s leaves room for a busy 2-core CI machine.
    wait_terminals(stub, [second["id"]], timeout=45, explain=bridge.tail)
    noticed = bridge.messages("exited mid-request") + bridge.messages("is not healthy")
    assert noticed and len(bridge.messages("reloaded sdxl")) == 1, bridge.tail()  # once: a second would kill the new stub
    other = small_wan(seed=9)
    push(client, other)
    wait_terminals(stub, [second["id"], other["id"]], timeout=240)
    assert_exactly_once(stub, [first["id"], warm["id"], other["id"]])  # other models kept serving
    assert bridge.tritonserver_pid() == new_server  # a dead stub does not cost the whole server
    result = Outcomes(stub).applied_terminals()[second["id"]][0]
    assert result["status"] == "completed", result  # the dead stub was reloaded and the job retried

    ids = [first["id"], warm["id"], second["id"], other["id"]]
    assert_exactly_once(stub, ids)
    starts = outcomes.generation_starts()
    assert starts[first["id"]] >= 2 and starts[second["id"]] >= 2, dict(starts)  # each was retried
    assert starts[other["id"]] == 1
    assert bridge.alive and bridge.health().status_code == 200
    assert len(bridge.messages("tritonserver is not live; restarting it")) == 1, bridge.tail()
    assert_no_unexpected_errors(bridge)
    assert bridge.terminate() == 0
    assert redis_leftovers(client) == {}


# --------------------------------------------------------------------------- Redis away for 10 s
def test_redis_stopped_for_10_seconds_and_restarted(tiny_models_dir, triton, redis_server, stub, spawn, tmp_path):
    client = redis.Redis.from_url(redis_server.url)
    env = bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / "out", redis_url=redis_server.url,
                     triton_url=triton.grpc_url, supabase=stub)
    bridge = spawn("redis-outage", env).start().wait_ready()
    before = [sdxl_job(seed=i) for i in range(6)] + [small_wan(seed=i) for i in range(3)]
    for job in before:
        push(client, job)
    wait_until(lambda: len(Outcomes(stub).terminals()) >= 2, 180)  # some done, some still queued

    redis_server.stop()  # SIGTERM; the append-only file keeps every key
    # While it is away, something else answers on its port and drops every connection at once:
    # counting the attempts shows the bridge backs off instead of hammering.
    health: list = []
    attempts = _count_connections(redis_server.port, seconds=10.0, during=lambda: health.append(bridge.health()))
    redis_server.start()
    # Still able to work (chat): 200, degraded (docs/API.md); readiness is what a balancer reads.
    assert health and health[0].status_code == 200 and health[0].json()["redis"] == "unreachable", health
    assert health[0].json()["status"] == "degraded"

    after = [sdxl_job(seed=10 + i) for i in range(3)] + [small_wan(seed=10)]
    for job in after:
        push(client, job)
    ids = [job["id"] for job in before + after]
    wait_terminals(stub, ids, timeout=240)
    assert_exactly_once(stub, ids)
    assert bridge.alive and bridge.health().status_code == 200
    assert len(bridge.messages("is unreachable")) == 1, bridge.messages("Redis")
    assert len(bridge.messages("is reachable again")) == 1, bridge.messages("Redis")
    early, late = sum(1 for t in attempts if t < 5.0), sum(1 for t in attempts if t >= 5.0)
    print(f"connection attempts during the outage: {early} in the first 5 s, {late} in the last 5 s")
    # Every retry loop backs off (exponentially, to 5 s): some hundreds in 10 s; a loop without
    # backoff makes thousands per second.
    assert 3 <= len(attempts) < 1500, (early, late)
    assert_no_unexpected_errors(bridge)
    assert bridge.terminate() == 0
    assert redis_leftovers(client) == {}


def _count_connections(port: int, seconds: float, during) -> list[float]:
    """Accept-and-close every connection to ``port`` for ``seconds``; when each came (s from start)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    server.settimeout(0.1)
    times: list[float] = []
    checker = threading.Thread(target=during, daemon=True)  # the API keeps answering meanwhile
    begin = time.monotonic()
    deadline = begin + seconds
    try:
        while time.monotonic() < deadline:
            if not checker.is_alive() and checker.ident is None and time.monotonic() > deadline - seconds / 2:
                checker.start()
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            times.append(time.monotonic() - begin)
            conn.close()
    finally:
        server.close()
    checker.join(timeout=15)
    return times


# --------------------------------------------------------------------------- Supabase failing
def test_supabase_500s_timeouts_and_dropped_connections(tiny_models_dir, triton, redis_server, stub, spawn, tmp_path):
    client = redis.Redis.from_url(redis_server.url)
    env = bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / "out", redis_url=redis_server.url,
                     triton_url=triton.grpc_url, supabase=stub, report_deadline_s=3)
    bridge = spawn("supabase-faults", env).start().wait_ready()
    runs_before = inference_counts(triton.grpc_url)
    bad = sdxl_job(num_inference_steps=0)  # refused: its failed callback has to get through too
    jobs = [sdxl_job(seed=1), sdxl_job(seed=2, num_images=3), small_wan(seed=3),
            small_wan("video_fast", seed=4, frame_num=5)]
    # Each phase lasts longer than REPORT_DEADLINE_S (3 s), so reporting rounds give up; the jobs stay
    # in the worker's processing list and are reported again from the spool (no new generation)
    # while their queues move on.
    phases = [
        ("storage 500", {"storage": dict(mode="status", status=500)}),
        ("storage drops connections, callback 503", {"storage": dict(mode="close"),
                                                     "job-callback": dict(mode="status", status=503)}),
        ("no answer at all", {"storage": dict(mode="hang", hang_s=2.0), "job-callback": dict(mode="hang", hang_s=2.0)}),
    ]
    counted = {}
    for index, (name, failures) in enumerate(phases):
        started = len(stub.requests)
        for route, options in failures.items():
            stub.fail_next(route, 10**6, **options)
        if index == 0:
            for job in jobs:
                push(client, job)
        if index == 1:
            push(client, bad)
        time.sleep(7.0)
        stub.clear_failures()
        counted[name] = len(stub.requests) - started
    jobs.append(bad)
    ids = [job["id"] for job in jobs]
    wait_terminals(stub, ids, timeout=180)
    assert_exactly_once(stub, ids, {job["id"]: "failed" if job is bad else "completed" for job in jobs})
    failed = Outcomes(stub).applied_terminals()[bad["id"]][0]
    assert "config.num_inference_steps" in failed["error_message"]
    runs = inference_counts(triton.grpc_url)
    assert (runs["sdxl"] - runs_before["sdxl"], runs["wan"] - runs_before["wan"]) == (2, 2), \
        "a job was generated again although its outputs were in the spool"
    assert bridge.messages("reporting deadline passed"), "no reporting round ran past its deadline"
    # Backoff: with jobs retrying for 7 s per phase, a client without backoff would send thousands.
    assert all(count < 150 for count in counted.values()), counted
    print(f"requests to the failing stand-in per 7 s phase: {counted}")
    assert bridge.alive and bridge.health().status_code == 200
    assert_no_unexpected_errors(bridge)
    assert bridge.terminate() == 0
    assert redis_leftovers(client) == {}


# --------------------------------------------------------------------------- spool full / unwritable
def test_spool_full_then_unwritable(tiny_models_dir, triton, redis_server, stub, spawn, tmp_path):
    client = redis.Redis.from_url(redis_server.url)
    out = tmp_path / "out"
    env = bridge_env(models_dir=tiny_models_dir, output_dir=out, redis_url=redis_server.url,
                     triton_url=triton.grpc_url, supabase=stub)
    bridge = spawn("spool", env).start().wait_ready()
    outcomes = Outcomes(stub)

    # Full: no file the bridge writes may grow past 1 KiB (writes fail with EFBIG; its log is a pipe).
    resource.prlimit(bridge.pid, resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))  # soft limit
    full = sdxl_job(seed=1)
    push(client, full)
    wait_until(lambda: bridge.messages(f"cannot save job {full['id']}"), 120, message=bridge.tail)
    time.sleep(2.0)
    assert not outcomes.terminals().get(full["id"]), "a job whose outputs cannot be spooled must not end"
    assert bridge.alive and bridge.health().status_code == 200
    resource.prlimit(bridge.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    wait_terminals(stub, [full["id"]], timeout=120)
    wait_until(lambda: bridge.messages(f"job {full['id']} completed"), 30)  # its spool entry is gone

    # Unwritable: the spool path is taken by a plain file (root ignores permission bits, so chmod
    # would prove nothing here); neither saving nor reading an entry can work.
    shutil.rmtree(out / ".spool", ignore_errors=True)
    (out / ".spool").write_text("not a directory")
    blocked = small_wan(seed=2)
    push(client, blocked)
    wait_until(lambda: [m for m in bridge.messages(blocked["id"]) if "spool" in m], 120, message=bridge.tail)
    time.sleep(3.0)
    assert not outcomes.terminals().get(blocked["id"]), "the job must wait for the spool, not fail"
    assert bridge.alive and bridge.health().status_code == 200
    (out / ".spool").unlink()
    wait_terminals(stub, [blocked["id"]], timeout=120)

    assert_exactly_once(stub, [full["id"], blocked["id"]])
    errors = [m for m in bridge.messages("spool directory") if "requeued" in m]
    assert errors, "the spool error must be logged, naming the spool and saying the job was requeued"
    assert_no_unexpected_errors(bridge)
    assert bridge.terminate() == 0
    assert redis_leftovers(client) == {}
