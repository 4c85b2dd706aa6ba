"""The operator's writes and lists, behind one small Protocol (tests inject a fake; the engine never sees the client).

`KubeClient` runs the official synchronous client on a dedicated thread pool, so no call blocks the event loop
and Kopf's own executor stays free. Status writes are JSON merge patches of only the fields the operator owns:
other writers (the energy loop, Kopf) keep theirs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import json
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from conserve import metrics
from conserve.api.common import GROUP, VERSION
from conserve.kube import ApiError, NotFound, Refused, new_api_client
from conserve.kube.clients import k8s
from conserve.kube.errors import translate
from conserve.kube.events import event_body

T = TypeVar("T")
Body = dict[str, Any]
LIST_PAGE = 500


__all__ = ["Kube", "KubeClient", "NotFound", "Refused", "k8s"]


class Kube(Protocol):
    async def list_objects(self, plural: str, namespace: str | None) -> list[Body]: ...
    async def list_pods(self, namespace: str | None) -> list[Body]: ...
    async def list_nodes(self) -> list[Body]: ...
    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body: ...
    async def patch_object(self, plural: str, namespace: str, name: str, patch: Body) -> Body: ...
    async def post_event(self, obj: Body, reason: str, message: str, *, warning: bool = False) -> None: ...


def utc_now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeClient:
    """The real client: `kubernetes` (sync) on a private thread pool."""

    def __init__(
        self, api_client: Any, *, threads: int = 16, component: str = "conserve-operator", instance: str = ""
    ) -> None:
        client = k8s("client")
        self._api_client = api_client
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")
        self._component = component
        self._instance = instance or component  # the replica (its Lease identity) in each Event it posts

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, *, threads: int = 16, instance: str = "") -> KubeClient:
        return cls(new_api_client(kubeconfig, pool_size=threads), threads=threads, instance=instance)

    @property
    def api_client(self) -> Any:
        return self._api_client

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api_client.close()

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        except ApiError as exc:
            error = translate(exc)
            if isinstance(error, NotFound | Refused):
                raise error from exc
            raise

    # Lists come in pages: one response with 10,000 conversations would be a peak of hundreds of MB in Python
    # (the text, then its parse), and the process keeps that high-water mark.
    async def _paged(self, fn: Callable[..., Any], *args: Any) -> list[Body]:
        items: list[Body] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            page = _page(await self._call(fn, *args, **kwargs))
            items.extend(page["items"])
            token = page["continue"]
            if not token:
                return items

    async def list_objects(self, plural: str, namespace: str | None) -> list[Body]:
        if namespace is None:
            return await self._paged(self._custom.list_cluster_custom_object, GROUP, VERSION, plural)
        return await self._paged(self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural)

    async def list_pods(self, namespace: str | None) -> list[Body]:
        # Plain dicts (as watch events carry them), not the client's model objects.
        if namespace is None:
            return await self._paged(self._core.list_pod_for_all_namespaces)
        return await self._paged(self._core.list_namespaced_pod, namespace)

    async def list_nodes(self) -> list[Body]:
        return await self._paged(self._core.list_node)

    # Writes skip the client's parsing of the object the API server sends back: nothing here reads it, and at
    # hundreds of writes per second the parsing costs more CPU than the request.
    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        await self._merge_patch(self._custom.patch_namespaced_custom_object_status, plural, namespace, name, patch)
        metrics.API_WRITES.labels(f"{plural}/status", "patch").inc()
        return {}

    async def patch_object(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        await self._merge_patch(self._custom.patch_namespaced_custom_object, plural, namespace, name, patch)
        metrics.API_WRITES.labels(plural, "patch").inc()
        return {}

    async def _merge_patch(self, fn: Callable[..., Any], plural: str, namespace: str, name: str, patch: Body) -> Body:
        await self._call(
            _discarding(fn),
            GROUP,
            VERSION,
            namespace,
            plural,
            name,
            patch,
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )
        return {}

    async def post_event(self, obj: Body, reason: str, message: str, *, warning: bool = False) -> None:
        event = event_body(obj, reason, message, warning=warning, component=self._component)
        event["reportingInstance"] = self._instance  # which replica decided
        namespace = event["metadata"]["namespace"]
        await self._call(_discarding(self._core.create_namespaced_event), namespace, event, _preload_content=False)
        metrics.API_WRITES.labels("events", "create").inc()


def _discarding(fn: Callable[..., Any]) -> Callable[..., None]:
    """Call a write with _preload_content=False and drain the raw response (the connection goes back to the pool)."""

    def call(*args: Any, **kwargs: Any) -> None:
        response = fn(*args, **kwargs)
        response.read()
        response.release_conn()

    return call


def _page(resp: Any) -> dict[str, Any]:
    """One page of a list: its items (with kind and apiVersion, as watch events have them) and the continue
    token; managedFields are dropped (the operator never reads them; they are a third of each object)."""
    data = json.loads(resp.data)
    kind = data.get("kind", "List").removesuffix("List")
    items: list[Body] = data.get("items", [])
    for item in items:
        item.setdefault("kind", kind)
        item.setdefault("apiVersion", data.get("apiVersion", "v1"))
        item.get("metadata", {}).pop("managedFields", None)
    return {"items": items, "continue": (data.get("metadata") or {}).get("continue")}
