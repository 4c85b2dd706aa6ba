"""The informer: list, watch from the listing's resourceVersion, follow bookmarks, re-list on 410 and on failure."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conserve.kube import Backoff, Gone, Informer, NotFound, Refused
from conserve.kube.errors import ApiError, translate

pytestmark = pytest.mark.unit


def obj(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": version}}


class Listing:
    def __init__(self, items: list[dict[str, Any]], version: str) -> None:
        self.data = json.dumps(
            {"kind": "PodList", "apiVersion": "v1", "items": items, "metadata": {"resourceVersion": version}}
        )


class WatchStream:
    """Newline-delimited events, cut into chunks that split documents (as a chunked response may)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self._raw = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.released = False

    def stream(self, amt: Any = None, decode_content: Any = None) -> Iterator[bytes]:
        for start in range(0, len(self._raw), 7):
            yield self._raw[start : start + 7]

    def release_conn(self) -> None:
        self.released = True

    def close(self) -> None:
        pass


class ScriptedApi:
    """A client `list_*` method answering from a script of listings, watch streams and failures."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls: list[dict[str, Any]] = []
        self.informer: Informer | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if not self.script:
            assert self.informer is not None
            self.informer.stop()
            raise ConnectionError("script over")
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def test_lists_watches_follows_bookmarks_and_relists_on_gone_and_failure() -> None:
    api = ScriptedApi(
        [
            Listing([obj("a", "5")], "10"),
            WatchStream([{"type": "ADDED", "object": obj("b", "11")}, {"type": "BOOKMARK", "object": obj("", "15")}]),
            WatchStream([{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}]),
            Listing([obj("b", "11")], "20"),
            ConnectionResetError("API server restarting"),
            Listing([], "30"),
            WatchStream([{"type": "DELETED", "object": obj("b", "31")}]),
        ]
    )
    listings: list[list[str]] = []
    events: list[tuple[str, str]] = []
    informer = Informer(
        api,
        name="pods",
        on_replace=lambda items: listings.append([i["metadata"]["name"] for i in items]),
        on_event=lambda kind, o: events.append((kind, o["metadata"]["name"])),
        backoff=Backoff(first_s=0.0),
        label_selector="conserve.dev/role",
    )
    api.informer = informer
    informer.run()

    assert listings == [["a"], ["b"], []]
    assert events == [("ADDED", "b"), ("DELETED", "b")]
    watches = [c for c in api.calls if c.get("watch")]
    assert [c["resource_version"] for c in watches] == ["10", "15", "20", "30", "31"]
    assert all(c["allow_watch_bookmarks"] and c["label_selector"] == "conserve.dev/role" for c in watches)
    assert informer.synced.is_set()
    assert informer.lists == 3


def test_events_reach_the_event_loop_thread() -> None:
    api = ScriptedApi([Listing([obj("a", "1")], "1"), WatchStream([{"type": "MODIFIED", "object": obj("a", "2")}])])

    async def main() -> list[tuple[str, bool]]:
        seen: list[tuple[str, bool]] = []
        loop_thread = threading.current_thread()
        done = asyncio.Event()

        def on_event(kind: str, o: dict[str, Any]) -> None:
            seen.append((kind, threading.current_thread() is loop_thread))
            done.set()

        informer = Informer(
            api,
            name="convs",
            on_replace=lambda items: seen.append(("LIST", threading.current_thread() is loop_thread)),
            on_event=on_event,
            loop=asyncio.get_running_loop(),
            backoff=Backoff(first_s=0.0),
        )
        api.informer = informer
        informer.start()
        assert await informer.wait_synced(5.0)
        await asyncio.wait_for(done.wait(), 5.0)
        informer.stop()
        return seen

    assert asyncio.run(main()) == [("LIST", True), ("MODIFIED", True)]


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(first_s=0.5, max_s=2.0)
    assert [backoff.next_delay_s() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    backoff.reset()
    assert backoff.next_delay_s() == 0.5


@pytest.mark.parametrize(("status", "kind"), [(404, NotFound), (409, Refused), (410, Gone), (422, Refused)])
def test_api_errors_map_to_named_exceptions(status: int, kind: type[Exception]) -> None:
    error = translate(ApiError(status=status, reason="nope"))
    assert isinstance(error, kind)
    assert error.status == status


def test_a_watch_request_refused_as_gone_relists_without_backing_off() -> None:
    class CountingBackoff(Backoff):
        delays = 0

        def next_delay_s(self) -> float:
            self.delays += 1
            return 0.0

    api = ScriptedApi([Listing([], "1"), ApiError(status=410, reason="Gone"), Listing([obj("a", "2")], "2")])
    listings: list[int] = []
    backoff = CountingBackoff()
    informer = Informer(api, name="x", on_replace=lambda i: listings.append(len(i)), on_event=print, backoff=backoff)
    api.informer = informer
    informer.run()
    assert listings == [0, 1]
    assert backoff.delays == 0
