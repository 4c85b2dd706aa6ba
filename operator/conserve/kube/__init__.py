"""The one Kubernetes adapter: client factory, list+watch informer, error mapping and patch helpers.

Every module that talks to the API server gets its client here (`new_api_client`), watches through `Informer`
and maps `ApiException`s with `errors`; no other module imports the client library (an import contract checks
it; devcluster's own bootstrap is the exception). The client is the official synchronous `kubernetes` one, run
in threads: benchmarks/kube_client_bench.py measured it against `kubernetes_asyncio` on the router's placement
wait and the operator's placement throughput (see that script's docstring for the figures).
"""

from conserve.kube.config import new_api_client, new_configuration
from conserve.kube.errors import ApiError, Conflict, Gone, KubeError, NotFound, Refused, status_of
from conserve.kube.informer import Backoff, Informer
from conserve.kube.patch import MERGE_PATCH, annotations_patch, drain

__all__ = [
    "MERGE_PATCH",
    "ApiError",
    "Backoff",
    "Conflict",
    "Gone",
    "Informer",
    "KubeError",
    "NotFound",
    "Refused",
    "annotations_patch",
    "drain",
    "new_api_client",
    "new_configuration",
    "status_of",
]
