"""The client library's API groups, untyped on purpose: its generated stubs want model objects where the API
takes plain dicts (which is what ConServe reads from watch events and writes back)."""

from __future__ import annotations

import functools
import importlib
from typing import Any

from kubernetes import client as _client

ApiClient: Any = _client.ApiClient
ApiextensionsV1Api: Any = _client.ApiextensionsV1Api
AppsV1Api: Any = _client.AppsV1Api
CoordinationV1Api: Any = _client.CoordinationV1Api
CoreV1Api: Any = _client.CoreV1Api
CustomObjectsApi: Any = _client.CustomObjectsApi
DiscoveryV1Api: Any = _client.DiscoveryV1Api


@functools.cache
def k8s(module: str) -> Any:
    """A `kubernetes` submodule by name (`k8s("watch")`), untyped like the classes above."""
    return importlib.import_module(f"kubernetes.{module}")


__all__ = [
    "ApiClient",
    "ApiextensionsV1Api",
    "AppsV1Api",
    "CoordinationV1Api",
    "CoreV1Api",
    "CustomObjectsApi",
    "DiscoveryV1Api",
    "k8s",
]
