"""What a test needs to make a job's outputs: PNGs and an MP4 built here, as ``JobOutputs``."""

from __future__ import annotations

import io
import os
import tempfile
import uuid

import av
import numpy as np
from PIL import Image

from bridge.spool import JobOutputs, OutputAsset
from model_kit.media import encode_mp4, encode_png

USER = "4c1d7a52-9a43-4f0e-8d0e-2f7a7e5b1c01"


def decode_mp4(data: bytes) -> list[np.ndarray]:
    """All frames of an MP4 as HxWx3 uint8 arrays (tests read what the models made)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def new_job_id() -> str:
    return str(uuid.uuid4())


def png(width: int, height: int, shade: int = 0) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, shade)], axis=-1).astype(np.uint8)
    return encode_png(frame)


VIDEO_FRAMES = 9
VIDEO_FPS = 8


def mp4(width: int = 320, height: int = 192) -> bytes:
    """Frame i is a flat grey of level 25 * i, so the middle frame (4) is grey 100."""
    frames = [np.full((height, width, 3), 25 * i, dtype=np.uint8) for i in range(VIDEO_FRAMES)]
    try:
        return encode_mp4(frames, fps=VIDEO_FPS)
    except av.error.FileNotFoundError:
        # model_kit.media.encode_mp4 with PyAV 18 fails on BytesIO + movflags=+faststart (the
        # second faststart pass reopens the output); reported. Same encoding through a real file.
        return mp4_via_file(frames, VIDEO_FPS)


def mp4_via_file(frames: list[np.ndarray], fps: int) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "clip.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        with open(path, "rb") as handle:
            return handle.read()


def image_outputs(count: int = 3, width: int = 640, height: int = 360) -> JobOutputs:
    assets = [
        OutputAsset("image", png(width, height, shade=40 * i),
                    {"seed": 1000 + i, "steps": 15, "guidance_scale": 6.0, "negative_prompt_used": "blurry"})
        for i in range(count)
    ]
    metadata = {"job_type": "sdxl_image_fast", "generation_time": 1.25, "seed": 1000, "num_images": count,
                "prompt": "a café at dusk, 🌸 blossoms"}
    return JobOutputs(user_id=USER, job_type="sdxl_image_fast", assets=assets, metadata=metadata)


def video_outputs() -> JobOutputs:
    asset = OutputAsset("video", mp4(), {"seed": 7, "fps": VIDEO_FPS, "frame_num": VIDEO_FRAMES})
    return JobOutputs(user_id=USER, job_type="video_fast", assets=[asset],
                      metadata={"job_type": "video_fast", "seed": 7, "frame_num": VIDEO_FRAMES})


def webp_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        return image.size
