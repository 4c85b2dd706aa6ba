"""dcgm-exporter reader: scrapes the Prometheus text NVIDIA's dcgm-exporter serves on :9400/metrics.

Fields used (dcgm-exporter's default counters, 3.x and 4.x):
- `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`, a counter, "Total energy consumption since boot (in mJ)";
- `DCGM_FI_DEV_POWER_USAGE`, a gauge, "Power draw (in W)".
Labels: `gpu` (index), `UUID`, `modelName`, `Hostname`, and with the Kubernetes pod mapping `pod`, `namespace`,
`container` (empty or absent when no pod holds the GPU). The text is parsed with prometheus_client's parser.
A GPU shared by several pods (or split by MIG) appears once per pod or instance: `merge_readings` keeps one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conserve.energy.reader import GpuReading, PodRef, merge_readings

log = logging.getLogger(__name__)

ENERGY_FIELD = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
POWER_FIELD = "DCGM_FI_DEV_POWER_USAGE"
DEFAULT_PORT = 9400

EndpointSource = Callable[[], Awaitable[Sequence[str]]]


def parse_exposition(text: str) -> list[GpuReading]:
    """GPU readings from one dcgm-exporter page (one per GPU; pods merged). Raises ValueError on bad text."""
    partial: dict[tuple[str, str, str], dict[str, object]] = {}
    pods: dict[tuple[str, str, str], list[PodRef]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (ENERGY_FIELD, POWER_FIELD):
            continue
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("Hostname", ""), labels.get("gpu", ""), labels.get("UUID", ""))
            entry = partial.setdefault(key, {"product": labels.get("modelName", "")})
            entry["energy_mj" if family.name == ENERGY_FIELD else "power_w"] = float(sample.value)
            pod, namespace = labels.get("pod", ""), labels.get("namespace", "")
            if pod and namespace:
                ref = PodRef(namespace, pod, labels.get("container", ""))
                if ref not in pods.setdefault(key, []):
                    pods[key].append(ref)
    readings = []
    for (hostname, gpu, uuid), entry in partial.items():
        energy, power = entry.get("energy_mj"), entry.get("power_w")
        readings.append(
            GpuReading(
                uuid=uuid,
                gpu_index=int(gpu) if gpu.isdigit() else -1,
                product=str(entry["product"]),
                hostname=hostname,
                energy_mj=float(energy) if isinstance(energy, float) else None,
                power_w=float(power) if isinstance(power, float) else None,
                pods=tuple(pods.get((hostname, gpu, uuid), ())),
            )
        )
    return merge_readings(readings)


def static_endpoints(urls: Sequence[str]) -> EndpointSource:
    async def source() -> Sequence[str]:
        return list(urls)

    return source


class DcgmExporterReader:
    """Scrapes every endpoint the source names (a URL each, e.g. http://10.0.0.5:9400/metrics) concurrently.

    An endpoint that fails is logged and left out of this read: its GPUs are missing samples this interval.
    """

    def __init__(self, endpoints: EndpointSource, *, timeout_s: float = 5.0) -> None:
        self._endpoints = endpoints
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.last_errors: dict[str, str] = {}

    async def read(self) -> list[GpuReading]:
        urls = list(await self._endpoints())
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        results = await asyncio.gather(*(self._scrape(self._session, url) for url in urls))
        return merge_readings(r for batch in results for r in batch)

    async def _scrape(self, session: aiohttp.ClientSession, url: str) -> list[GpuReading]:
        try:
            async with session.get(url) as response:
                response.raise_for_status()
                text = await response.text()
            readings = parse_exposition(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.last_errors[url] = str(exc) or type(exc).__name__
            log.warning("dcgm-exporter scrape of %s failed: %s", url, self.last_errors[url])
            return []
        self.last_errors.pop(url, None)
        return readings

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
