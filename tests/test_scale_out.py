"""Scale-out (docs/DEPLOY.md): several pods consume the same queues. Two ``python -m bridge serve``
processes share one Redis and one tritonserver; 200 jobs pushed at once each run exactly once
(Triton's own request statistics agree) and end with exactly one terminal callback."""

from __future__ import annotations

import json
import random

import pytest
import redis

from tests.bridge_stack import sdxl_job, wan_job
from harness.processes import BridgeProcess, Outcomes, bridge_env, inference_counts, queue_of, wait_terminals
from harness.supabase_stub import SupabaseStub

pytestmark = pytest.mark.timeout(600)

JOBS = 200


def test_two_bridges_share_the_queues_and_run_each_job_once(tiny_models_dir, triton, redis_server, tmp_path):
    rng = random.Random(1)
    jobs = []
    for i in range(JOBS):
        if rng.random() < 0.6:
            jobs.append(sdxl_job(seed=i))
        else:
            jobs.append(wan_job("image_fast", width=32, height=32, seed=i))
    expected_runs = {"sdxl": sum(1 for j in jobs if queue_of(j) == "sdxl_queue")}
    expected_runs["wan"] = JOBS - expected_runs["sdxl"]

    with SupabaseStub() as stub:
        bridges = [
            BridgeProcess(name, bridge_env(models_dir=tiny_models_dir, output_dir=tmp_path / name,
                                           redis_url=redis_server.url, triton_url=triton.grpc_url,
                                           supabase=stub, worker_id=f"pod-{name}"), tmp_path / "logs")
            for name in ("a", "b")
        ]
        try:
            for bridge in bridges:
                bridge.start()
            for bridge in bridges:
                bridge.wait_ready()
            before = inference_counts(triton.grpc_url)
            client = redis.Redis.from_url(redis_server.url)
            pipe = client.pipeline(transaction=False)
            for job in jobs:
                pipe.rpush(queue_of(job), json.dumps(job))
            pipe.execute()
            ids = [job["id"] for job in jobs]
            terminals = wait_terminals(stub, ids, timeout=400)
            after = inference_counts(triton.grpc_url)
            for bridge in bridges:
                assert bridge.terminate() == 0, bridge.tail()
        finally:
            for bridge in bridges:
                bridge.close()

        assert stub.violations == [], stub.violations[:5]
        starts = Outcomes(stub).generation_starts()
        for job_id in ids:
            assert [body["status"] for body in terminals[job_id]] == ["completed"], terminals[job_id]
            assert starts[job_id] == 1, f"job {job_id} started {starts[job_id]} generations"
    # Triton ran exactly one request per job, per model.
    assert {model: after[model] - before[model] for model in ("sdxl", "wan")} == expected_runs

    # Both pods worked, and no job was completed by both.
    done = [{r["job_id"] for r in bridge.records() if r.get("message", "").endswith(" completed") and "job_id" in r}
            for bridge in bridges]
    assert done[0] and done[1], [len(d) for d in done]
    assert done[0] & done[1] == set() and done[0] | done[1] == set(ids)
    left = {name: client.llen(name) for name in ("sdxl_queue", "wan_queue", "dead_letter")}
    left.update({key.decode(): client.llen(key) for key in client.scan_iter("processing:*")})
    assert not any(left.values()), left
    print(f"jobs per pod: a={len(done[0])}, b={len(done[1])}")
