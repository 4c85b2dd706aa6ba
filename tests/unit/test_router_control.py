"""The router's control plane on a scripted API: the informers' listing and events reach the placement cache
and the waiters, on the event loop; a conversation gone from a re-listing fails its waiters."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conserve.router.control import ConversationFailed, KubeControlPlane
from conserve.router.policy import Backend

pytestmark = pytest.mark.unit


class Response:
    def __init__(self, body: dict[str, Any] | None = None, events: list[dict[str, Any]] | None = None) -> None:
        self.data = json.dumps(body or {}).encode()
        self._lines = [json.dumps(e).encode() + b"\n" for e in events or []]
        self.closed = asyncio.Event()

    def stream(self, amt: Any = None, decode_content: Any = None) -> Iterator[bytes]:
        yield from self._lines

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


def conversation(name: str, phase: str, decoder: str = "", generation: int = 1) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "placementGeneration": generation}
    if decoder:
        status["decoder"] = {"pod": decoder, "endpoint": f"{decoder}:8000"}
    return {"metadata": {"name": name, "resourceVersion": "1"}, "status": status}


class ScriptedCustomObjects:
    """`list_namespaced_custom_object` answering per plural: a listing, then watch streams, then listings again."""

    def __init__(self, script: dict[str, list[Response | threading.Event]]) -> None:
        self.script = script

    def list_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, **kw: Any) -> Response:
        steps = self.script[plural]
        gate = steps[0] if steps else None
        if isinstance(gate, threading.Event):  # the test lets the script go on
            steps.pop(0)
            gate.wait(10)
        if not steps:
            raise ConnectionError("no more")  # the informer backs off and tries again
        step = steps.pop(0)
        assert isinstance(step, Response)
        return step


def listing(*items: dict[str, Any]) -> Response:
    return Response({"kind": "ConversationList", "items": list(items), "metadata": {"resourceVersion": "5"}})


def test_placements_from_events_and_a_relisting_that_drops_a_conversation() -> None:
    pool = {
        "metadata": {"name": "pool"},
        "status": {"decoders": [{"pod": "d0", "ready": True, "endpoint": "d0:8000"}, {"pod": "d1", "ready": False}]},
    }
    relist = threading.Event()
    api = ScriptedCustomObjects(
        {
            "decoderpools": [listing(pool)],
            "conversations": [
                listing(conversation("a", "Decoding", "d0"), conversation("b", "Pending")),
                Response(
                    events=[
                        {"type": "MODIFIED", "object": conversation("b", "Prefilling", "d0", 2)},
                        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}},
                    ]
                ),
                relist,
                listing(conversation("b", "Prefilling", "d0", 2)),  # `a` was deleted while the watch was down
            ],
        }
    )
    plane = KubeControlPlane(api_client=None, namespace="ns")
    plane._api = api  # the informers list and watch through it

    async def main() -> tuple[Any, ...]:
        await plane.start()
        try:
            a = plane.placement("a")  # from the first listing
            b = await plane.wait_placement("b", newer_than=1, timeout_s=5)
            a_moved = asyncio.create_task(plane.wait_placement("a", newer_than=1, timeout_s=5))
            await asyncio.sleep(0)  # the waiter is registered before the re-listing may start
            relist.set()
            with pytest.raises(ConversationFailed, match="deleted"):
                await a_moved
            return a, b, plane.pool_backends("pool")
        finally:
            await plane.stop()

    a, b, backends = asyncio.run(main())
    assert a is not None
    assert a.decoder == Backend("d0", "d0:8000")
    assert b.generation == 2
    assert b.decoder == Backend("d0", "d0:8000")
    assert backends == ([], [Backend("d0", "d0:8000")])
