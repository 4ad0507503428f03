"""The full-size benchmark builders have the real architectures (checked on torch's meta device:
shapes without memory), and the SDXL single-file names convert back with diffusers' own code."""

from __future__ import annotations

import pytest

from model_kit import fullsize


def _billions(module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e9, 3)


@pytest.fixture(scope="module")
def sdxl():
    return fullsize.sdxl_pipeline("meta")


def test_sdxl_components_have_the_published_sizes(sdxl) -> None:
    assert _billions(sdxl.unet) == 2.567
    assert _billions(sdxl.vae) == 0.084
    assert _billions(sdxl.text_encoder) == 0.123
    assert _billions(sdxl.text_encoder_2) == 0.695


def test_sdxl_single_file_names_convert_back_to_every_weight(sdxl) -> None:
    from diffusers.loaders import single_file_utils as sfu

    original = fullsize.sdxl_original_state_dict(sdxl)
    checks = {
        "unet": sfu.convert_ldm_unet_checkpoint(original, dict(sdxl.unet.config)),
        "vae": sfu.convert_ldm_vae_checkpoint(original, dict(sdxl.vae.config)),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(original, remove_prefix="conditioner.embedders.0.transformer."),
        "text_encoder_2": sfu.convert_open_clip_checkpoint(sdxl.text_encoder_2, original, prefix="conditioner.embedders.1.model."),
    }
    for name, converted in checks.items():
        expected = _shapes(getattr(sdxl, name).state_dict())
        assert _shapes(converted) == expected, name


def _shapes(state: dict) -> dict[str, tuple]:
    """Names and shapes; CLIP names without the ``text_model.`` level (transformers 5 drops it
    from the module tree and maps old names on load) and without the position-id buffer."""
    return {
        key.removeprefix("text_model."): tuple(value.shape)
        for key, value in state.items()
        if not key.endswith("position_ids")
    }


def test_wan_components_have_the_published_sizes() -> None:
    pipe = fullsize.wan_pipeline("meta")
    assert _billions(pipe.transformer) == 1.419
    assert _billions(pipe.vae) == 0.127
    assert _billions(pipe.text_encoder) == 5.681


@pytest.mark.parametrize("model", ["qwen_instruct", "qwen_base"])
def test_qwen_has_the_qwen25_7b_shape(model: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        llm = Qwen2ForCausalLM(Qwen2Config(**fullsize.qwen_architecture(model)))
    assert _billions(llm) == 7.616
    assert llm.config.max_position_embeddings == fullsize.QWEN_CONTEXT[model]
