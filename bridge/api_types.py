"""What the HTTP API uses of the process it serves: :class:`ApiRuntime`, the parts of
:class:`bridge.runtime.Runtime` its routes read (docs/ARCHITECTURE.md, "HTTP API").

A protocol rather than ``Runtime`` itself, so the routes name what they depend on and a module of
the API never imports the module that assembles everything (the runtime imports the API).
``tests/test_api.py`` checks that a started ``Runtime`` holds every part with the type named here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bridge.activity import Activity
    from bridge.availability import Availability
    from bridge.cpu_work import CpuWork
    from bridge.launcher import TritonServer
    from bridge.memory_ops import MemoryOps
    from bridge.queue import Queue
    from bridge.residency import ResidencyManager
    from bridge.settings import Settings
    from bridge.textgen import TextService
    from bridge.triton_client import TritonClient
    from bridge.worker import Worker


class ApiRuntime(Protocol):
    """The long-lived parts the routes use. ``worker`` exists with or without the job loop; its
    dispatcher grants the GPU only when ``with_jobs`` (an API-only process has nothing to wait for)."""

    settings: Settings
    with_jobs: bool
    queue: Queue
    triton: TritonClient
    triton_server: TritonServer | None
    residency: ResidencyManager
    text: TextService
    worker: Worker
    availability: Availability
    memory_ops: MemoryOps
    activity: Activity
    cpu_work: CpuWork
    api_server: Any  # uvicorn's Server: the operator page's event stream ends when it exits
