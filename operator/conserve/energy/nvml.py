"""NVML reader (nvidia-ml-py's `pynvml`): the GPUs of the machine it runs on.

Per GPU: `nvmlDeviceGetTotalEnergyConsumption` (mJ since the driver was loaded, Volta and later) and
`nvmlDeviceGetPowerUsage` (mW). A field the GPU does not support reads as None; the other still counts
(`conserve.core.energy` integrates power when there is no counter). Runs where the operator (or an agent on the
node) sees the GPUs; in a cluster the usual source is dcgm-exporter (`conserve.energy.dcgm`).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import pynvml

from conserve.energy.reader import GpuReading

log = logging.getLogger(__name__)


class NvmlUnavailableError(RuntimeError):
    """NVML could not be initialised (no driver, no GPU, no library)."""


def _text(value: Any) -> str:
    # Older nvidia-ml-py returned bytes for strings.
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Reads every GPU NVML lists. `nvml` is injectable so tests patch in fake counters."""

    def __init__(self, *, hostname: str | None = None, nvml: Any = None) -> None:
        self._nvml = nvml if nvml is not None else pynvml  # importing it loads no library: nvmlInit does
        self._hostname = hostname if hostname is not None else socket.gethostname()
        self._initialised = False

    def open(self) -> int:
        """Initialise NVML; returns the GPU count. Raises NvmlUnavailableError."""
        if not self._initialised:
            try:
                self._nvml.nvmlInit()
            except Exception as exc:  # pynvml raises NVMLError subclasses, or OSError without the library
                raise NvmlUnavailableError(f"NVML init failed: {exc}") from exc
            self._initialised = True
        return int(self._nvml.nvmlDeviceGetCount())

    def read_sync(self) -> list[GpuReading]:
        count = self.open()
        readings: list[GpuReading] = []
        for index in range(count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(self._nvml.nvmlDeviceGetUUID(handle))
            except self._nvml.NVMLError as exc:
                log.warning("NVML: GPU %d unreadable: %s", index, exc)
                continue
            readings.append(
                GpuReading(
                    uuid=uuid,
                    gpu_index=index,
                    product=self._optional_text(self._nvml.nvmlDeviceGetName, handle),
                    hostname=self._hostname,
                    energy_mj=self._optional_number(self._nvml.nvmlDeviceGetTotalEnergyConsumption, handle),
                    power_w=_mw_to_w(self._optional_number(self._nvml.nvmlDeviceGetPowerUsage, handle)),
                )
            )
        return readings

    async def read(self) -> list[GpuReading]:
        # NVML queries are local driver calls of microseconds; no thread hop needed.
        return self.read_sync()

    async def close(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("NVML shutdown: %s", exc)

    def _optional_number(self, query: Any, handle: Any) -> float | None:
        try:
            value = query(handle)
        except self._nvml.NVMLError:
            return None  # not supported on this GPU, or transiently unavailable: a missing sample
        # Keep NVML's integers exact: a float loses mJ near the top of the 64-bit counter, where it wraps.
        return value if isinstance(value, int) else float(value)

    def _optional_text(self, query: Any, handle: Any) -> str:
        try:
            return _text(query(handle))
        except self._nvml.NVMLError:
            return ""


def _mw_to_w(power_mw: float | None) -> float | None:
    return None if power_mw is None else power_mw / 1000.0
