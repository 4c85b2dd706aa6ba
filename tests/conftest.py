"""Fixtures shared by every test.

- ``cluster`` (session): a real control plane. Either the cluster named by ``CONSERVE_KUBECONFIG``, or a
  LocalCluster (etcd, kube-apiserver, kube-controller-manager, two kube-schedulers, KWOK) built from the
  Go modules (cached) and started once per session in a temporary directory, with the fake GPU nodes of
  ``conserve/devcluster/nodes.yaml`` (or ``CONSERVE_NODES_FILE``). A ``conserve.devcluster.testing.
  ClusterHandle``: ``kubeconfig``, ``api_client()``, ``kubectl(...)``, ``scheduler_name``,
  ``extender_url``, ``extender_port``, ``gpu_node_names``, ``apply_gpu_nodes(specs)``, ``helm``, ``local``.
  If it cannot be built or started, the tests that use it fail; they are never skipped.
- ``namespace`` (per test): a fresh namespace, deleted afterwards.
- ``trace_dir`` (session): the real traces kept in the repository (``operator/conserve/sim/traces``); a test
  that uses it fails, never skips, when they are missing.
- ``metric_registry`` (per test): a Prometheus registry of the test's own, for the metrics a test builds (they
  start at zero and leave the process's registry alone).

Tests under tests/unit are marked ``unit``, under tests/e2e ``e2e`` and under tests/packaging ``packaging``
automatically.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from conserve.devcluster.testing import ClusterHandle, cluster_for_tests, temporary_namespace
from conserve.testkit.metrics import fresh_registry


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.path)).parts
        if "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
        elif "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "packaging" in parts:
            item.add_marker(pytest.mark.packaging)


REPO = Path(__file__).resolve().parents[1]
TRACE_FILES = ("mooncake/conversation_trace.jsonl", "azure/AzureLLMInferenceTrace_conv.csv")


@pytest.fixture(scope="session")
def trace_dir() -> Path:
    path = REPO / "operator" / "conserve" / "sim" / "traces"
    missing = [str(path / name) for name in TRACE_FILES if not (path / name).is_file()]
    if missing:
        pytest.fail(f"trace data missing from the repository: {', '.join(missing)}")
    return path


@pytest.fixture
def metric_registry() -> CollectorRegistry:
    return fresh_registry()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    nodes_file = os.environ.get("CONSERVE_NODES_FILE")
    state_dir = tmp_path_factory.mktemp("cluster")
    with cluster_for_tests(state_dir, Path(nodes_file) if nodes_file else None) as handle:
        yield handle


@pytest.fixture
def namespace(cluster: ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    with temporary_namespace(cluster, request.node.name) as name:
        yield name
