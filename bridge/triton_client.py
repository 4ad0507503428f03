"""Inference on Triton over gRPC (grpc.aio): streaming requests with progress and cancellation.

Every model in our repository is decoupled, so every request is a bidirectional stream: we send
one request, half-close, and read responses until the server ends the stream after the model's
final response. Closing the iterator early (an ``asyncio`` cancellation, a time limit, ``break``)
cancels the gRPC call, which the model sees as ``is_cancelled()`` within one step; a request of a
model that takes stop requests (the Qwen models) is stopped that way instead and its stream read to
its end in the background: Triton 24.10's gRPC frontend can crash, or hold the request for ever
(its model then never unloads), when a cancellation meets a response on its way, and a chat stream
is always sending (docs/ARCHITECTURE.md, "Stopping a stream").
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from bridge.aio import cancel_until_done
from bridge.launcher import GRPC_API_KEY_HEADER

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
OnResponse = Callable[[Outputs], Awaitable[None] | None]

#: A stopped request's stream is read this long at most for its final answer, then cancelled.
STOP_WAIT_S = 10.0
_END = object()  # the reader's last item

# Messages that mean the model (or the server) is gone rather than the request being wrong.
_TRANSIENT_MARKERS = ("is not healthy", "failed to connect", "unavailable", "connection",
                      "socket closed", "is not ready", "unknown model", "has been unloaded",
                      "queue is full")  # a Qwen model's refusal when busy (model_kit/batching.py)


class InferenceFailed(RuntimeError):
    """A request failed; ``message`` is the server's or the model's own words."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.message = message

    @property
    def transient(self) -> bool:
        """The server or the model process failed; retrying (after a reload) may succeed."""
        text = self.message.lower()
        return any(marker in text for marker in _TRANSIENT_MARKERS)


class ModelProcessDied(InferenceFailed):
    """The model's process died mid-request (bridge/stub_watch.py): reload it, then retry."""


def _failed(model: str, message: str) -> InferenceFailed:
    """The error for a failed request. Triton's own words for a dead (or hung) stub process, when
    its health check sees it before :class:`bridge.stub_watch.StubWatch` does, mean the same as
    the watch's finding: only a reload brings the model back (an unload alone waits out the dead
    stub's timeout first)."""
    text = message.lower()
    if "stub process" in text and "is not healthy" in text:
        return ModelProcessDied(model, message)
    return InferenceFailed(model, message)


def _input(name: str, value: Any) -> grpcclient.InferInput:
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    if isinstance(value, bool):
        array = np.array([value], dtype=bool)
    elif isinstance(value, str):
        array = np.array([value.encode("utf-8")], dtype=np.object_)
    elif isinstance(value, bytes):
        array = np.array([value], dtype=np.object_)
    else:
        array = np.asarray(value)
    datatype = "BYTES" if array.dtype == np.object_ else grpcclient.np_to_triton_dtype(array.dtype)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _outputs(result: grpcclient.InferResult) -> Outputs:
    return {out.name: result.as_numpy(out.name) for out in result.get_response().outputs}


async def _read(stream: Any, arrived: asyncio.Queue) -> None:
    """Every ``(result, error)`` of ``stream`` into ``arrived``, then an exception it raised, if
    any, then ``_END``."""
    try:
        async for item in stream:
            arrived.put_nowait(item)
    except Exception as exc:  # noqa: BLE001 - the consumer raises it
        arrived.put_nowait(exc)
    finally:
        arrived.put_nowait(_END)


class TritonClient:
    """A grpc.aio client for one Triton server."""

    def __init__(self, url: str, api_key: SecretStr | None = None) -> None:
        self.url = url
        self._headers = {GRPC_API_KEY_HEADER: api_key.get_secret_value()} if api_key else None
        self._client = grpcaio.InferenceServerClient(url)
        # Beside each request: returns (a reason) once the model's process is gone (bridge/stub_watch.py).
        self.watch: Callable[[str], Awaitable[str]] | None = None
        self._stopping: set[asyncio.Task] = set()  # stopped requests whose streams are still read

    @property
    def raw(self) -> grpcaio.InferenceServerClient:
        """The underlying tritonclient (for model control)."""
        return self._client

    @property
    def headers(self) -> dict[str, str] | None:
        return self._headers

    async def close(self) -> None:
        await cancel_until_done(self._stopping)
        await self._client.close()

    async def is_live(self) -> bool:
        try:
            return bool(await self._client.is_server_live())
        except InferenceServerException:
            return False

    async def responses(self, model: str, inputs: dict[str, Any], request_id: str = "",
                        on_sent: Callable[[], None] | None = None, stoppable: bool = False) -> AsyncIterator[Outputs]:
        """Yield each response's outputs; raise :class:`InferenceFailed` on an error response.
        ``on_sent`` is called once the request is written to the stream.

        Leaving the iteration early cancels the request on the server: with ``stoppable`` (the
        model takes ``stop_request_id``) and a ``request_id``, by a stop request, its stream read
        to its end in the background (the module's docstring says why); else by cancelling the call.
        """
        tensors = [_input(name, value) for name, value in inputs.items() if value is not None]

        async def _requests():
            yield {"model_name": model, "inputs": tensors, "request_id": request_id}
            if on_sent is not None:  # asked for the next request: this one is written
                on_sent()

        stream = self._client.stream_infer(_requests())
        # Read by a task of its own: a caller cancelled while awaiting the call itself would cancel
        # the gRPC call with it (grpc.aio does), which a stop request is there to avoid.
        arrived: asyncio.Queue = asyncio.Queue()
        reader = asyncio.ensure_future(_read(stream, arrived))
        finished = False
        try:
            while (item := await arrived.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                result, error = item
                if error is not None:
                    raise _failed(model, error.message() if hasattr(error, "message") else str(error))
                yield _outputs(result)
            finished = True
        except InferenceServerException as exc:
            raise _failed(model, exc.message() or str(exc)) from None
        except Exception as exc:  # grpc.aio errors surface as AioRpcError
            if type(exc).__name__ == "AioRpcError":
                raise InferenceFailed(model, f"{exc.code().name}: {exc.details()}") from None  # type: ignore[attr-defined]
            raise
        finally:
            if not finished and not (stoppable and request_id and self._stop_later(model, request_id, stream, reader)):
                stream.cancel()
                reader.cancel()

    def _stop_later(self, model: str, request_id: str, stream: Any, reader: asyncio.Future) -> bool:
        """Start :meth:`_stop` in the background; False if the stream already ended or the loop
        is closing (the caller cancels the call)."""
        if reader.done():
            return False
        try:
            task = asyncio.get_running_loop().create_task(self._stop(model, request_id, stream, reader))
        except RuntimeError:
            return False
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        return True

    async def _stop(self, model: str, request_id: str, stream: Any, reader: asyncio.Future) -> None:
        """Ask ``model`` to stop ``request_id`` and wait for its stream to end; cancel the call
        only if that does not happen within :data:`STOP_WAIT_S`."""
        try:
            async with asyncio.timeout(STOP_WAIT_S):
                async for _ in self.responses(model, {"stop_request_id": request_id}):
                    pass
                await asyncio.shield(reader)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - the fallback below
            log.warning("%s: request %s not stopped (%s); its call is cancelled", model, request_id,
                        type(exc).__name__)
            stream.cancel()
            reader.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def run(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        on_response: OnResponse | None = None,
        timeout: float | None = None,
        request_id: str = "",
        on_sent: Callable[[], None] | None = None,
        stoppable: bool = False,
    ) -> Outputs:
        """Run one request to completion; every response goes to ``on_response``; return the
        outputs of all responses merged (later responses win), i.e. the final results.
        ``on_sent`` is called once the request is on its way to the server."""
        merged: Outputs = {}

        async def _consume() -> None:
            async with aclosing(self.responses(model, inputs, request_id, on_sent, stoppable)) as responses:
                async for outputs in responses:
                    merged.update(outputs)
                    if on_response is not None:
                        maybe = on_response(outputs)
                        if asyncio.iscoroutine(maybe):
                            await maybe

        if timeout is None:
            await self._watched(model, _consume)
        else:
            async with asyncio.timeout(timeout):
                await self._watched(model, _consume)
        return merged

    async def _watched(self, model: str, consume: Callable[[], Awaitable[None]]) -> None:
        """Run ``consume`` while :attr:`watch` looks at the model; a dead model process cancels
        the request at once (Triton notices only after its own timeouts) and fails it as
        transient, so the job is retried on the reloaded model."""
        if self.watch is None:
            await consume()
            return
        request = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(self.watch(model))
        try:
            await asyncio.wait({request, watch}, return_when=asyncio.FIRST_COMPLETED)
            if request.done():
                request.result()
                return
            reason = watch.result()
            request.cancel()
            await asyncio.wait({request}, timeout=5.0)
            log.warning("%s mid-request; request cancelled", reason)
            raise ModelProcessDied(model, f"{reason}: the model is not healthy")
        finally:
            for task in (request, watch):
                if not task.done():
                    task.cancel()
            await asyncio.gather(request, watch, return_exceptions=True)


class TritonModelControl:
    """:class:`bridge.residency.ModelControl` over Triton's gRPC repository API (``tritonclient.grpc.aio``)."""

    def __init__(self, url: str, api_key: Any = None, client: Any = None) -> None:
        self._client = client if client is not None else grpcaio.InferenceServerClient(url)
        key = api_key.get_secret_value() if hasattr(api_key, "get_secret_value") else api_key
        self._headers = {GRPC_API_KEY_HEADER: key} if key else None

    async def load(self, name: str, timeout_s: float | None = None) -> None:
        """Load ``name``; returns when the model is ready (or raises the server's error)."""
        await self._client.load_model(name, headers=self._headers, client_timeout=timeout_s)

    async def unload(self, name: str) -> None:
        """Ask for ``name`` to be unloaded; returns before its memory is free."""
        await self._client.unload_model(name, headers=self._headers)

    async def index(self) -> dict[str, str]:
        """State per model; a model with several versions reports its most alive one."""
        reply = await self._client.get_model_repository_index(headers=self._headers, as_json=True)
        order = {"READY": 3, "LOADING": 2, "UNLOADING": 1}
        states: dict[str, str] = {}
        for entry in reply.get("models", []):
            state = (entry.get("state") or "UNAVAILABLE").upper()
            name = entry["name"]
            if order.get(state, 0) >= order.get(states.get(name, ""), 0):
                states[name] = state
        return states

    async def close(self) -> None:
        await self._client.close()
