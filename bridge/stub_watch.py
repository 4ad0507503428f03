"""Notice, while a request is in flight, that its model's process died (docs/ARCHITECTURE.md,
"Process life cycle").

A Python-backend model runs in a stub process under tritonserver. When the stub dies mid-request,
Triton itself fails the request only after its own health checks (12 s to 2 min measured); the
bridge would wait that long with the GPU granted. :class:`StubWatch` watches the model beside the
request, once a second: with the embedded server (its pid known) the stub processes that serve the
model; with an external server (``TRITON_URL``) Triton's model readiness. The request is cancelled
as soon as the model is gone (``TritonClient.run``), and the job is retried on the reloaded model.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import psutil

STUB_BINARY = "triton_python_backend_stub"


def stub_pids(server_pid: int, model: str) -> set[int]:
    """The live stub processes of ``model`` under the server ``server_pid`` (their command line
    names the model's ``model.py`` in the repository: ``.../<model>/<version>/model.py``)."""
    try:
        children = psutil.Process(server_pid).children()
    except psutil.Error:
        return set()
    found = set()
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].endswith(STUB_BINARY) and any(f"/{model}/" in arg for arg in cmdline[1:]):
            found.add(child.pid)
    return found


class StubWatch:
    """``await watch(model)`` returns (a reason) once ``model``'s process is gone; it never returns
    while the model lives. ``server_pid()``: the embedded server's pid, or None (external)."""

    def __init__(self, client: Any, server_pid: Callable[[], int | None], interval_s: float = 1.0) -> None:
        self.client = client
        self.server_pid = server_pid
        self.interval_s = interval_s

    async def __call__(self, model: str) -> str:
        watched: set[int] = set()
        while True:
            await asyncio.sleep(self.interval_s)
            server = self.server_pid()
            if server is None:
                if not await self._ready(model):
                    return f"model {model} is no longer ready"
                continue
            live = await asyncio.to_thread(stub_pids, server, model)
            if watched and not (watched & live):
                return f"the stub process of {model} (pid {', '.join(map(str, sorted(watched)))}) exited"
            watched = live or watched

    async def _ready(self, model: str) -> bool:
        try:
            return bool(await self.client.raw.is_model_ready(model, headers=self.client.headers))
        except Exception:  # noqa: BLE001 - an unreachable server is the request's own error to report
            return True
