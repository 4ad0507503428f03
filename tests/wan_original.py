"""A tiny Wan 2.1 checkpoint in the original release's layout (test-side only).

diffusers reads the original layout (``from_single_file``) but has no writer for it, so the key
names of the original release's transformer and VAE are produced here from a tiny diffusers model, and :func:`original_keys_round_trip` checks them against
diffusers' own converters: every original key must map back to exactly the diffusers key it
came from, or the helper fails before any test uses it.

The folder holds what the release ships: ``diffusion_pytorch_model.safetensors``,
``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth`` (here the tiny encoder's state dict, a
stand-in: the converter does not read it), ``google/umt5-xxl/`` (tokenizer) and ``config.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_TRANSFORMER = (  # diffusers → original, applied in order (inverse of diffusers' rename table)
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__swap"),
    ("norm3", "norm2"),
    ("norm__swap", "norm3"),
    ("proj_out", "head.head"),
)
_RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
             "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
             "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def transformer_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    key = re.sub(r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation", key)
    for new, old in _TRANSFORMER:
        key = key.replace(new, old)
    return key


def vae_key(key: str) -> str:
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key.replace("post_quant_conv", "conv2").replace("quant_conv", "conv1")
    side, rest = key.split(".", 1)
    fixed = {"conv_in.weight": "conv1.weight", "conv_in.bias": "conv1.bias", "norm_out.gamma": "head.0.gamma",
             "conv_out.weight": "head.2.weight", "conv_out.bias": "head.2.bias"}
    if rest in fixed:
        return f"{side}.{fixed[rest]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{side}.middle.1.{m[1]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{side}.middle.{2 * int(m[1])}.{_RESIDUAL[m[2]]}"
    if m := re.match(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{side}.downsamples.{m[1]}.{_RESIDUAL.get(m[2], m[2])}"
    if m := re.match(r"up_blocks\.(\d)\.resnets\.(\d)\.(.+)", rest):
        return f"{side}.upsamples.{4 * int(m[1]) + int(m[2])}.{_RESIDUAL[m[3]]}"
    if m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.(.+)", rest):
        return f"{side}.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise KeyError(key)


def original_keys_round_trip(state: dict[str, torch.Tensor], rename, convert) -> dict[str, torch.Tensor]:
    """``state`` under its original names; asserts diffusers' ``convert`` maps them back."""
    original = {rename(key): value for key, value in state.items()}
    back = convert({k: v for k, v in original.items()})
    assert set(back) == set(state), sorted(set(back) ^ set(state))[:10]
    for key, value in back.items():
        assert value is state[key] or torch.equal(value, state[key]), key
    return original


def tiny_vae():
    """A tiny VAE with the real one's block structure (four levels, two residual blocks each),
    which diffusers' converter expects."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                            temperal_downsample=[False, True, True])


def write_original_wan(folder: Path, pipe, vae) -> None:
    """Write ``pipe``'s transformer and text encoder, ``vae`` and the tokenizer in the original layout."""
    from diffusers.loaders.single_file_utils import (
        convert_wan_transformer_to_diffusers,
        convert_wan_vae_to_diffusers,
    )
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    transformer = original_keys_round_trip(pipe.transformer.state_dict(), transformer_key,
                                           convert_wan_transformer_to_diffusers)
    save_file({k: v.contiguous() for k, v in transformer.items()}, folder / "diffusion_pytorch_model.safetensors")
    vae_state = original_keys_round_trip(vae.state_dict(), vae_key, convert_wan_vae_to_diffusers)
    torch.save(vae_state, folder / "Wan2.1_VAE.pth")
    torch.save(pipe.text_encoder.state_dict(), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    pipe.tokenizer.save_pretrained(folder / "google" / "umt5-xxl")
    config = pipe.transformer.config
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": config.num_attention_heads * config.attention_head_dim,
        "ffn_dim": config.ffn_dim, "freq_dim": config.freq_dim, "num_heads": config.num_attention_heads,
        "num_layers": config.num_layers, "in_dim": config.in_channels, "out_dim": config.out_channels,
        "text_dim": config.text_dim, "eps": config.eps, "text_len": 512,
    }))
