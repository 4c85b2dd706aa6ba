"""The operator's writes: Conversation status, finalizer removal and Events, retried and fenced.

The engine (engine.py) decides under each pool's lock and writes after it; this is the writing half. A write
is retried with back-off on transient failures (network, 5xx, 429), never on a refusal (the object is gone, or
the API server says no: the watch tells what happened). Once this replica lost its Lease (`fenced`) nothing is
written. Events go out in the background, a few at a time, and never fail a decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from conserve import metrics
from conserve.api import conversation, decoderpool
from conserve.api.common import API_VERSION
from conserve.controller.kube import Kube, NotFound, Refused
from conserve.controller.state import FINALIZER, ConvRecord, PoolRuntime
from conserve.controller.status import conversation_status_patch

log = logging.getLogger("conserve.operator")


@dataclass(frozen=True, slots=True)
class WriterConfig:
    write_retries: int = 6
    event_concurrency: int = 8
    #: Post Normal Events (Placed, Released, ...) too; False keeps only Warnings (one write less per placement).
    normal_events: bool = True


def event_subject(kind: str, namespace: str, name: str, uid: str) -> dict[str, Any]:
    """The object an Event is about, as `Kube.post_event` takes it."""
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": namespace, "uid": uid}}


def resource_version(body: dict[str, Any] | None) -> int:
    """An object's resourceVersion as a number (0 when absent or not a number: then nothing is older)."""
    value = (body or {}).get("metadata", {}).get("resourceVersion") if isinstance(body, dict) else None
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


class Writer:
    def __init__(self, kube: Kube, config: WriterConfig) -> None:
        self.kube = kube
        self._write_config = config
        self._events = asyncio.Semaphore(config.event_concurrency)
        self._background: set[asyncio.Task[Any]] = set()
        #: Set when this replica lost its Lease: from then on nothing is written (Kopf takes a moment to stop).
        self.fenced = False

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run a write in the background (`drain_background` waits for all of them)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain_background(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def write_status(self, record: ConvRecord) -> None:
        """Write the record's status (only the fields the operator owns). Writes of one record are serialized
        and coalesced: each writes the latest decision."""
        async with record.write_lock:
            if not record.dirty:
                return
            record.dirty = False
            patch = conversation_status_patch(record)
            record.written.append(record.decision_print())  # before the write: its echo may come first

            async def write() -> None:
                written = await self.kube.patch_status(conversation.PLURAL, record.namespace, record.name, patch)
                record.written_rv = max(record.written_rv, resource_version(written))

            ok = await self._retry(write)
            if not ok:
                record.dirty = True
                metrics.STATUS_WRITE_ERRORS.labels("Conversation").inc()

    async def remove_finalizer(self, record: ConvRecord) -> None:
        """Remove the finalizer earlier versions added (this one adds none: one write per placement)."""
        if not record.has_finalizer:
            return
        record.has_finalizer = False
        record.finalizers = [f for f in record.finalizers if f != FINALIZER]
        # A merge patch replaces the list; other finalizers seen on the object are kept in it.
        patch = {"metadata": {"finalizers": record.finalizers or None}}
        await self._retry(lambda: self.kube.patch_object(conversation.PLURAL, record.namespace, record.name, patch))

    async def _retry(self, call: Callable[[], Awaitable[Any]]) -> bool:
        """Make a write, retried with back-off; True once it landed or was refused (nothing to retry)."""
        retries = self._write_config.write_retries
        delay = 0.05
        for attempt in range(retries):
            if self.fenced:
                return False
            try:
                await call()
                return True
            except (NotFound, Refused) as exc:
                log.debug("write refused: %s", exc)
                return True  # gone or refused: nothing to retry; the watch tells us what happened
            # Any other failure (network, 5xx, 429, a client error) is retried with back-off, then logged: a
            # failed write must not end the decision that made it; the caller counts it and writes again later.
            except Exception as exc:  # noqa: BLE001 logged; the write is retried or reported as failed
                if attempt == retries - 1:
                    log.warning("write failed after %d attempts: %s", attempt + 1, exc)
                    return False
                log.debug("write failed (attempt %d), retrying: %s", attempt + 1, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return False

    def post_event(self, record: ConvRecord, reason: str, message: str, *, warning: bool = False) -> None:
        subject = event_subject(conversation.KIND, record.namespace, record.name, record.uid)
        self._post_soon(subject, reason, message, warning)

    def post_pool_event(self, pool: PoolRuntime, reason: str, message: str, *, warning: bool = False) -> None:
        uid = pool.body.get("metadata", {}).get("uid", "")
        self._post_soon(event_subject(decoderpool.KIND, pool.namespace, pool.name, uid), reason, message, warning)

    def _post_soon(self, subject: dict[str, Any], reason: str, message: str, warning: bool) -> None:
        if warning or self._write_config.normal_events:
            self.spawn(self._post(subject, reason, message, warning))

    async def _post(self, subject: dict[str, Any], reason: str, message: str, warning: bool) -> None:
        if self.fenced:
            return
        async with self._events:
            # Transient failures (timeouts, 429, 5xx under load) are retried like status writes; a refusal (403
            # into a terminating namespace, say) is not. `_retry` never raises: an Event never fails a decision.
            await self._retry(lambda: self.kube.post_event(subject, reason, message, warning=warning))
