"""The ``wan`` model served by a real tritonserver over the tiny random-weight diffusers folder.

Random weights draw noise, so these tests check what must hold whatever the weights: the MP4
decodes to the requested frames and size, image output is one PNG, seeds and determinism,
progress, cancellation, errors naming the field, the original-layout message, and the stub
process lifecycle.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_kit import layout
from tests.job_outputs import decode_mp4
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

MODEL = "wan"
REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red cat walks through the city at night"


@pytest.fixture(scope="module")
def url(triton) -> str:
    """The server's gRPC address with ``wan`` loaded (unloaded again afterwards)."""
    load_model(triton.grpc_url, MODEL)
    yield triton.grpc_url
    unload_model(triton.grpc_url, MODEL)


def generate(url: str, prompt: str = PROMPT, steps: int = 2, cancel_after: int | None = None, **params) -> Streamed:
    """One request; ``params`` go into the JSON ``parameters`` (32x32, 5 frames, seed 1 unless given)."""
    defaults = {"seed": 1, "width": 32, "height": 32, "steps": steps}
    if params.get("output") != "image":
        defaults["num_frames"] = 5
    inputs = {
        "prompt": prompt,
        "negative_prompt": params.pop("negative_prompt", None),
        "parameters": {**defaults, **params},
    }
    return stream(url, MODEL, inputs, timeout=120, cancel_after=cancel_after)


def frames(final: dict) -> list[np.ndarray]:
    return decode_mp4(bytes(final["video"][0]))


# ----------------------------------------------------------------------------- layout
def test_config_names_the_layout_path() -> None:
    config = (REPO / "model_repository" / MODEL / "config.pbtxt").read_text()
    parameters = dict(re.findall(r'key: "(\w+)", value: \{ string_value: "([^"]+)" \}', config))
    assert parameters == layout.WEIGHTS[MODEL]
    assert "decoupled: true" in config and "KIND_CPU" not in config


# ----------------------------------------------------------------------------- generation
def test_video_is_an_mp4_of_the_requested_frames_size_and_fps(url: str) -> None:
    final = outputs(generate(url, num_frames=9, width=48, height=32, fps=12, seed=42, steps=3), steps=3)
    assert set(final) == {"video", "seeds", "num_frames", "fps"}
    video = frames(final)
    assert len(video) == 9
    assert video[0].shape == (32, 48, 3)
    assert final["num_frames"].tolist() == [9]
    assert final["fps"].tolist() == [12]
    assert final["seeds"].tolist() == [42]


def test_previews_are_the_middle_frame_or_the_image_as_webp(url: str) -> None:
    video = outputs(generate(url, num_frames=9, width=48, height=32, preview_edge=24))
    [preview] = [bytes(b) for b in video["previews"]]
    middle = Image.fromarray(frames(video)[4])
    assert preview_distance(preview, middle, 24) < 12
    image = outputs(generate(url, output="image", width=48, height=32, preview_edge=64))
    assert preview_distance(bytes(image["previews"][0]), png(bytes(image["images"][0])), 64) < 12  # never upscaled


def test_the_longest_video_the_job_table_allows(url: str) -> None:
    """161 frames (41 latent frames): the most WAN_VIDEO_LIMITS accepts must also run."""
    final = outputs(generate(url, num_frames=161, width=32, height=32, steps=1), steps=1)
    assert len(frames(final)) == 161 and final["num_frames"].tolist() == [161]


def test_image_output_is_one_png(url: str) -> None:
    final = outputs(generate(url, output="image", width=48, height=32), steps=2)
    assert set(final) == {"images", "seeds", "num_frames", "fps"}
    assert len(final["images"]) == 1
    assert png(bytes(final["images"][0])).size == (48, 32)
    assert final["num_frames"].tolist() == [1]


def test_same_seed_same_result_other_seed_other_result(url: str) -> None:
    first, again, other = (bytes(outputs(generate(url, output="image", seed=s))["images"][0]) for s in (7, 7, 8))
    assert first == again
    assert first != other
    video, video_again = (frames(outputs(generate(url, seed=7))) for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(video, video_again, strict=True))


def test_null_seed_draws_one_that_reproduces(url: str) -> None:
    drawn = outputs(generate(url, output="image", seed=None))
    seed = int(drawn["seeds"][0])
    assert bytes(outputs(generate(url, output="image", seed=seed))["images"][0]) == bytes(drawn["images"][0])


def test_prompt_and_negative_prompt_change_the_result(url: str) -> None:
    def image(**kwargs) -> bytes:
        return bytes(outputs(generate(url, output="image", **kwargs))["images"][0])

    base = image()
    assert image(prompt="a blue dog") != base
    assert image(negative_prompt="blurry") != base


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"num_frames": 6}, "num_frames"),
        ({"width": 40}, "width"),
        ({"height": 24}, "height"),
        ({"steps": -1}, "steps"),
        ({"output": "gif"}, "output"),
        ({"fps": 0}, "fps"),
        ({"output": "image", "num_frames": 5}, "num_frames"),
        ("not json", "parameters"),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(url: str, params, field: str) -> None:
    message = error(stream(url, MODEL, {"prompt": PROMPT, "parameters": params}, timeout=60))
    assert re.match(rf"(parameters: Value error, )?{field}:", message), message


# ----------------------------------------------------------------------------- cancellation and lifecycle
def test_cancel_stops_the_request_early(url: str, triton) -> None:
    send = lambda steps, **kw: generate(url, steps=steps, **kw)  # noqa: E731
    check_cancel_stops_early(send, triton.log_path, MODEL)


def test_original_release_layout_is_named_with_the_way_out(url: str, tmp_path: Path) -> None:
    original = tmp_path / layout.WAN_ORIGINAL
    original.mkdir()
    for name in ("Wan2.1_VAE.pth", "diffusion_pytorch_model.safetensors", "config.json"):
        (original / name).write_bytes(b"")
    message = load_error(url, MODEL, str(original))
    assert f"original Wan release layout at {original}" in message, message
    assert "Wan2.1-T2V-1.3B-Diffusers" in message and "huggingface-cli download" in message


def test_missing_weights_fail_the_load_naming_the_path(url: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    message = load_error(url, MODEL, str(missing))
    assert str(missing / "model_index.json") in message, message
    outputs(generate(url))  # the loaded model still serves


def test_unload_ends_the_stub_and_load_works_again(url: str, triton) -> None:
    check_unload_ends_stub_and_reload_works(url, triton.process.pid, MODEL, lambda steps, **kw: generate(url, steps=steps, **kw))
