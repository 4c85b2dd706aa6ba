"""A pool's limit on the queue wait (`placement.maxQueueWaitSeconds`): the pure rule, and the operator refusing
conversations that waited past it (phase Failed, reason QueueWaitExceeded) while a re-created one queues afresh."""

from __future__ import annotations

from typing import Any

from fake_operator import NS, pool_world, started_engine, stored, stored_conv, sync

from conserve.controller import conversation
from conserve.core.admission import refusal_message
from conserve.core.pending import overdue
from conserve.testkit import FakeClock, conversation_body


def test_overdue_are_those_that_waited_the_limit_longest_first() -> None:
    since = {"ns/b": 100.0, "ns/a": 100.0, "ns/old": 40.0, "ns/new": 150.0}
    assert overdue(since, now_s=160.0, max_wait_s=60.0) == ["ns/old", "ns/a", "ns/b"]
    assert overdue(since, now_s=160.0, max_wait_s=120.0) == ["ns/old"]
    assert overdue(since, now_s=159.0, max_wait_s=120.0) == []
    assert overdue({}, now_s=1e9, max_wait_s=1.0) == []


def test_the_refusal_says_how_long_it_waited_and_why() -> None:
    message = refusal_message(60, 61.4, None, "NoCapacity: no decoder has room for 2000 KV tokens")
    assert message == (
        "waited 61 s in the queue, over its budget of 60 s (NoCapacity: no decoder has room for 2000 KV tokens)"
    )
    assert refusal_message(5, 5, None, "") == "waited 5 s in the queue, over its budget of 5 s"
    early = refusal_message(2, None, 7.5, "3 ahead of it")
    assert early.startswith("cannot start within its budget of 2 s: the expected wait is 8 s")


def _conv(name: str, tokens: int, ts: int = 0, **spec: Any) -> dict[str, Any]:
    return stored_conv(name, tokens, created=f"2026-01-01T00:00:{ts:02d}Z", **spec)


def _placed_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Placed")


@sync
async def test_a_conversation_queued_past_the_pools_limit_is_refused_and_its_successor_queues_afresh() -> None:
    clock = FakeClock()  # 2026-01-01T00:00:00Z, when the conversations below were created
    kube = pool_world(1, placement={"maxQueueWaitSeconds": 30})
    engine = await started_engine(kube, clock)
    await conversation.on_event(engine, "ADDED", _conv("big", 4500))  # 9000 of 9500: no room even for a floor
    late = _conv("late", 1000)
    await conversation.on_event(engine, "ADDED", late)
    assert kube.status[("conversations", "late")]["phase"] == "Pending"
    clock.advance(29)
    await engine.sweep_idle()
    assert kube.status[("conversations", "late")]["phase"] == "Pending"
    clock.advance(1)
    await engine.sweep_idle()
    status = kube.status[("conversations", "late")]
    assert status["phase"] == "Failed"
    placed = _placed_condition(status)
    assert (placed["status"], placed["reason"]) == ("False", "QueueWaitExceeded")
    assert placed["message"].startswith("waited 30 s in the queue, over its budget of 30 s (NoCapacity: ")
    assert ("late", "QueueWaitExceeded") in kube.events
    pool = engine.world.pool(NS, "llama")
    assert pool.scheduler.pending_count == 0
    # Room frees later: nothing refused is placed behind its client's back.
    await conversation.on_event(engine, "MODIFIED", _conv("big", 4500, completed=True))
    assert kube.status[("conversations", "late")]["phase"] == "Failed"
    # The client's retry: the router deletes the Failed object and creates it again (a new uid, a new creation).
    await conversation.on_event(engine, "DELETED", late)
    again = _conv("late", 1000, ts=31)
    again["metadata"]["uid"] = "uid-late-2"
    await conversation.on_event(engine, "ADDED", again)
    status = kube.status[("conversations", "late")]
    assert status["phase"] == "Prefilling"
    assert _placed_condition(status)["reason"] == "Placed"


@sync
async def test_a_conversation_waiting_for_a_pool_that_does_not_exist_has_no_limit() -> None:
    clock = FakeClock()
    kube = pool_world(1, placement={"maxQueueWaitSeconds": 1})
    engine = await started_engine(kube, clock)
    lost = stored(conversation_body("lost", "nowhere", 1000), created="2026-01-01T00:00:00Z")
    await conversation.on_event(engine, "ADDED", lost)
    clock.advance(3600)
    await engine.sweep_idle()
    status = kube.status[("conversations", "lost")]
    assert (status["phase"], _placed_condition(status)["reason"]) == ("Pending", "PoolNotFound")
