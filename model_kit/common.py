"""Plumbing the four Triton Python-backend models share.

Each ``model_repository/<name>/1/model.py`` subclasses :class:`StreamingModel` and implements
``load`` (build the pipeline from weights), ``run`` (serve one :class:`Request`) and, when it
holds more than ``self.pipe``, ``unload``. This module handles the rest once: reading tensors and
JSON parameters, validating them with pydantic (errors name the field and become INVALID_ARG),
streaming progress, cancellation, device and dtype choice, weight paths, and always sending the
final response (a decoupled model that never sends it cannot be unloaded).

It imports ``triton_python_backend_utils`` lazily so that the pure helpers are importable (and
testable) outside the stub.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

log = logging.getLogger("model_kit")

P = TypeVar("P", bound=BaseModel)


def _pb():
    import triton_python_backend_utils as pb_utils  # noqa: PLC0415 - only inside the stub

    return pb_utils


class ServerLogHandler(logging.Handler):
    """Sends ``model_kit``'s log records to tritonserver's own log through ``pb_utils.Logger``.

    The stub's standard streams do not reach the server log, so without this every stdlib log line
    of the models was lost. Call sites keep the plain ``logging`` API.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = _pb().Logger
            message = f"{record.name}: {self.format(record)}"
            if record.levelno >= logging.ERROR:
                logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                logger.log_warn(message)
            elif record.levelno >= logging.INFO:
                logger.log_info(message)
            else:
                logger.log_verbose(message)
        except Exception:  # noqa: BLE001 - logging must never break a request
            self.handleError(record)


def route_logs_to_server() -> None:
    """Inside the stub: ``model_kit`` (and its submodules') records go to the server log, once."""
    root = logging.getLogger("model_kit")
    if not any(isinstance(h, ServerLogHandler) for h in root.handlers):
        root.addHandler(ServerLogHandler())
        root.setLevel(logging.INFO)
        root.propagate = False


#: How often a stub looks for the tritonserver that started it (seconds).
SERVER_WATCH_S = 1.0


def exit_with_server() -> None:
    """End this stub process at once when the tritonserver that started it is gone.

    The Python backend's own check does the same, but deadlocks (joining its message threads)
    when a thread of the model is sending to the server at that moment, as the Qwen models'
    response and metric threads nearly always are: the stub then ran on with no server, for
    ever (docs/ARCHITECTURE.md, "Process life cycle")."""
    server = os.getppid()

    def watch() -> None:
        while os.getppid() == server:
            time.sleep(SERVER_WATCH_S)
        os._exit(1)  # no clean-up: that is what deadlocked, and no one is left to answer

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


class ParamError(ValueError):
    """A request parameter is invalid; the message names the field. Answered as INVALID_ARG."""


class Cancelled(Exception):
    """The client cancelled the request; the loop stopped early."""


# ----------------------------------------------------------------------------- device and dtype
def choose_device(setting: str | None = None) -> tuple[str, Any]:
    """``cuda`` with fp16 (bf16 for LLMs is chosen by the caller) when present, else CPU fp32."""
    import torch  # noqa: PLC0415

    setting = (setting or os.environ.get("DEVICE") or "auto").lower()
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return "cuda", torch.float16
    return "cpu", torch.float32


def set_threads() -> None:
    """Each model is its own process and torch uses every core in each: cap it when configured."""
    threads = int(os.environ.get("MODEL_THREADS", "0") or 0)
    if threads > 0:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- weights
def models_dir() -> Path:
    return Path(os.environ.get("MODELS_DIR", "/workspace/models"))


def weights_path(model_name: str, parameters: dict[str, str], key: str = "weights") -> Path:
    """Where a model's weights are: ``<NAME>_<KEY>`` from the environment (absolute or relative to
    ``MODELS_DIR``), else the config parameter ``key`` relative to ``MODELS_DIR``."""
    env_name = f"{model_name}_{key}".upper()
    value = os.environ.get(env_name) or parameters.get(key)
    if not value:
        raise RuntimeError(f"{model_name}: no '{key}' parameter in config.pbtxt and no {env_name} set")
    path = Path(value)
    return path if path.is_absolute() else models_dir() / path


def resolve_hf_folder(path: Path) -> Path:
    """Accept a plain model folder or a Hugging Face cache folder (``models--org--name``), whose
    newest snapshot is used (``refs/main`` when present)."""
    if (path / "config.json").exists():
        return path
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        ref = path / "refs" / "main"
        if ref.exists():
            candidate = snapshots / ref.read_text().strip()
            if (candidate / "config.json").exists():
                return candidate
        found = sorted((p for p in snapshots.iterdir() if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no model at {path}: expected config.json there or a snapshots/<hash>/ folder holding one")


def model_parameters(model_config: dict) -> dict[str, str]:
    """The ``parameters`` block of config.pbtxt as a flat ``{key: string_value}``."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


# ----------------------------------------------------------------------------- parameters
def parse_params(model: type[P], raw: str | bytes | None) -> P:
    """Parse a JSON parameters string into ``model``; errors name the field."""
    if raw in (None, b"", ""):
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ParamError(f"parameters: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ParamError("parameters: must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ParamError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "parameters"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- request wrapper
class Request:
    """One inference request of a decoupled model: typed input access and response sending."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.sender = request.get_response_sender()
        self.finished = False

    # inputs
    def _tensor(self, name: str) -> np.ndarray | None:
        tensor = _pb().get_input_tensor_by_name(self.request, name)
        return None if tensor is None else tensor.as_numpy()

    def bytes(self, name: str, required: bool = False) -> bytes | None:
        array = self._tensor(name)
        if array is None or array.size == 0:
            if required:
                raise ParamError(f"{name}: input is required")
            return None
        value = array.reshape(-1)[0]
        if array.dtype == np.uint8:
            return array.tobytes()
        return value if isinstance(value, bytes) else str(value).encode()

    def string(self, name: str, required: bool = False) -> str | None:
        raw = self.bytes(name, required=required)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ParamError(f"{name}: not valid UTF-8") from None

    def bool(self, name: str, default: bool = False) -> bool:
        array = self._tensor(name)
        return default if array is None or array.size == 0 else bool(array.reshape(-1)[0])

    def params(self, model: type[P], name: str = "parameters") -> P:
        return parse_params(model, self.bytes(name))

    # cancellation
    def cancelled(self) -> bool:
        return bool(self.request.is_cancelled())

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise Cancelled()

    # responses
    def send(self, outputs: dict[str, np.ndarray], final: bool = False) -> None:
        pb = _pb()
        tensors = [pb.Tensor(name, value) for name, value in outputs.items()]
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(pb.InferenceResponse(output_tensors=tensors), flags=flags)
        self.finished = self.finished or final

    def progress(self, fraction: float) -> None:
        """A progress response: ``progress`` = fraction done, 0..1."""
        self.send({"progress": np.array([min(max(fraction, 0.0), 1.0)], dtype=np.float32)})

    def fail(self, message: str, code: str = "INTERNAL") -> None:
        pb = _pb()
        error = pb.TritonError(message, getattr(pb.TritonError, code))
        self.sender.send(pb.InferenceResponse(error=error), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.finished = True

    def close(self) -> None:
        """Send the final flag if nothing final was sent yet."""
        if not self.finished:
            self.sender.send(flags=_pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.finished = True


def strings(values: list[bytes] | list[str]) -> np.ndarray:
    """A TYPE_STRING output tensor."""
    return np.array([v if isinstance(v, bytes) else v.encode() for v in values], dtype=np.object_)


def scalar(value: float | int, dtype: Any) -> np.ndarray:
    return np.array([value], dtype=dtype)


# ----------------------------------------------------------------------------- base model
class StreamingModel:
    """Base of our decoupled Python-backend models (one request at a time per instance)."""

    name = "model"

    def initialize(self, args: dict) -> None:
        exit_with_server()
        route_logs_to_server()
        self.model_config = json.loads(args["model_config"])
        self.parameters = model_parameters(self.model_config)
        set_threads()
        self.device, self.dtype = choose_device(self.parameters.get("device"))
        self.pipe: Any = None
        self.load()
        log.info("%s loaded on %s (%s)", self.name, self.device, self.dtype)

    def load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, request: Request) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def execute(self, requests: list) -> None:
        for raw in requests:
            self._serve(Request(raw))
        return None

    def _serve(self, request: Request) -> None:
        try:
            request.check_cancelled()
            self.run(request)
        except ParamError as exc:
            request.fail(str(exc), "INVALID_ARG")
        except Cancelled:
            # An explicit CANCELLED error, not a bare final flag: the server counts it as cancelled
            # and a client still listening knows the result is not a short one.
            request.fail("request cancelled", "CANCELLED")
        except Exception as exc:  # noqa: BLE001 - every error must end the stream
            log.error("%s request failed: %s", self.name, traceback.format_exc())
            request.fail(f"{type(exc).__name__}: {exc}", _error_code(exc))
        finally:
            request.close()

    def unload(self) -> None:
        self.pipe = None

    def finalize(self) -> None:
        self.unload()
        gc.collect()
        try:
            import torch  # noqa: PLC0415

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def _error_code(exc: Exception) -> str:
    text = str(exc).lower()
    if "out of memory" in text:
        return "UNAVAILABLE"  # the bridge treats UNAVAILABLE + "out of memory" as the OOM path
    return "INTERNAL"


def progress_callback(request: Request, total_steps: int, every: int = 1):
    """A diffusers ``callback_on_step_end`` that streams progress and stops on cancellation.

    Raising from the callback ends the denoising loop within one step.
    """

    def _callback(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        done = step + 1
        if done % every == 0 or done == total_steps:
            request.progress(done / max(total_steps, 1))
        request.check_cancelled()
        return callback_kwargs

    return _callback
