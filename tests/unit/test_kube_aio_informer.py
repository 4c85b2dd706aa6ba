"""The asyncio informer on a mocked API at the adapter boundary (raw aiohttp-like responses): list, watch from
the listing's resourceVersion, follow bookmarks, re-list on 410 (as an event and as the watch's status), back
off on failures; and the asyncio client's raw responses mapped to the named errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conserve.kube import Backoff, Conflict, Gone, NotFound
from conserve.kube.aio import read_body
from conserve.kube.aio_informer import AsyncInformer

pytestmark = pytest.mark.unit


def obj(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": version}}


class Content:
    """aiohttp's StreamReader as the informer reads it: chunks that split documents."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    async def iter_any(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._raw), 7):
            yield self._raw[start : start + 7]


class RawResponse:
    """A `_preload_content=False` reply of the asyncio client: an aiohttp response, its status unchecked."""

    def __init__(self, raw: bytes, status: int = 200, reason: str = "OK") -> None:
        self.status, self.reason, self.content = status, reason, Content(raw)
        self._raw = raw
        self.released = False

    async def read(self) -> bytes:
        return self._raw

    def release(self) -> None:
        self.released = True


def listing(items: list[dict[str, Any]], version: str) -> RawResponse:
    body = {"kind": "PodList", "apiVersion": "v1", "items": items, "metadata": {"resourceVersion": version}}
    return RawResponse(json.dumps(body).encode())


def stream(*events: dict[str, Any]) -> RawResponse:
    return RawResponse(b"".join(json.dumps(e).encode() + b"\n" for e in events))


def refusal(status: int, reason: str) -> RawResponse:
    return RawResponse(json.dumps({"kind": "Status", "code": status, "message": reason}).encode(), status, reason)


class ScriptedApi:
    """An async client `list_*` method answering from a script; when it runs out, the informer is stopped."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls: list[dict[str, Any]] = []
        self.responses: list[RawResponse] = []
        self.over = asyncio.Event()

    async def __call__(self, *args: Any, **kwargs: Any) -> RawResponse:
        self.calls.append(kwargs)
        if not self.script:
            self.over.set()
            await asyncio.sleep(3600)  # cancelled by stop()
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        assert isinstance(step, RawResponse)
        self.responses.append(step)
        return step


class CountingBackoff(Backoff):
    def __init__(self) -> None:
        super().__init__(first_s=0.0)
        self.delays = 0

    def next_delay_s(self) -> float:
        self.delays += 1
        return super().next_delay_s()


def run_script(script: list[Any], **selectors: Any) -> tuple[ScriptedApi, AsyncInformer, list[Any], int]:
    """Run an informer over `script` until it is spent; (api, informer, deliveries, back-offs)."""
    api = ScriptedApi(script)
    seen: list[Any] = []
    backoff = CountingBackoff()

    async def main() -> AsyncInformer:
        informer = AsyncInformer(
            api,
            name="pods",
            on_replace=lambda items: seen.append([i["metadata"]["name"] for i in items]),
            on_event=lambda kind, o: seen.append((kind, o["metadata"]["name"])),
            backoff=backoff,
            **selectors,
        )
        informer.start()
        assert await informer.wait_synced(5.0)
        await asyncio.wait_for(api.over.wait(), 5.0)
        await informer.stop()
        return informer

    return api, asyncio.run(main()), seen, backoff.delays


def test_lists_watches_follows_bookmarks_and_relists_on_gone_and_failure() -> None:
    api, informer, seen, delays = run_script(
        [
            listing([obj("a", "5")], "10"),
            stream({"type": "ADDED", "object": obj("b", "11")}, {"type": "BOOKMARK", "object": obj("", "15")}),
            stream({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}),
            listing([obj("b", "11")], "20"),
            ConnectionResetError("API server restarting"),
            listing([], "30"),
            stream({"type": "DELETED", "object": obj("b", "31")}),
        ],
        label_selector="conserve.dev/role",
    )
    assert seen == [["a"], ("ADDED", "b"), ["b"], [], ("DELETED", "b")]
    watches = [c for c in api.calls if c.get("watch")]
    assert [c["resource_version"] for c in watches] == ["10", "15", "20", "30", "31"]
    assert all(c["allow_watch_bookmarks"] and c["label_selector"] == "conserve.dev/role" for c in watches)
    assert all(c["_preload_content"] is False for c in api.calls)
    assert informer.lists == 3
    assert delays == 1  # the reset connection only: a 410 re-lists at once
    assert all(r.released for r in api.responses)


def test_a_watch_request_refused_as_gone_relists_without_backing_off() -> None:
    _api, informer, seen, delays = run_script([listing([], "1"), refusal(410, "Gone"), listing([obj("a", "2")], "2")])
    assert seen == [[], ["a"]]
    assert informer.lists == 2
    assert delays == 0


def test_a_refused_listing_backs_off_and_lists_again() -> None:
    _api, informer, seen, delays = run_script([refusal(503, "Unavailable"), listing([obj("a", "1")], "1")])
    assert seen == [["a"]]
    assert informer.lists == 1
    assert delays == 1


@pytest.mark.parametrize(("status", "kind"), [(404, NotFound), (409, Conflict), (410, Gone)])
def test_a_raw_refusal_reads_as_the_named_error(status: int, kind: type[Exception]) -> None:
    response = refusal(status, "nope")
    with pytest.raises(kind, match=f"{status} nope"):
        asyncio.run(read_body(response))
    assert response.released


def test_a_raw_success_reads_its_body() -> None:
    response = RawResponse(b'{"ok": true}', 201, "Created")
    assert asyncio.run(read_body(response)) == b'{"ok": true}'
    assert response.released
