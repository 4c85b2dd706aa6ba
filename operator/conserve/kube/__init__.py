"""The one Kubernetes adapter: client factory, list+watch informer, error mapping and patch helpers.

Every module that talks to the API server gets its client here (`new_api_client`), watches through `Informer`
and maps `ApiException`s with `errors`; no other module imports the client library (an import contract checks
it; devcluster's own bootstrap is the exception). The client is the official synchronous `kubernetes` one, run
in threads; callers see only this package's interface (informer callbacks on their event loop, named errors), so
the library can change here alone. benchmarks/kube_client_bench.py measures it against `kubernetes_asyncio`;
its one run so far (2 shared cores, load average 17-19, 300 conversations) found the operator's placement
throughput equal (8.1/s each) and the router's placement wait lower with asyncio (p50 4.6 s vs 5.8 s, placed
6.4/s vs 2.5/s; the threaded side ran first on a fresh cluster). Moving the router to an asyncio client is the
follow-up that run points to; it has not been made.
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
