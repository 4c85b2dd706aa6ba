"""List + watch on the event loop: `conserve.kube.Informer`'s protocol as an asyncio task, for the asyncio client.

An `AsyncInformer` lists (raw JSON), hands the listing to `on_replace`, then watches from its resourceVersion
with bookmarks on, handing ADDED / MODIFIED / DELETED to `on_event`; a watch that times out resumes from the
last resourceVersion seen (events and bookmarks advance it), one that is too old (410 Gone, as an ERROR event or
as the watch request's status) re-lists at once, any other failure backs off exponentially and re-lists.
The callbacks run on the loop, in the informer's task: no threads, no hand-over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from conserve.kube.aio import check_status, read_body
from conserve.kube.errors import Gone
from conserve.kube.informer import WATCH_EVENTS, LineSplitter, ListWatch, parse_event, parse_listing

log = logging.getLogger(__name__)

AsyncListFunc = Callable[..., Awaitable[Any]]


class AsyncInformer(ListWatch):
    """List + watch as a task on the running loop until `stop()`; `options` as `ListWatch`'s (`list_func` is an
    async client's `list_*` method)."""

    def __init__(self, list_func: AsyncListFunc, *args: Any, **options: Any) -> None:
        super().__init__(list_func, *args, **options)
        self._task: asyncio.Task[None] | None = None
        #: Set once the first listing has been handed over.
        self.synced = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"informer-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_synced(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.synced.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """The informer's loop (`start` runs it as a task); ends only when cancelled."""
        while True:
            try:
                version = await self._list()
                self._backoff.reset()
                while True:
                    version = await self._watch(version)
            except Gone as exc:
                log.info("%s: watch expired (%s); re-listing", self.name, exc)
            except Exception as exc:  # noqa: BLE001 an informer outlives any failure: log, back off, re-list
                delay = self._backoff.next_delay_s()
                log.warning("%s: list/watch failed (%s); re-listing in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)

    async def _list(self) -> str:
        items, version = parse_listing(await read_body(await self._request_list()))
        self.lists += 1
        log.info("%s: listed %d at resourceVersion %s", self.name, len(items), version)
        self._on_replace(items)
        self.synced.set()
        return version

    async def _watch(self, version: str) -> str:
        """Stream events from `version` until the watch times out; returns the last resourceVersion seen."""
        response = await self._request_watch(version)
        await check_status(response)
        splitter = LineSplitter()
        try:
            async for chunk in response.content.iter_any():
                for line in splitter.feed(chunk):
                    version = self._handle(line, version)
            for line in splitter.rest():
                version = self._handle(line, version)
        finally:
            response.release()
        return version

    def _handle(self, line: bytes, version: str) -> str:
        event = parse_event(line)
        if event is None:
            return version
        kind, obj, seen = event
        if kind in WATCH_EVENTS:
            self._on_event(kind, obj)
        return seen or version
