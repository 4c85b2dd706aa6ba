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
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from conserve.api.common import GROUP, VERSION
from conserve.api.conversation import PLURAL as CONVERSATIONS
from conserve.api.conversation import TERMINAL_PHASES, ConversationStatus, Phase
from conserve.api.decoderpool import PLURAL as DECODERPOOLS
from conserve.api.decoderpool import DecoderPoolStatus
from conserve.api.labels import LABEL_MANAGED_BY, ROUTER_MANAGER
from conserve.kube import ApiError, Informer
from conserve.kube.clients import CustomObjectsApi
from conserve.router.policy import Backend, Placement

log = logging.getLogger(__name__)
S = TypeVar("S", ConversationStatus, DecoderPoolStatus)


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


def parse_status(model: type[S], status: Mapping[str, Any] | None) -> S:
    """A status body through its api model; a malformed one reads as empty (logged), never an exception."""
    try:
        return model.model_validate(status or {})
    except ValidationError as err:
        log.warning("ignoring a malformed %s: %s", model.__name__, err)
        return model()


def placement_of(status: ConversationStatus) -> Placement | None:
    """The placement a Conversation's status gives, or None while it has no decoder with an endpoint."""
    if status.phase is Phase.PENDING or status.phase in TERMINAL_PHASES:
        return None
    decoder = status.decoder
    if decoder is None or not decoder.endpoint:
        return None
    prefill = status.prefill
    prefill_backend = Backend(prefill.pod, prefill.endpoint) if prefill and prefill.endpoint else None
    return Placement(status.placement_generation or 1, Backend(decoder.pod, decoder.endpoint), prefill_backend)


def placement_from_status(status: Mapping[str, Any] | None) -> Placement | None:
    """`placement_of` a raw status body."""
    return placement_of(parse_status(ConversationStatus, status)) if status else None


def backends_from_pool_status(status: Mapping[str, Any] | None) -> tuple[list[Backend], list[Backend]]:
    """(ready prefill servers, ready decoders) of a DecoderPool status, those with an endpoint."""
    pool = parse_status(DecoderPoolStatus, status)
    prefills = [Backend(p.pod, p.endpoint) for p in pool.prefills if p.ready and p.endpoint]
    return prefills, [Backend(d.pod, d.endpoint) for d in pool.decoders if d.ready and d.endpoint]


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
        self._statuses: dict[str, ConversationStatus] = {}
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
        status = self._statuses.get(name)
        return placement_of(status) if status is not None else None

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
        parsed = self._statuses[name] = parse_status(ConversationStatus, status)
        self._waiters.offer(name, placement_of(parsed), _failure(parsed))


def _failure(status: ConversationStatus | None) -> str | None:
    if status is not None and status.phase in TERMINAL_PHASES:
        return f"conversation is {status.phase}"
    return None
