"""The KV lifecycle as the operator runs it (fake API): idle KV reclaimed for a new conversation, offloads,
reloads and re-prefills in status and metrics, TTLs from observed gaps, a restart that keeps every state; and
the router's reported prefill server followed by status (energy attribution reads it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_controller_engine import NS, h200, pod

from conserve import metrics
from conserve.controller import conversation, startup
from conserve.controller.engine import Engine, EngineConfig
from conserve.controller.state import format_time
from conserve.controller.status import pool_status_patch
from conserve.controller.testing import conversation_body, pool_body
from conserve.core.lifecycle import MIN_GAP_OBSERVATIONS, GapHistory, LifecycleSettings
from conserve.testkit import FakeKube

pytestmark = pytest.mark.unit
EPOCH = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.t = float(EPOCH)

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


def body(name: str, tokens: int, **spec: Any) -> dict[str, Any]:
    out = conversation_body(name, "llama", tokens, **spec)
    out["metadata"].update(namespace=NS, uid=f"uid-{name}", generation=1, creationTimestamp=format_time(EPOCH))
    return out


async def engine_with(
    kube: FakeKube | None = None, host: int = 20_000, host_ttl_s: int = 1800
) -> tuple[Engine, FakeKube, Clock]:
    kube = kube or FakeKube()
    if not kube.objects["decoderpools"]:
        kube.nodes = [h200("n0")]
        kube.pods = [pod("dec-0", "n0"), pod("pre-0", "n0", app="dec-prefill"), pod("pre-1", "n0", app="dec-prefill")]
        pool = pool_body(
            "llama",
            tokens_per_decoder=10_000,
            kvLifecycle={"hostKvTokensPerDecoder": host, "maxResidentTtlSeconds": 60, "maxHostTtlSeconds": host_ttl_s},
        )
        pool["metadata"].update(namespace=NS, generation=1)
        kube.objects["decoderpools"] = [pool]
    clock = Clock()
    engine = Engine(kube, EngineConfig(), clock=clock)
    await startup.rebuild(engine, [NS])
    return engine, kube, clock


def turn(name: str, tokens: int, turns: int, cum_in: int, cum_out: int, t: float, **extra: Any) -> dict[str, Any]:
    usage = {"turns": turns, "inputTokens": cum_in, "outputTokens": cum_out, "lastTurnTime": format_time(t), **extra}
    return body(name, tokens, usage=usage)


def transitions(kind: str, reason: str) -> float:
    value: float = metrics.KV_LIFECYCLE.labels(NS, "llama", kind, reason)._value.get()
    return value


def test_idle_kv_is_reclaimed_offloaded_reloaded_and_shown() -> None:
    async def run() -> None:
        engine, kube, clock = await engine_with()
        offloads_before = transitions("offloaded", "RoomNeeded")
        reloads_before = transitions("reloaded", "Turn")
        await conversation.on_event(engine, "ADDED", body("a", 4000))  # reserves 8000 of 9500
        clock.t += 10
        await conversation.on_event(engine, "MODIFIED", turn("a", 4000, 1, 4000, 200, clock.t))
        clock.t += 5
        await conversation.on_event(engine, "ADDED", body("b", 4000))  # only a's KV could make room
        assert kube.status[("conversations", "b")]["phase"] == "Pending"  # a's next turn may come soon
        clock.t += 5  # a's active window (the pool's 10 s limit: no gaps observed yet) has passed
        await engine.sweep_idle()
        await engine.drain_background()
        a, b = kube.status[("conversations", "a")], kube.status[("conversations", "b")]
        assert b["phase"] == "Prefilling"
        assert b["decoder"]["pod"] == "dec-0"
        assert (a["kvState"], a["offloads"], a["decoder"]["pod"]) == ("Offloaded", 1, "dec-0")  # pin kept
        assert transitions("offloaded", "RoomNeeded") - offloads_before == 1
        pool = engine.world.pool(NS, "llama")
        entry = pool_status_patch(pool, 0)["status"]["decoders"][0]
        assert (entry["offloadedConversations"], entry["offloadedKvTokens"], entry["activeConversations"]) == (
            1,
            4200,
            1,
        )
        # b's turn ends (idle), then a's next turn: a comes back to its decoder, b's KV goes to the host
        clock.t += 10
        await conversation.on_event(engine, "MODIFIED", turn("b", 4000, 1, 4000, 100, clock.t))
        clock.t += 30
        await engine.sweep_idle()  # b idle
        await conversation.on_event(engine, "MODIFIED", turn("a", 4000, 2, 4300, 400, clock.t))
        await engine.drain_background()
        a, b = kube.status[("conversations", "a")], kube.status[("conversations", "b")]
        assert (a["kvState"], a["reloads"], a["decoder"]["pod"]) == ("Active", 1, "dec-0")  # its window again
        assert (b["kvState"], b["offloads"]) == ("Offloaded", 1)
        assert transitions("reloaded", "Turn") - reloads_before == 1

        # A restart rebuilds every conversation's state from the API server.
        for (plural, name), status in kube.status.items():
            if plural == "conversations":
                obj = body(name, 4000)
                obj["status"] = status
                kube.objects["conversations"].append(obj)
        restarted, _, _ = await engine_with(kube)
        views = restarted.world.pool(NS, "llama").scheduler.conversations
        assert {k: (v.kv_state.value, v.offloads, v.reloads) for k, v in views.items()} == {
            f"{NS}/a": ("Active", 1, 1),
            f"{NS}/b": ("Offloaded", 1, 0),
        }

    asyncio.run(run())


def test_without_host_room_idle_kv_is_dropped_then_prefilled_again() -> None:
    async def run() -> None:
        engine, kube, clock = await engine_with(host=0)
        await conversation.on_event(engine, "ADDED", body("a", 4000))
        clock.t += 10
        await conversation.on_event(engine, "MODIFIED", turn("a", 4000, 1, 4000, 200, clock.t))
        await conversation.on_event(engine, "ADDED", body("b", 4000))
        clock.t += 30
        await engine.sweep_idle()
        await engine.drain_background()
        assert kube.status[("conversations", "a")]["kvState"] == "Dropped"
        clock.t += 10
        await conversation.on_event(engine, "MODIFIED", turn("b", 4000, 1, 4000, 100, clock.t))
        clock.t += 30
        await engine.sweep_idle()
        await conversation.on_event(engine, "MODIFIED", turn("a", 4000, 2, 4300, 400, clock.t))
        await engine.drain_background()
        a = kube.status[("conversations", "a")]
        assert (a["reprefills"], a["decoder"]["pod"], a["kvState"]) == (1, "dec-0", "Active")

    asyncio.run(run())


def test_resident_ttl_offloads_and_host_ttl_drops() -> None:
    async def run() -> None:
        engine, kube, clock = await engine_with(host_ttl_s=100)
        await conversation.on_event(engine, "ADDED", body("a", 1000))
        clock.t += 5
        await conversation.on_event(engine, "MODIFIED", turn("a", 1000, 1, 1000, 100, clock.t))
        clock.t += 30
        await engine.sweep_idle()
        assert kube.status[("conversations", "a")]["kvState"] == "Idle"  # past the active window, resident
        clock.t += 29
        await engine.sweep_idle()
        assert kube.status[("conversations", "a")]["kvState"] == "Idle"
        clock.t += 1  # the resident TTL (the pool's limit: no gaps observed yet)
        await engine.sweep_idle()
        assert kube.status[("conversations", "a")]["kvState"] == "Offloaded"
        clock.t += 100  # the host TTL (the pool's limit)
        await engine.sweep_idle()
        a = kube.status[("conversations", "a")]
        assert (a["kvState"], a["decoder"]["pod"], a["phase"]) == ("Dropped", "dec-0", "Idle")  # the pin stays
        clock.t += 1800  # the idle timeout ends the pin
        await engine.sweep_idle()
        await engine.drain_background()
        assert kube.status[("conversations", "a")]["phase"] == "Completed"

    asyncio.run(run())


def test_ttls_follow_observed_gaps_within_the_limits() -> None:
    settings = LifecycleSettings(max_resident_ttl_s=300, max_host_ttl_s=1800)
    gaps = GapHistory()
    assert (gaps.resident_ttl_s(settings), gaps.host_ttl_s(settings)) == (300, 1800)  # no observation yet
    gaps.extend([10.0 * i for i in range(1, MIN_GAP_OBSERVATIONS + 1)])  # 10 .. 100 s
    assert gaps.resident_ttl_s(settings) == pytest.approx(55.0)  # the median
    assert gaps.host_ttl_s(settings) == pytest.approx(91.0)  # the 90th percentile
    gaps.extend([5000.0] * 100)
    assert (gaps.resident_ttl_s(settings), gaps.host_ttl_s(settings)) == (300, 1800)  # bounded


def test_status_prefill_follows_the_server_the_router_used() -> None:
    async def run() -> None:
        engine, kube, clock = await engine_with()
        await conversation.on_event(engine, "ADDED", body("a", 1000))
        assert kube.status[("conversations", "a")]["prefill"]["pod"] == "pre-0"  # the operator's choice
        clock.t += 2
        await conversation.on_event(engine, "MODIFIED", turn("a", 1000, 1, 1000, 50, clock.t, prefillPod="pre-1"))
        await engine.drain_background()
        assert kube.status[("conversations", "a")]["prefill"]["pod"] == "pre-1"  # what did the work
        # the choice counts the work where it happened: pre-1 has one first turn, so the next goes to pre-0
        await conversation.on_event(engine, "ADDED", body("b", 1000))
        assert kube.status[("conversations", "b")]["prefill"]["pod"] == "pre-0"

    asyncio.run(run())
