"""Fixtures shared by the e2e tests (a test module may override one, e.g. with a bigger pool): the CRDs, the
operator tests' `Api`, and `conserve` subcommands run as the test's own processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conserve.controller.testing import Api, install_crds
from conserve.devcluster.testing import ClusterHandle
from conserve.testkit.processes import ConserveProcesses

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def crds(cluster: ClusterHandle) -> None:
    with cluster.api_client() as client:
        install_crds(client)


@pytest.fixture
def api(cluster: ClusterHandle, namespace: str, crds: None) -> Iterator[Api]:
    with cluster.api_client() as client:
        yield Api(client, namespace)


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
