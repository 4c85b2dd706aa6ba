"""The router's control plane on a scripted asyncio API: the informers' listing and events reach the placement
cache and the waiters; a conversation gone from a re-listing fails its waiters; writes map refusals."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_kube_aio_informer import RawResponse, stream

from conserve.router.control import ControlPlaneError, ConversationFailed, KubeControlPlane
from conserve.router.policy import Backend

pytestmark = pytest.mark.unit


def conversation(
    name: str,
    phase: str,
    decoder: str = "",
    generation: int = 1,
    *,
    uid: str = "",
    placed: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A Conversation as the watch gives it; `placed`: the (reason, message) of its Placed=False condition."""
    status: dict[str, Any] = {"phase": phase, "placementGeneration": generation}
    if decoder:
        status["decoder"] = {"pod": decoder, "endpoint": f"{decoder}:8000"}
    if placed is not None:
        status["conditions"] = [{"type": "Placed", "status": "False", "reason": placed[0], "message": placed[1]}]
    return {"metadata": {"name": name, "resourceVersion": "1", "uid": uid}, "status": status}


class ScriptedCustomObjects:
    """The async `list_namespaced_custom_object` answering per plural: a listing, then watch streams, then
    listings again; `create_namespaced_custom_object` answering with a status per name."""

    def __init__(self, script: dict[str, list[RawResponse | asyncio.Event]], creates: dict[str, int]) -> None:
        self.script, self.creates = script, creates
        self.deletes: list[tuple[str, Any]] = []

    async def list_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, **kw: Any) -> Any:
        steps = self.script[plural]
        gate = steps[0] if steps else None
        if isinstance(gate, asyncio.Event):  # the test lets the script go on
            steps.pop(0)
            await gate.wait()
        if not steps:
            await asyncio.sleep(3600)  # a watch with nothing more to say, until the informer stops
        step = steps.pop(0)
        assert isinstance(step, RawResponse)
        return step

    async def create_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, body: Any, **kw: Any
    ) -> Any:
        status = self.creates[body["metadata"]["name"]]
        return RawResponse(b"{}", status, "Conflict" if status == 409 else "refused")

    async def delete_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, **kw: Any
    ) -> Any:
        self.deletes.append((name, kw.get("body")))
        return RawResponse(b"{}")


def listing(*items: dict[str, Any]) -> RawResponse:
    body = {"kind": "ConversationList", "items": list(items), "metadata": {"resourceVersion": "5"}}
    return RawResponse(json.dumps(body).encode())


def test_placements_from_events_and_a_relisting_that_drops_a_conversation() -> None:
    pool = {
        "metadata": {"name": "pool"},
        "status": {"decoders": [{"pod": "d0", "ready": True, "endpoint": "d0:8000"}, {"pod": "d1", "ready": False}]},
    }
    relist = asyncio.Event()
    api = ScriptedCustomObjects(
        {
            "decoderpools": [listing(pool)],
            "conversations": [
                listing(conversation("a", "Decoding", "d0"), conversation("b", "Pending")),
                stream(
                    {"type": "MODIFIED", "object": conversation("b", "Prefilling", "d0", 2)},
                    {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}},
                ),
                relist,
                listing(conversation("b", "Prefilling", "d0", 2)),  # `a` was deleted while the watch was down
            ],
        },
        creates={},
    )
    plane = KubeControlPlane(namespace="ns", api=api)  # the informers list and watch through it

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


def test_a_create_that_exists_already_is_fine_and_a_refused_one_is_a_control_plane_error() -> None:
    api = ScriptedCustomObjects({"conversations": [listing()], "decoderpools": [listing()]}, {"old": 409, "bad": 422})
    plane = KubeControlPlane(namespace="ns", api=api)

    async def main() -> None:
        await plane.start()
        try:
            await plane.create_conversation("old", {"pool": "p"})  # a router restart: already there
            with pytest.raises(ControlPlaneError, match="422"):
                await plane.create_conversation("bad", {"pool": "p"})
        finally:
            await plane.stop()

    asyncio.run(main())


def test_why_a_conversation_waits_or_was_refused_and_its_replacement_ignores_the_old_objects_late_events() -> None:
    pool = {"metadata": {"name": "pool"}, "spec": {"placement": {"maxQueueWaitSeconds": 30}}, "status": {}}
    no_room = ("NoCapacity", "no decoder has room")
    refusal = ("QueueWaitExceeded", "waited 31 s in the queue of pool pool, over its limit of 30 s")
    watch = asyncio.Event()
    api = ScriptedCustomObjects(
        {
            "decoderpools": [listing(pool)],
            "conversations": [
                listing(
                    conversation("w", "Pending", uid="u-w", placed=no_room),
                    conversation("r", "Failed", uid="u-old", placed=refusal),
                ),
                watch,
                stream(
                    # The deleted object's events may still come after the delete: ignored.
                    {"type": "MODIFIED", "object": conversation("r", "Failed", uid="u-old", placed=refusal)},
                    {"type": "DELETED", "object": conversation("r", "Failed", uid="u-old", placed=refusal)},
                    {"type": "ADDED", "object": conversation("r", "Pending", uid="u-new")},
                    {"type": "MODIFIED", "object": conversation("r", "Prefilling", "d0", uid="u-new")},
                ),
            ],
        },
        creates={"r": 201},
    )
    plane = KubeControlPlane(namespace="ns", api=api)

    async def main() -> None:
        await plane.start()
        try:
            assert plane.pool_max_queue_wait_s("pool") == 30.0
            assert plane.pool_max_queue_wait_s("other") is None
            assert plane.waiting_reason("w") == no_room
            assert plane.waiting_reason("r") is None  # not waiting: refused
            with pytest.raises(ConversationFailed) as failed:
                await plane.wait_placement("r", newer_than=None, timeout_s=5)
            assert (failed.value.reason, failed.value.detail) == refusal
            # A retry: the refused object is deleted (only that one: its uid is the precondition), then made anew.
            await plane.delete_conversation("r")
            await plane.create_conversation("r", {"pool": "pool"})
            placed = asyncio.create_task(plane.wait_placement("r", newer_than=None, timeout_s=5))
            await asyncio.sleep(0)
            watch.set()
            assert (await placed).decoder == Backend("d0", "d0:8000")
        finally:
            await plane.stop()

    asyncio.run(main())
    assert api.deletes == [("r", {"preconditions": {"uid": "u-old"}})]
