"""The reader the energy options ask for, and where dcgm-exporters are: a Service's ready endpoints or the pods
of a label selector, looked up through the Kubernetes adapter (`conserve.kube`) on every read."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from conserve.energy.dcgm import DcgmExporterReader, static_endpoints
from conserve.energy.nvml import NvmlReader
from conserve.energy.options import EnergyOptions
from conserve.energy.reader import EnergyReader, NullReader
from conserve.kube.clients import CoreV1Api, DiscoveryV1Api

#: The EndpointSlice label naming the Service a slice belongs to.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class ExporterDiscovery:
    """dcgm-exporter endpoints from a Service (its EndpointSlices' ready addresses) or a pod label selector,
    looked up on every read so exporters that come and go are followed."""

    def __init__(self, api_client: Any, *, service: str = "", pod_selector: str = "", port: int = 9400) -> None:
        self.api_client, self.service, self.pod_selector, self.port = api_client, service, pod_selector, port

    async def __call__(self) -> Sequence[str]:
        return await asyncio.to_thread(self._lookup)

    def _lookup(self) -> list[str]:
        urls = self._service_urls() if self.service else []
        if self.pod_selector:
            urls += self._selected_pod_urls()
        return sorted(set(urls))

    def _service_urls(self) -> list[str]:
        namespace, name = self.service.split("/", 1)
        slices = DiscoveryV1Api(self.api_client).list_namespaced_endpoint_slice(
            namespace, label_selector=f"{SERVICE_NAME_LABEL}={name}"
        )
        urls: list[str] = []
        for item in slices.items:
            port = _metrics_port(item.ports or [], self.port)
            for endpoint in item.endpoints or []:
                if endpoint.conditions is not None and endpoint.conditions.ready is False:
                    continue
                urls.extend(_url(address, port) for address in endpoint.addresses or [])
        return urls

    def _selected_pod_urls(self) -> list[str]:
        namespace, selector = self.pod_selector.split("/", 1)
        pods = CoreV1Api(self.api_client).list_namespaced_pod(namespace, label_selector=selector)
        return [
            _url(pod.status.pod_ip, self.port)
            for pod in pods.items
            if pod.status and pod.status.phase == "Running" and pod.status.pod_ip
        ]


def _metrics_port(ports: Sequence[Any], default: int) -> int:
    """The slice's port named `metrics`, else its first, else the configured one."""
    numbered = [p.port for p in ports if p.port]
    named = [p.port for p in ports if p.name == "metrics" and p.port]
    port: int = (named or numbered or [default])[0]
    return port


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/metrics"


def build_reader(options: EnergyOptions, api_client: Any | None) -> EnergyReader:
    """The reader the options ask for."""
    if options.source == "none":
        return NullReader()
    if options.source == "nvml":
        return NvmlReader()
    if options.dcgm_urls:
        return DcgmExporterReader(static_endpoints(options.dcgm_urls))
    if not (options.dcgm_service or options.dcgm_pod_selector) or api_client is None:
        raise ValueError("the dcgm energy source needs exporter URLs, a Service or a pod selector")
    discovery = ExporterDiscovery(
        api_client, service=options.dcgm_service, pod_selector=options.dcgm_pod_selector, port=options.dcgm_port
    )
    return DcgmExporterReader(discovery)
