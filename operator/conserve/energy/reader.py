"""The energy reader contract, and the readers that need no hardware (null and fake).

A reader returns one `GpuReading` per physical GPU it can see: its cumulative energy counter (mJ) and its
instantaneous power (W), with where the GPU is (node, index, UUID, product) and which pods use it when the
source knows (dcgm-exporter's Kubernetes pod mapping). Units are in every name. Readers do not keep history or
compute deltas: that is `conserve.core.energy`, fed by the operator's loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    pod: str
    container: str = ""


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU as a reader sees it. `energy_mj` or `power_w` is None when the source does not report it."""

    uuid: str
    gpu_index: int
    product: str = ""  # modelName as the driver says it, e.g. "NVIDIA H200"
    hostname: str = ""  # the node
    energy_mj: float | None = None
    power_w: float | None = None
    pods: tuple[PodRef, ...] = ()

    @property
    def key(self) -> str:
        """Identity across readings: the UUID, else node and index."""
        return self.uuid or f"{self.hostname}/{self.gpu_index}"


@runtime_checkable
class EnergyReader(Protocol):
    """Reads every GPU the reader can see. Failing sources are left out, not raised (missing samples)."""

    async def read(self) -> list[GpuReading]: ...

    async def close(self) -> None: ...


def merge_readings(readings: Iterable[GpuReading]) -> list[GpuReading]:
    """One reading per GPU: dcgm-exporter repeats a GPU per pod sharing it (and per MIG instance), and two
    endpoints may see the same node; energy must be counted once. Pods are merged; the first counter wins."""
    by_key: dict[str, GpuReading] = {}
    for reading in readings:
        seen = by_key.get(reading.key)
        if seen is None:
            by_key[reading.key] = reading
            continue
        pods = seen.pods + tuple(p for p in reading.pods if p not in seen.pods)
        by_key[reading.key] = replace(
            seen,
            pods=pods,
            energy_mj=seen.energy_mj if seen.energy_mj is not None else reading.energy_mj,
            power_w=seen.power_w if seen.power_w is not None else reading.power_w,
            product=seen.product or reading.product,
            hostname=seen.hostname or reading.hostname,
        )
    return sorted(by_key.values(), key=lambda r: (r.hostname, r.gpu_index, r.uuid))


class NullReader:
    """No GPU: reads nothing. Energy then stays unknown (None) rather than zero."""

    async def read(self) -> list[GpuReading]:
        return []

    async def close(self) -> None:
        return None


@dataclass
class FakeReader:
    """Returns what a test sets; `advance` moves every counter by power x seconds like a real board."""

    readings: list[GpuReading] = field(default_factory=list)
    reads: int = 0

    async def read(self) -> list[GpuReading]:
        self.reads += 1
        return list(self.readings)

    async def close(self) -> None:
        return None

    def set(self, readings: Sequence[GpuReading]) -> None:
        self.readings = list(readings)

    def advance(self, seconds: float) -> None:
        self.readings = [
            replace(r, energy_mj=(r.energy_mj or 0.0) + (r.power_w or 0.0) * seconds * 1000.0) for r in self.readings
        ]
