"""The client factory: one place decides where credentials come from and how big the connection pool is.

Order: an explicit kubeconfig (the devcluster's, a test's, `--kubeconfig`), else the pod's service account
(in-cluster), else the default kubeconfig ($KUBECONFIG, ~/.kube/config).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kubernetes import client, config

#: Connections per client: one per thread that calls it concurrently, plus its watches.
DEFAULT_POOL_SIZE = 16


def new_configuration(kubeconfig: str | Path | None = None, *, pool_size: int = DEFAULT_POOL_SIZE) -> Any:
    """A `kubernetes.client.Configuration` (untyped: the client's stubs want model objects, we pass dicts)."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=os.fspath(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = pool_size
    return configuration


def new_api_client(kubeconfig: str | Path | None = None, *, pool_size: int = DEFAULT_POOL_SIZE) -> Any:
    """A `kubernetes.client.ApiClient`; close it (or use it as a context manager) when done."""
    return client.ApiClient(new_configuration(kubeconfig, pool_size=pool_size))
