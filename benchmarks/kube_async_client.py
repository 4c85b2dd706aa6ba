"""The asyncio contender of benchmarks/kube_client_bench.py: the operator's `Kube` and the router's placement
wait on `kubernetes_asyncio` (aiohttp, no threads), written to the same contracts as the threaded adapters.

    python benchmarks/kube_async_client.py operator ARGS...   # `conserve operator ARGS` on this client
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from kubernetes_asyncio import client, config, watch

from conserve import cli
from conserve.api.common import GROUP, VERSION
from conserve.api.conversation import ConversationStatus
from conserve.controller import main
from conserve.controller.kube import NotFound, Refused
from conserve.kube.events import event_body
from conserve.router.control import _failure, _Waiters, parse_status, placement_of
from conserve.router.policy import Placement

Body = dict[str, Any]
MERGE = "application/merge-patch+json"


async def new_api_client(kubeconfig: str | None, pool_size: int) -> Any:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


class AsyncKubeClient:
    """`conserve.controller.kube.Kube` on kubernetes_asyncio: lists paged and raw, writes discard the reply."""

    def __init__(self, kubeconfig: str | None = None, threads: int = 64) -> None:
        self._kubeconfig, self._pool_size = kubeconfig, threads
        self._api: Any = None
        self._lock = asyncio.Lock()
        self.api_client = None  # no sync client: run with --no-leader-elect and no energy loop

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, *, threads: int = 64) -> AsyncKubeClient:
        return cls(kubeconfig, threads)

    def close(self) -> None:
        pass

    async def _client(self) -> Any:
        async with self._lock:
            if self._api is None:
                self._api = await new_api_client(self._kubeconfig, self._pool_size)
        return self._api

    async def _raw(self, api_class: Any, method: str, *args: Any, **kwargs: Any) -> bytes:
        api = api_class(await self._client())
        try:
            response = await getattr(api, method)(*args, _preload_content=False, **kwargs)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                raise NotFound(404, str(exc.reason)) from exc
            if exc.status in (409, 422):
                raise Refused(exc.status, f"{exc.reason}: {exc.body!r}") from exc
            raise
        data: bytes = await response.read()
        response.release()
        return data

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
            return await self._paged(client.CustomObjectsApi, "list_cluster_custom_object", GROUP, VERSION, plural)
        return await self._paged(
            client.CustomObjectsApi, "list_namespaced_custom_object", GROUP, VERSION, namespace, plural
        )

    async def list_pods(self, namespace: str | None) -> list[Body]:
        if namespace is None:
            return await self._paged(client.CoreV1Api, "list_pod_for_all_namespaces")
        return await self._paged(client.CoreV1Api, "list_namespaced_pod", namespace)

    async def list_nodes(self) -> list[Body]:
        return await self._paged(client.CoreV1Api, "list_node")

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        return await self._merge_patch("patch_namespaced_custom_object_status", plural, namespace, name, patch)

    async def patch_object(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        return await self._merge_patch("patch_namespaced_custom_object", plural, namespace, name, patch)

    async def _merge_patch(self, method: str, plural: str, namespace: str, name: str, patch: Body) -> Body:
        args = (GROUP, VERSION, namespace, plural, name, patch)
        await self._raw(client.CustomObjectsApi, method, *args, _content_type=MERGE)
        return {}

    async def post_event(self, obj: Body, reason: str, message: str, *, warning: bool = False) -> None:
        event = event_body(obj, reason, message, warning=warning, component="conserve-operator")
        await self._raw(client.CoreV1Api, "create_namespaced_event", event["metadata"]["namespace"], event)


class AsyncControlPlane:
    """The router's create + placement wait (`conserve.router.control.KubeControlPlane`) on kubernetes_asyncio."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self._api = client.CustomObjectsApi(api_client)
        self._namespace = namespace
        self._statuses: dict[str, ConversationStatus] = {}
        self._waiters = _Waiters()
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch())
        await asyncio.wait_for(self._synced.wait(), 30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        while True:
            listing = await self._api.list_namespaced_custom_object(GROUP, VERSION, self._namespace, "conversations")
            for item in listing.get("items", []):
                self._apply("ADDED", item)
            self._synced.set()
            try:
                async with watch.Watch() as w:
                    async for event in w.stream(
                        self._api.list_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        self._namespace,
                        "conversations",
                        resource_version=listing["metadata"]["resourceVersion"],
                        timeout_seconds=300,
                    ):
                        self._apply(str(event["type"]), event["object"])
            except client.exceptions.ApiException as exc:
                print(f"async watch restarting: {exc.status}", file=sys.stderr)

    def _apply(self, kind: str, obj: Body) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        if kind == "DELETED":
            self._statuses.pop(name, None)
            return
        status = self._statuses[name] = parse_status(ConversationStatus, obj.get("status"))
        self._waiters.offer(name, placement_of(status), _failure(status))

    async def create_conversation(self, name: str, spec: Body) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Conversation", "metadata": {"name": name}, "spec": spec}
        await self._api.create_namespaced_custom_object(GROUP, VERSION, self._namespace, "conversations", body)

    async def wait_placement(self, name: str, *, newer_than: int | None, timeout_s: float) -> Placement:
        fut = self._waiters.add(name, newer_than)
        status = self._statuses.get(name)
        self._waiters.offer(name, placement_of(status) if status else None, _failure(status))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        finally:
            self._waiters.remove(name, fut)


def run_operator_on_asyncio_client(argv: list[str]) -> int:
    """`conserve ARGV` with the operator's client swapped for `AsyncKubeClient`."""
    setattr(main, "KubeClient", AsyncKubeClient)  # noqa: B010 - the one swap this launcher exists for
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(run_operator_on_asyncio_client(sys.argv[1:]))
