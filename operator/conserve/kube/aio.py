"""The asyncio side of the adapter: `kubernetes_asyncio` (aiohttp, no threads) for services that live on an event
loop (the router), chosen by measurement (benchmarks/kube_client_bench.py: the router's placement wait).

Same choices as `conserve.kube.config` (an explicit kubeconfig, else in-cluster, else the default kubeconfig);
raw responses (`_preload_content=False`) read with `read_body`, which maps an HTTP refusal to the same named
errors (`NotFound`, `Conflict`, `Gone`, ...) the synchronous side raises. Import this module, not the package's
`__init__`, so that the synchronous services never load the asyncio client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from conserve.kube.errors import KubeError, error_for

#: The async client's API groups, untyped as on the synchronous side (plain dicts in, raw JSON out).
AsyncApiClient: Any = client.ApiClient
AsyncCustomObjectsApi: Any = client.CustomObjectsApi
AsyncCoreV1Api: Any = client.CoreV1Api

#: What a call may raise: a named `KubeError` (an HTTP refusal), or the API server unreachable or too slow.
CALL_ERRORS: tuple[type[Exception], ...] = (KubeError, aiohttp.ClientError, TimeoutError, OSError)

#: Concurrent requests per client (aiohttp's connection limit), watches included.
DEFAULT_CONNECTIONS = 64


async def new_async_configuration(
    kubeconfig: str | Path | None = None, *, connections: int = DEFAULT_CONNECTIONS
) -> Any:
    """A `kubernetes_asyncio.client.Configuration`, from the same sources as `new_configuration`."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        await config.load_kube_config(config_file=os.fspath(kubeconfig), client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = connections
    return configuration


async def new_async_api_client(kubeconfig: str | Path | None = None, *, connections: int = DEFAULT_CONNECTIONS) -> Any:
    """A `kubernetes_asyncio.client.ApiClient` on the running loop; `await client.close()` (or `async with`)."""
    return client.ApiClient(await new_async_configuration(kubeconfig, connections=connections))


async def read_body(response: Any) -> bytes:
    """The body of a raw (`_preload_content=False`) response, its connection released; a named `KubeError` for
    an HTTP error status (a raw response is not checked by the client library)."""
    try:
        data: bytes = await response.read()
    finally:
        response.release()
    if response.status >= 400:
        raise error_for(int(response.status), f"{response.reason}: {data.decode(errors='replace')}")
    return data


async def check_status(response: Any) -> None:
    """Raise the named error of a raw response that refused (before streaming it); a good one is left unread."""
    if response.status >= 400:
        await read_body(response)
