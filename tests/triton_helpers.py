"""Talking to a real tritonserver from tests: one streamed request, model control, stub processes.

Every model in the repository is decoupled, so a request is sent on a gRPC stream and its
responses are collected until the one flagged final (``enable_empty_final_response`` makes the
flag visible even when the model ends with an empty response).
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

Outputs = dict[str, np.ndarray]


@dataclass
class Streamed:
    """What came back for one request."""

    responses: list[Outputs] = field(default_factory=list)  # responses that carried outputs
    error: str | None = None  # an error response's message
    final: bool = False  # the final flag arrived
    cancelled: bool = False  # we cancelled the request

    def strings(self, name: str) -> list[str]:
        """``name`` of every response that has it, decoded (first element of each)."""
        return [_decode(r[name]) for r in self.responses if name in r]

    def last(self, name: str) -> Any:
        """``name`` from the last response that has it (a string decoded, else the scalar)."""
        for outputs in reversed(self.responses):
            if name in outputs:
                value = outputs[name].reshape(-1)[0]
                return value.decode() if isinstance(value, bytes) else value.item()
        raise KeyError(f"no response carried {name!r}; got {[list(r) for r in self.responses]}, error={self.error}")


def _decode(array: np.ndarray) -> str:
    value = array.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def infer_input(name: str, value: Any) -> grpcclient.InferInput:
    """An input tensor of shape [1] from a str / bytes / bool / number / JSON-able dict or list."""
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        array = np.array([value], dtype=np.object_)
    else:
        array = np.array([value])
    datatype = "BYTES" if array.dtype == np.object_ else grpcclient.np_to_triton_dtype(array.dtype)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def stream(
    url: str,
    model: str,
    inputs: dict[str, Any],
    timeout: float = 60.0,
    request_id: str = "",
    cancel_after: int | None = None,
) -> Streamed:
    """Send one request and collect its responses until the final one, an error or ``timeout``.

    With ``cancel_after=n`` the request is cancelled (the stream closed with ``cancel_requests``)
    once ``n`` responses with outputs have arrived.
    """
    arrived: queue.Queue = queue.Queue()
    result = Streamed()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: arrived.put((result, error)))
        tensors = [infer_input(name, value) for name, value in inputs.items() if value is not None]
        client.async_stream_infer(model, tensors, request_id=request_id, enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while not (result.final or result.error):
            if cancel_after is not None and len(result.responses) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                result.cancelled = True
                break
            res, err = arrived.get(timeout=max(deadline - time.monotonic(), 0.001))
            _collect(result, res, err)
    except queue.Empty:
        raise TimeoutError(f"{model}: no final response within {timeout}s; got {len(result.responses)}") from None
    finally:
        if not result.cancelled:
            client.stop_stream()
        client.close()
    return result


def _collect(result: Streamed, res: Any, err: Any) -> None:
    if err is not None:
        result.error = err.message() if isinstance(err, InferenceServerException) else str(err)
        return
    response = res.get_response()
    outputs = {out.name: res.as_numpy(out.name) for out in response.outputs}
    if outputs:
        result.responses.append(outputs)
    final = response.parameters.get("triton_final_response")
    result.final = bool(final is not None and final.bool_param)


# ----------------------------------------------------------------------------- model control
def load_model(url: str, model: str) -> None:
    """Load (or reload) ``model``; returns when it is ready."""
    with grpcclient.InferenceServerClient(url) as client:
        client.load_model(model, client_timeout=300)


def model_state(url: str, model: str) -> str:
    """The repository index state of ``model`` (READY, UNLOADING, UNAVAILABLE, ...)."""
    with grpcclient.InferenceServerClient(url) as client:
        index = client.get_model_repository_index(as_json=True).get("models", [])
    return next((m.get("state", "") for m in index if m["name"] == model), "")


def unload_model(url: str, model: str, timeout: float = 60.0) -> None:
    """Unload ``model`` and wait until Triton has finished (its stub process has exited)."""
    with grpcclient.InferenceServerClient(url) as client:
        client.unload_model(model)
    deadline = time.monotonic() + timeout
    while model_state(url, model) not in ("UNAVAILABLE", ""):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model} still {model_state(url, model)} {timeout}s after unload")
        time.sleep(0.1)


def stub_pids(server_pid: int, model: str) -> set[int]:
    """Python-backend stub processes of ``model`` started by the server ``server_pid``."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == server_pid and b"triton_python_backend_stub" in cmdline[0] and _names_model(cmdline, model):
            pids.add(int(entry.name))
    return pids


def _names_model(cmdline: list[bytes], model: str) -> bool:
    """The stub's first argument is the model's path (``.../<model>/1/model.py``)."""
    return len(cmdline) > 1 and f"/{model}/".encode() in cmdline[1]


def model_metric(metrics_url: str, name: str, model: str) -> float:
    """The value of a model's custom metric (``name{model="<model>"}``) on Triton's metrics port."""
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    match = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', body, re.M)
    assert match, f"{name} for {model} not on {metrics_url}"
    return float(match.group(1))


class Live:
    """A streaming request running in the background, with the time of each response."""

    def __init__(self, url: str, model: str, inputs: dict) -> None:
        self.url, self.model, self.request_id = url, model, f"live-{uuid.uuid4().hex}"
        self.result = Streamed()
        self.times: list[float] = []
        self.done = threading.Event()
        self._client = grpcclient.InferenceServerClient(url)
        self._client.start_stream(callback=self._on)
        tensors = [infer_input(k, v) for k, v in inputs.items() if v is not None]
        self._client.async_stream_infer(model, tensors, request_id=self.request_id, enable_empty_final_response=True)

    def _on(self, result, error) -> None:
        _collect(self.result, result, error)
        self.times.append(time.monotonic())
        if self.result.final or self.result.error:
            self.done.set()

    def wait_for(self, responses: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.result.responses) < responses and not self.done.is_set():
            assert time.monotonic() < deadline, "no responses in time"
            time.sleep(0.01)

    def finish(self, timeout: float = 120) -> Streamed:
        assert self.done.wait(timeout), "no final response in time"
        self._client.stop_stream()
        self._client.close()
        return self.result

    def cancel(self) -> None:
        """Cancel the gRPC call (as a client that goes away does)."""
        self._client.stop_stream(cancel_requests=True)
        self._client.close()

    def stop(self) -> Streamed:
        """End the stream with a stop request (as the bridge does): it ends with its final answer."""
        answer = stream(self.url, self.model, {"stop_request_id": self.request_id})
        assert answer.last("finish_reason") == "cancelled", answer.responses
        result = self.finish()
        assert result.last("finish_reason") == "cancelled"
        return result
