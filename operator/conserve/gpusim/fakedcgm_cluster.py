"""The fake DCGM exporter's targets and load: from a cluster's GPU nodes and gpu-sim pods, or from a YAML file.

`conserve fake-dcgm --targets FILE` serves a YAML list of targets (`pod`, `namespace`, `node`, `gpu`, `product`);
`--from-cluster` maps every GPU of the cluster's GPU nodes to the pods bound there (as the device plugin would)
and follows each gpu-sim pod's own power and energy counter.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from conserve.api.labels import ANNOTATION_ENDPOINT, LABEL_GPU_PRODUCT, RESOURCE_GPU
from conserve.cliargs import add_seconds_option
from conserve.gpusim.fakedcgm import ConstantLoad, FakeDcgmExporter, FakeGpu, make_app
from conserve.gpusim.server import ENERGY_METRIC, POWER_METRIC
from conserve.kube import new_api_client
from conserve.kube.clients import CoreV1Api

log = logging.getLogger(__name__)

# --- targets and load from a cluster ----------------------------------------------------------------------


def targets_from_cluster(pods: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]]) -> list[FakeGpu]:
    """Fake GPUs for the pods bound to GPU nodes, as the device plugin would hand them out: on each node, pods in
    name order take consecutive GPU indices (as many as they request); the node's other GPUs idle with no pod."""
    gpu_nodes: dict[str, tuple[str, int]] = {}
    for node_body in nodes:
        meta = node_body.get("metadata") or {}
        labels = meta.get("labels") or {}
        product = labels.get(LABEL_GPU_PRODUCT)
        if product:
            count = int((node_body.get("status") or {}).get("allocatable", {}).get(RESOURCE_GPU, 0) or 0)
            gpu_nodes[str(meta.get("name"))] = (str(product), count)
    by_node: dict[str, list[tuple[str, str, int]]] = {}
    for pod in pods:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        node = spec.get("nodeName")
        if not node or node not in gpu_nodes or meta.get("deletionTimestamp"):
            continue
        wanted = sum(_gpu_request(c) for c in spec.get("containers") or [])
        if wanted > 0:
            by_node.setdefault(node, []).append((str(meta.get("namespace")), str(meta.get("name")), wanted))
    targets = []
    for node, (product, count) in sorted(gpu_nodes.items()):
        index = 0
        for namespace, name, wanted in sorted(by_node.get(node, []), key=lambda p: (p[1], p[0])):
            for _ in range(wanted):
                if index < count:
                    targets.append(FakeGpu(node, index, product, name, namespace, "vllm"))
                    index += 1
        targets.extend(FakeGpu(node, i, product) for i in range(index, count))
    return targets


def _gpu_request(container: Mapping[str, Any]) -> int:
    resources = container.get("resources") or {}
    value = (resources.get("limits") or {}).get(RESOURCE_GPU) or (resources.get("requests") or {}).get(RESOURCE_GPU)
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


@dataclass
class GpuSimLoad:
    """Load and energy from the GPU-server simulators (`conserve gpu-sim`): each pod's modelled power
    (`conserve_gpusim_power_watts`, for all its GPUs) turned back into an activity of the same power model (the
    power gauge and the utilisation), and each pod's energy counter (`conserve_gpusim_energy_joules_total`, J) split
    evenly over its GPUs (`counter_j`, the exporter's energy counter). `endpoints` maps "<ns>/<pod>" to the
    simulator's host:port (the pod's `conserve.dev/endpoint`). A scrape that fails keeps the pod's last values, so
    the next good one covers the gap exactly once; a pod whose endpoint is gone is forgotten."""

    endpoints: dict[str, str] = field(default_factory=dict)
    gpus_per_pod: dict[str, int] = field(default_factory=dict)
    power_w: dict[str, float] = field(default_factory=dict)  # last scraped, per pod
    energy_j: dict[str, float] = field(default_factory=dict)  # last scraped, per pod (all its GPUs)

    def __call__(self, gpu: FakeGpu) -> float:
        watts = self.power_w.get(gpu.pod_key)
        if watts is None:
            return 0.0
        per_gpu_w = watts / max(self.gpus_per_pod.get(gpu.pod_key, 1), 1)
        spec = gpu.spec
        return (per_gpu_w - spec.idle_power_w) / max(spec.tdp_w - spec.idle_power_w, 1e-9)

    def counter_j(self, gpu: FakeGpu) -> float | None:
        """This GPU's share of its pod's simulator energy counter (J), or None when no simulator reports one."""
        joules = self.energy_j.get(gpu.pod_key)
        if joules is None:
            return None
        return joules / max(self.gpus_per_pod.get(gpu.pod_key, 1), 1)

    async def refresh(self, session: Any) -> None:
        endpoints = dict(self.endpoints)
        for gone in [k for k in set(self.power_w) | set(self.energy_j) if k not in endpoints]:
            self.power_w.pop(gone, None)
            self.energy_j.pop(gone, None)
        for key, endpoint in endpoints.items():
            try:
                async with session.get(f"http://{endpoint}/metrics") as response:
                    response.raise_for_status()
                    text = await response.text()
                power, energy = None, None
                for family in text_string_to_metric_families(text):
                    if family.name == POWER_METRIC and family.samples:
                        power = float(sum(s.value for s in family.samples))
                    elif family.name == ENERGY_METRIC:  # a counter: samples end in _total
                        values = [s.value for s in family.samples if s.name.endswith("_total")]
                        energy = float(sum(values)) if values else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # starting, busy, restarting: keep values
                log.debug("gpu-sim %s at %s: %s", key, endpoint, exc)
                continue
            if power is not None:
                self.power_w[key] = power
            if energy is not None:
                self.energy_j[key] = energy


class ClusterTargets:
    """Targets (and gpu-sim endpoints) refreshed from the API server on a background thread's schedule."""

    def __init__(self, kubeconfig: str | None, namespace: str | None, load: GpuSimLoad) -> None:
        self._api: Any = new_api_client(kubeconfig)
        self._core: Any = CoreV1Api(self._api)
        self._namespace = namespace
        self._load = load
        self.targets: list[FakeGpu] = []

    def __call__(self) -> Sequence[FakeGpu]:
        return self.targets

    def refresh(self) -> None:
        nodes = self._api.sanitize_for_serialization(self._core.list_node().items)
        if self._namespace:
            pod_list = self._core.list_namespaced_pod(self._namespace)
        else:
            pod_list = self._core.list_pod_for_all_namespaces()
        pods = self._api.sanitize_for_serialization(pod_list.items)
        self.targets = targets_from_cluster(pods, nodes)
        endpoints, counts = {}, {}
        for pod in pods:
            meta = pod.get("metadata") or {}
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            endpoint = (meta.get("annotations") or {}).get(ANNOTATION_ENDPOINT)
            if endpoint:
                endpoints[key] = endpoint
                counts[key] = max(sum(_gpu_request(c) for c in (pod.get("spec") or {}).get("containers") or []), 1)
        self._load.endpoints, self._load.gpus_per_pod = endpoints, counts


# --- CLI -------------------------------------------------------------------------------------------------


def load_targets(path: Path) -> list[FakeGpu]:
    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of targets")
    return [
        FakeGpu(
            node=str(item["node"]),
            gpu_index=int(item.get("gpu", 0)),
            product=str(item["product"]),
            pod=str(item.get("pod", "")),
            namespace=str(item.get("namespace", "")),
            container=str(item.get("container", "")),
        )
        for item in items
    ]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "fake-dcgm", help="serve dcgm-exporter metrics for fake GPUs whose power follows their load"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9400)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--targets", type=Path, help="YAML list of pod/namespace/node/gpu/product")
    source.add_argument(
        "--from-cluster",
        action="store_true",
        help="every GPU of the cluster's GPU nodes, pods mapped as the device plugin would; load from gpu-sim",
    )
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--namespace", default=None, help="with --from-cluster: only this namespace's pods")
    add_seconds_option(parser, "--refresh-seconds", 2.0, "with --from-cluster: re-list this often")
    parser.add_argument("--activity", type=float, default=0.0, help="activity of every GPU without an override")
    add_seconds_option(
        parser, "--tick-seconds", 1.0, "how often counters advance (and, with --from-cluster, gpu-sim is scraped)"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.targets is not None:
        targets = load_targets(args.targets)
        exporter = FakeDcgmExporter(targets=lambda: targets, load=ConstantLoad(args.activity))
        app = make_app(exporter, tick_s=args.tick_seconds)
        log.info("fake dcgm-exporter: %d GPUs on http://%s:%d/metrics", len(targets), args.host, args.port)
    else:
        gpusim = GpuSimLoad()
        cluster = ClusterTargets(args.kubeconfig, args.namespace, gpusim)
        baseline = ConstantLoad(args.activity)

        def load(gpu: FakeGpu) -> float:
            return gpusim(gpu) if gpu.pod_key in gpusim.power_w else baseline(gpu)

        exporter = FakeDcgmExporter(targets=cluster, load=load, counters=gpusim.counter_j)
        app = make_app(exporter, tick_s=args.tick_seconds)

        async def follow_cluster(app: web.Application) -> Any:
            async def list_cluster() -> None:
                while True:
                    try:
                        await asyncio.to_thread(cluster.refresh)
                    except Exception as exc:  # noqa: BLE001 any failure (API server restarting, reset connection): keep the last targets
                        log.warning("fake dcgm-exporter: cluster refresh failed: %s", exc)
                    await asyncio.sleep(args.refresh_seconds)

            async def scrape_gpusim() -> None:
                # As often as the counters tick: the exporter's counters lag gpu-sim's by at most this.
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                    while True:
                        await gpusim.refresh(session)
                        await asyncio.sleep(args.tick_seconds)

            tasks = [asyncio.create_task(list_cluster()), asyncio.create_task(scrape_gpusim())]
            yield
            for task in tasks:
                task.cancel()

        app.cleanup_ctx.append(follow_cluster)
        log.info("fake dcgm-exporter for the cluster's GPU nodes on http://%s:%d/metrics", args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
