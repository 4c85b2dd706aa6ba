"""Placement at scale on a fake API (no cluster): one write per placement, Events aggregated, deletes released
without a finalizer, observed occupancy folded into placement, shards fencing writes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fake_operator import NS, engine_with, held_per_decoder, stored_conv, sync

from conserve.controller import conversation
from conserve.controller.engine import Engine
from conserve.controller.events import AggregatingKube, EventWindows
from conserve.controller.occupancy import OccupancyScraper, engine_hook, parse_metrics
from conserve.controller.shards import ShardFencedKube, ShardSet, fair_share, shard_of
from conserve.core.occupancy import ObservedOccupancy, with_observed
from conserve.core.placement import DecoderState
from conserve.gpusim.engine import Role, SimRequest
from conserve.gpusim.server import GpuSimConfig, GpuSimServer
from conserve.router.policy import USAGE_INTERVAL_S, Usage, UsageBatcher
from conserve.testkit import FakeClock, FakeKube

pytestmark = pytest.mark.unit


class CountingKube(FakeKube):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, str]] = []

    async def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.writes.append((f"{plural}/status", name))
        return await super().patch_status(plural, namespace, name, patch)

    async def patch_object(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.writes.append((plural, name))
        return await super().patch_object(plural, namespace, name, patch)

    async def post_event(self, obj: dict[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
        self.writes.append(("events", obj["metadata"]["name"]))
        await super().post_event(obj, reason, message, warning=warning)


async def counted_engine(decoders: int, window_s: float = 10.0) -> tuple[Engine, CountingKube, FakeClock]:
    engine, plain = await engine_with(decoders)
    counting = CountingKube()
    counting.objects, counting.pods, counting.nodes = plain.objects, plain.pods, plain.nodes
    clock = FakeClock()
    engine.kube = AggregatingKube(counting, window_s, clock)
    return engine, counting, clock


@sync
async def test_a_placement_is_one_api_write_and_normal_events_are_aggregated() -> None:
    engine, kube, clock = await counted_engine(3)
    await asyncio.gather(*(conversation.on_event(engine, "ADDED", stored_conv(f"c{i}", 1000)) for i in range(12)))
    await engine.drain_background()
    conv_writes = [w for w in kube.writes if w[0].startswith("conversations")]
    assert sorted(conv_writes) == sorted(("conversations/status", f"c{i}") for i in range(12))  # no finalizer
    events = [w for w in kube.writes if w[0] == "events"]
    assert len(events) == 1  # the first Placed of the window; 11 counted
    aggregator = engine.kube
    assert isinstance(aggregator, AggregatingKube)
    assert await aggregator.flush() == 0  # the window is still open
    clock.advance(10)
    assert await aggregator.flush() == 1
    assert len(kube.events) == 2
    assert kube.events[-1][1] == "Placed"


@sync
async def test_warnings_are_never_aggregated() -> None:
    inner = CountingKube()
    kube = AggregatingKube(inner, 10.0, FakeClock())
    obj = {"kind": "Conversation", "metadata": {"namespace": NS, "name": "x"}}
    for _ in range(5):
        await kube.post_event(obj, "Outgrown", "full", warning=True)
    assert len(inner.events) == 5


def test_event_windows_per_reason_with_a_summary_naming_the_count() -> None:
    windows = EventWindows(10.0)

    def obj(name: str) -> dict[str, Any]:
        return {"kind": "Conversation", "metadata": {"namespace": NS, "name": name}}

    assert windows.offer(obj("a"), "Placed", "m", 0.0)
    assert windows.offer(obj("b"), "Released", "m", 0.0)  # another reason: its own window
    assert not any(windows.offer(obj(f"p{i}"), "Placed", "m", 1.0) for i in range(7))
    assert windows.due(5.0) == []
    # A new Placed after the window ended is posted at once; the old window's summary is still owed.
    assert windows.offer(obj("late"), "Placed", "m", 12.0)
    summaries = windows.due(12.0)
    assert [(s.reason, s.obj["metadata"]["name"]) for s in summaries] == [("Placed", "p6")]
    assert "7 more Conversation Placed Events" in summaries[0].message
    assert "p0, p1" in summaries[0].message
    with pytest.raises(ValueError, match="window_s"):
        EventWindows(0)


@sync
async def test_a_delete_releases_capacity_without_a_finalizer() -> None:
    engine, _ = await engine_with(1)
    await conversation.on_event(engine, "ADDED", stored_conv("a", 1000))
    assert held_per_decoder(engine) == {"dec-0": 2000}
    await conversation.on_event(engine, "DELETED", stored_conv("a", 1000))
    assert held_per_decoder(engine) == {"dec-0": 0}


@sync
async def test_a_delete_missed_by_the_watch_is_released_by_the_sweep() -> None:
    engine, kube = await engine_with(1)
    await conversation.on_event(engine, "ADDED", stored_conv("gone", 1000))
    await conversation.on_event(engine, "ADDED", stored_conv("kept", 1000))
    kube.objects["conversations"] = [stored_conv("kept", 1000)]  # "gone" was deleted while the watch was down
    assert await conversation.release_vanished(engine, [NS]) == 1
    assert held_per_decoder(engine) == {"dec-0": 2000}
    assert "gone" not in {k.split("/")[1] for k in engine.world.convs}


VLLM = """# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
"""


def test_parse_engine_metrics_real_and_older_names() -> None:
    assert parse_metrics(VLLM) == (0.42, 7)
    older = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.3\nvllm:num_requests_running{model_name="m"} 2\n'
    assert parse_metrics(older) == (0.3, 2)
    assert parse_metrics(older + VLLM) == (0.42, 9)  # the real name wins; running requests add up
    assert parse_metrics("vllm:num_requests_running 3\n") is None  # no KV usage: no reading
    assert parse_metrics("not { a metric") is None


def test_observed_occupancy_raises_usage_never_lowers_it_and_ages_out() -> None:
    states = [DecoderState("d0", capacity_kv_tokens=10_000, reserved_kv_tokens=6000, live_kv_tokens=1000)]
    high = {"d0": ObservedOccupancy(0.9, 3, at_s=100.0)}
    low = {"d0": ObservedOccupancy(0.05, 1, at_s=100.0)}
    assert with_observed(states, high, 101.0, 10.0)[0].free_kv_tokens == 1000
    assert with_observed(states, low, 101.0, 10.0)[0].free_kv_tokens == 4000  # the reservations still hold
    assert with_observed(states, high, 200.0, 10.0)[0].free_kv_tokens == 4000  # stale: the ledger alone


@sync
async def test_a_decoder_its_engine_reports_full_takes_no_new_conversation() -> None:
    engine, _ = await engine_with(2)
    observe = engine_hook(engine)
    now = engine.clock.monotonic()
    observe(NS, "llama", "dec-0", ObservedOccupancy(0.95, 12, now))  # KV the ledger does not know of
    for i in range(4):
        await conversation.on_event(engine, "ADDED", stored_conv(f"c{i}", 1000))
    assert held_per_decoder(engine) == {"dec-0": 0, "dec-1": 8000}


def test_shards_are_stable_and_shared_fairly() -> None:
    assert shard_of("ns", "llama", 8) == shard_of("ns", "llama", 8)
    spread = {shard_of("ns", f"pool-{i}", 4) for i in range(40)}
    assert spread == {0, 1, 2, 3}
    assert [fair_share(8, m) for m in (1, 2, 3, 4, 0)] == [8, 4, 3, 2, 8]


@sync
async def test_writes_for_pools_of_shards_not_held_are_dropped() -> None:
    pools = {"a": "pool-a", "b": "pool-b"}
    shard_set = ShardSet(64)
    inner = CountingKube()
    fenced = ShardFencedKube(inner, shard_set, lambda _ns, name: pools.get(name))
    shard_set.held.add(shard_of(NS, "pool-a", 64))
    assert shard_of(NS, "pool-a", 64) != shard_of(NS, "pool-b", 64)
    await fenced.patch_status("conversations", NS, "a", {"status": {}})
    await fenced.patch_status("conversations", NS, "b", {"status": {}})
    await fenced.patch_status("conversations", NS, "unknown", {"status": {}})
    await fenced.patch_status("decoderpools", NS, "pool-b", {"status": {}})
    await fenced.post_event({"kind": "Conversation", "metadata": {"namespace": NS, "name": "b"}}, "Placed", "m")
    assert inner.writes == [("conversations/status", "a")]
    assert not await shard_set.wait_owned(NS, "pool-b")


def test_the_router_sends_a_conversations_usage_once_per_interval_and_at_its_end() -> None:
    batcher = UsageBatcher(USAGE_INTERVAL_S)
    sent = []
    for second in range(120):  # a turn every second for two minutes, flushed on the router's tick
        batcher.record("c", Usage(second + 1, 10 * (second + 1), 5 * (second + 1), "", None))
        sent += batcher.due(float(second))
    batcher.complete("c")
    sent += batcher.due(120.0)
    assert len(sent) == 120 // USAGE_INTERVAL_S + 1  # one per interval, one at the end
    assert sent[-1][1]["spec"]["completed"] is True
    assert sent[-1][1]["spec"]["usage"]["turns"] == 120


@sync
async def test_the_scraper_reads_a_simulated_engines_kv_usage_over_http() -> None:
    """The adapter against the GPU simulator's real /metrics (localhost): as vLLM's block pool counts it, a
    conversation's KV kept for its next turn (an evictable prefix-cache entry) is not usage, a running request's
    is; an unreachable decoder gives no reading."""
    server = GpuSimServer(GpuSimConfig(role=Role.DECODE, port=0, time_scale=0.01, kv_capacity_tokens=10_000))
    port = await server.start()
    readings: dict[str, ObservedOccupancy] = {}
    try:
        scraper = OccupancyScraper(
            lambda: [(NS, "llama", "dec-0", f"127.0.0.1:{port}"), (NS, "llama", "dec-gone", "127.0.0.1:9")],
            lambda _ns, _pool, pod, reading: readings.__setitem__(pod, reading),
        )
        turn = SimRequest("t1", prompt_tokens=2000, max_tokens=50, conversation_id="c")
        server.engine.submit(turn)
        await turn.events.get()  # its first token: running
        assert await scraper.scrape_once() == 1
        running = readings["dec-0"]
        while not (await turn.events.get()).finished:
            pass
        assert await scraper.scrape_once() == 1
        await scraper.close()
    finally:
        await server.stop()
    assert set(readings) == {"dec-0"}
    assert running.kv_used_fraction == pytest.approx(2050 / 10_000)
    assert running.requests_running == 1
    assert server.engine.cached_tokens_of("c") == 2050  # kept for the next turn ...
    assert (readings["dec-0"].kv_used_fraction, readings["dec-0"].requests_running) == (0.0, 0)  # ... yet free
