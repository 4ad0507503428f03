"""The four models at their real architecture sizes, with random weights, for benchmarks.

``build(model, root)`` writes a model where production looks for it (``model_kit.layout`` paths
under ``root``), in the production formats: SDXL as one original-layout single-file checkpoint plus
its config folder, WAN 2.1 T2V 1.3B in the diffusers layout, Qwen 2.5-7B as a Hugging Face cache
folder. Sizes and shapes are the real ones (SDXL base UNet / VAE / CLIP-L / OpenCLIP bigG; WAN 2.1
1.3B transformer / VAE / UMT5-XXL; Qwen 2.5-7B), so load time, memory and per-step cost are
realistic; the weights are random and the tokenizers are the tiny builders' (small vocabularies
whose ids fit the real embedding tables), so outputs are noise.

Weights are made directly on ``device`` in the dtype the model serves in (cuda: minutes; CPU:
tens of GB of RAM and a long wait). A marker per model makes a second call cheap.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from model_kit import layout

VERSION = 1
SEED = 0
MODELS = ("sdxl", "wan", "qwen_instruct", "qwen_base")

# ----------------------------------------------------------------------------- architectures
# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json, text_encoder*/config.json.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77)

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: transformer/config.json; the VAE is AutoencoderKLWan's defaults;
# the text encoder is google/umt5-xxl's encoder.
WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# Qwen/Qwen2.5-7B(-Instruct): config.json (the base model's context is 131072, the instruct's 32768).
QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=False,
    use_sliding_window=False,
)
QWEN_CONTEXT = {"qwen_instruct": 32768, "qwen_base": 131072}


# ----------------------------------------------------------------------------- helpers
@contextmanager
def _making(device: str, dtype: Any) -> Iterator[None]:
    """Modules created inside are allocated on ``device`` in ``dtype`` (no fp32 CPU detour)."""
    import torch  # noqa: PLC0415

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(SEED)
            yield
    finally:
        torch.set_default_dtype(previous)


def default_device() -> str:
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- builders
def sdxl_pipeline(device: str) -> Any:
    """The SDXL base architecture in fp16 with random weights (``device="meta"``: shapes only)."""
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    from model_kit.tiny import sdxl as tiny_sdxl  # noqa: PLC0415

    tokenizer, tokenizer_2 = tiny_sdxl._tokenizers()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with _making(device, torch.float16):
        modules = dict(
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_COMMON, **CLIP_L, **ids)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_COMMON, **CLIP_BIG_G, **ids)),
            unet=UNet2DConditionModel(**SDXL_UNET),
        )
    return StableDiffusionXLPipeline(
        **modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=tiny_sdxl._scheduler()
    )


def sdxl_original_state_dict(pipe: Any) -> dict[str, Any]:
    """The pipeline's weights under the original single-file names (tiny builder's converter)."""
    from model_kit.tiny import sdxl as tiny_sdxl  # noqa: PLC0415

    # The converter reads the UNet's layers per block from its module constant (1, tiny); the
    # real UNet has 2. Set it for the call until the converter takes it from the UNet's config.
    saved = tiny_sdxl.LAYERS_PER_BLOCK
    tiny_sdxl.LAYERS_PER_BLOCK = pipe.unet.config.layers_per_block
    try:
        return tiny_sdxl.to_original_state_dict(pipe)
    finally:
        tiny_sdxl.LAYERS_PER_BLOCK = saved


def _build_sdxl(root: Path, device: str) -> None:
    """Original-layout fp16 single-file checkpoint + the local config folder it loads with."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from model_kit.tiny import sdxl as tiny_sdxl  # noqa: PLC0415

    pipe = sdxl_pipeline(device)
    tiny_sdxl._write_config_folder(pipe, root / layout.SDXL_CONFIG)
    checkpoint = root / layout.SDXL_CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in sdxl_original_state_dict(pipe).items()}, str(checkpoint))


def wan_pipeline(device: str) -> Any:
    """WAN 2.1 T2V 1.3B: bf16 transformer and UMT5-XXL encoder, fp32 VAE (as the release ships)."""
    import torch  # noqa: PLC0415
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel  # noqa: PLC0415
    from transformers import UMT5Config, UMT5EncoderModel  # noqa: PLC0415

    from model_kit.tiny import wan as tiny_wan  # noqa: PLC0415

    with _making(device, torch.bfloat16):
        transformer = WanTransformer3DModel(**WAN_TRANSFORMER)
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    with _making(device, torch.float32):
        vae = AutoencoderKLWan()
    return WanPipeline(
        tokenizer=tiny_wan._tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=tiny_wan._scheduler(),
    )


def _build_wan(root: Path, device: str) -> None:
    """The diffusers layout (``Wan2.1-T2V-1.3B-Diffusers``)."""
    wan_pipeline(device).save_pretrained(root / layout.WAN_DIFFUSERS, safe_serialization=True)


def qwen_architecture(model: str) -> dict:
    """``Qwen2Config`` fields of Qwen 2.5-7B (base or instruct: they differ in context only)."""
    return {**QWEN25_7B, "max_position_embeddings": QWEN_CONTEXT[model]}


def _qwen_builder(model: str) -> Callable[[Path, str], None]:
    def _build(root: Path, device: str) -> None:
        """Hugging Face cache folder, bf16 weights, Qwen 2.5-7B shapes, the tiny tokenizer."""
        import torch  # noqa: PLC0415

        from model_kit.tiny import qwen as tiny_qwen  # noqa: PLC0415

        eos = tiny_qwen.INSTRUCT_EOS if model == "qwen_instruct" else tiny_qwen.BASE_EOS
        with _making(device, torch.bfloat16):
            tiny_qwen.write_cache_folder(
                root / layout.WEIGHTS[model]["weights"],
                f"{model}-fullsize",
                tiny_qwen.train_tokenizer(),
                eos,
                qwen_architecture(model),
            )

    return _build


_BUILDERS: dict[str, Callable[[Path, str], None]] = {
    "sdxl": _build_sdxl,
    "wan": _build_wan,
    "qwen_instruct": _qwen_builder("qwen_instruct"),
    "qwen_base": _qwen_builder("qwen_base"),
}


def build(model: str, root: Path, device: str | None = None, force: bool = False) -> Path:
    """Write ``model`` at full size under ``root`` (skipped when already built); return ``root``."""
    root = Path(root)
    marker = root / ".fullsize" / f"{model}.json"
    if marker.exists() and not force and json.loads(marker.read_text()).get("version") == VERSION:
        return root
    _BUILDERS[model](root, device or default_device())
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"version": VERSION}))
    _free_memory()
    return root


def _free_memory() -> None:
    import gc  # noqa: PLC0415

    import torch  # noqa: PLC0415

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
