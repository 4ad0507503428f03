"""A first start on a volume that holds only part of the weights (docs/DEPLOY.md, "Weights on the
volume"): the bridge serves what is there, leaves the other queues' jobs in Redis, reports what is
missing, and picks up weights that appear (here: the original Wan release converted with
``python -m bridge weights convert wan``) without a restart.

Real parts throughout: an embedded tritonserver over a models folder holding only the tiny SDXL
at first, a real redis-server, the production WAN model loading the converted folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.availability import Availability, MissingRequiredModels
from bridge.cli import app
from bridge.settings import Settings
from bridge.weights import inspect_weights
from model_kit import layout
from tests.stack import client, running, stack_settings, wait_for_state

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


def _link(tiny: Path, root: Path, relative: str) -> None:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(tiny / relative)


@pytest.fixture()
def original_wan(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A models folder with the tiny SDXL and a tiny Wan in the original release layout; the
    UMT5 encoder (HF layout) and the tiny VAE's config beside it, as ``--text-encoder`` /
    ``--config-dir`` give them."""
    from model_kit.tiny.wan import make_pipeline
    from tests.wan_original import tiny_vae, write_original_wan

    models = tmp_path / "models"
    pipe, vae = make_pipeline(), tiny_vae()
    write_original_wan(models / layout.WAN_ORIGINAL, pipe, vae)
    pipe.text_encoder.save_pretrained(tmp_path / "umt5")
    vae.save_config(tmp_path / "configs" / "vae")
    return models, tmp_path / "umt5", tmp_path / "configs"


async def test_a_partial_volume_is_served_and_the_rest_picked_up_without_a_restart(
        tiny_models_dir: Path, redis_server, tmp_path: Path, original_wan) -> None:
    models, umt5, configs = original_wan
    for relative in (layout.SDXL_CHECKPOINT, layout.SDXL_CONFIG):
        _link(tiny_models_dir, models, relative)
    settings = stack_settings(models, None, redis_server.url, tmp_path / "out", weights_recheck_s=0,
                              triton_startup_models=["sdxl"])
    async with running(settings) as runtime, client(runtime) as http:
        health = await http.get("/health")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "degraded"
        assert any(problem.startswith("wan weights are missing") for problem in health.json()["problems"])
        missing = {entry["model"]: entry for entry in health.json()["missing_models"]}
        assert set(missing) == {"wan", "qwen_instruct", "qwen_base"}
        # Where under MODELS_DIR, not where the volume is (/health needs no key; docs/API.md "Errors").
        assert "weights convert wan" in missing["wan"]["fix"] and f"MODELS_DIR/{layout.WAN_ORIGINAL}" in missing["wan"]["fix"]
        assert missing["wan"]["path"] == f"MODELS_DIR/{layout.WAN_DIFFUSERS}" and missing["wan"]["queues_paused"] == ["wan_queue"]
        assert str(models) not in health.text
        assert missing["qwen_instruct"]["queues_paused"] == ["chat_queue"]

        wan_job = await _submit(http, "image_fast", "a red city")
        enhanced_job = await _submit(http, "image7b_fast_enhanced", "a blue city")
        sdxl_job = await _submit(http, "sdxl_image_fast", "a red fox", num_images=1)
        assert (await wait_for_state(http, sdxl_job, lambda s: s["status"] == "completed"))["assets"]
        for job_id in (wan_job, enhanced_job):
            assert (await http.get(f"/jobs/{job_id}")).json()["status"] == "queued"
        assert (await runtime.queue.queue_depths())["wan_queue"] == 2  # left in Redis, not failed

        # The weights arrive while it runs: the original release converted by the CLI.
        converted = await asyncio.to_thread(
            CliRunner().invoke, app, ["weights", "convert", "wan", "--text-encoder", str(umt5), "--config-dir",
                                      str(configs)], env={"MODELS_DIR": str(models)})
        assert converted.exit_code == 0, converted.output
        assert converted.output.strip().endswith(str(models / layout.WAN_DIFFUSERS)), converted.output
        assert (models / layout.WAN_ORIGINAL / "Wan2.1_VAE.pth").is_file()  # the original is untouched
        await asyncio.sleep(0.5)
        assert (await http.get(f"/jobs/{wan_job}")).json()["status"] == "queued"  # no re-check here (0: off)

        # POST /memory/load looks again at once, opens wan_queue and answers 202 while WAN loads;
        # the queued jobs then run on the production loader's pipeline over the converted folder.
        started = time.monotonic()
        load = await http.post("/memory/load", params={"which": "wan"})
        assert load.status_code == 202 and time.monotonic() - started < 1.0, load.text
        assert load.json()["status"] == "running"
        for job_id in (wan_job, enhanced_job):
            done = await wait_for_state(http, job_id, lambda s: s["status"] in ("completed", "failed"))
            assert done["status"] == "completed" and done["assets"], done
        metadata = done["metadata"]  # the enhanced one: qwen_base is not on the volume
        assert metadata["enhancement_fell_back"] is True and "qwen_base" in metadata["enhancement_note"], metadata
        assert metadata["enhanced_prompt"] == "a blue city"
        ours = await _operation(http, load.json()["operation"])
        assert ours["op"] == "load" and ours["models"] == ["wan"] and ours["state"] == "done", ours
        # The operation is also followed like a job: its events end with the load's outcome.
        assert load.json()["events"] == f"/jobs/{load.json()['job_id']}/events"
        async with http.stream("GET", load.json()["events"]) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        statuses = [json.loads(line[6:])["status"] for line in lines]
        assert statuses[-1] == "completed" and set(statuses) <= {"processing", "completed"}, statuses
        startup = [op for op in (await http.get("/memory/status")).json()["operations"] if op["which"] == "startup"]
        assert [(op["models"], op["state"]) for op in startup] == [(["sdxl"], "done")]

        # Without qwen_base the enhanced job ran on its original prompt (the enhancement's fallback).
        missing = {e["model"]: e for e in (await http.get("/health")).json()["missing_models"]}
        assert set(missing) == {"qwen_instruct", "qwen_base"}
        assert missing["qwen_base"]["queues_paused"] == [] and "image7b_fast_enhanced" in missing["qwen_base"]["jobs_without_it"]
        missing_chat = await http.post("/memory/load", params={"which": "instruct"})
        assert missing_chat.status_code == 409 and "weights download qwen_instruct" in missing_chat.text


async def test_the_periodic_recheck_reports_weights_that_appear(tiny_models_dir: Path, tmp_path: Path) -> None:
    appeared: list[list[str]] = []

    async def on_change(models: list[str]) -> None:
        appeared.append(models)

    availability = Availability(Settings(models_dir=tmp_path, weights_recheck_s=0.1), on_change)
    availability.check_start()
    assert availability.queues() == [] and set(availability.missing) == {"sdxl", "wan", "qwen_instruct", "qwen_base"}
    watcher = asyncio.create_task(availability.watch())
    try:
        await asyncio.sleep(0.3)
        assert appeared == []
        _link(tiny_models_dir, tmp_path, layout.WAN_DIFFUSERS)
        for _ in range(50):
            if appeared:
                break
            await asyncio.sleep(0.1)
        assert appeared == [["wan"]] and availability.queues() == ["wan_queue"]
    finally:
        watcher.cancel()
    required = Availability(Settings(models_dir=tmp_path, require_models=["sdxl"]))
    with pytest.raises(MissingRequiredModels, match="sdxl"):
        required.check_start()


async def _submit(http, job_type: str, prompt: str, **config) -> str:
    answer = await http.post("/jobs", json={"type": job_type, "prompt": prompt, "user_id": "u1",
                                            "config": {**SMALL, **config}})
    assert answer.status_code in (200, 201, 202), answer.text
    return answer.json()["id"]


async def _operation(http, operation_id: int, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        [op] = [op for op in (await http.get("/memory/status")).json()["operations"] if op["id"] == operation_id]
        if op["state"] != "running" or time.monotonic() > deadline:
            return op
        await asyncio.sleep(0.2)


def test_weights_on_a_half_filled_folder_says_exactly_what_is_missing(tiny_models_dir: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    import shutil

    models = tmp_path / "models"
    wan = models / layout.WAN_DIFFUSERS
    shutil.copytree(tiny_models_dir / layout.WAN_DIFFUSERS, wan)
    (wan / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(wan / "text_encoder")
    for relative in (layout.SDXL_CHECKPOINT, layout.SDXL_CONFIG, layout.QWEN_INSTRUCT, layout.QWEN_BASE):
        _link(tiny_models_dir, models, relative)
    monkeypatch.setenv("MODELS_DIR", str(models))
    found = inspect_weights(Settings(models_dir=models))
    assert found["wan"].missing == ("VAE weights (vae/diffusion_pytorch_model*.safetensors)",
                                    "UMT5 text encoder config (text_encoder/config.json)",
                                    "UMT5 text encoder weights (text_encoder/model*.safetensors)")
    assert found["wan"].layout == "partial diffusers" and not found["wan"].present
    assert "weights download wan" in found["wan"].fix
    assert all(found[name].present for name in ("sdxl", "qwen_instruct", "qwen_base"))
    result = CliRunner().invoke(app, ["weights"])  # the same findings as a table, exit status 1
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "wan partial diffusers" in text and "VAE weights" in text and text.count(" ok ") == 3, text
    # run.sh serves what is there: some weights are, so `serve` (not the demo) is what it starts.
    assert CliRunner().invoke(app, ["weights", "--any"]).exit_code == 0
    empty = tmp_path / "empty-volume"
    empty.mkdir()
    monkeypatch.setenv("MODELS_DIR", str(empty))
    assert CliRunner().invoke(app, ["weights", "--any"]).exit_code == 1


def test_download_lifts_the_offline_switch_for_itself_only(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    from bridge.weights import WeightsError, download

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    settings = Settings(models_dir=tmp_path)
    try:
        download(settings, "sdxl")
    except WeightsError as exc:  # no hub here: it was asked (not refused as offline), and said so
        assert "stabilityai/stable-diffusion-xl-base-1.0" in str(exc) and "offline" not in str(exc).lower(), exc
    else:  # a machine that reaches the hub: the base config is there now
        assert inspect_weights(settings, ["sdxl"])["sdxl"].missing[0].startswith("checkpoint")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    with pytest.raises(WeightsError, match="unknown model"):
        download(settings, "sd15")
