"""A tiny random-weight Wan 2.1 text-to-video model in the diffusers layout.

Writes ``layout.WAN_DIFFUSERS`` the way ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` is laid out: a tiny
``WanTransformer3DModel``, ``AutoencoderKLWan``, ``UMT5EncoderModel`` with a T5-style (Unigram)
tokenizer whose vocabulary is written here (no hub access), and the UniPC flow-matching scheduler
that release uses, saved with ``WanPipeline.save_pretrained``.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from model_kit import layout

SEED = 0
TEXT_DIM = 32
_WORDS = ("the", "a", "of", "and", "cat", "dog", "city", "night", "walks", "video", "red", "blue", "camera")


def _tokenizer():
    """A T5-style Unigram tokenizer: specials, characters (word-initial and inner), a few words."""
    from transformers import T5Tokenizer  # noqa: PLC0415

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(f"▁{c}", -5.0) for c in chars] + [(c, -6.0) for c in chars]
    pieces += [(f"▁{w}", -2.0) for w in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel  # noqa: PLC0415

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config)


def _transformer():
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,  # 41 latent frames: the 161 frames the job table allows
    )


def _vae():
    from diffusers import AutoencoderKLWan  # noqa: PLC0415

    # Same spatial (8x) and temporal (4x) compression as the real VAE, a fraction of its width.
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def _scheduler():
    from diffusers import UniPCMultistepScheduler  # noqa: PLC0415

    # The scheduler Wan2.1-T2V-1.3B-Diffusers ships (flow matching, shift 3.0).
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
        solver_order=2,
    )


def make_pipeline():
    """The tiny WAN pipeline in memory (deterministic: fixed torch seed)."""
    from diffusers import WanPipeline  # noqa: PLC0415

    torch.manual_seed(SEED)
    tokenizer = _tokenizer()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(len(tokenizer)),
        vae=_vae(),
        transformer=_transformer(),
        scheduler=_scheduler(),
    )


def build(root: Path) -> None:
    """Write the tiny diffusers-layout WAN folder under ``root``."""
    make_pipeline().save_pretrained(Path(root) / layout.WAN_DIFFUSERS, safe_serialization=True)
