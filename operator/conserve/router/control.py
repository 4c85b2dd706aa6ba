"""What the router needs from the control plane, behind one Protocol, and its Kubernetes implementation.

The router creates Conversation objects, reads their placement (`status.decoder`, `status.prefill`,
`status.placementGeneration`) from a watch cache, patches `spec.usage` / `spec.completed` (merge patches), and
reads each DecoderPool's ready decoders and prefill servers (with endpoints) from a second watch.
The Kubernetes client is synchronous: its watches are `conserve.kube.Informer`s (threads that hand events to
the event loop), and its writes run on two thread pools of the router's own: creates (on a new conversation's
first-turn path) never queue behind usage patches, and neither waits for the event loop's small default
executor (cores + 4 threads).
Size the client's connection pool (`connection_pool_maxsize`) to at least both pools together.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from conserve.api.common import GROUP, VERSION
from conserve.api.conversation import PLURAL as CONVERSATIONS
from conserve.api.decoderpool import PLURAL as DECODERPOOLS
from conserve.kube import ApiError, Informer
from conserve.kube.clients import CustomObjectsApi
from conserve.router.policy import Backend, Placement

log = logging.getLogger(__name__)

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ROUTER_MANAGER = "conserve-router"


class ConversationFailed(Exception):
    """The operator could not place the conversation (phase Failed or Completed)."""


class ControlPlane(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def create_conversation(self, name: str, spec: dict[str, Any]) -> None: ...

    def placement(self, name: str) -> Placement | None: ...

    async def wait_placement(self, name: str, *, newer_than: int | None, timeout_s: float) -> Placement: ...

    async def patch_conversation(self, name: str, patch: dict[str, Any]) -> None: ...

    def pool_backends(self, pool: str) -> tuple[list[Backend], list[Backend]]: ...


def placement_from_status(status: Mapping[str, Any] | None) -> Placement | None:
    """The placement a Conversation's status gives, or None while it has no decoder with an endpoint."""
    if not status:
        return None
    if status.get("phase") in ("Pending", "Failed", "Completed"):
        return None
    decoder = status.get("decoder") or {}
    endpoint = str(decoder.get("endpoint") or "")
    if not endpoint:
        return None
    prefill_raw = status.get("prefill") or {}
    prefill = None
    if prefill_raw.get("endpoint"):
        prefill = Backend(str(prefill_raw.get("pod", "")), str(prefill_raw["endpoint"]))
    generation = int(status.get("placementGeneration") or 1)
    return Placement(generation, Backend(str(decoder.get("pod", "")), endpoint), prefill)


def backends_from_pool_status(status: Mapping[str, Any] | None) -> tuple[list[Backend], list[Backend]]:
    """(ready prefill servers, ready decoders) of a DecoderPool status, those with an endpoint."""
    status = status or {}

    def ready(items: Any) -> list[Backend]:
        out = []
        for item in items or []:
            if item.get("ready") and item.get("endpoint"):
                out.append(Backend(str(item.get("pod", "")), str(item["endpoint"])))
        return out

    return ready(status.get("prefills")), ready(status.get("decoders"))


class _Waiters:
    """Futures waiting for a conversation's placement to reach a generation."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[tuple[int | None, asyncio.Future[Placement]]]] = {}

    def add(self, name: str, newer_than: int | None) -> asyncio.Future[Placement]:
        fut: asyncio.Future[Placement] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(name, []).append((newer_than, fut))
        return fut

    def remove(self, name: str, fut: asyncio.Future[Placement]) -> None:
        entries = [e for e in self._waiting.get(name, []) if e[1] is not fut]
        if entries:
            self._waiting[name] = entries
        else:
            self._waiting.pop(name, None)

    def offer(self, name: str, placement: Placement | None, failed: str | None) -> None:
        keep = []
        for newer_than, fut in self._waiting.get(name, []):
            if fut.done():
                continue
            if failed is not None:
                fut.set_exception(ConversationFailed(failed))
            elif placement is not None and (newer_than is None or placement.generation > newer_than):
                fut.set_result(placement)
            else:
                keep.append((newer_than, fut))
        if keep:
            self._waiting[name] = keep
        else:
            self._waiting.pop(name, None)


#: Threads of the create pool (a burst of new conversations) and of the usage-patch pool.
CREATE_THREADS = 32
PATCH_THREADS = 8


class KubeControlPlane:
    def __init__(
        self,
        *,
        api_client: Any,
        namespace: str,
        create_threads: int = CREATE_THREADS,
        patch_threads: int = PATCH_THREADS,
    ) -> None:
        self._api = CustomObjectsApi(api_client)
        self._namespace = namespace
        self._statuses: dict[str, dict[str, Any]] = {}
        self._pools: dict[str, tuple[list[Backend], list[Backend]]] = {}
        self._waiters = _Waiters()
        self._informers: list[Informer] = []
        self._creates = ThreadPoolExecutor(create_threads, thread_name_prefix="router-create")
        self._patches = ThreadPoolExecutor(patch_threads, thread_name_prefix="router-patch")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for plural in (CONVERSATIONS, DECODERPOOLS):
            informer = Informer(
                self._api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self._namespace,
                plural,
                name=f"router-{plural}",
                on_replace=functools.partial(self._replace, plural),
                on_event=functools.partial(self._apply, plural),
                loop=loop,
            )
            informer.start()
            self._informers.append(informer)
        for informer in self._informers:
            await informer.wait_synced(30.0)

    async def stop(self) -> None:
        for informer in self._informers:
            informer.stop()
        self._creates.shutdown(wait=False, cancel_futures=True)
        self._patches.shutdown(wait=False, cancel_futures=True)

    async def _call(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    # ---- reads from the watch cache ------------------------------------------------------------------------
    def placement(self, name: str) -> Placement | None:
        return placement_from_status(self._statuses.get(name))

    def pool_backends(self, pool: str) -> tuple[list[Backend], list[Backend]]:
        return self._pools.get(pool, ([], []))

    async def wait_placement(self, name: str, *, newer_than: int | None, timeout_s: float) -> Placement:
        fut = self._waiters.add(name, newer_than)
        self._waiters.offer(name, self.placement(name), _failure(self._statuses.get(name)))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        finally:
            self._waiters.remove(name, fut)

    # ---- writes --------------------------------------------------------------------------------------------
    async def create_conversation(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Conversation",
            "metadata": {"name": name, "labels": {LABEL_MANAGED_BY: ROUTER_MANAGER}},
            "spec": spec,
        }
        try:
            await self._call(
                self._creates,
                self._api.create_namespaced_custom_object,
                GROUP,
                VERSION,
                self._namespace,
                CONVERSATIONS,
                body,
            )
        except ApiError as err:
            if err.status != 409:  # already there: a router restart, or a client that created it
                raise

    async def patch_conversation(self, name: str, patch: dict[str, Any]) -> None:
        await self._call(
            self._patches,
            self._api.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            self._namespace,
            CONVERSATIONS,
            name,
            patch,
        )

    # ---- watches: the informers call these on the event loop ------------------------------------------------
    def _replace(self, plural: str, items: list[dict[str, Any]]) -> None:
        names = {str((item.get("metadata") or {}).get("name", "")) for item in items}
        known = self._pools if plural == DECODERPOOLS else self._statuses
        for gone in set(known) - names:  # deleted while the watch was down
            self._apply(plural, "DELETED", {"metadata": {"name": gone}})
        for item in items:
            self._apply(plural, "ADDED", item)

    def _apply(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        if kind == "ERROR" or not name:
            return
        status = obj.get("status") or {}
        if plural == DECODERPOOLS:
            if kind == "DELETED":
                self._pools.pop(name, None)
            else:
                self._pools[name] = backends_from_pool_status(status)
            return
        if kind == "DELETED":
            self._statuses.pop(name, None)
            self._waiters.offer(name, None, "conversation deleted")
            return
        self._statuses[name] = status
        self._waiters.offer(name, placement_from_status(status), _failure(status))


def _failure(status: Mapping[str, Any] | None) -> str | None:
    if status and status.get("phase") in ("Failed", "Completed"):
        return f"conversation is {status['phase']}"
    return None
