"""Triton Python-backend model ``wan``: Wan 2.1 text-to-video (MP4), or one frame as a PNG.

Reads the diffusers layout (``Wan2.1-T2V-1.3B-Diffusers``). When only the original Wan release
layout is present, loading fails with a message saying so and how to get the diffusers one.
"""

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from model_kit import diffusion, layout
from model_kit.common import Request, StreamingModel, models_dir, scalar, strings, weights_path
from model_kit.media import encode_mp4, encode_png

DIFFUSERS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
DEFAULT_VIDEO_FRAMES = 81


class WanParams(diffusion.DiffusionParams):
    """The JSON ``parameters`` input (docs/ARCHITECTURE.md)."""

    size_multiple = 16

    output: Literal["video", "image"] = "video"
    num_frames: int | None = Field(None, ge=1, le=257)  # 4k+1; default 81 for video, 1 for image
    fps: int = Field(16, ge=1, le=60)
    guidance_scale: float = Field(6.5, ge=0.0, le=30.0)
    width: int = Field(832, ge=16, le=1920)
    height: int = Field(480, ge=16, le=1920)

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, value: int | None) -> int | None:
        if value is not None and (value - 1) % 4:
            raise ValueError(f"must be 4k+1 (1, 5, ..., 81), got {value}")
        return value

    @model_validator(mode="after")
    def _frames_for_output(self) -> "WanParams":
        if self.num_frames is None:
            self.num_frames = 1 if self.output == "image" else DEFAULT_VIDEO_FRAMES
        elif self.output == "image" and self.num_frames != 1:
            raise ValueError(f"num_frames: output 'image' is one frame, got {self.num_frames}")
        return self


class TritonPythonModel(StreamingModel):
    name = "wan"

    def load(self) -> None:
        folder = weights_path(self.name, self.parameters)
        _require_diffusers_layout(folder)  # before the slow imports
        import torch  # noqa: PLC0415
        from diffusers import AutoencoderKLWan, WanPipeline  # noqa: PLC0415

        # On CUDA: bf16 (UMT5 overflows in fp16) and the VAE in fp32, as the Wan authors recommend.
        dtype = torch.bfloat16 if self.device == "cuda" else self.dtype
        vae = AutoencoderKLWan.from_pretrained(str(folder), subfolder="vae", **diffusion.dtype_kwargs(torch.float32))
        pipe = WanPipeline.from_pretrained(str(folder), vae=vae, **diffusion.dtype_kwargs(dtype))
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        applied = diffusion.cuda_speedups(self.pipe, self.device)  # SDPA / TORCH_COMPILE (model_kit.speedups)
        diffusion.warm_up(self.name, self._warm_up_run, diffusion.WARMUP_SHAPES[self.name], diffusion.compiled(applied))

    def _warm_up_run(self, width: int, height: int, frames: int):
        return self.pipe(prompt="warm-up", width=width, height=height, num_frames=frames, num_inference_steps=2,
                         output_type="latent")

    def run(self, request: Request) -> None:
        prompt = request.string("prompt", required=True)
        negative_prompt = request.string("negative_prompt")
        params = request.params(WanParams)
        seed = diffusion.seeds_for(params.seed, 1)[0]
        result = diffusion.run_pipeline(
            self.name,
            self.pipe,
            request,
            params.steps,
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=params.width,
            height=params.height,
            num_frames=params.num_frames,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=diffusion.generators([seed])[0],
            output_type="np",
        )
        frames = result.frames[0]  # (frames, height, width, 3) floats in [0, 1]
        if params.output == "image":
            media = {"images": strings([encode_png(frames[0])]), **diffusion.previews([frames[0]], params)}
        else:
            media = {"video": strings([encode_mp4(frames, fps=params.fps)]),
                     **diffusion.previews([frames[len(frames) // 2]], params)}
        request.send(
            {
                **media,
                "seeds": np.array([seed], dtype=np.int64),
                "num_frames": scalar(len(frames), np.int32),
                "fps": scalar(params.fps, np.int32),
            },
            final=True,
        )


def _is_original_layout(folder: Path) -> bool:
    """The original Wan release: ``Wan2.1_VAE.pth``, or DiT weights + config.json, no model_index.json."""
    if not folder.is_dir() or (folder / "model_index.json").exists():
        return False
    dit = (folder / "diffusion_pytorch_model.safetensors").exists() and (folder / "config.json").exists()
    return (folder / "Wan2.1_VAE.pth").exists() or dit


def _require_diffusers_layout(folder: Path) -> None:
    """Fail with a plain message unless ``folder`` holds the diffusers layout."""
    if (folder / "model_index.json").exists():
        return
    for candidate in (folder, models_dir() / layout.WAN_ORIGINAL):
        if _is_original_layout(candidate):
            raise FileNotFoundError(_original_layout_message(candidate, folder))
    diffusion.require_paths("wan", folder / "model_index.json")


def _original_layout_message(original: Path, configured: Path) -> str:
    """What was found and the one command that fixes it (into the configured folder, or the
    default diffusers folder when the configured path is the original release itself)."""
    target = models_dir() / layout.WAN_DIFFUSERS if configured == original else configured
    repoint = "" if target == configured else f", then set WAN_WEIGHTS={target}"
    return (
        f"wan: found the original Wan release layout at {original}, which diffusers cannot read; "
        f"it needs {DIFFUSERS_REPO.split('/')[1]}: "
        f"huggingface-cli download {DIFFUSERS_REPO} --local-dir {target}{repoint}"
    )
