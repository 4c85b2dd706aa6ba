"""The watch cache fed by events: free GPUs and role counts follow pods; nodes come and go."""

from __future__ import annotations

import pytest

from conserve.core.gpus import Tier
from conserve.extender.cache import ClusterCache
from conserve.extender.testing import node, pod

pytestmark = pytest.mark.unit


def test_pods_update_free_gpus_and_role_counts() -> None:
    cache = ClusterCache()
    cache.replace_nodes([node("h200-0", "H200")])
    cache.replace_pods([pod("a", "decode", gpus=2, node_name="h200-0", phase="Running")])
    assert cache.nodes_synced.is_set()
    assert cache.pods_synced.is_set()
    view = cache.get("h200-0")
    assert view is not None
    assert view.gpu.tier is Tier.BANDWIDTH
    assert (view.allocatable_gpus, view.used_gpus, view.decode_pods, view.free_gpus) == (8, 2, 1, 6)

    pending = pod("b", "prefill", gpus=3)
    cache.apply_pod("ADDED", pending)  # not bound yet: takes nothing
    assert cache.get("h200-0").used_gpus == 2  # type: ignore[union-attr]
    cache.apply_pod("MODIFIED", {**pending, "spec": {**pending["spec"], "nodeName": "h200-0"}})
    view = cache.get("h200-0")
    assert view is not None
    assert (view.used_gpus, view.prefill_pods) == (5, 1)
    done = pod("b", "prefill", gpus=3, node_name="h200-0", phase="Succeeded")
    cache.apply_pod("MODIFIED", done)
    assert cache.get("h200-0").used_gpus == 2  # type: ignore[union-attr]
    cache.apply_pod("DELETED", pod("a", "decode", gpus=2, node_name="h200-0"))
    view = cache.get("h200-0")
    assert view is not None
    assert (view.used_gpus, view.decode_pods) == (0, 0)
    assert cache.usage("h200-0") is None
    assert cache.pod_count == 0


def test_pods_on_nodes_not_yet_seen_count_once_the_node_arrives() -> None:
    cache = ClusterCache()
    cache.replace_nodes([])
    cache.replace_pods([pod("a", "prefill", gpus=8, node_name="h100-0", phase="Running")])
    assert cache.get("h100-0") is None
    cache.apply_node("ADDED", node("h100-0", "H100"))
    assert cache.get("h100-0").free_gpus == 0  # type: ignore[union-attr]
    relabelled = node("h100-0", "H100", tier="bandwidth")
    cache.apply_node("MODIFIED", relabelled)
    assert cache.get("h100-0").gpu.tier is Tier.BANDWIDTH  # type: ignore[union-attr]
    cache.apply_node("DELETED", relabelled)
    assert cache.get("h100-0") is None
    assert cache.node_count == 0


def test_relist_replaces_state() -> None:
    cache = ClusterCache()
    cache.replace_nodes([node("a", "H100"), node("b", "H200")])
    cache.replace_pods([pod("x", "prefill", node_name="a", phase="Running")])
    cache.replace_nodes([node("b", "H200")])
    cache.replace_pods([])
    assert cache.get("a") is None
    b = cache.get("b")
    assert b is not None
    assert b.used_gpus == 0


def test_nodes_with_equal_gpu_labels_share_their_gpu_object() -> None:
    cache = ClusterCache()
    cache.replace_nodes([node("a", "H200"), node("b", "H200")])
    a, b = cache.get("a"), cache.get("b")
    assert a is not None
    assert b is not None
    assert a.gpu is b.gpu
