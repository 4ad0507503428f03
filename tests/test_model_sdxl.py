"""The ``sdxl`` model served by a real tritonserver over the tiny random-weight checkpoint.

Random weights draw noise, so these tests check what must hold whatever the weights: sizes and
counts, seeds, determinism, that each input really changes the result, progress, cancellation,
errors naming the field, and the stub process lifecycle. The tiny checkpoint itself is checked to
be in the original single-file layout and to reload bit-identically.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from model_kit import clip_prompt, layout
from model_kit.tiny import sdxl as tiny_sdxl
from tests.diffusion_checks import (
    check_cancel_stops_early,
    check_unload_ends_stub_and_reload_works,
    error,
    load_error,
    outputs,
    png,
    preview_distance,
)
from tests.triton_helpers import Streamed, load_model, stream, unload_model

MODEL = "sdxl"
REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a red cat"
SIZE = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def url(triton) -> str:
    """The server's gRPC address with ``sdxl`` loaded (unloaded again afterwards)."""
    load_model(triton.grpc_url, MODEL)
    yield triton.grpc_url
    unload_model(triton.grpc_url, MODEL)


@pytest.fixture(scope="module")
def pipe(tiny_models_dir: Path):
    """The tiny checkpoint loaded in this process the way the model loads it."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(
        str(tiny_models_dir / layout.SDXL_CHECKPOINT),
        config=str(tiny_models_dir / layout.SDXL_CONFIG),
        local_files_only=True,
    )


def generate(url: str, prompt: str = PROMPT, steps: int = 2, cancel_after: int | None = None, **params) -> Streamed:
    """One request; ``params`` go into the JSON ``parameters`` (64x64 and seed 1 unless given).
    ``negative_prompt`` / ``reference_image`` in ``params`` are sent as inputs."""
    inputs = {
        "prompt": prompt,
        "negative_prompt": params.pop("negative_prompt", None),
        "reference_image": params.pop("reference_image", None),
        "parameters": {"seed": 1, **SIZE, "steps": steps, **params},
    }
    return stream(url, MODEL, inputs, timeout=120, cancel_after=cancel_after)


def image_bytes(url: str, **kwargs) -> list[bytes]:
    return [bytes(b) for b in outputs(generate(url, **kwargs))["images"]]


def reference_png(color: tuple[int, int, int], size: tuple[int, int] = (96, 48)) -> bytes:
    """A two-colour PNG of a different aspect ratio than the output (letterboxed by the model)."""
    image = Image.new("RGB", size, color)
    image.paste((255, 255, 255), (0, 0, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- weights and layout
def test_config_names_the_layout_paths() -> None:
    config = (REPO / "model_repository" / MODEL / "config.pbtxt").read_text()
    parameters = dict(re.findall(r'key: "(\w+)", value: \{ string_value: "([^"]+)" \}', config))
    assert parameters == layout.WEIGHTS[MODEL]
    assert "decoupled: true" in config and "KIND_CPU" not in config


def test_tiny_checkpoint_is_original_layout_and_reloads_bit_identically(tiny_models_dir: Path, pipe) -> None:
    with safe_open(str(tiny_models_dir / layout.SDXL_CHECKPOINT), "pt") as checkpoint:
        keys = set(checkpoint.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    # No diffusers names left (CLIP-L keeps its Hugging Face names in the original layout too).
    assert not any(re.search(r"down_blocks|mid_block|resnets|embedders\.1\..*q_proj", k) for k in keys)
    built = tiny_sdxl.make_pipeline()  # deterministic: the same weights the builder wrote
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, actual = getattr(built, name).state_dict(), getattr(pipe, name).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name


# ----------------------------------------------------------------------------- prompt embeddings
def test_weight_parser_reads_a1111_syntax() -> None:
    assert clip_prompt.parse_weighted("a (masterpiece:1.3), [bad] ((x)) \\(y\\) style: z") == [
        ("a ", 1.0),
        ("masterpiece", 1.3),
        (", ", 1.0),
        ("bad", pytest.approx(1 / 1.1)),
        (" ", 1.0),
        ("x", pytest.approx(1.21)),
        (" (y) style: z", 1.0),
    ]
    assert clip_prompt.with_weights("a cat,", "(best quality:1.2)") == "a cat, (best quality:1.2)"
    assert clip_prompt.with_weights("a cat", None) == "a cat"


def test_short_unweighted_prompt_embeds_exactly_like_the_pipeline(pipe) -> None:
    ours = clip_prompt.encode_sdxl(pipe, PROMPT, "blurry", "cpu")
    theirs = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry")
    for mine, reference in zip(
        (ours.prompt_embeds, ours.negative_prompt_embeds, ours.pooled_prompt_embeds, ours.negative_pooled_prompt_embeds),
        theirs,
    ):
        assert torch.equal(mine, reference)


def test_long_prompt_is_encoded_in_chunks_and_negative_padded_to_match(pipe) -> None:
    long_prompt = " ".join(["red cat"] * 50)  # 100 tokens: two chunks
    embeds = clip_prompt.encode_sdxl(pipe, long_prompt, "blurry", "cpu")
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape == (1, 2 * 77, 96)
    first_chunk = clip_prompt.encode_sdxl(pipe, " ".join(["red cat"] * 37) + " red", "blurry", "cpu")
    # Chunk one of the long prompt is the 75-token head, wrapped alike (a batch of two may round apart).
    assert torch.allclose(embeds.prompt_embeds[:, :77], first_chunk.prompt_embeds, atol=1e-6)
    assert torch.allclose(embeds.pooled_prompt_embeds, first_chunk.pooled_prompt_embeds, atol=1e-6)
    assert not torch.allclose(embeds.prompt_embeds[:, 77:], first_chunk.prompt_embeds, atol=1e-3)


# ----------------------------------------------------------------------------- generation
def test_batch_gives_pngs_of_the_requested_size_with_consecutive_seeds(url: str) -> None:
    final = outputs(generate(url, num_images=3, seed=1234, width=64, height=80, steps=3), steps=3)
    images = [png(bytes(b)) for b in final["images"]]
    assert [im.size for im in images] == [(64, 80)] * 3
    assert final["seeds"].tolist() == [1234, 1235, 1236]
    assert len({im.tobytes() for im in images}) == 3


def test_previews_are_webp_thumbnails_of_each_image_only_when_asked(url: str) -> None:
    final = outputs(generate(url, num_images=2, seed=3, width=64, height=128, preview_edge=32))
    images = [png(bytes(b)) for b in final["images"]]
    previews = [bytes(b) for b in final["previews"]]
    distances = [[preview_distance(preview, image, 32) for image in images] for preview in previews]
    assert distances[0][0] < 12 and distances[1][1] < 12, distances  # each is its own image, scaled
    assert distances[0][0] < distances[0][1] and distances[1][1] < distances[1][0], distances
    assert "previews" not in outputs(generate(url, seed=3))


def test_same_seed_same_bytes_other_seed_other_image(url: str) -> None:
    first, again, other = (image_bytes(url, seed=seed) for seed in (7, 7, 8))
    assert first == again
    assert first != other


def test_seed_zero_is_a_seed_and_null_draws_one_that_reproduces(url: str) -> None:
    zero = outputs(generate(url, seed=0))
    assert zero["seeds"].tolist() == [0]
    drawn = outputs(generate(url, seed=None, num_images=2))
    base = int(drawn["seeds"][0])
    assert drawn["seeds"].tolist() == [base, base + 1]
    assert image_bytes(url, seed=base, num_images=2) == [bytes(b) for b in drawn["images"]]


def test_negative_prompt_changes_the_image(url: str) -> None:
    assert image_bytes(url) != image_bytes(url, negative_prompt="blurry dog")


def test_long_prompt_is_not_cut_at_77_tokens(url: str, pipe) -> None:
    head = " ".join(["red cat"] * 37) + " red"  # exactly 75 tokens: all CLIP keeps
    assert len(pipe.tokenizer(head, add_special_tokens=False).input_ids) == 75
    long_prompt = head + " blue dog" * 20
    assert len(pipe.tokenizer(long_prompt, add_special_tokens=False, verbose=False).input_ids) > 77
    assert image_bytes(url, prompt=long_prompt) != image_bytes(url, prompt=head)


def test_compel_weights_take_effect(url: str) -> None:
    plain = image_bytes(url, prompt=PROMPT + ", masterpiece")
    neutral = image_bytes(url, prompt=PROMPT, compel_weights="(masterpiece:1.0)")
    weighted = image_bytes(url, prompt=PROMPT, compel_weights="(masterpiece:1.3)")
    assert neutral == plain  # appended to the prompt
    assert weighted != neutral  # and the weight changes the embedding


def test_image_to_image_uses_the_letterboxed_reference(url: str) -> None:
    # 4 scheduled steps at strength 0.5: 2 denoising steps, so 2 progress responses.
    red = outputs(generate(url, reference_image=reference_png((255, 0, 0)), strength=0.5, steps=4, num_images=2), steps=2)
    blue = outputs(generate(url, reference_image=reference_png((0, 0, 255)), strength=0.5, steps=4), steps=2)
    assert [png(bytes(b)).size for b in red["images"]] == [(64, 64)] * 2
    assert red["seeds"].tolist() == [1, 2]
    assert bytes(red["images"][0]) != bytes(blue["images"][0])
    assert bytes(red["images"][0]) not in image_bytes(url)  # not text-to-image


def test_image_to_image_runs_at_least_one_step_at_tiny_strength(url: str) -> None:
    # 3 steps at strength 0.05 would denoise int(0.15) = 0 steps: the model raises the steps.
    results = [
        generate(url, reference_image=reference_png(color), strength=0.05, steps=3, guidance_scale=1.0)
        for color in ((0, 255, 0), (0, 0, 255))
    ]
    images = [bytes(outputs(result, steps=1)["images"][0]) for result in results]
    assert png(images[0]).size == (64, 64)
    assert images[0] != images[1]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"width": 65}, "width"),
        ({"height": 60}, "height"),
        ({"steps": -1}, "steps"),
        ({"num_images": 9}, "num_images"),
        ({"strength": 0}, "strength"),
        ({"seed": -5}, "seed"),
        ({"stepz": 3}, "stepz"),
        ("not json", "parameters"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(url: str, params, field: str) -> None:
    inputs = {"prompt": PROMPT, "parameters": params}
    message = error(stream(url, MODEL, inputs, timeout=60))
    assert message.startswith(f"{field}:"), message


def test_unreadable_reference_image_is_rejected(url: str) -> None:
    assert error(generate(url, reference_image=b"not an image")).startswith("reference_image:")


def test_missing_prompt_is_rejected(url: str) -> None:
    assert "prompt" in error(stream(url, MODEL, {"parameters": {"steps": 2}}, timeout=60))


# ----------------------------------------------------------------------------- cancellation and lifecycle
def test_cancel_stops_the_request_early(url: str, triton) -> None:
    send = lambda steps, **kw: generate(url, steps=steps, num_images=2, **kw)  # noqa: E731
    check_cancel_stops_early(send, triton.log_path, MODEL)


def test_missing_weights_fail_the_load_naming_the_path(url: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    message = load_error(url, MODEL, str(missing))
    assert str(missing) in message, message
    outputs(generate(url))  # the loaded model still serves


def test_unload_ends_the_stub_and_load_works_again(url: str, triton) -> None:
    check_unload_ends_stub_and_reload_works(url, triton.process.pid, MODEL, lambda steps, **kw: generate(url, steps=steps, **kw))


def test_model_log_lines_reach_the_server_log(url: str, triton) -> None:
    # model_kit logs with the stdlib; pb_utils.Logger carries it into tritonserver's log.
    lines = triton.log_path.read_text(errors="replace").splitlines()
    assert any("model_kit: sdxl loaded on cpu" in line for line in lines), lines[-20:]


def test_warm_up_runs_each_production_shape_once_when_compiled(pipe) -> None:
    # torch.compile compiles per shape (CUDA only): the model runs each shape at load so no job
    # pays it. Here the model's own warm-up run on the tiny pipeline, at small shapes.
    import importlib.util

    from model_kit import diffusion

    spec = importlib.util.spec_from_file_location("sdxl_model", REPO / "model_repository" / MODEL / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.pipe = pipe
    shapes = []
    run = lambda w, h, n: shapes.append(tuple(model._warm_up_run(w, h, n).images.shape))  # noqa: E731
    assert diffusion.warm_up(MODEL, run, ((64, 64, 1), (64, 32, 2)), enabled=True) == [(64, 64, 1), (64, 32, 2)]
    latent = pipe.vae_scale_factor
    assert shapes == [(1, 4, 64 // latent, 64 // latent), (2, 4, 32 // latent, 64 // latent)]
    assert diffusion.warm_up(MODEL, run, ((64, 64, 1),), enabled=False) == [] and len(shapes) == 2
    assert diffusion.compiled(["unet channels-last", "unet compiled (mode default)"])
    assert not diffusion.compiled(["unet channels-last"])
    assert all(w % 8 == 0 and h % 8 == 0 for w, h, _ in diffusion.WARMUP_SHAPES["sdxl"])
    assert all(w % 16 == 0 and h % 16 == 0 and (n - 1) % 4 == 0 for w, h, n in diffusion.WARMUP_SHAPES["wan"])
