"""Normal Events aggregated, Warnings always: at most one API write per (namespace, kind, reason) per window.

A placement is one status write; posting a `Placed` Event for each would double the API server's load (an Event
is a write to etcd like any other). So of Normal Events with the same namespace, kind and reason, the first of a
window is posted as it comes and the rest are counted; when the window ends, one summary Event (on the last of
them, with the count and a few names) stands for them all. Warnings (Outgrown, Failed, DecoderLost, ...) are
posted one by one: an operator acts on each of them. At 50 placements/s and a 10 s window that is 2 Event
writes per 500 placements instead of 500.

`AggregatingKube` wraps any `Kube`: the engine keeps calling `post_event`, nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conserve import metrics
from conserve.controller.kube import Body, Kube

log = logging.getLogger("conserve.operator")

#: Names quoted in a summary Event's message (the rest are only counted).
SAMPLE_NAMES = 5


@dataclass(slots=True)
class _Window:
    opened_s: float
    suppressed: int = 0
    names: list[str] = field(default_factory=list)
    last_obj: Body | None = None
    last_message: str = ""


@dataclass(frozen=True, slots=True)
class Summary:
    obj: Body
    reason: str
    message: str


class EventWindows:
    """The aggregation rule, without I/O: `offer` says whether to post an Event now; `due` gives the summaries of
    windows that ended (and closes them)."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._open: dict[tuple[str, str, str], _Window] = {}
        self._ended: list[Summary] = []  # windows replaced by a newer one before `due` ran

    def offer(self, obj: Body, reason: str, message: str, now_s: float) -> bool:
        meta = obj.get("metadata", {})
        key = (str(meta.get("namespace", "")), str(obj.get("kind", "")), reason)
        window = self._open.get(key)
        if window is None or now_s - window.opened_s >= self.window_s:
            if window is not None:
                self._end(key, window)
            self._open[key] = _Window(now_s)
            return True
        window.suppressed += 1
        name = str(meta.get("name", ""))
        if len(window.names) < SAMPLE_NAMES:
            window.names.append(name)
        window.last_obj, window.last_message = obj, message
        return False

    def due(self, now_s: float) -> list[Summary]:
        for key, window in list(self._open.items()):
            if now_s - window.opened_s >= self.window_s:
                del self._open[key]
                self._end(key, window)
        out, self._ended = self._ended, []
        return out

    def _end(self, key: tuple[str, str, str], window: _Window) -> None:
        if not window.suppressed or window.last_obj is None:
            return
        _, kind, reason = key
        more = "" if window.suppressed <= len(window.names) else ", ..."
        message = (
            f"{window.suppressed} more {kind} {reason} Events in {self.window_s:g}s aggregated into this one "
            f"(e.g. {', '.join(window.names)}{more}); the last: {window.last_message}"
        )
        self._ended.append(Summary(window.last_obj, reason, message))

    def __len__(self) -> int:
        return len(self._open)


class AggregatingKube:
    """A `Kube` whose Normal Events are aggregated (`EventWindows`); every other call goes to `inner` as is."""

    def __init__(self, inner: Kube, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.windows = EventWindows(window_s)
        self._clock = clock

    # Delegated unchanged.
    async def list_objects(self, plural: str, namespace: str | None) -> list[Body]:
        return await self.inner.list_objects(plural, namespace)

    async def list_pods(self, namespace: str | None) -> list[Body]:
        return await self.inner.list_pods(namespace)

    async def list_nodes(self) -> list[Body]:
        return await self.inner.list_nodes()

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        return await self.inner.patch_status(plural, namespace, name, patch)

    async def patch_object(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        return await self.inner.patch_object(plural, namespace, name, patch)

    def __getattr__(self, name: str) -> Any:  # api_client and other extras of the real client
        return getattr(self.inner, name)

    async def post_event(self, obj: Body, reason: str, message: str, *, warning: bool = False) -> None:
        if warning or self.windows.offer(obj, reason, message, self._clock()):
            await self.inner.post_event(obj, reason, message, warning=warning)
        else:
            metrics.EVENTS_AGGREGATED.labels(reason).inc()

    async def flush(self) -> int:
        """Post the summaries of the windows that ended; returns how many."""
        summaries = self.windows.due(self._clock())
        for summary in summaries:
            try:
                await self.inner.post_event(summary.obj, summary.reason, summary.message)
            except Exception as exc:  # noqa: BLE001 an Event never fails the operator
                log.debug("summary Event %s not posted: %s", summary.reason, exc)
        return len(summaries)

    async def run(self) -> None:
        """Flush ended windows for as long as the operator runs."""
        while True:
            await asyncio.sleep(min(self.windows.window_s / 4, 1.0))
            with contextlib.suppress(Exception):
                await self.flush()
