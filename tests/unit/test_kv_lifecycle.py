"""The KV lifecycle as the operator runs it (fake API): idle KV reclaimed for a new conversation, offloads,
reloads and re-prefills in status and metrics, TTLs from observed gaps, a restart that keeps every state; and
the router's reported prefill server followed by status (energy attribution reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from fake_operator import NS, pool_world, started_engine, stored_conv, sync

from conserve import metrics
from conserve.controller import conversation
from conserve.controller.engine import Engine
from conserve.controller.state import format_time
from conserve.controller.status import pool_status_patch
from conserve.core.lifecycle import MIN_GAP_OBSERVATIONS, GapHistory, LifecycleSettings
from conserve.testkit import FakeClock, FakeKube

pytestmark = pytest.mark.unit
EPOCH = 1_800_000_000


def body(name: str, tokens: int, **spec: Any) -> dict[str, Any]:
    return stored_conv(name, tokens, created=format_time(EPOCH), **spec)


@dataclass
class Run:
    """One test's operator: the engine, its fake API and clock, and the steps the tests take."""

    engine: Engine
    kube: FakeKube
    clock: FakeClock

    async def create(self, name: str, tokens: int) -> None:
        await conversation.on_event(self.engine, "ADDED", body(name, tokens))

    async def turn(
        self, after_s: float, name: str, tokens: int, turns: int, cum_in: int, cum_out: int, **extra: Any
    ) -> None:
        """`after_s` later: the router reports the conversation's turn (cumulative usage, the turn's time)."""
        self.clock.advance(after_s)
        usage = {"turns": turns, "inputTokens": cum_in, "outputTokens": cum_out, **extra}
        usage["lastTurnTime"] = format_time(self.clock.now())
        await conversation.on_event(self.engine, "MODIFIED", body(name, tokens, usage=usage))

    async def sweep(self, after_s: float) -> None:
        """`after_s` later: the operator's idle sweep."""
        self.clock.advance(after_s)
        await self.engine.sweep_idle()

    def status(self, name: str) -> dict[str, Any]:
        return self.kube.status[("conversations", name)]


async def started(kube: FakeKube | None = None, host: int = 20_000, host_ttl_s: int = 1800) -> Run:
    """One H200 decoder of 10,000 KV tokens, two prefill servers, `host` KV tokens of host memory; or the
    operator restarted on `kube`."""
    if kube is None:
        lifecycle = {"hostKvTokensPerDecoder": host, "maxResidentTtlSeconds": 60, "maxHostTtlSeconds": host_ttl_s}
        kube = pool_world(1, 10_000, prefills=2, kvLifecycle=lifecycle)
    clock = FakeClock(epoch_s=EPOCH)
    return Run(await started_engine(kube, clock), kube, clock)


def transitions(kind: str, reason: str) -> float:
    value: float = metrics.KV_LIFECYCLE.labels(NS, "llama", kind, reason)._value.get()
    return value


@sync
async def test_idle_kv_is_reclaimed_offloaded_reloaded_and_shown() -> None:
    op = await started()
    offloads_before = transitions("offloaded", "RoomNeeded")
    reloads_before = transitions("reloaded", "Turn")
    await op.create("a", 4000)  # reserves 8000 of 9500
    await op.turn(10, "a", 4000, 1, 4000, 200)
    op.clock.advance(5)
    await op.create("b", 4000)  # only a's KV could make room
    assert op.status("b")["phase"] == "Pending"  # a's next turn may come soon
    await op.sweep(5)  # a's active window (the pool's 10 s limit: no gaps observed yet) has passed
    await op.engine.drain_background()
    a, b = op.status("a"), op.status("b")
    assert b["phase"] == "Prefilling"
    assert b["decoder"]["pod"] == "dec-0"
    assert (a["kvState"], a["offloads"], a["decoder"]["pod"]) == ("Offloaded", 1, "dec-0")  # pin kept
    assert transitions("offloaded", "RoomNeeded") - offloads_before == 1
    pool = op.engine.world.pool(NS, "llama")
    entry = pool_status_patch(pool, 0)["status"]["decoders"][0]
    assert (entry["offloadedConversations"], entry["offloadedKvTokens"], entry["activeConversations"]) == (
        1,
        4200,
        1,
    )
    # b's turn ends (idle), then a's next turn: a comes back to its decoder, b's KV goes to the host
    await op.turn(10, "b", 4000, 1, 4000, 100)
    await op.sweep(30)  # b idle
    await op.turn(0, "a", 4000, 2, 4300, 400)
    await op.engine.drain_background()
    a, b = op.status("a"), op.status("b")
    assert (a["kvState"], a["reloads"], a["decoder"]["pod"]) == ("Active", 1, "dec-0")  # its window again
    assert (b["kvState"], b["offloads"]) == ("Offloaded", 1)
    assert transitions("reloaded", "Turn") - reloads_before == 1

    # A restart rebuilds every conversation's state from the API server.
    for (plural, name), status in op.kube.status.items():
        if plural == "conversations":
            obj = body(name, 4000)
            obj["status"] = status
            op.kube.objects["conversations"].append(obj)
    restarted = await started(op.kube)
    scheduler = restarted.engine.world.pool(NS, "llama").scheduler
    views = [scheduler.conversation(key) for key in scheduler.conversation_keys()]
    assert {v.key: (v.kv_state.value, v.offloads, v.reloads) for v in views if v is not None} == {
        f"{NS}/a": ("Active", 1, 1),
        f"{NS}/b": ("Offloaded", 1, 0),
    }


@sync
async def test_without_host_room_idle_kv_is_dropped_then_prefilled_again() -> None:
    op = await started(host=0)
    await op.create("a", 4000)
    await op.turn(10, "a", 4000, 1, 4000, 200)
    await op.create("b", 4000)
    await op.sweep(30)
    await op.engine.drain_background()
    assert op.status("a")["kvState"] == "Dropped"
    await op.turn(10, "b", 4000, 1, 4000, 100)
    await op.sweep(30)
    await op.turn(0, "a", 4000, 2, 4300, 400)
    await op.engine.drain_background()
    a = op.status("a")
    assert (a["reprefills"], a["decoder"]["pod"], a["kvState"]) == (1, "dec-0", "Active")


@sync
async def test_resident_ttl_offloads_and_host_ttl_drops() -> None:
    op = await started(host_ttl_s=100)
    await op.create("a", 1000)
    await op.turn(5, "a", 1000, 1, 1000, 100)
    await op.sweep(30)
    assert op.status("a")["kvState"] == "Idle"  # past the active window, resident
    await op.sweep(29)
    assert op.status("a")["kvState"] == "Idle"
    await op.sweep(1)  # the resident TTL (the pool's limit: no gaps observed yet)
    assert op.status("a")["kvState"] == "Offloaded"
    await op.sweep(100)  # the host TTL (the pool's limit)
    a = op.status("a")
    assert (a["kvState"], a["decoder"]["pod"], a["phase"]) == ("Dropped", "dec-0", "Idle")  # the pin stays
    await op.sweep(1800)  # the idle timeout ends the pin
    await op.engine.drain_background()
    assert op.status("a")["phase"] == "Completed"


def test_ttls_follow_observed_gaps_within_the_limits() -> None:
    settings = LifecycleSettings(max_resident_ttl_s=300, max_host_ttl_s=1800)
    gaps = GapHistory()
    assert (gaps.resident_ttl_s(settings), gaps.host_ttl_s(settings)) == (300, 1800)  # no observation yet
    gaps.extend([10.0 * i for i in range(1, MIN_GAP_OBSERVATIONS + 1)])  # 10 .. 100 s
    assert gaps.resident_ttl_s(settings) == pytest.approx(55.0)  # the median
    assert gaps.host_ttl_s(settings) == pytest.approx(91.0)  # the 90th percentile
    gaps.extend([5000.0] * 100)
    assert (gaps.resident_ttl_s(settings), gaps.host_ttl_s(settings)) == (300, 1800)  # bounded


@sync
async def test_status_prefill_follows_the_server_the_router_used() -> None:
    op = await started()
    await op.create("a", 1000)
    assert op.status("a")["prefill"]["pod"] == "pre-0"  # the operator's choice
    await op.turn(2, "a", 1000, 1, 1000, 50, prefillPod="pre-1")
    await op.engine.drain_background()
    assert op.status("a")["prefill"]["pod"] == "pre-1"  # what did the work
    # the choice counts the work where it happened: pre-1 has one first turn, so the next goes to pre-0
    await op.create("b", 1000)
    assert op.status("b")["prefill"]["pod"] == "pre-0"
