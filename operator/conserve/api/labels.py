"""The names ConServe reads and writes on Kubernetes objects, declared once: labels, annotations, the
finalizer, resources, and the pod phases it acts on. (GPU node labels are GPU Feature Discovery's, declared in
the pure core beside the catalog that reads them, and re-exported here.)"""

from __future__ import annotations

from conserve.core.gpus import (
    LABEL_GPU_COUNT,
    LABEL_GPU_MEMORY_MIB,
    LABEL_GPU_PRODUCT,
    LABEL_TIER_OVERRIDE,
    RESOURCE_GPU,
)

#: Pod label: which phase a serving pod runs (`prefill`, `decode`, or `both` for an aggregated gpu-sim).
LABEL_ROLE = "conserve.dev/role"
#: Pod label (extender) and annotation (gpu-sim): the model a serving pod holds.
LABEL_MODEL = "conserve.dev/model"
ANNOTATION_MODEL = "conserve.dev/model"
#: Pod annotation: host:port the data plane sends to, in place of the pod IP (gpu-sim pods on KWOK nodes).
ANNOTATION_ENDPOINT = "conserve.dev/endpoint"
#: Who created an object (the router marks the Conversations it creates).
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ROUTER_MANAGER = "conserve-router"
#: Conversation annotation: the identity that created it through the router (absent: the anonymous caller).
ANNOTATION_OWNER = "conserve.dev/owner"
#: Node annotation KWOK manages: a fake node whose pods run nothing (gpu-sim serves them).
ANNOTATION_KWOK_NODE = "kwok.x-k8s.io/node"
#: Finalizer that earlier operator versions added to Conversations (this one removes it where it finds it).
FINALIZER = "conserve.dev/release-capacity"
#: Pod phases after which a pod holds no GPU and serves nothing.
POD_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
#: The pod phase in which a pod may serve (once Ready).
POD_RUNNING = "Running"

__all__ = [
    "ANNOTATION_ENDPOINT",
    "ANNOTATION_KWOK_NODE",
    "ANNOTATION_MODEL",
    "ANNOTATION_OWNER",
    "FINALIZER",
    "LABEL_GPU_COUNT",
    "LABEL_GPU_MEMORY_MIB",
    "LABEL_GPU_PRODUCT",
    "LABEL_MANAGED_BY",
    "LABEL_MODEL",
    "LABEL_ROLE",
    "LABEL_TIER_OVERRIDE",
    "POD_FINISHED_PHASES",
    "POD_RUNNING",
    "RESOURCE_GPU",
    "ROUTER_MANAGER",
]
