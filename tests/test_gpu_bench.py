"""bench/gpu.py: the CPU dry run (tiny models, the real tritonserver, redis-server and bridge), its
plans, and the speed-up switches of model_kit.speedups (which only act on CUDA)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.jobs import parse_job
from bridge.launcher import TritonInstall, TritonServer, speedup_environment
from bridge.settings import Settings
from model_kit import speedups

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu"] = bench  # dataclasses look their module up while the file runs
_spec.loader.exec_module(bench)


def _run_bench(tiny_models_dir: Path, tmp_path: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}  # no stray settings
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--models-dir", str(tiny_models_dir), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return done, time.monotonic() - started


def _table(markdown: str, title_start: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table under the heading starting with ``title_start``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {title_start}"))
    rows = []
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_dry_run_writes_a_row_per_model_and_request(tiny_models_dir: Path, tmp_path: Path) -> None:
    out, out_json = tmp_path / "gpu.md", tmp_path / "gpu.json"
    done, seconds = _run_bench(tiny_models_dir, tmp_path, "--out", str(out), "--json", str(out_json))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert "Per model" in done.stdout  # the Rich table was printed too

    models = {row[0]: row for row in _table(text, "Per model")}
    assert set(models) == {"sdxl", "wan", "qwen_instruct"}
    for row in models.values():
        assert float(row[2]) > 0, row  # load s
        assert float(row[3]) > 0, row  # first request s
        assert row[4] == "n/a (no GPU)", row

    requests = _table(text, "Per request")
    assert [(r[0], r[1]) for r in requests] == [
        ("sdxl", "sdxl_image_fast"), ("wan", "image_fast"), ("wan", "video_fast"), ("qwen_instruct", "chat_conversation"),
    ]
    for row in requests:
        assert float(row[3]) > 0 and float(row[4]) > 0, row  # bridge s, direct s
        assert not row[8], row  # no note: nothing failed or was skipped
    assert "tok/s decode (16 tokens)" in requests[-1][6]
    assert float(requests[-1][7]) > 0  # time to first token

    speedup = _table(text, "Speed-ups")
    assert [(r[0], r[1]) for r in speedup] == [("sdxl", "SDPA=0")]
    assert float(speedup[0][4]) > 0 and float(speedup[0][5]) > 0, speedup[0]
    assert "CUDA only" in speedup[0][10]

    data = json.loads(out_json.read_text())
    assert [m["model"] for m in data["models"]] == ["sdxl", "wan", "qwen_instruct"]
    print(f"dry run: {seconds:.0f} s")


def test_a_spent_budget_skips_with_a_note_and_still_writes_the_tables(tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    done, _ = _run_bench(tiny_models_dir, tmp_path, "--out", str(out), "--models", "sdxl", "--budget-s", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    (row,) = _table(text, "Per model")
    assert row[0] == "sdxl" and "skipped" in row[7] and "--budget-s 1" in row[7]
    assert all("skipped" in r[8] for r in _table(text, "Per request"))
    assert "skipped: no baseline" in _table(text, "Speed-ups")[0][10]


def test_no_gpu_means_no_full_size_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if bench._has_cuda():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert bench.main(["--quick", "--out", str(tmp_path / "gpu.md")]) == 2
    assert not (tmp_path / "gpu.md").exists()


@pytest.mark.parametrize("mode", ["dry", "quick", "full"])
def test_every_planned_request_is_a_valid_production_job(mode: str) -> None:
    plan = bench.make_plan(mode)
    cases = [c for cs in plan.cases.values() for c in cs] + list(plan.representative.values()) + list(plan.warmup.values())
    for case in cases:
        job = parse_job(json.dumps(case.payload()))  # raises InvalidJob on a bad size, step count, ...
        assert job.model == case.model
    if mode == "dry":
        return
    sdxl = [parse_job(json.dumps(c.payload())) for c in plan.cases["sdxl"]]
    assert {(j.width, j.height) for j in sdxl} == {(1024, 1024)}
    assert {j.num_images for j in sdxl} == ({1, 3} if mode == "quick" else {1, 3, 6})
    assert {j.type.name for j in sdxl} == ({"sdxl_image_fast"} if mode == "quick" else {"sdxl_image_fast", "sdxl_image_high"})
    video = parse_job(json.dumps(plan.cases["wan"][1].payload()))
    assert (video.width, video.height, video.num_frames) == (480, 832, 81)
    assert video.steps == (10 if mode == "quick" else 25)
    assert {t.env for t in plan.toggles} >= {"CHANNELS_LAST=0", "SDPA=0", "FP16_VAE=1", "TORCH_COMPILE=full"}


def test_settings_reach_the_model_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = speedups.Speedups.from_env(speedup_environment(Settings()))
    assert defaults == speedups.Speedups()  # the bridge's defaults are the models' defaults
    assert defaults.channels_last and defaults.sdpa and not defaults.fp16_vae and defaults.torch_compile == "off"
    monkeypatch.setenv("SDPA", "0")
    monkeypatch.setenv("FP16_VAE", "true")
    monkeypatch.setenv("TORCH_COMPILE", "1")
    monkeypatch.setenv("TORCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
    seen = speedups.Speedups.from_env(speedup_environment(Settings()))
    assert seen == speedups.Speedups(True, False, True, "full", "max-autotune-no-cudagraphs")
    env = TritonServer(Settings(sdpa=False, torch_compile="regional")).environment(TritonInstall(Path("/bin/true")))
    assert (env["SDPA"], env["TORCH_COMPILE"], env["CHANNELS_LAST"]) == ("0", "regional", "1")
    with pytest.raises(ValueError, match="SDPA"):
        speedups.Speedups.from_env({"SDPA": "maybe"})
    with pytest.raises(ValueError, match="TORCH_COMPILE"):
        speedups.Speedups.from_env({"TORCH_COMPILE": "always"})


def test_speedups_change_nothing_on_cpu() -> None:
    class Pipe:  # any attribute access would fail
        __slots__ = ()

    assert speedups.apply(Pipe(), "cpu", speedups.Speedups(sdpa=False, fp16_vae=True, torch_compile="full")) == []


def test_sdxl_defaults_keep_the_vae_in_float32_for_half_precision_latents(tiny_models_dir: Path) -> None:
    """What CUDA gets by default, run on CPU: a bfloat16 UNet, classic attention, a float32 VAE fed
    half-precision latents (text-to-image decode) and a half-precision image (img2img encode)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from PIL import Image

    from model_kit import layout

    torch.set_num_threads(1)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(tiny_models_dir / layout.SDXL_CHECKPOINT), config=str(tiny_models_dir / layout.SDXL_CONFIG),
        local_files_only=True, torch_dtype=torch.bfloat16,
    )
    pipe.set_progress_bar_config(disable=True)
    done = speedups.apply(pipe, "cuda", speedups.Speedups(sdpa=False))
    assert done == ["unet channels-last", "unet classic attention (AttnProcessor)", "vae float32"]
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16
    assert pipe.vae.config.force_upcast is False
    image = pipe(prompt="a fox", width=64, height=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = img2img(prompt="a fox", image=Image.new("RGB", (64, 64), (200, 20, 20)), strength=0.5,
                    num_inference_steps=4, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert pipe.vae.dtype == torch.float32  # img2img did not cast it back to half precision
