"""Builders of raw Node and Pod objects (as the API server serves them) for tests and the benchmark."""

from __future__ import annotations

from typing import Any

from conserve.api.labels import LABEL_MODEL, LABEL_ROLE
from conserve.core.gpus import LABEL_GPU_COUNT, LABEL_GPU_MEMORY_MIB, LABEL_GPU_PRODUCT, LABEL_TIER_OVERRIDE

#: GFD product strings and per-GPU memory (MiB) of the fleet the tests and the benchmark use.
GFD_PRODUCTS: dict[str, tuple[str, int]] = {
    "H100": ("NVIDIA-H100-80GB-HBM3", 81559),
    "L40S": ("NVIDIA-L40S", 46068),
    "H200": ("NVIDIA-H200", 143771),
    "A100": ("NVIDIA-A100-SXM4-80GB", 81920),
    "H20": ("NVIDIA-H20", 97871),
}


def node(
    name: str,
    gpu: str | None = "H100",
    *,
    gpus: int = 8,
    tier: str | None = None,
    product: str | None = None,
    memory_mib: int | None = None,
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node with GFD labels for `gpu` (a key of GFD_PRODUCTS; None: no GPU labels) and allocatable GPUs."""
    labels: dict[str, str] = {"kubernetes.io/hostname": name, "type": "kwok"}
    if gpu is not None or product is not None:
        default_product, default_memory = GFD_PRODUCTS.get(gpu or "", ("", 0))
        labels[LABEL_GPU_PRODUCT] = product if product is not None else default_product
        labels[LABEL_GPU_MEMORY_MIB] = str(memory_mib if memory_mib is not None else default_memory)
        labels[LABEL_GPU_COUNT] = str(gpus)
    if tier is not None:
        labels[LABEL_TIER_OVERRIDE] = tier
    labels.update(extra_labels or {})
    resources = {"cpu": "128", "memory": "2Ti", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "1",
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {},
        "status": {
            "capacity": dict(resources),
            "allocatable": dict(resources),
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def pod(
    name: str,
    role: str | None = "prefill",
    *,
    gpus: int = 1,
    namespace: str = "default",
    scheduler_name: str = "conserve-scheduler",
    node_name: str | None = None,
    phase: str = "Pending",
    model: str | None = None,
    uid: str | None = None,
) -> dict[str, Any]:
    """A Pod with one container asking for `gpus` nvidia.com/gpu (as a limit, as device plugins want)."""
    labels = {"app": name}
    if role is not None:
        labels[LABEL_ROLE] = role
    if model is not None:
        labels[LABEL_MODEL] = model
    spec: dict[str, Any] = {
        "schedulerName": scheduler_name,
        "containers": [
            {
                "name": "server",
                "image": "registry.k8s.io/pause:3.10",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
                if gpus
                else {},
            }
        ],
    }
    if node_name is not None:
        spec["nodeName"] = node_name
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{namespace}-{name}", "labels": labels},
        "spec": spec,
        "status": {"phase": phase},
    }


def fleet(count: int) -> list[dict[str, Any]]:
    """`count` nodes cycling through the GFD_PRODUCTS (two compute, three bandwidth products)."""
    kinds = list(GFD_PRODUCTS)
    return [node(f"node-{i:05d}", kinds[i % len(kinds)]) for i in range(count)]
