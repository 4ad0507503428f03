"""model_kit.media: a video's middle frame (with and without a frame count in its header) and
thumbnails (longest edge, never upscaled, WEBP)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from job_outputs import mp4
from model_kit.media import thumbnail_webp, video_middle_frame, video_size


def _grey(image: Image.Image) -> float:
    return float(np.asarray(image.convert("L"), dtype=float).mean())


def _raw_h264(levels: list[int], width: int = 64, height: int = 48) -> bytes:
    """An H.264 elementary stream: no container, so no frame count to read."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="h264") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_middle_frame_of_an_mp4_is_decoded_up_to_the_middle() -> None:
    frame = video_middle_frame(mp4())  # frame i is grey 25 * i, 9 frames: the middle one is grey 100
    assert frame.size == (320, 192) and abs(_grey(frame) - 100) < 6


def test_middle_frame_without_a_frame_count_in_the_header() -> None:
    data = _raw_h264([20 * i for i in range(7)])
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].frames == 0  # the case under test
    assert abs(_grey(video_middle_frame(data)) - 60) < 6


def test_a_video_without_frames_or_a_video_stream_is_an_error() -> None:
    with pytest.raises(ValueError):  # FFmpeg's InvalidDataError is one
        video_middle_frame(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    audio = io.BytesIO()
    with av.open(audio, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    for read in (video_middle_frame, video_size):
        with pytest.raises(ValueError, match="no video stream"):
            read(audio.getvalue())


@pytest.mark.parametrize(("size", "expected"), [((1024, 768), (256, 192)), ((300, 600), (128, 256)),
                                                ((64, 40), (64, 40))])
def test_thumbnail_longest_edge_never_upscaled(size: tuple[int, int], expected: tuple[int, int]) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    with Image.open(io.BytesIO(thumbnail_webp(image))) as thumb:
        assert thumb.format == "WEBP" and thumb.size == expected
