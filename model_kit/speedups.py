"""Speed-up switches of the diffusion models (``sdxl``, ``wan``), read in the model process.

The bridge's settings (``bridge/settings.py``, "Speed-ups" block) are passed to tritonserver's
environment by ``bridge.launcher`` and so reach each model stub as environment variables:

``CHANNELS_LAST`` (default on)
    The SDXL UNet in channels-last (NHWC) memory format: cuDNN's tensor-core convolutions take
    NHWC natively, so the UNet's convolutions skip layout transposes. Numerically the same.
    (WAN's denoiser is a transformer: nothing to change there.)
``SDPA`` (default on)
    PyTorch's fused ``scaled_dot_product_attention`` (flash / memory-efficient kernels): diffusers'
    default processor (``AttnProcessor2_0``; WAN's dispatcher backend ``native``). Off switches to
    the classic unfused attention for comparison: SDXL's UNet gets ``AttnProcessor`` (baddbmm +
    softmax + bmm, the attention matrix materialised), WAN's transformer SDPA's ``_native_math``
    backend (the same unfused computation). Off costs time and, for long videos, tens of GB.
``FP16_VAE`` (default off)
    The SDXL VAE's precision. The released SDXL VAE overflows in float16 (activations in its
    decoder exceed 65504: NaN/black images), which is why diffusers marks it ``force_upcast``. Off
    (the default): the VAE is kept in float32 on the GPU (about 170 MB more than fp16) and its
    inputs are cast to float32, so no per-request up/down casts of its weights are needed and
    img2img's encode and the decode both run in float32. On: the VAE runs in float16 (faster,
    half the activation memory) -- only safe with an fp16-fixed VAE (e.g.
    ``madebyollin/sdxl-vae-fp16-fix`` baked into the checkpoint). WAN's VAE stays float32 always,
    as the Wan authors recommend.
``TORCH_COMPILE`` (default ``off``)
    ``full``: ``torch.compile`` the denoiser (SDXL UNet / WAN transformer) in place with
    ``TORCH_COMPILE_MODE`` (default ``default``; ``max-autotune-no-cudagraphs`` tunes kernels
    further at a much longer first request). ``regional``: compile only the repeated blocks
    (diffusers' ``compile_repeated_blocks``: the WAN transformer blocks, SDXL's transformer
    blocks), a far shorter compile. Compilation happens on the first request of each new shape
    (size, batch), which takes minutes: so the model runs each production shape once at load
    (``model_kit.diffusion.WARMUP_SHAPES``, two steps each) and no job pays it; the load takes that
    much longer. ``1``/``true`` mean ``full``.

Everything here applies on CUDA only; on CPU the models run exactly as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("model_kit")

COMPILE_CHOICES = ("off", "full", "regional")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    """An on/off environment value; an unknown word is an error naming the variable."""
    if value is None:
        return default
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False if word else default
    raise ValueError(f"{name}: expected 1/0, true/false, yes/no or on/off, got {value!r}")


def parse_compile(value: str | None) -> str:
    """``TORCH_COMPILE``: ``off``/``full``/``regional`` (``1``/``true`` = ``full``, ``0`` = ``off``)."""
    word = (value or "off").strip().lower()
    if word in COMPILE_CHOICES:
        return word
    if word in _TRUE:
        return "full"
    if word in _FALSE:
        return "off"
    raise ValueError(f"TORCH_COMPILE: expected one of {', '.join(COMPILE_CHOICES)} (or 1/0), got {value!r}")


@dataclass(frozen=True)
class Speedups:
    """The switches; :meth:`from_env` reads them as the model process sees them."""

    channels_last: bool = True
    sdpa: bool = True
    fp16_vae: bool = False
    torch_compile: str = "off"
    compile_mode: str = "default"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Speedups:
        env = os.environ if env is None else env
        mode = (env.get("TORCH_COMPILE_MODE") or "default").strip().lower()
        if mode not in COMPILE_MODES:
            raise ValueError(f"TORCH_COMPILE_MODE: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        return cls(
            channels_last=parse_bool("CHANNELS_LAST", env.get("CHANNELS_LAST"), True),
            sdpa=parse_bool("SDPA", env.get("SDPA"), True),
            fp16_vae=parse_bool("FP16_VAE", env.get("FP16_VAE"), False),
            torch_compile=parse_compile(env.get("TORCH_COMPILE")),
            compile_mode=mode,
        )


def apply(pipe: Any, device: str, speedups: Speedups | None = None) -> list[str]:
    """Apply the switches to a loaded diffusers pipeline on ``device``; return what was done.

    On a non-CUDA device nothing is changed (and nothing is returned).
    """
    if device != "cuda":
        return []
    speedups = speedups or Speedups.from_env()
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    done: list[str] = []
    if unet is not None and speedups.channels_last:
        import torch  # noqa: PLC0415

        unet.to(memory_format=torch.channels_last)
        done.append("unet channels-last")
    if not speedups.sdpa:
        done += _classic_attention(unet, transformer)
    if unet is not None:  # SDXL: WAN's VAE is float32 by construction (see the WAN model)
        done.append(_sdxl_vae_precision(pipe.vae, speedups.fp16_vae))
    if speedups.torch_compile != "off":
        denoiser = unet if unet is not None else transformer
        if denoiser is not None:
            done.append(_compile(denoiser, speedups.torch_compile, speedups.compile_mode))
    log.info("speed-ups on %s: %s", type(pipe).__name__, ", ".join(done) or "none")
    return done


def _classic_attention(unet: Any, transformer: Any) -> list[str]:
    """Unfused attention in place of SDPA (a comparison setting)."""
    done = []
    if unet is not None:
        from diffusers.models.attention_processor import AttnProcessor  # noqa: PLC0415

        unet.set_attn_processor(AttnProcessor())
        done.append("unet classic attention (AttnProcessor)")
    if transformer is not None:
        if hasattr(transformer, "set_attention_backend"):
            try:
                transformer.set_attention_backend("_native_math")
                done.append("transformer attention backend _native_math")
            except Exception as exc:  # noqa: BLE001 - an older diffusers; a comparison setting must not fail a load
                done.append(f"transformer attention unchanged ({exc})")
        else:
            done.append("transformer attention unchanged (no set_attention_backend in this diffusers)")
    return done


def _sdxl_vae_precision(vae: Any, fp16: bool) -> str:
    """The SDXL VAE in float16 (``FP16_VAE=1``) or kept in float32 with float32 inputs (default).

    ``force_upcast`` is cleared either way: in float32 there is nothing to upcast, and in float16
    the caller asked for float16. (Left set, the pipelines would cast the weights to float32 and
    back around every decode, and img2img would leave them in float16.)
    """
    import torch  # noqa: PLC0415

    dtype = torch.float16 if fp16 else torch.float32
    vae.to(dtype=dtype)
    vae.register_to_config(force_upcast=False)
    if not fp16:
        # The UNet's float16 latents (and img2img's float16 image) enter a float32 VAE.
        for name in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
            module = getattr(vae, name, None)
            if module is not None:
                module.register_forward_pre_hook(_cast_inputs(dtype))
    return f"vae {'float16' if fp16 else 'float32'}"


def _cast_inputs(dtype: Any):
    import torch  # noqa: PLC0415

    def hook(module: Any, args: tuple) -> tuple:
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != dtype else a
                     for a in args)

    return hook


def _compile(module: Any, how: str, mode: str) -> str:
    """``torch.compile`` ``module`` in place (its type, config and attributes stay)."""
    name = type(module).__name__
    if how == "regional":
        if getattr(module, "_repeated_blocks", None) and hasattr(module, "compile_repeated_blocks"):
            module.compile_repeated_blocks(mode=mode)
            return f"{name} repeated blocks compiled (mode {mode})"
        log.warning("%s has no repeated blocks to compile in this diffusers; compiling it whole", name)
    module.compile(mode=mode)
    return f"{name} compiled (mode {mode})"
