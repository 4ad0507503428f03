"""GPU memory readings through NVML (``pynvml``), when a GPU and the library are present.

On a CPU machine :meth:`NvmlMemory.probe` returns ``None`` and callers go on without readings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

GB = 1024**3


@dataclass(frozen=True)
class GpuMemoryInfo:
    total_gb: float
    free_gb: float
    used_gb: float


class GpuMemory(Protocol):
    def read(self) -> GpuMemoryInfo | None: ...


class NvmlMemory:
    """GPU memory of one device through NVML (``pynvml``)."""

    def __init__(self, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    @classmethod
    def probe(cls, index: int = 0) -> NvmlMemory | None:
        """An NVML reader, or ``None`` when pynvml or a GPU is missing."""
        try:
            return cls(index)
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError (no driver, no device)
            log.info("no GPU memory readings (NVML unavailable: %s)", exc)
            return None

    def read(self) -> GpuMemoryInfo | None:
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as exc:  # noqa: BLE001 - a reading is optional
            log.warning("NVML memory reading failed: %s", exc)
            return None
        return GpuMemoryInfo(info.total / GB, info.free / GB, info.used / GB)
