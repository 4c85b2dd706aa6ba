"""The one Kubernetes adapter: client factories, list+watch informers, error mapping and patch helpers.

Every module that talks to the API server gets its client here and maps refusals to the named `errors`; no
other module imports a client library (an import contract checks it; devcluster's own bootstrap is the
exception). Two clients, chosen by measurement (benchmarks/kube_client_bench.py):
- the synchronous `kubernetes` client, run in threads (`new_api_client`, `Informer`), for the operator (Kopf),
  the extender and gpu-sim: the operator's placement throughput showed no consistent difference between them;
- `kubernetes_asyncio` (`conserve.kube.aio`, `conserve.kube.aio_informer.AsyncInformer`), for the router, which
  lives on an aiohttp event loop: parity on a quiet machine, far ahead under CPU contention, and no thread
  pools or hand-over to the loop.
Import the asyncio side from its modules (not re-exported here), so that the synchronous services never load it.
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
