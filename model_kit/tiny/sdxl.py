"""A tiny random-weight SDXL, written the way production ships it.

Production loads one single-file checkpoint (original Stability key layout, ``layout.SDXL_CHECKPOINT``)
together with a local diffusers config folder (``layout.SDXL_CONFIG``). This builder writes both:

* the config folder: ``model_index.json``, each component's config, and two CLIP tokenizers made
  from a small byte-level vocabulary written here (no hub access);
* the checkpoint: the in-memory pipeline's weights converted from diffusers names to the original
  names (``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.{0,1}.*``).
  diffusers ships only the original → diffusers direction; :func:`to_original_state_dict` is the
  reverse of it.

After writing, :func:`build` reloads the pair with ``StableDiffusionXLPipeline.from_single_file``
and checks every tensor is bit-identical to the in-memory pipeline.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from model_kit import layout

SEED = 0
LAYERS_PER_BLOCK = 1
TEXT_HIDDEN = (32, 64)  # the two encoders must differ, or diffusers cannot tell them apart
PROJECTION_DIM = 32
TIME_EMBED_DIM = 8
# A few merged words, so the tokenizer is a real BPE and not only characters.
_MERGED_WORDS = ("the", "a", "of", "cat", "dog", "photo", "best", "quality", "masterpiece", "red", "blue")


# ----------------------------------------------------------------------------- tokenizers
def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values (GPT-2 / CLIP)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary: specials, every byte char alone and word-final, a few merged words."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = _byte_chars()
    for suffix in ("", "</w>"):
        for char in chars:
            vocab.setdefault(char + suffix, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _MERGED_WORDS:
        current = word[0]
        for index, char in enumerate(word[1:], start=1):
            piece = char + ("</w>" if index == len(word) - 1 else "")
            if (current, piece) not in merges:
                merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    return vocab, merges


def _tokenizers():
    from transformers import CLIPTokenizer  # noqa: PLC0415

    vocab, merges = _vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    # SDXL's second tokenizer pads with "!" instead of <|endoftext|>.
    tokenizer_2 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token="!")
    return tokenizer, tokenizer_2


# ----------------------------------------------------------------------------- components
def _text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    def config(hidden: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=1000,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=PROJECTION_DIM,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )

    return CLIPTextModel(config(TEXT_HIDDEN[0], "quick_gelu")), CLIPTextModelWithProjection(config(TEXT_HIDDEN[1], "gelu"))


def _unet():
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=LAYERS_PER_BLOCK,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=sum(TEXT_HIDDEN),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )


def _vae():
    from diffusers import AutoencoderKL  # noqa: PLC0415

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler  # noqa: PLC0415

    # stabilityai/stable-diffusion-xl-base-1.0's scheduler settings.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
        use_karras_sigmas=False,
    )


def make_pipeline():
    """The tiny SDXL pipeline in memory (deterministic: fixed torch seed)."""
    from diffusers import StableDiffusionXLPipeline  # noqa: PLC0415

    torch.manual_seed(SEED)
    text_encoder, text_encoder_2 = _text_encoders()
    tokenizer, tokenizer_2 = _tokenizers()
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(),
        scheduler=_scheduler(),
    )


# ----------------------------------------------------------------------------- diffusers → original keys
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_FIXED = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _split(key: str, table: dict[str, str]) -> str:
    """Rename the leading module path of ``key`` (``<module>.<param>``) by ``table``; unknown → as is."""
    module, _, param = key.rpartition(".")
    return f"{table.get(module, module)}.{param}"


def _unet_key(key: str, layers_per_block: int, up_attention_blocks: set[int]) -> str:
    """One UNet parameter name, diffusers → original (``model.diffusion_model.`` not included).

    The original numbers ``input_blocks`` (conv_in, then per down block its layers and its
    downsampler) and ``output_blocks`` (per up block its layers + 1, the last holding the upsampler)
    consecutively.
    """
    per_block = layers_per_block + 1
    module = key.rpartition(".")[0]
    if module in _UNET_FIXED:
        return _split(key, _UNET_FIXED)
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = 1 + block * per_block + layer
        return f"input_blocks.{index}.0.{_split(rest, _UNET_RESNET)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{1 + int(match[1]) * per_block + layers_per_block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_split(match[2], _UNET_RESNET)}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * per_block + layer
        return f"output_blocks.{index}.0.{_split(rest, _UNET_RESNET)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        block = int(match[1])
        slot = 2 if block in up_attention_blocks else 1
        return f"output_blocks.{block * per_block + layers_per_block}.{slot}.conv.{match[2]}"
    raise KeyError(f"no original name for UNet parameter {key}")


def _vae_key(key: str, num_up_blocks: int) -> str:
    """One VAE parameter name, diffusers → original (``first_stage_model.`` not included)."""
    module = key.rpartition(".")[0]
    if module in _VAE_FIXED:
        return _split(key, _VAE_FIXED)
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block = num_up_blocks - 1 - int(match[1])  # the original counts decoder blocks bottom-up
        return f"decoder.up.{block}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{match[1]}.mid.attn_1.{_split(match[2], _VAE_ATTENTION)}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _vae_tensor(original_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The original VAE attention uses 1x1 convolutions where diffusers uses linear layers."""
    if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key) and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def _clip_l_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L keeps Hugging Face names under ``conditioner.embedders.0.transformer.text_model.``."""
    prefix = "conditioner.embedders.0.transformer."
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items() if not k.endswith("position_ids")}


def _open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP-G uses open_clip names (fused q/k/v ``in_proj``, transposed ``text_projection``)."""
    prefix = "conditioner.embedders.1.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _OPENCLIP_FIXED:
            out[prefix + _OPENCLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif match := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            layer, param = match[1], match[2]
            parts = [state[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(parts, dim=0)
        elif re.fullmatch(r"text_model\.encoder\.layers\.\d+\.self_attn\.[kv]_proj\.\w+", key) or key.endswith("position_ids"):
            continue  # fused into in_proj above
        elif match := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            out[f"{prefix}transformer.resblocks.{match[1]}.{_split(match[2], _OPENCLIP_LAYER)}"] = value
        else:
            raise KeyError(f"no original name for OpenCLIP parameter {key}")
    return out


def to_original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """All weights of an SDXL pipeline under the original single-file checkpoint names."""
    unet = pipe.unet.config
    up_attention_blocks = {i for i, kind in enumerate(unet.up_block_types) if "CrossAttn" in kind}
    state = {
        f"model.diffusion_model.{_unet_key(k, unet.layers_per_block, up_attention_blocks)}": v
        for k, v in pipe.unet.state_dict().items()
    }
    num_up = len(pipe.vae.config.up_block_types)
    for key, value in pipe.vae.state_dict().items():
        original = _vae_key(key, num_up)
        state[f"first_stage_model.{original}"] = _vae_tensor(original, value)
    state.update(_clip_l_state(pipe.text_encoder.state_dict()))
    state.update(_open_clip_state(pipe.text_encoder_2.state_dict()))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


# ----------------------------------------------------------------------------- writing
def _write_config_folder(pipe, folder: Path) -> None:
    """model_index.json, component configs and tokenizers: what ``from_single_file(config=...)`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(folder / name)
    for name in ("tokenizer", "tokenizer_2"):
        getattr(pipe, name).save_pretrained(folder / name)


def _verify_roundtrip(pipe, checkpoint: Path, config: Path) -> None:
    """Reload the pair offline and require every tensor to equal the in-memory pipeline's."""
    from diffusers import StableDiffusionXLPipeline  # noqa: PLC0415

    loaded = StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(config), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, actual = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        if expected.keys() != actual.keys():
            raise RuntimeError(f"tiny sdxl {name}: reloaded keys differ: {sorted(expected.keys() ^ actual.keys())[:5]}")
        for key, value in expected.items():
            if not torch.equal(value, actual[key]):
                raise RuntimeError(f"tiny sdxl {name}: {key} differs after from_single_file")


def build(root: Path) -> None:
    """Write the tiny single-file checkpoint and its config folder under ``root``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    pipe = make_pipeline()
    checkpoint, config = Path(root) / layout.SDXL_CHECKPOINT, Path(root) / layout.SDXL_CONFIG
    _write_config_folder(pipe, config)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_original_state_dict(pipe), str(checkpoint))
    _verify_roundtrip(pipe, checkpoint, config)
