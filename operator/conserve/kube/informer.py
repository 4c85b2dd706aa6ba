"""List + watch of one collection, the way client-go's reflector does it, for the adapters that keep a cache.

An `Informer` lists (raw JSON, paged by the API server's own limit), hands the whole listing to `on_replace`,
then watches from the listing's resourceVersion with bookmarks on, handing each ADDED / MODIFIED / DELETED
event to `on_event`. A watch that ends (its timeout) resumes from the last resourceVersion seen (events and
bookmarks advance it); one that is too old (410 Gone) re-lists at once; any other failure (an API server
restart, a reset connection) backs off exponentially, then re-lists. It runs in a daemon thread: given a
`loop`, the callbacks run on that asyncio loop (`call_soon_threadsafe`), else on the informer's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from conserve.kube.errors import Gone, from_watch_error, status_of

log = logging.getLogger(__name__)

Object = dict[str, Any]
ListFunc = Callable[..., Any]
WATCH_EVENTS = frozenset({"ADDED", "MODIFIED", "DELETED"})


class Backoff:
    """Exponential delays between failed attempts: first_s, 2*first_s, ... up to max_s; `reset` on success."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self._next = first_s

    def next_delay_s(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.first_s


class ListWatch:
    """What both informers (this threaded one, `aio_informer.AsyncInformer`) share: the collection
    (`list_func(*args, **selectors)`, a client `list_*` method), the callbacks, the back-off, and the requests:
    a raw listing, and a raw watch from a resourceVersion with bookmarks on."""

    def __init__(
        self,
        list_func: ListFunc,
        *args: Any,
        name: str,
        on_replace: Callable[[list[Object]], None],
        on_event: Callable[[str, Object], None],
        watch_timeout_s: int = 300,
        backoff: Backoff | None = None,
        **selectors: Any,
    ) -> None:
        self.name = name
        self._list_func, self._args, self._selectors = list_func, args, selectors
        self._on_replace, self._on_event = on_replace, on_event
        self._watch_timeout_s = watch_timeout_s
        self._backoff = backoff or Backoff()
        #: Lists made so far (the first, then one per 410 or failure).
        self.lists = 0

    def _request_list(self) -> Any:
        return self._list_func(*self._args, _preload_content=False, _request_timeout=60, **self._selectors)

    def _request_watch(self, version: str) -> Any:
        return self._list_func(
            *self._args,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            _preload_content=False,
            _request_timeout=self._watch_timeout_s + 30,
            **self._selectors,
        )


class Informer(ListWatch):
    """List + watch on a thread of its own until `stop()`; `options` as `ListWatch`'s."""

    def __init__(
        self, list_func: ListFunc, *args: Any, loop: asyncio.AbstractEventLoop | None = None, **options: Any
    ) -> None:
        super().__init__(list_func, *args, **options)
        self._loop = loop
        self._stopped = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None
        #: Set once the first listing has been handed over.
        self.synced = threading.Event()

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        response = self._response
        if response is not None:
            # Unblock a watch waiting for its next event, from a thread of its own: the reading thread holds the
            # response's buffer lock while it waits, so closing here could block the caller (a SIGTERM handler)
            # until the next event; the informer threads are daemons, so the process exits regardless.
            threading.Thread(target=response.close, name=f"informer-{self.name}-close", daemon=True).start()

    async def wait_synced(self, timeout_s: float) -> bool:
        return await asyncio.to_thread(self.synced.wait, timeout_s)

    def run(self) -> None:
        """The informer's loop (`start` runs it on a thread)."""
        while not self._stopped.is_set():
            try:
                version = self._list()
                self._backoff.reset()
                while not self._stopped.is_set():
                    version = self._watch(version)
            except Gone as exc:
                log.info("%s: watch expired (%s); re-listing", self.name, exc)
            except Exception as exc:  # noqa: BLE001 an informer outlives any failure: log, back off, re-list
                if self._stopped.is_set():
                    return
                if status_of(exc) == 410:  # the watch request itself refused as too old
                    continue
                delay = self._backoff.next_delay_s()
                log.warning("%s: list/watch failed (%s); re-listing in %.1fs", self.name, exc, delay)
                self._stopped.wait(delay)

    # --- one list, one watch ------------------------------------------------------------------------------

    def _list(self) -> str:
        items, version = parse_listing(self._request_list().data)
        self.lists += 1
        log.info("%s: listed %d at resourceVersion %s", self.name, len(items), version)
        self._deliver(self._on_replace, items)
        self.synced.set()
        return version

    def _watch(self, version: str) -> str:
        """Stream events from `version` until the watch times out; returns the last resourceVersion seen."""
        self._response = self._request_watch(version)
        try:
            for line in _lines(self._response):
                event = parse_event(line)
                if event is None or self._stopped.is_set():
                    continue
                kind, obj, version = event[0], event[1], event[2] or version
                if kind in WATCH_EVENTS:
                    self._deliver(self._on_event, kind, obj)
        finally:
            response, self._response = self._response, None
            response.release_conn()
        return version

    def _deliver(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            callback(*args)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)


def parse_listing(data: bytes | str) -> tuple[list[Object], str]:
    """A raw list response's items (with the kind and apiVersion watch events carry) and its resourceVersion."""
    body = json.loads(data)
    kind = str(body.get("kind", "List")).removesuffix("List")
    items: list[Object] = body.get("items") or []
    for item in items:
        item.setdefault("kind", kind)
        item.setdefault("apiVersion", body.get("apiVersion", "v1"))
    return items, str((body.get("metadata") or {}).get("resourceVersion", ""))


def parse_event(line: bytes) -> tuple[str, Object, str] | None:
    """(type, object, its resourceVersion or "") of one watch event line; None for one without an object.

    Raises the error an ERROR event carries (`Gone` for an expired resourceVersion)."""
    event = json.loads(line)
    kind, obj = event.get("type"), event.get("object")
    if not isinstance(obj, dict):
        return None
    if kind == "ERROR":
        raise from_watch_error(obj)
    return str(kind), obj, str((obj.get("metadata") or {}).get("resourceVersion") or "")


class LineSplitter:
    """Newline-delimited documents out of chunks that may split them (a chunked watch response)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n")
        return [line for line in complete if line.strip()]

    def rest(self) -> list[bytes]:
        pending, self._pending = self._pending, b""
        return [pending] if pending.strip() else []


def _lines(response: Any) -> Iterator[bytes]:
    """The newline-delimited JSON documents of a watch response, as they arrive."""
    splitter = LineSplitter()
    for chunk in response.stream(amt=None, decode_content=False):
        yield from splitter.feed(chunk)
    yield from splitter.rest()
