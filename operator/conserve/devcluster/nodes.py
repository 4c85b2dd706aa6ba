"""Fake GPU nodes: specs read from an editable YAML file, and a helper that creates them in any cluster.

KWOK manages every node annotated ``kwok.x-k8s.io/node: fake``: it makes it Ready, renews its Lease and
plays the status of the pods bound to it. The labels are the ones NVIDIA GPU Feature Discovery sets.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from conserve import kube
from conserve.api.labels import (
    ANNOTATION_KWOK_NODE,
    LABEL_GPU_COUNT,
    LABEL_GPU_MEMORY_MIB,
    LABEL_GPU_PRODUCT,
    RESOURCE_GPU,
)
from conserve.kube import ApiError
from conserve.kube.clients import CoreV1Api

KWOK_ANNOTATION_VALUE = "fake"


@dataclass(frozen=True)
class GpuNodeSpec:
    """One fake GPU node. ``gpu_memory_mib`` is per GPU, as GFD's ``nvidia.com/gpu.memory``."""

    name: str
    gpu_product: str
    gpu_count: int
    gpu_memory_mib: int
    gpu_family: str = ""
    gpu_compute: str = ""  # "major.minor" CUDA compute capability
    cpu: str = "128"
    memory: str = "2Ti"
    pods: str = "110"
    labels: Mapping[str, str] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            LABEL_GPU_PRODUCT: self.gpu_product,
            LABEL_GPU_MEMORY_MIB: str(self.gpu_memory_mib),
            LABEL_GPU_COUNT: str(self.gpu_count),
            "nvidia.com/gpu.present": "true",
        }
        if self.gpu_family:
            labels["nvidia.com/gpu.family"] = self.gpu_family
        if self.gpu_compute:
            major, _, minor = self.gpu_compute.partition(".")
            labels["nvidia.com/gpu.compute.major"] = major
            labels["nvidia.com/gpu.compute.minor"] = minor or "0"
        labels.update(self.labels)
        resources_ = {"cpu": self.cpu, "memory": self.memory, "pods": self.pods, RESOURCE_GPU: str(self.gpu_count)}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": labels,
                "annotations": {ANNOTATION_KWOK_NODE: KWOK_ANNOTATION_VALUE},
            },
            "spec": {},
            # The API server keeps status on create (kubelets register this way); KWOK's node-initialize
            # stage keeps capacity and allocatable as given and adds the Ready condition.
            "status": {"capacity": dict(resources_), "allocatable": dict(resources_)},
        }


def default_nodes_file() -> Path:
    return Path(str(resources.files("conserve.devcluster").joinpath("nodes.yaml")))


def load_node_specs(path: Path | str | None = None) -> list[GpuNodeSpec]:
    """Read a nodes file (default: the packaged ``nodes.yaml``) into one spec per node."""
    data = yaml.safe_load(Path(path or default_nodes_file()).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("pools"), list):
        raise ValueError(f"{path}: expected a mapping with a `pools:` list")
    defaults = data.get("defaults") or {}
    specs: list[GpuNodeSpec] = []
    for pool in data["pools"]:
        gpu = pool["gpu"]
        for i in range(int(pool.get("count", 1))):
            specs.append(
                GpuNodeSpec(
                    name=f"kwok-{pool['name']}-{i}",
                    gpu_product=str(gpu["product"]),
                    gpu_count=int(gpu["count"]),
                    gpu_memory_mib=int(gpu["memoryMiB"]),
                    gpu_family=str(gpu.get("family", "")),
                    gpu_compute=str(gpu.get("compute", "")),
                    cpu=str(pool.get("cpu", defaults.get("cpu", "128"))),
                    memory=str(pool.get("memory", defaults.get("memory", "2Ti"))),
                    pods=str(pool.get("pods", defaults.get("pods", "110"))),
                    labels={str(k): str(v) for k, v in (pool.get("labels") or {}).items()},
                )
            )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate node names")
    return specs


def make_gpu_nodes(
    prefix: str, count: int, product: str, gpu_count: int, gpu_memory_mib: int, **kwargs: Any
) -> list[GpuNodeSpec]:
    """Many nodes of one kind, e.g. ``make_gpu_nodes("bench-h200", 500, "NVIDIA-H200", 8, 143771)``."""
    return [
        GpuNodeSpec(
            name=f"{prefix}-{i}", gpu_product=product, gpu_count=gpu_count, gpu_memory_mib=gpu_memory_mib, **kwargs
        )
        for i in range(count)
    ]


def new_api_client(kubeconfig: Path | str, pool_size: int = 16) -> Any:
    """A ``kubernetes.client.ApiClient`` for the given kubeconfig."""
    return kube.new_api_client(kubeconfig, pool_size=pool_size)


def apply_gpu_nodes(kubeconfig: Path | str, nodes: Iterable[GpuNodeSpec], parallelism: int = 8) -> list[str]:
    """Create (or update) the nodes; returns their names. Works on any cluster with KWOK managing
    ``kwok.x-k8s.io/node=fake`` nodes."""
    specs = list(nodes)
    api_client = new_api_client(kubeconfig, pool_size=max(parallelism, 4))
    core = CoreV1Api(api_client)

    def one(spec: GpuNodeSpec) -> str:
        # The client takes plain dicts as bodies; its annotations name only the model classes.
        body: Any = spec.manifest()
        try:
            core.create_node(body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            core.patch_node(spec.name, {"metadata": body["metadata"]})
            core.patch_node_status(spec.name, {"status": body["status"]})
        return spec.name

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallelism)) as pool:
            return list(pool.map(one, specs))
    finally:
        api_client.close()


def delete_gpu_nodes(kubeconfig: Path | str, names: Iterable[str], parallelism: int = 8) -> None:
    api_client = new_api_client(kubeconfig, pool_size=max(parallelism, 4))
    core = CoreV1Api(api_client)

    def one(name: str) -> None:
        try:
            core.delete_node(name)
        except ApiError as exc:
            if exc.status != 404:
                raise

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallelism)) as pool:
            list(pool.map(one, names))
    finally:
        api_client.close()


def wait_nodes_ready(kubeconfig: Path | str, names: Sequence[str], timeout_s: float = 60.0) -> None:
    """Block until every named node reports Ready (KWOK has taken it over)."""
    api_client = new_api_client(kubeconfig)
    core = CoreV1Api(api_client)
    wanted = set(names)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            ready = set()
            for node in core.list_node().items:
                conditions = (node.status.conditions if node.status else None) or []
                if node.metadata and any(c.type == "Ready" and c.status == "True" for c in conditions):
                    ready.add(node.metadata.name)
            missing = wanted - ready
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not Ready after {timeout_s:.0f}s: {sorted(missing)[:10]}")
            time.sleep(0.5)
    finally:
        api_client.close()
