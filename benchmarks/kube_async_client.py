"""The asyncio contender of benchmarks/kube_client_bench.py for the operator: its `Kube` on `kubernetes_asyncio`
(aiohttp, no threads; the client `conserve.kube.aio` makes), written to the same contract as the threaded one.
(The router's side needs no contender here: its own control plane is on the asyncio client.)

    python benchmarks/kube_async_client.py operator ARGS...   # `conserve operator ARGS` on this client
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from conserve import cli
from conserve.api.common import GROUP, VERSION
from conserve.controller import main
from conserve.kube.aio import AsyncCoreV1Api, AsyncCustomObjectsApi, new_async_api_client, read_body
from conserve.kube.events import event_body

Body = dict[str, Any]
MERGE = "application/merge-patch+json"


class AsyncKubeClient:
    """`conserve.controller.kube.Kube` on kubernetes_asyncio: lists paged and raw, writes discard the reply."""

    def __init__(self, kubeconfig: str | None = None, threads: int = 64, instance: str = "") -> None:
        self._kubeconfig, self._pool_size = kubeconfig, threads
        self._instance = instance or "conserve-operator"  # the replica, in each Event it posts (as `Kube`)
        self._api: Any = None
        self._lock = asyncio.Lock()
        self.api_client = None  # no sync client: run with --no-leader-elect and no energy loop

    @classmethod
    def from_kubeconfig(
        cls, kubeconfig: str | None = None, *, threads: int = 64, instance: str = ""
    ) -> AsyncKubeClient:
        return cls(kubeconfig, threads, instance)

    def close(self) -> None:
        pass

    async def _client(self) -> Any:
        async with self._lock:
            if self._api is None:
                self._api = await new_async_api_client(self._kubeconfig, connections=self._pool_size)
        return self._api

    async def _raw(self, api_class: Any, method: str, *args: Any, **kwargs: Any) -> bytes:
        """A raw call; a refusal raises the adapter's named errors (`NotFound`, `Refused`), as `Kube`'s do."""
        api = api_class(await self._client())
        return await read_body(await getattr(api, method)(*args, _preload_content=False, **kwargs))

    async def _paged(self, api_class: Any, method: str, *args: Any) -> list[Body]:
        items: list[Body] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": 500}
            if token:
                kwargs["_continue"] = token
            page = json.loads(await self._raw(api_class, method, *args, **kwargs))
            kind = page.get("kind", "List").removesuffix("List")
            for item in page.get("items", []):
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", page.get("apiVersion", "v1"))
                item.get("metadata", {}).pop("managedFields", None)
                items.append(item)
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    async def list_objects(self, plural: str, namespace: str | None) -> list[Body]:
        if namespace is None:
            return await self._paged(AsyncCustomObjectsApi, "list_cluster_custom_object", GROUP, VERSION, plural)
        return await self._paged(
            AsyncCustomObjectsApi, "list_namespaced_custom_object", GROUP, VERSION, namespace, plural
        )

    async def list_pods(self, namespace: str | None) -> list[Body]:
        if namespace is None:
            return await self._paged(AsyncCoreV1Api, "list_pod_for_all_namespaces")
        return await self._paged(AsyncCoreV1Api, "list_namespaced_pod", namespace)

    async def list_nodes(self) -> list[Body]:
        return await self._paged(AsyncCoreV1Api, "list_node")

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        return await self._merge_patch("patch_namespaced_custom_object_status", plural, namespace, name, patch)

    async def patch_object(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        return await self._merge_patch("patch_namespaced_custom_object", plural, namespace, name, patch)

    async def _merge_patch(self, method: str, plural: str, namespace: str, name: str, patch: Body) -> Body:
        args = (GROUP, VERSION, namespace, plural, name, patch)
        await self._raw(AsyncCustomObjectsApi, method, *args, _content_type=MERGE)
        return {}

    async def post_event(self, obj: Body, reason: str, message: str, *, warning: bool = False) -> None:
        event = event_body(obj, reason, message, warning=warning, component="conserve-operator")
        event["reportingInstance"] = self._instance
        await self._raw(AsyncCoreV1Api, "create_namespaced_event", event["metadata"]["namespace"], event)


def run_operator_on_asyncio_client(argv: list[str]) -> int:
    """`conserve ARGV` with the operator's client swapped for `AsyncKubeClient`."""
    setattr(main, "KubeClient", AsyncKubeClient)  # noqa: B010 - the one swap this launcher exists for
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(run_operator_on_asyncio_client(sys.argv[1:]))
