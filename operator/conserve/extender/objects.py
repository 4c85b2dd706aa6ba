"""Reading the few fields the extender needs from raw Pod and Node objects (dicts, as the API serves them).

Everything here tolerates missing or ill-typed fields: a malformed object yields defaults, never an exception.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conserve.api.labels import LABEL_MODEL, LABEL_ROLE, POD_FINISHED_PHASES
from conserve.core.gpus import (
    LABEL_GPU_COUNT,
    LABEL_GPU_MEMORY_MIB,
    LABEL_GPU_PRODUCT,
    LABEL_TIER_OVERRIDE,
    RESOURCE_GPU,
    NodeGpu,
    Role,
    node_gpu_from_labels,
)
from conserve.core.node_scoring import DEFAULT_MODEL, GpuNode, PodDemand

# LABEL_ROLE states a pod's role; LABEL_MODEL (optional) the model it serves, a name from
# `conserve.core.llm.MODELS` (prices energy per token).
__all__ = ["LABEL_MODEL", "LABEL_ROLE"]


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels = _dict(_dict(obj.get("metadata")).get("labels"))
    return {str(k): str(v) for k, v in labels.items() if isinstance(v, str)}


def name_of(obj: Mapping[str, Any]) -> str:
    name = _dict(obj.get("metadata")).get("name")
    return name if isinstance(name, str) else ""


def parse_count(value: object) -> int:
    """An integer resource quantity ("8", 8, "8k" is not a GPU count): 0 when it is not a plain integer."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str):
        try:
            return max(int(value.strip()), 0)
        except ValueError:
            return 0
    return 0


def _container_gpus(container: object) -> int:
    resources = _dict(_dict(container).get("resources"))
    requests = _dict(resources.get("requests"))
    limits = _dict(resources.get("limits"))
    # Extended resources: requests default to limits and may not differ from them; take the larger.
    return max(parse_count(requests.get(RESOURCE_GPU)), parse_count(limits.get(RESOURCE_GPU)))


def pod_gpu_request(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: max(sum over containers, largest init container), as the scheduler counts."""
    spec = _dict(pod.get("spec"))
    containers = spec.get("containers")
    init_containers = spec.get("initContainers")
    total = sum(_container_gpus(c) for c in containers) if isinstance(containers, list) else 0
    largest_init = (
        max((_container_gpus(c) for c in init_containers), default=0) if isinstance(init_containers, list) else 0
    )
    return max(total, largest_init)


def pod_role(pod: Mapping[str, Any]) -> Role | None:
    value = labels_of(pod).get(LABEL_ROLE, "").strip().lower()
    try:
        return Role(value)
    except ValueError:
        return None


def pod_scheduler_name(pod: Mapping[str, Any]) -> str:
    name = _dict(pod.get("spec")).get("schedulerName")
    return name if isinstance(name, str) and name else "default-scheduler"


def pod_demand(pod: Mapping[str, Any]) -> PodDemand:
    model = labels_of(pod).get(LABEL_MODEL, DEFAULT_MODEL).strip().lower() or DEFAULT_MODEL
    return PodDemand(role=pod_role(pod), gpus=pod_gpu_request(pod), model=model)


@dataclass(frozen=True, slots=True)
class PodUsage:
    """What a bound, non-terminal pod takes from its node."""

    node: str
    gpus: int
    role: Role | None


def pod_usage(pod: Mapping[str, Any]) -> PodUsage | None:
    """The pod's claim on a node, or None when it is not bound or has finished."""
    node = _dict(pod.get("spec")).get("nodeName")
    if not isinstance(node, str) or not node:
        return None
    if _dict(pod.get("status")).get("phase") in POD_FINISHED_PHASES:
        return None
    return PodUsage(node=node, gpus=pod_gpu_request(pod), role=pod_role(pod))


@functools.lru_cache(maxsize=4096)
def _node_gpu_interned(product: str | None, memory: str | None, count: str | None, tier: str | None) -> NodeGpu:
    labels = {
        k: v
        for k, v in (
            (LABEL_GPU_PRODUCT, product),
            (LABEL_GPU_MEMORY_MIB, memory),
            (LABEL_GPU_COUNT, count),
            (LABEL_TIER_OVERRIDE, tier),
        )
        if v is not None
    }
    return node_gpu_from_labels(labels)


def node_gpu(labels: Mapping[str, str]) -> NodeGpu:
    """The node's GPU class; nodes with the same GPU labels share one object (cheap memo keys in the core)."""
    return _node_gpu_interned(
        labels.get(LABEL_GPU_PRODUCT),
        labels.get(LABEL_GPU_MEMORY_MIB),
        labels.get(LABEL_GPU_COUNT),
        labels.get(LABEL_TIER_OVERRIDE),
    )


def node_allocatable_gpus(node: Mapping[str, Any]) -> int:
    return parse_count(_dict(_dict(node.get("status")).get("allocatable")).get(RESOURCE_GPU))


@dataclass(frozen=True, slots=True)
class NodeUsage:
    gpus: int = 0
    prefill_pods: int = 0
    decode_pods: int = 0


def gpu_node(node: Mapping[str, Any], usage: NodeUsage | None = None) -> GpuNode:
    """A raw Node plus what is bound to it, as the core sees it."""
    used = usage or NodeUsage()
    return GpuNode(
        name=name_of(node),
        gpu=node_gpu(labels_of(node)),
        allocatable_gpus=node_allocatable_gpus(node),
        used_gpus=used.gpus,
        prefill_pods=used.prefill_pods,
        decode_pods=used.decode_pods,
    )
