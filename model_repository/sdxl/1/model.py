"""Triton Python-backend model ``sdxl``: text-to-image, and image-to-image with a reference image.

Loads one single-file checkpoint with a local diffusers config folder (offline); the img2img
pipeline shares the text-to-image pipeline's modules, so the weights are in memory once. Prompts
are embedded by :mod:`model_kit.clip_prompt` (no 77-token cut; ``compel_weights`` applied).
"""

import io
from typing import Any

import numpy as np
from pydantic import Field

from model_kit import clip_prompt, diffusion
from model_kit.common import ParamError, Request, StreamingModel, strings, weights_path
from model_kit.media import encode_png, letterbox


class SdxlParams(diffusion.DiffusionParams):
    """The JSON ``parameters`` input (docs/ARCHITECTURE.md)."""

    size_multiple = 8

    num_images: int = Field(1, ge=1, le=8)
    width: int = Field(1024, ge=64, le=2048)
    height: int = Field(1024, ge=64, le=2048)
    strength: float = Field(0.75, gt=0.0, le=1.0)
    compel_weights: str | None = Field(None, max_length=4000)


class TritonPythonModel(StreamingModel):
    name = "sdxl"

    def load(self) -> None:
        checkpoint = weights_path(self.name, self.parameters)
        config = weights_path(self.name, self.parameters, key="config")
        diffusion.require_paths(self.name, checkpoint, config / "model_index.json")  # before the slow imports
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline  # noqa: PLC0415

        pipe = StableDiffusionXLPipeline.from_single_file(
            str(checkpoint), config=str(config), local_files_only=True, **diffusion.dtype_kwargs(self.dtype)
        )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        applied = diffusion.cuda_speedups(self.pipe, self.device)
        diffusion.warm_up(self.name, self._warm_up_run, diffusion.WARMUP_SHAPES[self.name], diffusion.compiled(applied))
        # Built from the same module objects: no second copy of the weights.
        self.img2img = StableDiffusionXLImg2ImgPipeline(
            **self.pipe.components, force_zeros_for_empty_prompt=self.pipe.config.force_zeros_for_empty_prompt
        )
        self.img2img.set_progress_bar_config(disable=True)

    def _warm_up_run(self, width: int, height: int, count: int) -> Any:
        return self.pipe(prompt="warm-up", width=width, height=height, num_images_per_prompt=count,
                         num_inference_steps=2, output_type="latent")

    def unload(self) -> None:
        self.img2img = None
        super().unload()

    def run(self, request: Request) -> None:
        prompt = request.string("prompt", required=True)
        negative_prompt = request.string("negative_prompt")
        params = request.params(SdxlParams)
        reference = request.bytes("reference_image")
        init_image = _reference_image(reference, params.width, params.height) if reference else None
        seeds = diffusion.seeds_for(params.seed, params.num_images)
        embeds = clip_prompt.encode_sdxl(
            self.pipe, clip_prompt.with_weights(prompt, params.compel_weights), negative_prompt, self.device
        )
        common = dict(
            **embeds.as_kwargs(),
            num_images_per_prompt=params.num_images,
            guidance_scale=params.guidance_scale,
            generator=diffusion.generators(seeds),
            output_type="pil",
        )
        if init_image is None:
            result = diffusion.run_pipeline(
                self.name, self.pipe, request, params.steps,
                width=params.width, height=params.height, num_inference_steps=params.steps, **common,
            )  # fmt: skip
        else:
            steps, denoise_steps = _img2img_steps(params.steps, params.strength)
            result = diffusion.run_pipeline(
                self.name, self.img2img, request, denoise_steps,
                image=init_image, strength=params.strength, num_inference_steps=steps, **common,
            )  # fmt: skip
        pngs = strings([encode_png(image) for image in result.images])
        request.send({"images": pngs, "seeds": np.array(seeds, dtype=np.int64),
                      **diffusion.previews(result.images, params)}, final=True)


def _reference_image(data: bytes, width: int, height: int):
    """The reference image decoded and letterboxed to the output size."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ParamError(f"reference_image: not a readable image ({exc})") from None
    return letterbox(image, width, height)


def _img2img_steps(steps: int, strength: float) -> tuple[int, int]:
    """Scheduler steps (raised if needed) and the denoising steps img2img then runs: at least one.

    diffusers runs ``min(int(steps * strength), steps)`` of ``steps`` scheduled steps.
    """
    while int(steps * strength) < 1:
        steps += 1
    return steps, min(int(steps * strength), steps)
