"""Jobs as the live app sends them (docs/APP_CONTRACT.md), end to end: elements built like
``queue-job`` builds them (tests/app_payloads.py), the real redis-server and tritonserver (tiny
models), and the Supabase stand-in serving Storage, signed URLs and the ``jobs`` REST read."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from urllib.parse import parse_qs

import pytest
from PIL import Image

from bridge import metrics
from bridge.app_payload import WAN_NEGATIVE_PROMPT
from bridge.fetch import FetchError, fetch_job_reference
from bridge.jobs import JOB_TYPES, parse_job
from bridge.runtime import Runtime
from tests.job_outputs import decode_mp4
from tests.app_payloads import USER_ID, app_request, queue_element, queue_json
from tests.bridge_stack import TERMINAL, stack_settings, wait_state
from harness.supabase_stub import SupabaseStub

pytestmark = pytest.mark.timeout(600)


@pytest.fixture()
async def bridge(tiny_models_dir, triton, redis_server, supabase, tmp_path):
    settings = stack_settings(tiny_models_dir, triton, redis_server, tmp_path / "out", app_cancel_poll_s=0.5,
                              **supabase.settings_values())
    async with Runtime(settings, api=False) as runtime:
        yield runtime


def png(width: int = 96, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


async def push_app(bridge: Runtime, request: dict, *, cpu_size: bool = False, **kwargs) -> dict:
    element = queue_element(request, **kwargs)
    if cpu_size:
        # The tiny SDXL's VAE scales by 2, not 8: at the app's 1024x1024 its attention would span
        # 262,144 latent pixels, far beyond a CPU test. The size is checked at parse time instead
        # (test_the_app_exact_copy_element_resolves_to_1024); everything else is the app's element.
        element["config"]["resolution"] = "64x64"
    queue = "sdxl_queue" if "image" in request["job_type"] else "wan_queue"
    await bridge.queue.push(queue, queue_json(element))
    return element


async def terminal(stub: SupabaseStub, job_id: str, timeout: float = 240.0) -> dict:
    """The job's one terminal callback (whatever the stand-in did with it: a cancelled row ignores it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [c for c in stub.callbacks(job_id, outcome=None) if c["status"] in TERMINAL]
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no terminal callback for {job_id}: {stub.callbacks(job_id, outcome=None)}")


def exact_copy(reference: str) -> dict:
    """An "exact copy" of an uploaded image with no stored prompt, as the app's UI asks for it."""
    return app_request("sdxl_image_fast", "", metadata={"exact_copy_mode": True, "reference_image_url": reference})


# --------------------------------------------------------------------------- exact copy
async def test_promptless_exact_copy_runs_at_1024_and_a_prompt_is_still_required_without_a_reference(
        bridge: Runtime, supabase: SupabaseStub) -> None:
    supabase.put_object("user-library", f"{USER_ID}/upload.png", png())
    copy = await push_app(bridge, exact_copy(supabase.sign_url("user-library", f"{USER_ID}/upload.png", 3600)),
                          cpu_size=True)
    assert copy["prompt"] == "" and copy["config"]["pipeline"] == "img2img" and "negative_prompt" not in copy
    no_reference = await push_app(bridge, app_request("sdxl_image_fast", ""), cpu_size=True)

    done = await terminal(supabase, copy["id"])
    assert done["status"] == "completed", done
    asset = done["assets"][0]
    assert asset["metadata"]["guidance_scale"] == 1.0  # exact copy: strength <= 0.05, guidance 1.0
    assert Image.open(io.BytesIO(supabase.object(asset["url"]).data)).size == (64, 64)
    refused = await terminal(supabase, no_reference["id"])
    assert refused["status"] == "failed" and "prompt: required" in refused["error_message"]


# --------------------------------------------------------------------------- video size, steps, negatives
async def test_an_app_16_9_video_job_renders_landscape_at_480p_with_the_table_steps(
        bridge: Runtime, supabase: SupabaseStub, monkeypatch) -> None:
    # The table's frames and steps made small for CPU; the test is that they, not the app's, are used.
    monkeypatch.setitem(JOB_TYPES, "video_fast", replace(JOB_TYPES["video_fast"], steps=2, num_frames=5))
    start = supabase.sign_url("user-library", f"{USER_ID}/start.png", 3600)
    element = await push_app(bridge, app_request("wan_video_fast", "waves on a beach at sunset", aspect_ratio="16:9",
                                                 metadata={"start_reference_url": start}))
    assert element["config"]["resolution"] == "1024x576" and element["config"]["num_inference_steps"] == 25
    assert element["negative_prompt"].startswith("lowres")  # the app's SDXL negatives

    done = await terminal(supabase, element["id"])
    assert done["status"] == "completed", done
    asset, meta = done["assets"][0], done["metadata"]
    assert (asset["metadata"]["width"], asset["metadata"]["height"]) == (832, 480)
    assert asset["metadata"]["steps"] == 2 and asset["metadata"]["guidance_scale"] == 6.5
    frames = decode_mp4(supabase.object(asset["url"]).data)
    assert len(frames) == 5 and frames[0].shape == (480, 832, 3)
    assert meta["requested"] == {"resolution": "1024x576", "num_inference_steps": 25, "guidance_scale": 6.0}
    assert meta["used"]["orientation"] == "landscape" and meta["negative_prompt_source"].startswith("wan2.1")
    assert meta["references_not_used"] == ["metadata.start_reference_url", "config.first_frame"]


def test_the_app_exact_copy_element_resolves_to_1024() -> None:
    job = parse_job(queue_json(queue_element(exact_copy(f"user-library/{USER_ID}/upload.png"))))
    assert (job.prompt, job.width, job.height, job.exact_copy) == ("", 1024, 1024, True)
    assert job.strength == 0.05 and job.guidance_scale == 1.0 and job.reference_image_url.startswith("user-library/")


def test_wan_sizes_per_aspect_ratio_and_explicit_sizes_are_kept() -> None:
    for ratio, size in (("1:1", (624, 624)), ("9:16", (480, 832)), ("16:9", (832, 480))):
        job = parse_job(queue_json(queue_element(app_request("wan_video_high", "a cat", aspect_ratio=ratio))))
        assert (job.width, job.height, job.steps, job.guidance_scale) == (*size, 50, 7.5)
        assert job.negative_prompt == WAN_NEGATIVE_PROMPT
    explicit = {"id": "j1", "type": "video_fast", "prompt": "a cat", "user_id": "u1", "negative_prompt": "blur",
                "config": {"width": 640, "height": 368, "num_inference_steps": 30, "resolution": "1024x1024"}}
    job = parse_job(queue_json(explicit))
    assert (job.width, job.height, job.steps, job.negative_prompt, dict(job.notes)) == (640, 368, 30, "blur", {})


# --------------------------------------------------------------------------- references
async def test_raw_storage_paths_and_expired_signed_urls_are_fetched_through_storage(
        bridge: Runtime, supabase: SupabaseStub) -> None:
    supabase.put_object("workspace-temp", f"{USER_ID}/raw.png", png())
    supabase.put_object("user-library", f"{USER_ID}/old.png", png())
    raw = await push_app(bridge, exact_copy(f"workspace-temp/{USER_ID}/raw.png"), cpu_size=True)
    expired = await push_app(bridge, exact_copy(supabase.sign_url("user-library", f"{USER_ID}/old.png", -60)), cpu_size=True)
    missing = await push_app(bridge, exact_copy(f"user-library/{USER_ID}/gone.png"), cpu_size=True)
    foreign = await push_app(bridge, exact_copy("user-library/someone-else/private.png"), cpu_size=True)
    supabase.put_object("user-library", "someone-else/private.png", png())
    forged_url = supabase.sign_url("user-library", f"{USER_ID}/old.png", -60).replace(
        f"{USER_ID}/old.png", "someone-else/private.png")  # an expired token of ours on another object
    forged = await push_app(bridge, exact_copy(forged_url), cpu_size=True)

    for job in (raw, expired):
        done = await terminal(supabase, job["id"])
        assert done["status"] == "completed", done
    signed = sorted(r.outcome for r in supabase.requests_for("storage") if "/sign/" in r.path)
    assert signed == ["expired", "rejected"]  # the forged token is refused, never read with the service key
    for job, reason in ((missing, "Object not found"), (foreign, "not under this job's user id"),
                        (forged, "do not match the signature")):
        failed = await terminal(supabase, job["id"])
        assert failed["status"] == "failed" and reason in failed["error_message"], failed
        assert failed["metadata"]["error_type"] == "reference_image_error"


async def test_a_raw_storage_path_in_local_mode_is_a_clear_refusal() -> None:
    with pytest.raises(FetchError, match="storage path.*no Supabase project"):
        await fetch_job_reference(f"user-library/{USER_ID}/x.png", user_id=USER_ID, storage=None,
                                  max_bytes=1_000_000, timeout_s=5)


# --------------------------------------------------------------------------- cancellation
async def test_a_job_cancelled_in_the_jobs_row_stops_within_seconds_and_the_next_job_runs(
        bridge: Runtime, supabase: SupabaseStub, monkeypatch) -> None:
    monkeypatch.setitem(JOB_TYPES, "video_fast", replace(JOB_TYPES["video_fast"], steps=100, num_frames=13))
    long = await push_app(bridge, app_request("wan_video_fast", "a very long video", aspect_ratio="9:16"))
    supabase.set_job(long["id"], "queued")
    supabase.put_object("user-library", f"{USER_ID}/next.png", png())
    # Waits for the GPU the long job holds (a WAN job behind a cancelled one: the test below).
    following = await push_app(bridge, exact_copy(f"user-library/{USER_ID}/next.png"), cpu_size=True)
    await wait_state(bridge, long["id"], ("processing",))
    await asyncio.sleep(1.0)
    supabase.set_job(long["id"], "cancelled")  # all the app does
    cancelled_at = time.monotonic()
    done = await terminal(supabase, long["id"], timeout=30)
    assert done["status"] == "cancelled" and time.monotonic() - cancelled_at < 5.0
    statuses = [c["status"] for c in supabase.callbacks(long["id"], outcome=None)]
    assert statuses[-1] == "cancelled" and set(statuses[:-1]) <= {"processing"}, statuses
    progress = [c["metadata"].get("progress", 0) for c in supabase.callbacks(long["id"]) if c["status"] == "processing"]
    assert max(progress) < 50, progress  # stopped far from done

    assert (await terminal(supabase, following["id"]))["status"] == "completed"
    reads = [parse_qs(r.query) for r in supabase.requests_for("rest")]
    assert {"id": [f"eq.{long['id']}"], "select": ["status"]} in reads


async def test_a_job_runs_when_the_jobs_table_cannot_be_read(bridge: Runtime, supabase: SupabaseStub) -> None:
    supabase.fail_next("rest", 1000, mode="close")
    before = metrics.METRICS.app_status_read_failures._value.get()
    supabase.put_object("user-library", f"{USER_ID}/up.png", png())
    job = await push_app(bridge, exact_copy(f"user-library/{USER_ID}/up.png"), cpu_size=True)
    assert (await terminal(supabase, job["id"]))["status"] == "completed"
    assert metrics.METRICS.app_status_read_failures._value.get() > before
    supabase.clear_failures()



async def test_a_wan_job_queued_behind_a_wan_job_cancelled_while_loading_runs(
        bridge: Runtime, supabase: SupabaseStub, monkeypatch) -> None:
    # Cancelled while WAN still loaded, the first job left the model "loading" for ever; the
    # second then looped in ResidencyManager.use without awaiting and the whole worker hung.
    monkeypatch.setitem(JOB_TYPES, "video_fast", replace(JOB_TYPES["video_fast"], steps=100, num_frames=13))
    await bridge.residency.unload("wan")  # loaded by the first job, as in a fresh worker
    long = await push_app(bridge, app_request("wan_video_fast", "a very long video", aspect_ratio="9:16"))
    supabase.set_job(long["id"], "queued")
    following = queue_element(app_request("wan_video_fast", "a short video"))
    following["config"] = {"width": 64, "height": 64, "num_inference_steps": 2, "frame_num": 5}  # another producer
    supabase.set_job(following["id"], "queued")
    await bridge.queue.push("wan_queue", queue_json(following))
    await wait_state(bridge, long["id"], ("processing",))
    supabase.set_job(long["id"], "cancelled")  # at once: WAN is still loading
    assert (await terminal(supabase, long["id"], timeout=30))["status"] == "cancelled"
    assert (await terminal(supabase, following["id"], timeout=90))["status"] == "completed"


async def test_the_operator_page_shows_a_supabase_thumbnail_through_a_signed_url(
        bridge: Runtime, supabase: SupabaseStub) -> None:
    import httpx

    from bridge.api_ui import snapshot

    supabase.put_object("user-library", f"{USER_ID}/page.png", png())
    job = await push_app(bridge, exact_copy(f"user-library/{USER_ID}/page.png"), cpu_size=True)
    done = await terminal(supabase, job["id"])
    assert done["status"] == "completed"
    # The page lists the job once the worker has settled it (just after its callback arrived).
    for _ in range(100):
        finished = {entry["id"]: entry for entry in (await snapshot(bridge))["finished"]}
        if job["id"] in finished:
            break
        await asyncio.sleep(0.1)
    url = finished[job["id"]]["thumbnail"]
    assert url.startswith(f"{supabase.url}/storage/v1/object/sign/") and "token=" in url  # the bucket stays private
    async with httpx.AsyncClient() as http:
        shown = await http.get(url)
    assert shown.status_code == 200
    assert shown.content == supabase.object(done["assets"][0]["thumbnail_url"]).data
