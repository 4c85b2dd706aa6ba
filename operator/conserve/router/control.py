"""What the router needs from the control plane, behind one Protocol, and its Kubernetes implementation.

The router creates Conversation objects, reads their placement (`status.decoder`, `status.prefill`,
`status.placementGeneration`, or why there is none: the `Placed` condition) from a watch cache, patches
`spec.usage` / `spec.completed` (merge patches), deletes a Conversation that ended without a placement before it
creates it again (a client's retry after a refusal), and reads each DecoderPool's ready decoders and prefill
servers (with endpoints), its `placement.maxQueueWaitSeconds`, `defaultIdleTimeoutSeconds` and P/D decider settings
(`prefillDecider`, through the DecoderPool api model and `conserve.api.scheduling.pd_settings`) from a second watch.
`PlacementCache` is that watch cache and its waiters, whatever feeds it; `KubeControlPlane` feeds it from the
asyncio client (`conserve.kube.aio`: two `AsyncInformer` tasks, writes awaited on the router's own loop, no
threads). It replaced the synchronous client in thread pools by measurement: benchmarks/kube_client_bench.py
(its docstring has the figures) compares the two on the router's placement wait.
Usage patches take at most `PATCHES_IN_FLIGHT` of the client's connections, so a new conversation's create
(on its first turn's path) never queues behind them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from conserve.api.common import GROUP, VERSION
from conserve.api.conversation import PLURAL as CONVERSATIONS
from conserve.api.conversation import TERMINAL_PHASES, ConversationStatus, Phase
from conserve.api.decoderpool import DEFAULT_MAX_QUEUE_WAIT_SECONDS, DecoderPoolSpec, DecoderPoolStatus
from conserve.api.decoderpool import PLURAL as DECODERPOOLS
from conserve.api.labels import ANNOTATION_OWNER, LABEL_MANAGED_BY, ROUTER_MANAGER
from conserve.api.scheduling import pd_settings, slo_policy_from
from conserve.api.slo import SloSpec
from conserve.core.pd import PdSettings
from conserve.core.slo import SloPolicy
from conserve.kube.aio import CALL_ERRORS, AsyncCustomObjectsApi, new_async_api_client, read_body
from conserve.kube.aio_informer import AsyncInformer
from conserve.kube.errors import Conflict, NotFound
from conserve.kube.patch import MERGE_PATCH
from conserve.router.policy import Backend, Placement

log = logging.getLogger(__name__)
S = TypeVar("S", ConversationStatus, DecoderPoolStatus)


class _Follower(Protocol):
    """Either client's informer, as the cache starts it."""

    def start(self) -> None: ...

    async def wait_synced(self, timeout_s: float) -> bool: ...


InformerT = TypeVar("InformerT", bound=_Follower)


class ConversationFailed(Exception):
    """The conversation ended without a placement (phase Failed or Completed, or deleted): `reason` and `detail`
    are a Failed one's `Placed` condition's, a Completed one's `Ended` condition's."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ControlPlaneError(Exception):
    """A write the control plane could not make (refused, or the API server unreachable)."""


class ControlPlane(Protocol):
    """Writes raise `ControlPlaneError`; `wait_placement` raises `ConversationFailed` or `TimeoutError`."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def create_conversation(self, name: str, spec: dict[str, Any], owner: str = "") -> None:
        """Create it, annotated with its `owner` (the identity; none for the anonymous caller); there already is
        fine."""

    async def delete_conversation(self, name: str) -> None:
        """Delete the object the cache knows under `name` (not a newer one: its uid is the precondition); gone
        already is fine. The cache forgets it, and ignores its late events."""

    def placement(self, name: str) -> Placement | None: ...

    async def wait_placement(self, name: str, *, newer_than: int | None, timeout_s: float) -> Placement: ...

    def waiting_reason(self, name: str) -> tuple[str, str] | None:
        """(reason, message) of the `Placed=False` condition of a conversation still waiting; None otherwise."""

    async def patch_conversation(self, name: str, patch: dict[str, Any]) -> None: ...

    def pool_backends(self, pool: str) -> tuple[list[Backend], list[Backend]]: ...

    def pool_max_queue_wait_s(self, pool: str) -> float | None:
        """The pool's `placement.maxQueueWaitSeconds`; None for a pool the router has not seen."""

    def pool_idle_timeout_s(self, pool: str) -> float | None:
        """The pool's `defaultIdleTimeoutSeconds` (the operator ends a conversation idle this long); None for a
        pool the router has not seen."""

    def pool_pd_settings(self, pool: str) -> PdSettings:
        """The pool's P/D decider settings (`spec.prefillDecider`); the defaults for a pool the router has not
        seen."""

    def pool_slo(self, pool: str) -> SloPolicy | None:
        """The pool's SLO (`spec.slo`); None for a pool without one, or not seen."""

    def status(self, name: str) -> ConversationStatus | None:
        """The conversation's status as last seen (the operator's checkpoint of its usage); None when unknown."""

    def ended(self, name: str) -> bool:
        """Whether the conversation's object exists and has ended (Completed, e.g. its idle timeout, or Failed):
        its next turn starts it afresh."""

    def owner(self, name: str) -> str | None:
        """The identity the conversation's object is annotated with ("" for none); None for an object not known."""


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


def max_queue_wait_of(spec: Mapping[str, Any] | None) -> float:
    """A DecoderPool spec's `placement.maxQueueWaitSeconds` (the API server fills in its default; a value that is
    missing or not a positive integer reads as that default)."""
    placement = (spec or {}).get("placement")
    value = placement.get("maxQueueWaitSeconds") if isinstance(placement, Mapping) else None
    return _positive_seconds(value, DEFAULT_MAX_QUEUE_WAIT_SECONDS)


def idle_timeout_of(spec: Mapping[str, Any] | None) -> float:
    """A DecoderPool spec's `defaultIdleTimeoutSeconds` (missing or invalid: the API's default)."""
    default = DecoderPoolSpec.model_fields["default_idle_timeout_seconds"].default
    return _positive_seconds((spec or {}).get("defaultIdleTimeoutSeconds"), default)


def pd_settings_of(spec: Mapping[str, Any] | None) -> PdSettings:
    """A DecoderPool spec's P/D decider settings (its `prefillDecider` and its model's KV size); a spec the api
    model refuses reads as the defaults (logged: the API server validates what it stores, so this is a bug)."""
    try:
        return pd_settings(DecoderPoolSpec.model_validate(spec or {}))
    except ValidationError as err:
        log.warning("DecoderPool spec not readable, the P/D decider runs with its defaults: %s", err)
        return PdSettings()


def slo_of(spec: Mapping[str, Any] | None) -> SloPolicy | None:
    """A DecoderPool spec's SLO (`spec.slo`); None without one, or when the api model refuses it (logged)."""
    raw = (spec or {}).get("slo")
    if raw is None:
        return None
    try:
        return slo_policy_from(SloSpec.model_validate(raw))
    except ValidationError as err:
        log.warning("DecoderPool spec.slo not readable, turns are not judged: %s", err)
        return None


def _positive_seconds(value: object, default: int) -> float:
    """A spec's whole seconds as the API server stores them; missing or not a positive integer: the default."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return float(value)
    return float(default)


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

    def offer(self, name: str, placement: Placement | None, failed: tuple[str, str] | None) -> None:
        """A conversation's latest placement, or (reason, detail) when it ended without one."""
        keep = []
        for newer_than, fut in self._waiting.get(name, []):
            if fut.done():
                continue
            if failed is not None:
                fut.set_exception(ConversationFailed(*failed))
            elif placement is not None and (newer_than is None or placement.generation > newer_than):
                fut.set_result(placement)
            else:
                keep.append((newer_than, fut))
        if keep:
            self._waiting[name] = keep
        else:
            self._waiting.pop(name, None)


class PlacementCache:
    """The watch cache of Conversation placements and DecoderPool servers, and the waiters on placements.

    Fed by `replace` (a whole listing) and `apply` (one watch event), on the event loop."""

    def __init__(self) -> None:
        self._statuses: dict[str, ConversationStatus] = {}
        self._uids: dict[str, str] = {}  # of the objects in _statuses
        self._owners: dict[str, str] = {}  # of the objects in _statuses
        #: Objects this router deleted, by name: uid. Their late events (the watch may lag the delete) are ignored.
        self._deleted: dict[str, str] = {}
        self._pools: dict[str, tuple[list[Backend], list[Backend]]] = {}
        self._queue_waits: dict[str, float] = {}
        self._idle_timeouts: dict[str, float] = {}
        self._pd_settings: dict[str, PdSettings] = {}
        self._slos: dict[str, SloPolicy | None] = {}
        self._waiters = _Waiters()

    def placement(self, name: str) -> Placement | None:
        status = self._statuses.get(name)
        return placement_of(status) if status is not None else None

    def pool_backends(self, pool: str) -> tuple[list[Backend], list[Backend]]:
        return self._pools.get(pool, ([], []))

    def pool_max_queue_wait_s(self, pool: str) -> float | None:
        return self._queue_waits.get(pool)

    def pool_idle_timeout_s(self, pool: str) -> float | None:
        return self._idle_timeouts.get(pool)

    def pool_pd_settings(self, pool: str) -> PdSettings:
        return self._pd_settings.get(pool) or PdSettings()

    def pool_slo(self, pool: str) -> SloPolicy | None:
        return self._slos.get(pool)

    def owner(self, name: str) -> str | None:
        return self._owners.get(name) if name in self._statuses else None

    def status(self, name: str) -> ConversationStatus | None:
        return self._statuses.get(name)

    def ended(self, name: str) -> bool:
        status = self._statuses.get(name)
        return status is not None and status.phase in TERMINAL_PHASES

    def waiting_reason(self, name: str) -> tuple[str, str] | None:
        status = self._statuses.get(name)
        if status is None or status.phase is not Phase.PENDING:
            return None
        placed = next((c for c in status.conditions if c.type == "Placed" and c.status == "False"), None)
        return (placed.reason, placed.message) if placed is not None else None

    def forget(self, name: str) -> str | None:
        """Drop a conversation about to be deleted (its waiters stay); returns its uid when known, and from then
        on that object's events are ignored."""
        self._statuses.pop(name, None)
        uid = self._uids.pop(name, None)
        if uid:
            self._deleted[name] = uid
        return uid

    async def wait_placement(self, name: str, *, newer_than: int | None, timeout_s: float) -> Placement:
        fut = self._waiters.add(name, newer_than)
        self._waiters.offer(name, self.placement(name), _failure(self._statuses.get(name)))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        finally:
            self._waiters.remove(name, fut)

    async def follow(
        self, kind: Callable[..., InformerT], list_func: Any, namespace: str, **options: Any
    ) -> list[InformerT]:
        """Start an informer of `kind` (either client's) on each collection the cache follows, feeding it, and
        wait (up to 30 s) for their first listings."""
        informers = [
            kind(
                list_func,
                GROUP,
                VERSION,
                namespace,
                plural,
                name=f"router-{plural}",
                on_replace=functools.partial(self.replace, plural),
                on_event=functools.partial(self.apply, plural),
                **options,
            )
            for plural in (CONVERSATIONS, DECODERPOOLS)
        ]
        for informer in informers:
            informer.start()
        for informer in informers:
            await informer.wait_synced(30.0)
        return informers

    def replace(self, plural: str, items: list[dict[str, Any]]) -> None:
        names = {str((item.get("metadata") or {}).get("name", "")) for item in items}
        known: Mapping[str, object] = self._pools if plural == DECODERPOOLS else self._statuses
        for gone in set(known) - names:  # deleted while the watch was down
            self.apply(plural, "DELETED", {"metadata": {"name": gone}})
        for item in items:
            self.apply(plural, "ADDED", item)

    def apply(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        if kind == "ERROR" or not name:
            return
        status = obj.get("status") or {}
        if plural == DECODERPOOLS:
            if kind == "DELETED":
                self._pools.pop(name, None)
                self._queue_waits.pop(name, None)
                self._idle_timeouts.pop(name, None)
                self._pd_settings.pop(name, None)
                self._slos.pop(name, None)
            else:
                self._pools[name] = backends_from_pool_status(status)
                self._queue_waits[name] = max_queue_wait_of(obj.get("spec"))
                self._idle_timeouts[name] = idle_timeout_of(obj.get("spec"))
                self._pd_settings[name] = pd_settings_of(obj.get("spec"))
                self._slos[name] = slo_of(obj.get("spec"))
            return
        uid = str(obj["metadata"].get("uid") or "")
        deleted = self._deleted.get(name)
        if deleted is not None and uid == deleted:  # a late event of an object this router deleted
            if kind == "DELETED":
                del self._deleted[name]
            return
        if deleted is not None and uid:  # a newer object: the deleted one's events are all behind
            del self._deleted[name]
        if kind == "DELETED":
            self._statuses.pop(name, None)
            self._uids.pop(name, None)
            self._owners.pop(name, None)
            self._waiters.offer(name, None, ("Deleted", "the conversation was deleted"))
            return
        parsed = self._statuses[name] = parse_status(ConversationStatus, status)
        self._uids[name] = uid
        annotations = obj["metadata"].get("annotations") or {}
        self._owners[name] = str(annotations.get(ANNOTATION_OWNER) or "")
        self._waiters.offer(name, placement_of(parsed), _failure(parsed))


def conversation_body(name: str, spec: dict[str, Any], owner: str = "") -> dict[str, Any]:
    """A Conversation the router creates (labelled as the router's, annotated with its owner when it has one)."""
    metadata: dict[str, Any] = {"name": name, "labels": {LABEL_MANAGED_BY: ROUTER_MANAGER}}
    if owner:
        metadata["annotations"] = {ANNOTATION_OWNER: owner}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Conversation", "metadata": metadata, "spec": spec}


#: Usage patches in flight at once (the rest of the connections stay free for creates and the watches).
PATCHES_IN_FLIGHT = 8
#: The client's connections: a burst of creates, the usage patches, the two watches.
CONNECTIONS = 32 + PATCHES_IN_FLIGHT + 2


class KubeControlPlane(PlacementCache):
    """The router's control plane on the asyncio client: informers and writes on the router's event loop."""

    def __init__(self, *, namespace: str, kubeconfig: str | Path | None = None, api: Any = None) -> None:
        """`api`: a CustomObjectsApi to use (tests); by default `start` connects from `kubeconfig`."""
        super().__init__()
        self._namespace = namespace
        self._kubeconfig = kubeconfig
        self._api: Any = api
        self._client: Any = None
        self._informers: list[AsyncInformer] = []
        self._patches = asyncio.Semaphore(PATCHES_IN_FLIGHT)

    async def start(self) -> None:
        if self._api is None:
            self._client = await new_async_api_client(self._kubeconfig, connections=CONNECTIONS)
            self._api = AsyncCustomObjectsApi(self._client)
        self._informers = await self.follow(AsyncInformer, self._api.list_namespaced_custom_object, self._namespace)

    async def stop(self) -> None:
        for informer in self._informers:
            await informer.stop()
        self._informers = []
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def create_conversation(self, name: str, spec: dict[str, Any], owner: str = "") -> None:
        try:
            body = conversation_body(name, spec, owner)
            await self._write(self._api.create_namespaced_custom_object, CONVERSATIONS, body)
        except ControlPlaneError as err:
            if not isinstance(err.__cause__, Conflict):  # already there: a router restart, or a client made it
                raise

    async def delete_conversation(self, name: str) -> None:
        uid = self.forget(name)
        options = {"preconditions": {"uid": uid}} if uid else {}
        try:
            await self._write(self._api.delete_namespaced_custom_object, CONVERSATIONS, name, body=options)
        except ControlPlaneError as err:
            if not isinstance(err.__cause__, NotFound | Conflict):  # gone, or already replaced (the uid differs)
                raise

    async def patch_conversation(self, name: str, patch: dict[str, Any]) -> None:
        async with self._patches:
            await self._write(self._api.patch_namespaced_custom_object, CONVERSATIONS, name, patch, **MERGE_PATCH)

    async def _write(self, method: Any, plural: str, *args: Any, **kwargs: Any) -> None:
        """One write, its reply discarded; failures as `ControlPlaneError` (the named error as its cause)."""
        try:
            await read_body(
                await method(GROUP, VERSION, self._namespace, plural, *args, _preload_content=False, **kwargs)
            )
        except CALL_ERRORS as err:
            raise ControlPlaneError(f"{plural} write: {err}") from err


def _failure(status: ConversationStatus | None) -> tuple[str, str] | None:
    """(reason, detail) of a conversation that ended: a Failed one's `Placed=False` condition (a refusal, a
    failure), a Completed one's `Ended` condition, else its phase; None while it lives."""
    if status is None or status.phase not in TERMINAL_PHASES:
        return None
    conditions = {c.type: c for c in status.conditions}
    condition = conditions.get("Placed") if status.phase is Phase.FAILED else conditions.get("Ended")
    if condition is not None and condition.status == ("False" if status.phase is Phase.FAILED else "True"):
        return condition.reason, condition.message
    return str(status.phase), f"the conversation is {status.phase}"
