"""The real kube-scheduler calls the real extender: prefill and decode Deployments land on the right GPU tier.

The extender runs in this process on the port the cluster's `conserve-scheduler` profile calls, with its watch
cache on the cluster. Each test makes its own small pool of fake GPU nodes (a label ties its pods to them with
a nodeSelector, so the default node mix and other tests do not matter) and deletes it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from conserve.core.node_scoring import NodeFilterReason, NodeScoringSettings
from conserve.core.placement import TierPolicy
from conserve.devcluster.nodes import GpuNodeSpec, delete_gpu_nodes
from conserve.devcluster.testing import ClusterHandle
from conserve.extender.cli import Extender, build_extender
from conserve.extender.server import BackgroundServer
from conserve.extender.service import ExtenderSettings
from conserve.testkit import wait_for

POOL_LABEL = "conserve.dev/e2e-pool"
GPUS = {
    "H100": ("NVIDIA-H100-80GB-HBM3", 81559),
    "H200": ("NVIDIA-H200", 143771),
    "A100": ("NVIDIA-A100-SXM4-80GB", 81920),
    "H20": ("NVIDIA-H20", 97871),
}
COMPUTE_PRODUCTS = {GPUS["H100"][0]}
BANDWIDTH_PRODUCTS = {GPUS["H200"][0], GPUS["A100"][0], GPUS["H20"][0]}
STRICT_REASON = "conserve: prefill pod needs a compute-tier GPU node, node is bandwidth tier (strict tier policy)"


@pytest.fixture(scope="module")
def extender(cluster: ClusterHandle) -> Iterator[Extender]:
    port = cluster.extender_port
    assert port is not None, "the cluster names no extender URL (set CONSERVE_EXTENDER_URL for a given cluster)"
    running = build_extender(
        ExtenderSettings(scheduler_names=frozenset({cluster.scheduler_name})), kubeconfig=str(cluster.kubeconfig)
    )
    server = BackgroundServer(running.app(), host="127.0.0.1", port=port).start()
    try:
        wait_for("the extender's watch cache", running.ready, timeout_s=30)
        yield running
    finally:
        server.stop()
        if running.watcher is not None:
            running.watcher.stop()


def set_policy(extender: Extender, policy: TierPolicy) -> None:
    settings = extender.service.settings
    extender.service.settings = ExtenderSettings(
        scoring=NodeScoringSettings(tier_policy=policy), scheduler_names=settings.scheduler_names
    )


@pytest.fixture
def core(cluster: ClusterHandle) -> Iterator[Any]:
    with cluster.api_client() as api_client:
        yield client.CoreV1Api(api_client)


@pytest.fixture
def apps(cluster: ClusterHandle) -> Iterator[Any]:
    with cluster.api_client() as api_client:
        yield client.AppsV1Api(api_client)


@pytest.fixture
def pool(
    cluster: ClusterHandle, namespace: str, extender: Extender
) -> Iterator[Callable[[dict[str, tuple[int, int]]], list[str]]]:
    """Make fake GPU nodes for this test: {"H100": (nodes, gpus per node), ...}; deleted afterwards."""
    made: list[str] = []

    def make(layout: dict[str, tuple[int, int]]) -> list[str]:
        specs = [
            GpuNodeSpec(
                name=f"{namespace}-{kind.lower()}-{i}",
                gpu_product=GPUS[kind][0],
                gpu_count=gpus,
                gpu_memory_mib=GPUS[kind][1],
                labels={POOL_LABEL: namespace},
            )
            for kind, (count, gpus) in layout.items()
            for i in range(count)
        ]
        names = cluster.apply_gpu_nodes(specs)
        made.extend(names)
        # A node the scheduler knows and the extender's cache not yet is rejected as unknown (then retried);
        # start from a cache that has them.
        cache = extender.cache
        assert cache is not None
        wait_for("the extender's cache to see the nodes", lambda: all(cache.get(n) for n in names), timeout_s=30)
        return names

    yield make
    delete_gpu_nodes(cluster.kubeconfig, made)


def deployment(name: str, role: str, replicas: int, scheduler_name: str, pool_name: str) -> dict[str, Any]:
    labels = {"app": name, "conserve.dev/role": role}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "schedulerName": scheduler_name,
                    "nodeSelector": {POOL_LABEL: pool_name},
                    "terminationGracePeriodSeconds": 0,
                    "containers": [
                        {
                            "name": "server",
                            "image": "registry.k8s.io/pause:3.10",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                },
            },
        },
    }


def pods_of(core: Any, namespace: str, app: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"app={app}").items)


def bound(core: Any, namespace: str, app: str, count: int) -> list[Any] | None:
    pods = pods_of(core, namespace, app)
    placed = [p for p in pods if p.spec.node_name]
    return placed if len(placed) >= count else None


def node_products(core: Any, pods: list[Any]) -> dict[str, str]:
    """pod name -> GPU product of its node."""
    return {p.metadata.name: core.read_node(p.spec.node_name).metadata.labels["nvidia.com/gpu.product"] for p in pods}


def filtered(extender: Extender, reason: NodeFilterReason) -> float:
    value = extender.metrics.registry.get_sample_value(
        "conserve_extender_filtered_nodes_total", {"reason": reason.value}
    )
    return value or 0.0


def test_prefill_on_compute_tier_decode_on_bandwidth_tier(
    cluster: ClusterHandle, extender: Extender, core: Any, apps: Any, namespace: str, pool: Any
) -> None:
    set_policy(extender, TierPolicy.STRICT)
    pool({"H100": (2, 8), "H200": (1, 8), "A100": (1, 8), "H20": (1, 8)})
    mismatches_before = filtered(extender, NodeFilterReason.TIER_MISMATCH)
    apps.create_namespaced_deployment(namespace, deployment("prefill", "prefill", 3, cluster.scheduler_name, namespace))
    apps.create_namespaced_deployment(namespace, deployment("decode", "decode", 4, cluster.scheduler_name, namespace))

    prefill = wait_for("3 prefill pods bound", lambda: bound(core, namespace, "prefill", 3))
    decode = wait_for("4 decode pods bound", lambda: bound(core, namespace, "decode", 4))
    assert set(node_products(core, prefill).values()) <= COMPUTE_PRODUCTS
    assert set(node_products(core, decode).values()) <= BANDWIDTH_PRODUCTS
    # the extender took part: it turned nodes of the other tier away for each of the 7 pods
    assert filtered(extender, NodeFilterReason.TIER_MISMATCH) - mismatches_before >= 3 + 4
    # KWOK runs them
    wait_for(
        "pods Running",
        lambda: all(
            p.status.phase == "Running"
            for p in pods_of(core, namespace, "prefill") + pods_of(core, namespace, "decode")
        ),
    )


def fill_compute_tier(
    cluster: ClusterHandle, extender: Extender, core: Any, apps: Any, namespace: str, pool: Any, app: str, pods: int
) -> None:
    """Strict tiers on one H100 node of two GPUs and one H200 node: `pods` prefill pods of the Deployment `app`
    (one GPU each) take the two compute GPUs."""
    set_policy(extender, TierPolicy.STRICT)
    pool({"H100": (1, 2), "H200": (1, 8)})
    apps.create_namespaced_deployment(namespace, deployment(app, "prefill", pods, cluster.scheduler_name, namespace))
    placed = wait_for(f"2 {app} pods bound", lambda: bound(core, namespace, app, 2))
    assert set(node_products(core, placed).values()) == COMPUTE_PRODUCTS


def test_compute_tier_full_strict_keeps_prefill_pending_with_the_reason(
    cluster: ClusterHandle, extender: Extender, core: Any, apps: Any, namespace: str, pool: Any
) -> None:
    fill_compute_tier(cluster, extender, core, apps, namespace, pool, "prefill", 3)

    def pending_with_reason() -> Any:
        for p in pods_of(core, namespace, "prefill"):
            for condition in (p.status.conditions or []) if not p.spec.node_name else []:
                if (
                    condition.type == "PodScheduled"
                    and condition.reason == "Unschedulable"
                    and STRICT_REASON in (condition.message or "")
                ):
                    return p
        return None

    pending = wait_for("the third prefill pod Unschedulable with the extender's reason", pending_with_reason)
    # what `kubectl describe pod` shows: a FailedScheduling event carrying the extender's message
    events = wait_for(
        "a FailedScheduling event",
        lambda: [
            e
            for e in core.list_namespaced_event(
                namespace, field_selector=f"involvedObject.name={pending.metadata.name}"
            ).items
            if e.reason == "FailedScheduling" and STRICT_REASON in (e.message or "")
        ],
    )
    # the H200 is the one node the extender turned away (the full H100 is the scheduler's own business:
    # "Insufficient nvidia.com/gpu")
    assert f"1 {STRICT_REASON}" in events[0].message, events[0].message
    described = cluster.kubectl("describe", "pod", "-n", namespace, pending.metadata.name).stdout
    assert STRICT_REASON in described
    # The scheduler's decision for the third pod is the Unschedulable condition and the event awaited above: it
    # is still unbound, and the other two are where they were.
    assert not core.read_namespaced_pod(pending.metadata.name, namespace).spec.node_name
    assert len(bound(core, namespace, "prefill", 0) or []) == 2


def test_compute_tier_full_preferred_falls_back_to_bandwidth_tier(
    cluster: ClusterHandle, extender: Extender, core: Any, apps: Any, namespace: str, pool: Any
) -> None:
    fill_compute_tier(cluster, extender, core, apps, namespace, pool, "filler", 2)
    set_policy(extender, TierPolicy.PREFERRED)
    try:
        apps.create_namespaced_deployment(
            namespace, deployment("prefill", "prefill", 1, cluster.scheduler_name, namespace)
        )
        placed = wait_for("the prefill pod bound", lambda: bound(core, namespace, "prefill", 1))
        assert list(node_products(core, placed).values()) == [GPUS["H200"][0]]
    finally:
        set_policy(extender, TierPolicy.STRICT)
