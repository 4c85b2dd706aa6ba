"""Fixtures shared by the e2e tests (a test module may override one, e.g. with a bigger pool): the CRDs, the
operator tests' `Api`, `conserve operator` for the test's namespace (its arguments from `operator_args`), and
`conserve` subcommands run as the test's own processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from conserve.api.common import GROUP, VERSION
from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle
from conserve.testkit import Api, ConserveProcesses, OperatorProcess, install_crds
from conserve.testkit.builders import serving_deployment
from conserve.testkit.processes import ServingStack, StartServingStack

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crds(cluster: ClusterHandle) -> None:
    with cluster.api_client() as client:
        install_crds(client)


@pytest.fixture
def api(cluster: ClusterHandle, namespace: str, crds: None) -> Iterator[Api]:
    with cluster.api_client() as client:
        yield Api(client, namespace)


@pytest.fixture
def operator_args() -> list[str]:
    """More `conserve operator` arguments for the `operator` fixture (a module overrides this fixture)."""
    return []


@pytest.fixture
def operator(
    cluster: ClusterHandle, namespace: str, api: Api, tmp_path: Path, operator_args: list[str]
) -> Iterator[OperatorProcess]:
    """`conserve operator` for the test's namespace, its ledger rebuilt; stopped afterwards, and the namespace's
    conversations let go (no operator is left to release them)."""
    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log", operator_args).start()
    try:
        yield op
    finally:
        op.stop()
        api.strip_finalizers()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Keep each phase's report on the test, so a fixture's teardown knows whether the test failed."""
    report = yield
    setattr(item, f"report_{call.when}", report)
    return report


@pytest.fixture
def conserve_processes(
    request: pytest.FixtureRequest, cluster: ClusterHandle, tmp_path: Path
) -> Iterator[ConserveProcesses]:
    """The CRDs applied, then a place to start `conserve` processes; their logs are printed when the test (or a
    fixture starting them) fails, and they are all stopped afterwards."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    names = ("crd/conversations.conserve.dev", "crd/decoderpools.conserve.dev")
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    processes = ConserveProcesses(cluster.kubeconfig, tmp_path)
    try:
        yield processes
    finally:
        reports = [getattr(request.node, f"report_{when}", None) for when in ("setup", "call")]
        if any(r is not None and r.failed for r in reports):
            processes.write_logs()
        processes.stop()


@pytest.fixture
def serving_stack(
    cluster: ClusterHandle, namespace: str, conserve_processes: ConserveProcesses
) -> Iterator[StartServingStack]:
    clients: list[Any] = []

    def start(pool: dict[str, Any], decoders: int) -> ServingStack:
        kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
        router_port = free_port()
        api = cluster.api_client()
        clients.append(api)
        core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", pool)
        apps.create_namespaced_deployment(namespace, serving_deployment("pre", "prefill", 1))  # type: ignore[arg-type]
        apps.create_namespaced_deployment(namespace, serving_deployment("dec", "decode", decoders))  # type: ignore[arg-type]
        conserve_processes.start(
            "operator", "operator", f"--namespace={namespace}", "--no-leader-elect", "--metrics-port=0"
        )
        conserve_processes.start(
            "gpusim", "gpu-sim", "pods", kubeconfig, f"--namespace={namespace}", "--time-scale=0.02"
        )
        conserve_processes.start(
            "router",
            "router",
            kubeconfig,
            f"--namespace={namespace}",
            "--pool=pool",
            f"--port={router_port}",
            "--usage-interval=0.3",
        )
        return ServingStack(f"http://127.0.0.1:{router_port}", custom, core)

    yield start
    for api in clients:
        api.close()
