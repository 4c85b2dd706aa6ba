"""The operator's decisions on a fake API (no cluster): bursts, queue order, turns, release once, decoder loss,
rebuild. The e2e suite runs the same flows against the real control plane."""

from __future__ import annotations

import asyncio
from typing import Any

from fake_operator import NS, engine_with, held_per_decoder, pod, pool_world, started_engine, stored_conv, sync

from conserve import metrics
from conserve.api.decoderpool import DecoderPoolSpec
from conserve.controller import conversation, decoderpool, healing, pods
from conserve.controller.engine import Engine, EngineConfig
from conserve.controller.state import FINALIZER, NodeInfo, PodInfo
from conserve.controller.status import pool_status_patch
from conserve.testkit import FakeClock, FakeKube, gpu_node, pool_body


def conv(name: str, tokens: int, ts: int = 0, **spec: Any) -> dict[str, Any]:
    """A conversation created `ts` seconds into 2026 (the queue orders equal priorities by age)."""
    return stored_conv(name, tokens, created=f"2026-01-01T00:00:{ts:02d}Z", **spec)


@sync
async def test_burst_never_oversubscribes() -> None:
    engine, kube = await engine_with(3)
    await asyncio.gather(*(conversation.on_event(engine, "ADDED", conv(f"c{i}", 1000)) for i in range(100)))
    await engine.drain_background()
    # 9500 usable per decoder, 2000 per conversation (the 2.0 prior): 4 each; then the prior, which nothing
    # observed confirms, does not block a fifth: it gets the floor (1000 input + 256 allowance) where that fits.
    assert held_per_decoder(engine) == {"dec-0": 9256, "dec-1": 9256, "dec-2": 9256}
    phases = [s["phase"] for (plural, _), s in kube.status.items() if plural == "conversations"]
    assert phases.count("Prefilling") == 15
    assert phases.count("Pending") == 85
    # One write per placement: the status, no finalizer patch.
    assert not any(FINALIZER in (m.get("finalizers") or []) for m in kube.meta.values())
    assert engine.world.pool(NS, "llama").scheduler.pending_count == 85


@sync
async def test_queue_order_priority_then_age() -> None:
    engine, kube = await engine_with(1)
    await conversation.on_event(engine, "ADDED", conv("big", 4500))  # 9000 of 9500: not even a floor (1256) fits
    for name, ts, prio in (("old", 1, 0), ("young", 2, 0), ("vip", 3, 5)):
        await conversation.on_event(engine, "ADDED", conv(name, 1000, ts=ts, priority=prio))
    assert kube.status[("conversations", "vip")]["phase"] == "Pending"
    await conversation.on_event(engine, "MODIFIED", conv("big", 4500, completed=True))
    # 9500 free: vip and old fit (2000 each), then young too: placed in that order.
    placed = [n for n, r in kube.events if r == "Placed"]
    assert placed == ["big", "vip", "old", "young"]


@sync
async def test_release_exactly_once() -> None:
    engine, kube = await engine_with(1)
    before = metrics.RELEASES.labels(NS, "llama", "Completed")._value.get()
    await conversation.on_event(engine, "ADDED", conv("a", 1000))
    done = conv("a", 1000, completed=True)
    done["metadata"]["finalizers"] = [FINALIZER]
    for _ in range(3):
        await conversation.on_event(engine, "MODIFIED", done)
    deleting = {**done, "metadata": {**done["metadata"], "deletionTimestamp": "2026-01-01T00:01:00Z"}}
    await conversation.on_event(engine, "MODIFIED", deleting)
    await conversation.on_event(engine, "DELETED", deleting)
    assert metrics.RELEASES.labels(NS, "llama", "Completed")._value.get() - before == 1
    assert [r for _, r in kube.events].count("Released") == 1
    assert held_per_decoder(engine) == {"dec-0": 0}


@sync
async def test_turns_extend_then_pin() -> None:
    engine, kube = await engine_with(1)
    await conversation.on_event(engine, "ADDED", conv("a", 1000))  # reserves 2000
    await conversation.on_event(engine, "MODIFIED", conv("a", 1000, usage={"turns": 1, "inputTokens": 3000}))
    status = kube.status[("conversations", "a")]
    # grown in place to the live context x the growth factor (the 2.0 prior: one turn observed), room permitting
    assert (status["phase"], status["reservedKvTokens"], status["liveKvTokens"]) == ("Decoding", 6000, 3000)
    await conversation.on_event(engine, "MODIFIED", conv("a", 1000, usage={"turns": 2, "inputTokens": 12000}))
    status = kube.status[("conversations", "a")]
    outgrown = [c for c in status["conditions"] if c["type"] == "Outgrown"]
    assert outgrown[0]["reason"] == "DecoderFull"
    assert status["decoder"]["pod"] == "dec-0"
    assert held_per_decoder(engine) == {"dec-0": 12000}  # the live context counts; new placements see it


@sync
async def test_status_shows_where_the_turns_were_prefilled() -> None:
    engine, kube = await engine_with(1)
    await conversation.on_event(engine, "ADDED", conv("a", 1000))
    usage = {"turns": 3, "inputTokens": 3000, "poolPrefills": 1}  # the first on the pool, two on the decoder
    await conversation.on_event(engine, "MODIFIED", conv("a", 1000, usage=usage))
    status = kube.status[("conversations", "a")]
    assert (status["poolPrefills"], status["decoderPrefills"]) == (1, 2)
    # a later report that only moves the split is still followed
    await conversation.on_event(engine, "MODIFIED", conv("a", 1000, usage={**usage, "poolPrefills": 2}))
    status = kube.status[("conversations", "a")]
    assert (status["poolPrefills"], status["decoderPrefills"]) == (2, 1)


@sync
async def test_the_usage_sent_with_the_completion_reaches_the_status() -> None:
    engine, kube = await engine_with(1)
    await conversation.on_event(engine, "ADDED", conv("one", 1000))
    # a single-turn conversation: the router's only report comes with its completion, in one patch
    usage = {"turns": 1, "inputTokens": 1000, "outputTokens": 40, "poolPrefills": 1}
    await conversation.on_event(engine, "MODIFIED", conv("one", 1000, usage=usage, completed=True))
    status = kube.status[("conversations", "one")]
    assert status["phase"] == "Completed"
    assert (status["turnsServed"], status["outputTokens"], status["poolPrefills"]) == (1, 40, 1)


@sync
async def test_decoder_loss_moves_after_the_grace_or_queues_again() -> None:
    clock = FakeClock()
    kube = pool_world(2, placement={"decoderLostGraceSeconds": 30})
    engine = await started_engine(kube, clock)
    for i in range(4):
        await conversation.on_event(engine, "ADDED", conv(f"c{i}", 1000))
    pool = engine.world.pool(NS, "llama")
    on_dec0 = pool.scheduler.conversations_on("dec-0")
    await decoderpool.on_pod_event(engine, "MODIFIED", pod("dec-0", "n0", ready=False))
    clock.advance(29)
    await healing.lose_unready_past_grace(engine)
    for key in on_dec0:  # unready within the grace: kept where they are
        status = kube.status[("conversations", key.split("/")[1])]
        assert (status["placementGeneration"], status["decoder"]["pod"]) == (1, "dec-0")
    clock.advance(1)
    await healing.lose_unready_past_grace(engine)
    for key in on_dec0:
        status = kube.status[("conversations", key.split("/")[1])]
        assert status["placementGeneration"] == 2
        assert status["kvTransfers"] == 2
        assert status["decoder"]["pod"] == "dec-1"
    await decoderpool.on_pod_event(engine, "DELETED", pod("dec-1", "n0"))  # deleted: no grace, nowhere to go
    statuses = [s for (p, _), s in kube.status.items() if p == "conversations"]
    assert {s["phase"] for s in statuses} == {"Pending"}  # queued again, never failed for a lost decoder
    assert all(s.get("decoder") is None and s["reservedKvTokens"] == 0 for s in statuses)
    assert pool.scheduler.holdings() == {}
    assert pool.scheduler.pending_count == 4
    # Back with room: they are placed again, sized by what they held, with a new generation.
    await decoderpool.on_pod_event(engine, "MODIFIED", pod("dec-0", "n0"))
    placed = [s for (p, _), s in kube.status.items() if p == "conversations" and s["phase"] == "Prefilling"]
    assert len(placed) == 4
    assert {s["decoder"]["pod"] for s in placed} == {"dec-0"}
    assert all(s["placementGeneration"] >= 2 for s in placed)


@sync
async def test_rebuild_adopts_even_over_capacity_and_places_nothing_twice() -> None:
    kube = pool_world(1)
    placed = conv("old", 1000)
    placed["status"] = {
        "phase": "Decoding",
        "decoder": {"pod": "dec-0"},
        "reservedKvTokens": 12_000,
        "placementGeneration": 1,
        "kvTransfers": 1,
    }
    kube.objects["conversations"] = [placed, conv("new", 1000)]
    engine = await started_engine(kube)
    assert held_per_decoder(engine) == {"dec-0": 12_000}
    assert kube.status[("conversations", "new")]["phase"] == "Pending"
    assert ("conversations", "old") not in kube.status  # adopted as is, not rewritten


def test_pool_status_keeps_energy_fields() -> None:
    engine = Engine(FakeKube(), EngineConfig())
    world = engine.world
    world.nodes["n0"] = NodeInfo.from_labels("n0", gpu_node("n0")["metadata"]["labels"])
    world.pods[f"{NS}/dec-0"] = PodInfo(NS, "dec-0", {"app": "dec"}, "n0", True, "10.0.0.1", "127.0.0.1:9001", 1)
    pool = world.pool(NS, "llama")
    body = pool_body("llama")
    body["metadata"]["namespace"] = NS
    body["status"] = {"decoders": [{"pod": "dec-0", "powerWatts": 350.0, "energyJoules": 10.0}]}
    decoderpool.load_spec(pool, body)
    pods.sync_pool(world, pool)
    entry = pool_status_patch(pool, 0)["status"]["decoders"][0]
    assert (entry["powerWatts"], entry["energyJoules"], entry["endpoint"]) == (350.0, 10.0, "127.0.0.1:9001")
    world.set_decoder_energy(NS, "llama", "dec-0", power_watts=400.0, energy_joules=12.0)
    status = pool_status_patch(pool, 0)["status"]
    assert status["decoders"][0]["powerWatts"] == 400.0
    assert status["powerWatts"] == 400.0


def test_capacity_derived_from_gpu_memory() -> None:
    spec = DecoderPoolSpec.model_validate(
        {"model": {"name": "llama-3-8b"}, "decoderSelector": {"matchLabels": {"app": "dec"}}}
    )
    node = NodeInfo.from_labels("n0", gpu_node("n0")["metadata"]["labels"])
    info = pods.decoder_info(PodInfo(NS, "d", {}, "n0", True, "10.0.0.1", "", 1), node, spec)
    # 143771 MiB x 0.9 = 135.7 GB, less 16.06 GB of weights, over 128 KiB per token: 912,623.
    assert info.tier == "bandwidth"
    assert info.capacity_kv_tokens == 912_623
    assert info.endpoint == "10.0.0.1:8000"
    bare = pods.decoder_info(PodInfo(NS, "d", {}, "n1", True, "", "", 1), None, spec)
    assert bare.capacity_kv_tokens == 0
    assert "gpu.memory" in bare.problem
