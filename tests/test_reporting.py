"""bridge.reporting against the local Supabase stand-in (harness/supabase_stub.py): uploads, thumbnails,
the signed callback, retries and their deadline, rejections, the progress throttle, resending from
the spool, local mode, and that secrets never leak."""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


from bridge.reporting import (
    LocalReporter,
    ProgressThrottle,
    ReportingDeadline,
    ReportingError,
    ReportingRejected,
    SupabaseReporter,
    make_reporter,
)
from bridge.settings import Settings
from bridge.spool import Spool
from job_outputs import USER, VIDEO_FRAMES, VIDEO_FPS, image_outputs, new_job_id, video_outputs, webp_size
from harness.supabase_stub import SupabaseStub

FAST = {"request_timeout_s": 0.5, "backoff_base_s": 0.02, "backoff_max_s": 0.1}


@pytest.fixture(scope="module")
def stub():
    with SupabaseStub() as server:
        yield server


@pytest.fixture()
def supabase(stub):
    """The shared stub, emptied; each test must leave no contract violation behind."""
    stub.reset()
    stub.unknown_jobs = "accept"
    yield stub
    assert stub.violations == []


def _settings(stub: SupabaseStub, tmp_path: Path, **overrides) -> Settings:
    values = {**stub.settings_values(), "output_dir": tmp_path / "out", "report_deadline_s": 10.0}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture()
async def reporter(supabase, tmp_path):
    async with SupabaseReporter.from_settings(_settings(supabase, tmp_path), **FAST) as client:
        yield client


@pytest.fixture()
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "spool")


# --- uploads and asset objects -------------------------------------------------------------------


async def test_image_uploads_paths_types_thumbnails_and_assets(supabase, reporter, spool):
    job = new_job_id()
    outputs = image_outputs(count=3)
    assets = await reporter.upload_assets(spool.save(job, outputs))

    expected = []
    for i in range(3):
        expected += [(f"{USER}/{job}/{i}.png", "image/png"), (f"{USER}/{job}/{i}.thumb.webp", "image/webp")]
    got = [(r.path.split("/workspace-temp/", 1)[1], r.stored_type) for r in supabase.uploads()]
    assert sorted(got) == sorted(expected)  # uploaded concurrently: in any order
    assert all(r.headers["x-upsert"] == "true" for r in supabase.uploads())

    for i, asset in enumerate(assets):
        assert asset["type"] == "image"
        assert asset["url"] == f"{USER}/{job}/{i}.png"  # inside the bucket, no bucket prefix
        assert asset["thumbnail_url"] == f"{USER}/{job}/{i}.thumb.webp"
        assert supabase.object(asset["url"]).data == outputs.assets[i].data
        assert webp_size(supabase.object(asset["thumbnail_url"]).data) == (256, 144)
        assert asset["metadata"] == {
            "width": 640, "height": 360, "format": "png", "batch_size": 3, "steps": 15, "guidance_scale": 6.0,
            "seed": 1000 + i, "file_size_bytes": len(outputs.assets[i].data), "asset_index": i,
            "negative_prompt_used": "blurry",
        }

    answer = await reporter.send_callback(job, "completed", assets=assets, metadata=outputs.metadata)
    assert answer["success"] is True
    [body] = supabase.callbacks(job)
    assert body["assets"] == assets and body["status"] == "completed" and body["error_message"] is None
    assert supabase.job_status(job) == "completed"


async def test_a_jobs_files_are_uploaded_concurrently(supabase, reporter, spool):
    """The stub answers only once all four files of a two-image job are in flight at once: one
    round trip for the job's files, not four (docs/ARCHITECTURE.md, one job's path)."""
    job = new_job_id()
    supabase.hold("storage", 4)
    assets = await reporter.upload_assets(spool.save(job, image_outputs(count=2)))
    assert len(supabase.uploads()) == 4 and [r for r in supabase.requests if r.outcome == "held-alone"] == []
    assert all(supabase.object(asset[key]) is not None for asset in assets for key in ("url", "thumbnail_url"))


async def test_one_failed_upload_stops_the_others_and_is_raised_as_itself(supabase, reporter, spool):
    supabase.fail_next("storage", 1, status=403)
    with pytest.raises(ReportingRejected, match="HTTP 403"):
        await reporter.upload_assets(spool.save(new_job_id(), image_outputs(count=2)))


async def test_video_upload_thumbnail_is_middle_frame(supabase, reporter, spool):
    job = new_job_id()
    outputs = video_outputs()
    [asset] = await reporter.upload_assets(spool.save(job, outputs))

    # (this job's uploads: the test before may still have one in flight after its failure)
    assert sorted(r.stored_type for r in supabase.uploads() if job in r.path) == ["image/webp", "video/mp4"]
    assert asset["url"] == f"{USER}/{job}/0.mp4" and asset["thumbnail_url"] == f"{USER}/{job}/0.thumb.webp"
    assert supabase.object(asset["url"]).data == outputs.assets[0].data
    thumb = supabase.object(asset["thumbnail_url"]).data
    assert webp_size(thumb) == (256, 154)
    grey = np.asarray(Image.open(io.BytesIO(thumb)).convert("L"), dtype=float).mean()
    assert abs(grey - 25 * (VIDEO_FRAMES // 2)) < 8, grey  # frame 4 (grey 100), not 3 (75) or 5 (125)
    assert asset["metadata"] == {
        "width": 320, "height": 192, "format": "mp4", "frame_num": VIDEO_FRAMES, "fps": VIDEO_FPS,
        "duration_seconds": VIDEO_FRAMES / VIDEO_FPS, "seed": 7,
        "file_size_bytes": len(outputs.assets[0].data), "asset_index": 0,
    }
    await reporter.send_callback(job, "completed", assets=[asset], metadata=outputs.metadata)
    assert supabase.job_status(job) == "completed"


async def test_upload_refuses_octet_stream_before_sending(supabase, reporter):
    with pytest.raises(ValueError, match="real content type"):
        await reporter.upload(f"{USER}/{new_job_id()}/0.png", b"\x89PNG\r\n\x1a\n", "application/octet-stream")
    assert supabase.requests == []


# --- the callback and its signature --------------------------------------------------------------


async def test_signature_verifies_over_exact_body_bytes(supabase, reporter):
    job = new_job_id()
    metadata = {"progress": 0, "prompt": "naïve 🌸 \"quoted\" prompt"}
    await reporter.send_callback(job, "processing", metadata=metadata)
    [request] = supabase.requests_for("job-callback")
    expected = hmac.new(supabase.callback_secret.encode(), request.body, hashlib.sha256).hexdigest()
    assert request.headers["x-callback-signature"] == f"sha256={expected}"
    assert request.headers["authorization"] == f"Bearer {supabase.service_key}"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {
        "job_id": job, "status": "processing", "assets": [], "error_message": None, "metadata": metadata,
    }


async def test_wrong_callback_secret_gets_401_rejected(supabase, tmp_path):
    settings = _settings(supabase, tmp_path, job_callback_secret="not-the-secret-42")
    async with SupabaseReporter.from_settings(settings, **FAST) as client:
        with pytest.raises(ReportingRejected) as info:
            await client.send_callback(new_job_id(), "processing", metadata={"progress": 0})
    assert info.value.status_code == 401
    assert "not-the-secret-42" not in str(info.value)
    assert [r.status for r in supabase.requests] == [401]  # not retried
    assert supabase.violations  # the stub noticed the bad signature
    supabase.violations.clear()


async def test_callbacks_after_completion_are_ignored_and_unknown_jobs_skipped(supabase, reporter):
    job = new_job_id()
    await reporter.send_callback(job, "failed", error_message="out of memory: lower the resolution",
                                 metadata={"error_type": "oom", "job_type": "sdxl_image_fast"})
    supabase.set_job(job, "completed")
    answer = await reporter.send_callback(job, "failed", error_message="late duplicate")
    assert answer.get("skipped") is True
    assert supabase.job_status(job) == "completed"

    supabase.unknown_jobs = "skip"
    answer = await reporter.send_callback(new_job_id(), "processing", metadata={"progress": 5})
    assert answer == {"success": True, "skipped": True, "reason": "job not found"}


async def test_invalid_status_refused_locally(supabase, reporter):
    with pytest.raises(ValueError, match="status 'done'"):
        await reporter.send_callback(new_job_id(), "done")
    assert supabase.requests == []


# --- retries, deadline, rejection ----------------------------------------------------------------


async def test_500_then_200_is_retried(supabase, reporter):
    job = new_job_id()
    supabase.fail_next("job-callback", 2, status=500)
    answer = await reporter.send_callback(job, "processing", metadata={"progress": 0})
    assert answer["success"] is True
    assert [r.status for r in supabase.requests_for("job-callback")] == [500, 500, 200]
    assert reporter.retries == 2
    assert len(supabase.callbacks(job)) == 1


async def test_storage_503_and_429_are_retried(supabase, reporter, spool):
    supabase.fail_next("storage", 1, status=503)
    supabase.fail_next("storage", 1, status=429)
    job = new_job_id()
    assets = await reporter.upload_assets(spool.save(job, image_outputs(count=1)))
    assert [r.status for r in supabase.requests_for("storage")] == [503, 429, 200, 200]
    assert reporter.retries == 2 and reporter.retries_by_route == {"storage": 2, "job-callback": 0}
    assert supabase.object(assets[0]["url"]) is not None and supabase.object(assets[0]["thumbnail_url"]) is not None


@pytest.mark.parametrize("mode", ["hang", "close"])
async def test_hang_and_dropped_connection_are_retried(supabase, reporter, mode):
    job = new_job_id()
    supabase.fail_next("job-callback", 1, mode=mode, hang_s=3.0)
    retried: list[tuple[str, str]] = []
    reporter.on_retry = lambda route, reason: retried.append((route, reason))
    started = time.monotonic()
    await reporter.send_callback(job, "failed", error_message="boom", metadata={"error_type": "x"})
    assert time.monotonic() - started < 2.5  # the hang was cut by the request timeout (0.5 s)
    assert [r.outcome for r in supabase.requests_for("job-callback")] == [f"injected-{mode}", "applied"]
    assert reporter.retries == 1
    assert retried[0][0] == "job-callback" and reporter.retries_by_route["job-callback"] == 1
    assert ("Timeout" in retried[0][1]) if mode == "hang" else ("Error" in retried[0][1])
    assert supabase.job_status(job) == "failed"


async def test_deadline_raises_and_nothing_is_dropped(supabase, spool, tmp_path):
    job = new_job_id()
    entry = spool.save(job, image_outputs(count=1))
    supabase.fail_next("storage", 10_000, status=500)
    supabase.fail_next("job-callback", 10_000, status=502)
    settings = _settings(supabase, tmp_path, report_deadline_s=0.6)
    async with SupabaseReporter.from_settings(settings, **FAST) as client:
        started = time.monotonic()
        with pytest.raises(ReportingDeadline) as info:
            await client.upload_assets(entry)
        assert time.monotonic() - started < 1.5
        assert info.value.attempts >= 3 and "HTTP 500" in str(info.value)
        assert re.match(rf"storage upload of {USER}/{job}/0\.(png|thumb\.webp): no success after", str(info.value))
        with pytest.raises(ReportingDeadline, match=r"job-callback \(completed\): .*HTTP 502"):
            await client.send_callback(job, "completed", assets=[], metadata={})
        assert client.retries > 4
    assert supabase.uploads() == [] and supabase.callbacks(job) == []
    reloaded = Spool(spool.directory).load(job)  # still there for the next round
    assert reloaded is not None and reloaded.assets[0].read_bytes() == entry.assets[0].read_bytes()


@pytest.mark.parametrize("status", [400, 403, 404, 409])
async def test_4xx_is_rejected_without_retry(supabase, reporter, status):
    supabase.fail_next("job-callback", 1, status=status)
    with pytest.raises(ReportingRejected) as info:
        await reporter.send_callback(new_job_id(), "processing", metadata={"progress": 1})
    assert info.value.status_code == status
    assert "injected failure" in info.value.body_excerpt
    assert f"HTTP {status}" in str(info.value)
    assert reporter.retries == 0 and len(supabase.requests) == 1


async def test_secrets_never_in_logs_reprs_or_errors(supabase, tmp_path, caplog, spool):
    caplog.set_level(logging.DEBUG)
    settings = _settings(supabase, tmp_path, report_deadline_s=0.5)
    secrets = [supabase.service_key, supabase.callback_secret]
    errors: list[Exception] = []
    async with make_reporter(settings, record=_unused_record, **FAST) as client:
        supabase.fail_next("storage", 1, mode="close")
        supabase.fail_next("job-callback", 1, status=500)
        job = new_job_id()
        assets = await client.upload_assets(spool.save(job, image_outputs(count=1)))
        await client.send_callback(job, "completed", assets=assets, metadata={"job_type": "sdxl_image_fast"})
        supabase.fail_next("job-callback", 1000, status=503)
        with pytest.raises(ReportingDeadline) as deadline:
            await client.send_callback(job, "processing", metadata={"progress": 3})
        errors.append(deadline.value)
        supabase.clear_failures()
        supabase.fail_next("job-callback", 1, status=401)
        with pytest.raises(ReportingRejected) as rejected:
            await client.send_callback(job, "processing", metadata={"progress": 4})
        errors.append(rejected.value)
        texts = [caplog.text, repr(client), str(client.__dict__.get("_service_key")), repr(settings)]
    assert "retrying" in caplog.text  # the retries were logged...
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    for secret in secrets:
        assert all(secret not in text for text in texts)  # ...without any secret


async def _unused_record(*args):
    raise AssertionError("Supabase mode must not record locally")


# --- progress throttle ---------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_progress_throttle_rate_and_monotonic(tmp_path):
    recorded: list[tuple] = []

    async def record(job_id, status, assets, error_message, metadata):
        recorded.append((job_id, status, metadata["progress"], metadata.get("job_type")))

    clock = _Clock()
    throttle = ProgressThrottle(LocalReporter(tmp_path, record), "job-1", clock=clock,
                                metadata={"job_type": "video_fast"})
    steps = [(0.0, 0), (0.3, 10), (1.1, 20), (1.2, 25), (2.5, 15), (2.6, 20), (3.0, 150), (5.0, 100)]
    sent = []
    for at, percent in steps:
        clock.now = 100.0 + at
        sent.append(await throttle.update(percent))
    assert sent == [True, False, True, False, False, False, True, False]
    assert recorded == [("job-1", "processing", p, "video_fast") for p in (0, 20, 100)]
    assert throttle.last_percent == 100 and throttle.sent == 3


async def test_progress_first_update_always_sent_and_failures_do_not_raise(supabase, reporter):
    clock = _Clock()
    job = new_job_id()
    throttle = ProgressThrottle(reporter, job, clock=clock, deadline_s=0.3)
    supabase.fail_next("job-callback", 1, status=400)
    assert await throttle.update(42) is False  # refused: logged, not raised
    clock.now += 0.2
    assert await throttle.update(43) is False  # too soon after the last attempt
    clock.now += 1.0
    assert await throttle.update(44) is True
    assert [b["metadata"]["progress"] for b in supabase.callbacks(job)] == [44]

    fresh = ProgressThrottle(reporter, new_job_id(), clock=clock)
    assert await fresh.update(73.9) is True  # first one goes out whatever the value
    assert supabase.callbacks(fresh.job_id)[0]["metadata"] == {"progress": 73}


# --- spool ---------------------------------------------------------------------------------------


async def test_restart_resends_from_spool(supabase, reporter, tmp_path):
    """After a restart, a new Spool over the same folder finishes the job without regenerating."""
    job = new_job_id()
    outputs = image_outputs(count=1)
    Spool(tmp_path / "spool").save(job, outputs)

    spool = Spool(tmp_path / "spool")  # the "restarted" process
    [pending] = spool.pending()
    entry = spool.load(pending)
    assets = await reporter.upload_assets(entry)
    await reporter.send_callback(job, "completed", assets=assets, metadata=entry.metadata)
    spool.remove(job)
    assert supabase.object(f"{USER}/{job}/0.png").data == outputs.assets[0].data
    assert supabase.callbacks(job)[0]["metadata"] == outputs.metadata
    assert spool.pending() == []


async def test_reupload_is_an_upsert(supabase, reporter, spool):
    job = new_job_id()
    entry = spool.save(job, image_outputs(count=1))
    await reporter.upload_assets(entry)
    await reporter.upload_assets(entry)
    assert supabase.object(f"{USER}/{job}/0.png").writes == 2
    assert all(r.status == 200 for r in supabase.requests_for("storage"))


# --- local mode ----------------------------------------------------------------------------------


async def test_local_reporter_layout_and_record(tmp_path, spool):
    recorded: list[tuple] = []

    async def record(job_id, status, assets, error_message, metadata):
        recorded.append((job_id, status, assets, error_message, metadata))

    settings = Settings(supabase_url=None, output_dir=tmp_path / "outputs")
    reporter = make_reporter(settings, record)
    assert isinstance(reporter, LocalReporter)

    job = new_job_id()
    outputs = image_outputs(count=2, width=300, height=600)
    assets = await reporter.upload_assets(spool.save(job, outputs))
    folder = tmp_path / "outputs" / USER / job
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "0.thumb.webp", "1.png", "1.thumb.webp"]
    assert (folder / "1.png").read_bytes() == outputs.assets[1].data
    assert webp_size((folder / "0.thumb.webp").read_bytes()) == (128, 256)
    assert assets[1]["url"] == f"{USER}/{job}/1.png" and assets[1]["metadata"]["seed"] == 1001

    await reporter.send_callback(job, "completed", assets=assets, metadata=outputs.metadata)
    assert recorded == [(job, "completed", assets, None, outputs.metadata)]

    video_job = new_job_id()
    [video] = await reporter.upload_assets(spool.save(video_job, video_outputs()))
    video_folder = tmp_path / "outputs" / USER / video_job
    assert sorted(p.name for p in video_folder.iterdir()) == ["0.mp4", "0.thumb.webp"]
    assert video["metadata"]["duration_seconds"] == VIDEO_FRAMES / VIDEO_FPS


async def test_local_reporter_links_spooled_files_else_copies_them(tmp_path, spool, monkeypatch):
    """Local mode stores by hard-linking the spool's files (no bytes copied); where links are
    refused (another device) it copies them; a file it cannot write is a ReportingError."""
    reporter = LocalReporter(tmp_path / "outputs", _unused_record)
    linked, copied = new_job_id(), new_job_id()
    entry = spool.save(linked, image_outputs(count=1))
    await reporter.upload_assets(entry)
    stored = tmp_path / "outputs" / USER / linked
    assert os.stat(stored / "0.png").st_ino == os.stat(entry.assets[0].path).st_ino
    assert os.stat(stored / "0.thumb.webp").st_ino == os.stat(entry.assets[0].thumbnail_path).st_ino
    spool.remove(linked)  # the job is settled: the stored files stay
    assert (stored / "0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def cross_device(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))

    monkeypatch.setattr(os, "link", cross_device)
    entry = spool.save(copied, image_outputs(count=2))
    assets = await reporter.upload_assets(entry)
    stored = tmp_path / "outputs" / USER / copied
    assert sorted(p.name for p in stored.iterdir()) == ["0.png", "0.thumb.webp", "1.png", "1.thumb.webp"]
    assert (stored / "1.png").read_bytes() == entry.assets[1].read_bytes()
    assert os.stat(stored / "1.png").st_ino != os.stat(entry.assets[1].path).st_ino
    assert [asset["url"] for asset in assets] == [f"{USER}/{copied}/0.png", f"{USER}/{copied}/1.png"]

    (tmp_path / "outputs" / USER / "blocked").write_text("a file where the job's folder should be")
    with pytest.raises(ReportingError, match="cannot write: Not a directory"):
        await reporter.upload_assets(spool.save("blocked", image_outputs(count=1)))


def test_make_reporter_picks_supabase_when_configured(supabase, tmp_path):
    reporter = make_reporter(_settings(supabase, tmp_path), _unused_record)
    assert isinstance(reporter, SupabaseReporter)
    assert reporter.url == supabase.url and reporter.bucket == "workspace-temp" and reporter.deadline_s == 10.0


async def test_stub_checks_contract_violations(supabase):
    """The stand-in itself flags wrong requests (so the other tests' empty violation lists mean something)."""
    import httpx

    async with httpx.AsyncClient() as client:
        url = f"{supabase.url}/storage/v1/object/workspace-temp/{USER}/job/0.png"
        answer = await client.post(url, content=b"\x89PNG\r\n\x1a\n", headers={
            "Authorization": f"Bearer {supabase.service_key}", "apikey": supabase.service_key,
            "Content-Type": "application/octet-stream"})
        assert answer.status_code == 400
        body = json.dumps({"job_id": "j", "status": "completed", "assets": [], "error_message": None, "metadata": {}})
        answer = await client.post(f"{supabase.url}/functions/v1/job-callback", content=body, headers={
            "Authorization": f"Bearer {supabase.service_key}", "Content-Type": "application/json"})
        assert answer.status_code == 401
        answer = await client.post(f"{supabase.url}/functions/v1/update-worker-url", json={"worker_url": "http://x"},
                                   headers={"Authorization": f"Bearer {supabase.service_key}"})
        assert answer.status_code == 200
    assert supabase.function_calls("update-worker-url") == [{"worker_url": "http://x"}]
    assert len(supabase.violations) == 2
    assert "octet-stream" in supabase.violations[0] and "X-Callback-Signature" in supabase.violations[1]
    supabase.violations.clear()
