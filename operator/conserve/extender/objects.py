"""The few fields the extender needs of raw Pod and Node objects (dicts, as the API serves them), read through the
api's core/v1 models (`conserve.api.corev1`), which are lenient: a malformed object yields defaults, never an
exception.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conserve.api.corev1 import Node, Pod
from conserve.api.labels import LABEL_MODEL, LABEL_ROLE
from conserve.core.gpus import (
    LABEL_GPU_COUNT,
    LABEL_GPU_MEMORY_MIB,
    LABEL_GPU_PRODUCT,
    LABEL_TIER_OVERRIDE,
    NodeGpu,
    Role,
    node_gpu_from_labels,
)
from conserve.core.node_scoring import DEFAULT_MODEL, GpuNode, PodDemand

# LABEL_ROLE states a pod's role; LABEL_MODEL (optional) the model it serves, a name from
# `conserve.core.llm.MODELS` (prices energy per token).
__all__ = ["LABEL_MODEL", "LABEL_ROLE"]


def name_of(obj: Mapping[str, Any]) -> str:
    """The object's name alone (the full-node filter reads it per node of a request: no parse of the rest)."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""


def pod_gpu_request(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: max(sum over containers, largest init container), as the scheduler counts."""
    return Pod.model_validate(pod).gpus


def _role(pod: Pod) -> Role | None:
    try:
        return Role(pod.role)
    except ValueError:
        return None


def pod_scheduler_name(pod: Mapping[str, Any]) -> str:
    return Pod.model_validate(pod).spec.scheduler_name or "default-scheduler"


def pod_demand(pod: Mapping[str, Any]) -> PodDemand:
    parsed = Pod.model_validate(pod)
    model = parsed.metadata.labels.get(LABEL_MODEL, DEFAULT_MODEL).strip().lower() or DEFAULT_MODEL
    return PodDemand(role=_role(parsed), gpus=parsed.gpus, model=model)


@dataclass(frozen=True, slots=True)
class PodUsage:
    """What a bound, non-terminal pod takes from its node."""

    node: str
    gpus: int
    role: Role | None


def pod_usage(pod: Mapping[str, Any]) -> PodUsage | None:
    """The pod's claim on a node, or None when it is not bound or has finished."""
    parsed = Pod.model_validate(pod)
    if not parsed.spec.node_name or parsed.finished:
        return None
    return PodUsage(node=parsed.spec.node_name, gpus=parsed.gpus, role=_role(parsed))


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


@dataclass(frozen=True, slots=True)
class NodeUsage:
    gpus: int = 0
    prefill_pods: int = 0
    decode_pods: int = 0


def gpu_node(node: Mapping[str, Any], usage: NodeUsage | None = None) -> GpuNode:
    """A raw Node plus what is bound to it, as the core sees it."""
    used = usage or NodeUsage()
    parsed = Node.model_validate(node)
    return GpuNode(
        name=parsed.metadata.name,
        gpu=node_gpu(parsed.metadata.labels),
        allocatable_gpus=parsed.allocatable_gpus,
        used_gpus=used.gpus,
        prefill_pods=used.prefill_pods,
        decode_pods=used.decode_pods,
    )
