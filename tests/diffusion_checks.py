"""Checks the ``sdxl`` and ``wan`` model tests share (real tritonserver, tiny weights).

Each takes the server's gRPC address and a function that sends one request of the model under
test with a given number of steps, so that the same check runs against both models.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.triton_helpers import Streamed, load_model, model_state, stub_pids, unload_model

#: ``send(steps, cancel_after=None) -> Streamed``: one request of the model under test.
Send = Callable[..., Streamed]


def png(data: bytes) -> Image.Image:
    """Decode PNG bytes, checking they really are a PNG."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def preview_distance(preview: bytes, image: Image.Image, edge: int) -> float:
    """Mean absolute difference (0-255) between a model's WEBP ``preview`` and ``image`` scaled to
    the same size, after checking the preview is a WEBP whose longest edge is ``edge``."""
    with Image.open(io.BytesIO(preview)) as decoded:
        assert decoded.format == "WEBP"
        assert max(decoded.size) == min(edge, max(image.size)), (decoded.size, image.size)
        scaled = image.convert("RGB").resize(decoded.size, Image.LANCZOS)
        return float(np.abs(np.asarray(decoded.convert("RGB"), dtype=float) - np.asarray(scaled, dtype=float)).mean())


def outputs(result: Streamed, steps: int | None = None) -> dict:
    """The final outputs of a successful request, after checking its progress stream.

    Progress responses come first, strictly increasing, the last one exactly 1.0 (``steps`` of
    them when given), then one final response with the results and no progress.
    """
    assert result.error is None, result.error
    assert result.final, "the stream did not end with the final flag"
    *progress, final = result.responses
    fractions = [float(r["progress"][0]) for r in progress]
    assert all(set(r) == {"progress"} for r in progress), [list(r) for r in progress]
    assert fractions and fractions[-1] == 1.0, fractions
    assert all(a < b for a, b in zip(fractions, fractions[1:])), fractions
    if steps is not None:
        assert len(fractions) == steps, fractions
    assert "progress" not in final
    return final


def error(result: Streamed) -> str:
    """The error message of a request that had to fail (and produced no results)."""
    assert result.error is not None, f"expected an error, got {[list(r) for r in result.responses]}"
    assert not any("progress" not in r for r in result.responses), "results arrived despite the error"
    return result.error


def check_cancel_stops_early(send: Send, server_log: Path, model: str, long_steps: int = 150) -> None:
    """Cancel a long request at its first progress response: the model must stop early.

    The client sees nothing of the cancelled request once it closed the stream, so the model's
    own account is read from the server log (``<model>: cancelled after k of n steps``, written
    after its denoising loop has stopped). The next request must then be served normally.
    """
    log_start = server_log.stat().st_size
    cancelled = send(long_steps, cancel_after=1)
    assert cancelled.cancelled and not cancelled.final
    assert float(cancelled.responses[0]["progress"][0]) == pytest.approx(1 / long_steps)
    outputs(send(2), steps=2)  # one instance: served only after the cancelled request ended
    with server_log.open("rb") as log:
        log.seek(log_start)
        text = log.read().decode(errors="replace")
    done = re.findall(rf"{model}: cancelled after (\d+) of {long_steps} steps", text)
    assert len(done) == 1, text[-2000:]
    assert 1 <= int(done[0]) < long_steps // 2, done


def check_unload_ends_stub_and_reload_works(url: str, server_pid: int, model: str, send: Send) -> None:
    """Unloading ends the model's stub process; loading again starts a new one that serves."""
    before = stub_pids(server_pid, model)
    assert len(before) == 1, before
    unload_model(url, model)
    assert model_state(url, model) == "UNAVAILABLE"
    assert not stub_pids(server_pid, model) & before, "the stub survived the unload"
    load_model(url, model)
    after = stub_pids(server_pid, model)
    assert len(after) == 1 and not after & before
    outputs(send(2), steps=2)


def load_error(url: str, model: str, weights: str) -> str:
    """Try to reload the loaded ``model`` with its ``weights`` parameter overridden; it must fail.

    The override is the model's full configuration (as Triton requires) with one parameter
    changed. A failed reload leaves the loaded model serving, as it was.
    """
    with grpcclient.InferenceServerClient(url) as client:
        config = client.get_model_config(model, as_json=True)["config"]
        config["parameters"]["weights"]["string_value"] = weights
        try:
            client.load_model(model, config=json.dumps(config), client_timeout=300)
        except InferenceServerException as exc:
            return exc.message()
    pytest.fail(f"{model} loaded with weights={weights}")
