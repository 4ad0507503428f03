"""bridge.jobs: the job-type table, payload parsing and resolution (pure, no I/O)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.jobs import (
    JOB_TYPES,
    QUEUES,
    SDXL_NEGATIVE_PROMPT,
    DeadLetter,
    InvalidJob,
    Job,
    JobType,
    parse_job,
    peek_id,
)

# docs/APP_CONTRACT.md §3, written out independently of the table under test:
# type: (model, queue, output, width, height, steps, guidance, frames, fps, enhance)
CONTRACT_DEFAULTS = {
    "sdxl_image_fast": ("sdxl", "sdxl_queue", "image", 1024, 1024, 15, 6.0, None, None, False),
    "sdxl_image_high": ("sdxl", "sdxl_queue", "image", 1024, 1024, 25, 7.5, None, None, False),
    "image_fast": ("wan", "wan_queue", "image", 480, 832, 25, 6.5, 1, None, False),
    "image_high": ("wan", "wan_queue", "image", 480, 832, 50, 7.5, 1, None, False),
    "video_fast": ("wan", "wan_queue", "video", 480, 832, 25, 6.5, 81, 16, False),
    "video_high": ("wan", "wan_queue", "video", 480, 832, 50, 7.5, 81, 16, False),
    "image7b_fast_enhanced": ("wan", "wan_queue", "image", 480, 832, 25, 6.5, 1, None, True),
    "image7b_high_enhanced": ("wan", "wan_queue", "image", 480, 832, 50, 7.5, 1, None, True),
    "video7b_fast_enhanced": ("wan", "wan_queue", "video", 480, 832, 25, 6.5, 81, 16, True),
    "video7b_high_enhanced": ("wan", "wan_queue", "video", 480, 832, 50, 7.5, 81, 16, True),
    "wan_video_fast": ("wan", "wan_queue", "video", 480, 832, 25, 6.5, 81, 16, False),
    "wan_video_high": ("wan", "wan_queue", "video", 480, 832, 50, 7.5, 81, 16, False),
}


def payload(type_: str = "sdxl_image_fast", **fields: object) -> dict:
    base = {"id": "job-1", "type": type_, "prompt": "a red fox in the snow", "user_id": "user-1"}
    base.update(fields)
    return base


def parse(type_: str = "sdxl_image_fast", **fields: object) -> Job:
    return parse_job(json.dumps(payload(type_, **fields)))


def invalid(type_: str = "sdxl_image_fast", **fields: object) -> InvalidJob:
    with pytest.raises(InvalidJob) as info:
        parse(type_, **fields)
    return info.value


# --- the table --------------------------------------------------------------------------------


CHAT_TYPES = {"chat_conversation", "chat_unrestricted", "chat_enhance", "admin_utilities"}


def test_the_table_holds_exactly_the_contract_types_and_the_chat_types() -> None:
    assert set(JOB_TYPES) == set(CONTRACT_DEFAULTS) | CHAT_TYPES
    assert QUEUES == ("sdxl_queue", "wan_queue", "chat_queue")
    assert {name for name, t in JOB_TYPES.items() if t.queue == "chat_queue"} == CHAT_TYPES
    assert all(JOB_TYPES[name].output == "text" for name in CHAT_TYPES)


@pytest.mark.parametrize("name", sorted(CONTRACT_DEFAULTS))
def test_each_type_resolves_to_its_contract_defaults(name: str) -> None:
    model, queue, output, width, height, steps, guidance, frames, fps, enhance = CONTRACT_DEFAULTS[name]
    job = parse(name)
    assert (job.type.model, job.type.queue, job.type.output, job.type.enhance) == (model, queue, output, enhance)
    assert (job.width, job.height, job.steps, job.guidance_scale) == (width, height, steps, guidance)
    assert (job.num_frames, job.fps, job.num_images, job.seed) == (frames, fps, 1, None)
    assert job.requested_type == name
    assert job.type.models == (("qwen_base", model) if enhance else (model,))
    if model == "sdxl":
        assert job.negative_prompt == SDXL_NEGATIVE_PROMPT
    else:
        assert job.negative_prompt is None


def test_aliases_resolve_to_their_targets() -> None:
    assert JOB_TYPES["wan_video_fast"] is JOB_TYPES["video_fast"]
    assert JOB_TYPES["wan_video_high"] is JOB_TYPES["video_high"]
    job = parse("wan_video_fast")
    assert job.type.name == "video_fast" and job.requested_type == "wan_video_fast"


def test_a_chat_row_fits_the_table() -> None:
    row = JobType(name="chat_conversation", model="qwen_instruct", queue="chat_queue", output="text", time_limit_s=120)
    assert row.width is None and row.steps is None and row.models == ("qwen_instruct",)


# --- payload forms ----------------------------------------------------------------------------


def test_plain_and_double_encoded_payloads_give_the_same_job() -> None:
    data = payload(config={"seed": 7})
    plain = parse_job(json.dumps(data))
    assert parse_job(json.dumps(data).encode()) == plain
    assert parse_job(json.dumps([json.dumps(data)])) == plain
    assert parse_job(json.dumps([json.dumps(data)]).encode()) == plain
    assert peek_id(json.dumps([json.dumps(data)])) == "job-1"


def test_unknown_fields_and_legacy_duplicates_are_ignored() -> None:
    job = parse(
        job_id="other-id", job_type="video_high", quality="high", format="png", content_type="image",
        created_at="2026-01-01", model_variant="lustify", bucket="x", video_id="v", image_id="i",
        character_id="c", brand_new_field={"nested": [1, 2]},
        config={"unknown_knob": 3, "sample_solver": "unipc"}, metadata={"free": "form", "n": 1},
    )
    assert job.id == "job-1" and job.type.name == "sdxl_image_fast"
    assert job.metadata == {"free": "form", "n": 1}  # passed through as it came
    assert job.payload.config.sample_solver == "unipc"


def test_null_config_and_metadata_mean_empty() -> None:
    job = parse(config=None, metadata=None, negative_prompt=None, compel_enabled=None)
    assert job.width == 1024 and job.metadata == {}


# --- resolution rules -------------------------------------------------------------------------


def test_config_overrides_the_type_defaults() -> None:
    job = parse(config={"num_inference_steps": 40, "guidance_scale": 3.5, "num_images": 6, "seed": 123})
    assert (job.steps, job.guidance_scale, job.num_images, job.seed) == (40, 3.5, 6, 123)
    video = parse("video_fast", config={"frame_num": 33, "fps": 24, "num_inference_steps": 10})
    assert (video.num_frames, video.fps, video.steps) == (33, 24, 10)


def test_width_and_height_beat_resolution() -> None:
    assert (lambda j: (j.width, j.height))(parse(config={"resolution": "1024x576"})) == (1024, 576)
    both = parse(config={"resolution": "1024x576", "width": 768, "height": 512})
    assert (both.width, both.height) == (768, 512)
    # With both width and height given, the resolution is not even looked at.
    assert parse(config={"resolution": "garbage", "width": 512, "height": 512}).width == 512
    one = parse(config={"resolution": "576x1024", "width": 640})
    assert (one.width, one.height) == (640, 1024)


def test_seed_zero_is_a_seed() -> None:
    assert parse(config={"seed": 0}).seed == 0
    assert parse("video_fast", config={"seed": 0}).triton_parameters()["seed"] == 0
    assert parse(config={"seed": None}).seed is None
    assert parse(config={}).seed is None
    assert parse(config={"seed": -1}).seed is None  # the usual UI "random" value


def test_negative_prompt_replaces_the_default() -> None:
    assert parse(negative_prompt="cartoon").negative_prompt == "cartoon"
    assert parse(negative_prompt="   ").negative_prompt == SDXL_NEGATIVE_PROMPT
    assert parse("video_fast", negative_prompt="static").negative_prompt == "static"


def test_compel_weights_only_when_enabled() -> None:
    weights = "(masterpiece:1.3), (best quality:1.2)"
    assert parse(compel_weights=weights).compel_weights is None
    job = parse(compel_enabled=True, compel_weights=weights)
    assert job.compel_weights == weights and job.triton_parameters()["compel_weights"] == weights
    assert "compel_weights" not in parse().triton_parameters()


def test_img2img_strength_sources_in_order() -> None:
    ref = "https://example.com/ref.png"
    assert parse(metadata={"reference_image_url": ref}).strength == pytest.approx(0.5)
    assert parse(metadata={"reference_image_url": ref, "reference_strength": 0.8}).strength == pytest.approx(0.2)
    md = {"reference_image_url": ref, "reference_strength": 0.8, "denoise_strength": 0.6}
    assert parse(metadata=md).strength == pytest.approx(0.6)
    job = parse(metadata=md, config={"denoise_strength": 0.3})
    assert job.strength == pytest.approx(0.3) and job.reference_image_url == ref
    assert job.triton_parameters()["strength"] == pytest.approx(0.3)
    assert parse().reference_image_url is None and "strength" not in parse().triton_parameters()
    # WAN is text-to-video: a reference image does not turn it into img2img.
    assert parse("video_fast", metadata={"reference_image_url": ref}).strength is None


def test_exact_copy_mode() -> None:
    md = {"reference_image_url": "https://example.com/ref.png", "exact_copy_mode": True, "reference_strength": 0.1}
    job = parse(metadata=md)
    assert job.exact_copy and job.strength <= 0.05 and job.guidance_scale == 1.0
    assert int(job.steps * job.strength) >= 1  # at least one denoising step runs


def test_low_strength_gets_enough_steps() -> None:
    md = {"reference_image_url": "https://example.com/ref.png", "denoise_strength": 0.03}
    job = parse(metadata=md, config={"num_inference_steps": 10})
    assert int(job.steps * job.strength) >= 1 and job.steps >= 34


def test_triton_parameters() -> None:
    sdxl = parse(config={"num_images": 3, "seed": 5, "resolution": "1024x576"})
    assert sdxl.triton_parameters() == {
        "num_images": 3, "steps": 15, "guidance_scale": 6.0, "width": 1024, "height": 576, "seed": 5,
        "preview_edge": 256, "preview_quality": 85,
    }
    video = parse("video_high", config={"seed": 9})
    assert video.triton_parameters() == {
        "num_frames": 81, "fps": 16, "steps": 50, "guidance_scale": 7.5, "width": 480, "height": 832,
        "seed": 9, "output": "video", "preview_edge": 256, "preview_quality": 85,
    }
    image = parse("image_fast")
    assert image.triton_parameters()["output"] == "image" and image.triton_parameters()["num_frames"] == 1


# --- invalid jobs: the message names the field -------------------------------------------------

INVALID_CASES = [
    ({"config": {"width": 1001}}, "config.width", "multiple of 8"),
    ({"config": {"height": 4096}}, "config.height", "between 64 and 2048"),
    ({"config": {"resolution": "big"}}, "config.resolution", "WIDTHxHEIGHT"),
    ({"config": {"resolution": "1000x100"}}, "config.resolution", "height"),
    ({"config": {"num_images": 4}}, "config.num_images", "one of 1, 3, 6"),
    ({"config": {"num_inference_steps": 0}}, "config.num_inference_steps", "between"),
    ({"config": {"num_inference_steps": "many"}}, "config.num_inference_steps", "whole number"),
    ({"config": {"num_inference_steps": True}}, "config.num_inference_steps", "true or false"),
    ({"config": {"guidance_scale": 99}}, "config.guidance_scale", "between"),
    ({"config": {"seed": 2**60}}, "config.seed", "between 0 and"),
    ({"config": {"seed": -5}}, "config.seed", "between 0 and"),
    ({"config": {"seed": 1.5}}, "config.seed", "whole number"),
    ({"config": "fast"}, "config", "object"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": None}, "prompt", "required"),
    ({"prompt": 42}, "prompt", "string"),
    ({"prompt": "x" * 100_000}, "prompt", "10000 characters"),
    ({"negative_prompt": "x" * 10_001}, "negative_prompt", "10000 characters"),
    ({"user_id": None}, "user_id", "required"),
    ({"user_id": "../etc"}, "user_id", "letters"),
    ({"type": 3}, "type", "string"),
    ({"metadata": {"reference_image_url": "file:///etc/passwd"}}, "metadata.reference_image_url", "http"),
    ({"metadata": {"reference_image_url": "https://x/y", "reference_strength": 2}}, "metadata.reference_strength", "between 0 and 1"),
    ({"metadata": {"reference_image_url": "https://x/y", "reference_strength": 1}}, "metadata.reference_strength", "at least"),
    ({"metadata": {"reference_image_url": "https://x/y", "denoise_strength": "lots"}}, "metadata.denoise_strength", "number"),
    ({"metadata": {"reference_image_url": "https://x/y", "exact_copy_mode": "yes"}}, "metadata.exact_copy_mode", "true or false"),
    ({"config": {"denoise_strength": 1.5}, "metadata": {"reference_image_url": "https://x/y"}}, "config.denoise_strength", "between 0 and 1"),
]


@pytest.mark.parametrize(("fields", "name", "words"), INVALID_CASES, ids=[c[1] + ":" + c[2] for c in INVALID_CASES])
def test_invalid_fields_are_named(fields: dict, name: str, words: str) -> None:
    error = invalid(**fields)
    assert error.message.startswith(name + ":") or f"; {name}:" in error.message, error.message
    assert words in error.message, error.message
    expected_type = fields.get("type", "sdxl_image_fast")
    assert error.job_id == "job-1" and error.job_type == (expected_type if isinstance(expected_type, str) else None)


@pytest.mark.parametrize(
    ("type_", "config", "name", "words"),
    [
        ("video_fast", {"width": 488}, "config.width", "multiple of 16"),
        ("video_fast", {"frame_num": 80}, "config.frame_num", "4k+1"),
        ("video_fast", {"frame_num": 1001}, "config.frame_num", "between"),
        ("video_fast", {"fps": 0}, "config.fps", "between"),
        ("image_fast", {"resolution": "1024x1000"}, "config.resolution", "multiple of 16"),
    ],
)
def test_invalid_wan_fields_are_named(type_: str, config: dict, name: str, words: str) -> None:
    error = invalid(type_, config=config)
    assert error.message.startswith(name) and words in error.message, error.message


def test_the_example_message_reads_well() -> None:
    error = invalid(config={"width": 1004})
    assert error.message == "config.width: must be a multiple of 8 between 64 and 2048 for sdxl_image_fast, got 1004"


def test_unknown_type_lists_the_known_ones() -> None:
    error = invalid("sdxl_image_ultra")
    assert error.message.startswith("type: unknown job type \"sdxl_image_ultra\"")
    assert all(name in error.message for name in JOB_TYPES)
    assert (error.job_id, error.user_id, error.job_type) == ("job-1", "user-1", "sdxl_image_ultra")


def test_every_problem_is_reported_at_once() -> None:
    error = invalid(prompt="", config={"width": 3, "num_images": 2})
    assert [p.split(":")[0] for p in error.problems] == ["prompt", "config.width", "config.num_images"]


def test_image_jobs_ignore_frame_settings() -> None:
    assert parse("image_fast", config={"frame_num": 81, "fps": 24}).num_frames == 1


# --- dead letters -----------------------------------------------------------------------------

DEAD_CASES = [
    (b"\xff\xfe", "UTF-8"),
    (b"", "not valid JSON"),
    (b"{oops", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"just text"', "not valid JSON"),
    (b"42", "JSON object"),
    (b"[" * 100_000, "nested 100000 levels deep"),
    (json.dumps({"type": "sdxl_image_fast", "prompt": "x"}).encode(), "no usable id"),
    (json.dumps({"id": "", "type": "x"}).encode(), "no usable id"),
    (json.dumps({"id": "../../etc/passwd"}).encode(), "no usable id"),
    (json.dumps({"id": ["a"]}).encode(), "no usable id"),
    (json.dumps({"id": True}).encode(), "no usable id"),
]


@pytest.mark.parametrize(("raw", "words"), DEAD_CASES, ids=[c[1] for c in DEAD_CASES])
def test_unparseable_payloads_are_dead_letters(raw: bytes, words: str) -> None:
    with pytest.raises(DeadLetter) as info:
        parse_job(raw)
    assert words in info.value.reason
    assert peek_id(raw) is None


def test_numeric_ids_are_usable() -> None:
    assert parse_job(json.dumps(payload(id=12345))).id == "12345"


# --- property-based: nothing but DeadLetter / InvalidJob ever escapes -------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_values = json_values | st.integers(min_value=-10, max_value=3000) | st.sampled_from(
    ["1024x1024", "576x1024", "1024x576", "480x832", "", "0x0", "https://example.com/a.png"]
)
config_dicts = st.dictionaries(
    st.sampled_from(["num_images", "num_inference_steps", "guidance_scale", "seed", "resolution", "width",
                     "height", "pipeline", "denoise_strength", "frame_num", "fps", "sample_solver", "other"]),
    field_values, max_size=6,
)
metadata_dicts = st.dictionaries(
    st.sampled_from(["reference_image_url", "denoise_strength", "reference_strength", "exact_copy_mode",
                     "reference_mode", "start_reference_url", "free"]),
    field_values, max_size=5,
)
payloads = st.fixed_dictionaries(
    {"id": st.one_of(st.just("job-1"), json_values)},
    optional={
        "type": st.one_of(st.sampled_from(sorted(JOB_TYPES)), json_values),
        "prompt": st.one_of(st.text(max_size=40), json_values),
        "user_id": st.one_of(st.just("user-1"), json_values),
        "negative_prompt": json_values,
        "compel_enabled": json_values,
        "compel_weights": json_values,
        "config": st.one_of(config_dicts, json_values),
        "metadata": st.one_of(metadata_dicts, json_values),
        "job_id": json_values,
    },
)

# Mostly plausible payloads, so that many of them resolve and the Job invariants get checked.
plausible_config = st.fixed_dictionaries(
    {},
    optional={
        "num_images": st.sampled_from([1, 3, 6, 2]),
        "num_inference_steps": st.integers(0, 200),
        "guidance_scale": st.floats(0, 35, allow_nan=False),
        "seed": st.none() | st.integers(-2, 2**54),
        "resolution": st.sampled_from(["1024x1024", "1024x576", "576x1024", "480x832", "832x480", "64x64"]),
        "width": st.integers(200, 2100).map(lambda x: x - x % 8),
        "height": st.integers(200, 2100).map(lambda x: x - x % 8),
        "denoise_strength": st.floats(0, 1),
        "frame_num": st.integers(1, 200),
        "fps": st.integers(0, 70),
    },
)
plausible_metadata = st.fixed_dictionaries(
    {},
    optional={
        "reference_image_url": st.sampled_from(["https://example.com/a.png", "", "ftp://x"]),
        "denoise_strength": st.floats(0, 1),
        "reference_strength": st.floats(0, 1),
        "exact_copy_mode": st.booleans(),
        "free": json_values,
    },
)
plausible_payloads = st.fixed_dictionaries(
    {
        "id": st.just("job-1"),
        "type": st.sampled_from(sorted(JOB_TYPES)),
        "prompt": st.text(min_size=1, max_size=40),
        "user_id": st.just("user-1"),
        "config": plausible_config,
        "metadata": plausible_metadata,
    },
    optional={"negative_prompt": st.text(max_size=20), "compel_enabled": st.booleans(), "compel_weights": st.text(max_size=20)},
)

resolved: list[int] = []


def _check_outcome(raw: bytes | str) -> None:
    try:
        job = parse_job(raw)
    except (DeadLetter, InvalidJob) as exc:
        assert str(exc)
        return
    resolved.append(1)
    # Whatever got through is runnable.
    limits = job.type.limits
    # a prompt, except for an SDXL job with a reference image (the app sends "" for an exact copy)
    assert job.prompt or (job.type.model == "sdxl" and job.reference_image_url)
    assert len(job.prompt) <= limits.max_prompt_chars
    if job.type.output == "text":  # a chat job carries a validated chat request, no sizes
        assert job.chat is not None and job.width is None
        return
    assert job.width % limits.size_multiple == 0 and limits.min_size <= job.width <= limits.max_size
    assert job.height % limits.size_multiple == 0 and limits.min_size <= job.height <= limits.max_size
    assert limits.min_steps <= job.steps and math.isfinite(job.guidance_scale)
    assert job.num_images in limits.num_images or job.type.model == "wan"
    assert job.seed is None or 0 <= job.seed <= 2**53
    if job.num_frames and job.num_frames > 1:
        assert (job.num_frames - 1) % 4 == 0
    if job.strength is not None:
        assert 0 < job.strength <= 1 and int(job.steps * job.strength) >= 1
    json.dumps(job.triton_parameters())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape(raw: bytes) -> None:
    _check_outcome(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_never_escapes(value: object) -> None:
    _check_outcome(json.dumps(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.booleans())
def test_arbitrary_payloads_never_escape(data: dict, double: bool) -> None:
    text = json.dumps(data)
    _check_outcome(json.dumps([text]) if double else text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible_payloads, st.booleans())
# an exact copy's blank prompt (found by a CI run): accepted, the job runs without one
@example({"id": "job-1", "type": "sdxl_image_fast", "prompt": " ", "user_id": "user-1", "config": {},
          "metadata": {"reference_image_url": "https://example.com/a.png"}}, False)
def _plausible_round(data: dict, double: bool) -> None:
    text = json.dumps(data)
    _check_outcome(json.dumps([text]) if double else text)


def test_plausible_payloads_resolve_to_runnable_jobs() -> None:
    resolved.clear()
    _plausible_round()
    # Enough of them got through for the Job invariants in _check_outcome to mean something.
    assert len(resolved) >= 40, len(resolved)
