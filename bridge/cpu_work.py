"""CPU work of HTTP requests (the safety gate's reading, tokenising, scene rules) on a thread pool of
its own, bounded in time (docs/API.md, "Limits").

Input sizes are bounded already (docs/API.md); this bounds the time too. The pool is the
standard library's, sized ``API_CPU_WORKERS``, apart from the event loop's default executor (which
uvicorn, Redis and file work share), so a flood of heavy requests waits here and cannot starve
them. A request whose work has not finished (waiting for a thread included) within
``API_CPU_WORK_TIMEOUT_S`` raises :class:`CpuWorkTimeout`; work not yet started is dropped from the
pool's queue, work already running finishes in its thread (Python cannot stop a thread) but holds
one of the pool's threads, never more.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class CpuWorkTimeout(Exception):
    """One request's CPU work did not finish within the time limit."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"CPU work did not finish within {timeout_s:g} s")
        self.timeout_s = timeout_s


class CpuWork:
    """``await cpu_work.run(fn, *args)``: ``fn(*args)`` on the pool, within ``timeout_s``."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="api-cpu")

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        future = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        limit = asyncio.timeout(self.timeout_s)
        try:
            async with limit:
                return await future  # a timeout cancels the future: dropped from the queue if not started
        except TimeoutError:
            if limit.expired():
                raise CpuWorkTimeout(self.timeout_s) from None
            raise  # fn's own TimeoutError

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
