"""Fixtures shared by the operator's e2e tests (a test module may override one, e.g. with a bigger pool)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conserve.controller.testing import Api, install_crds
from conserve.devcluster.testing import ClusterHandle


@pytest.fixture(scope="module")
def crds(cluster: ClusterHandle) -> None:
    with cluster.api_client() as client:
        install_crds(client)


@pytest.fixture
def api(cluster: ClusterHandle, namespace: str, crds: None) -> Iterator[Api]:
    with cluster.api_client() as client:
        yield Api(client, namespace)
