"""The pure parts of issue 27's healing and integrity: the decoder grace (`core.healing`), the checks of a status
the operator did not write (`core.integrity`), the scheduler queueing a lost decoder's conversations again, and the
operator's pool status writer when the API server refuses one pool's status."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest
from fake_operator import NS, pool_world, started_engine, stored_conv, sync

from conserve.controller import conversation, decoderpool
from conserve.controller.kube import Refused
from conserve.core.decisions import ConversationRequest, Verdict
from conserve.core.healing import UnreadyDecoders
from conserve.core.integrity import AdoptedFacts, foreign, forged_end, reservation_floor, status_print
from conserve.core.placement import DecoderState
from conserve.core.scheduler import PoolScheduler, SchedulerSettings
from conserve.testkit import FakeClock, FakeKube

pytestmark = pytest.mark.unit


def test_unready_decoders_are_due_once_past_the_grace() -> None:
    unready = UnreadyDecoders()
    unready.observe({"a": False, "b": True}, now_s=100.0)
    assert unready.due(now_s=219.0, grace_s=120) == []
    assert unready.due(now_s=220.0, grace_s=120) == ["a"]
    assert unready.due(now_s=300.0, grace_s=120) == []  # declared once
    unready.observe({"a": True, "b": True}, now_s=301.0)  # ready again: forgotten
    unready.observe({"a": False, "b": True}, now_s=302.0)
    assert unready.unready_for("a", 310.0) == 8.0
    assert unready.due(now_s=310.0, grace_s=0) == ["a"]  # no grace: at once


def test_a_decoder_ready_again_within_the_grace_is_never_due() -> None:
    unready = UnreadyDecoders()
    unready.observe({"a": False}, now_s=0.0)
    unready.observe({"a": True}, now_s=60.0)
    assert unready.due(now_s=1000.0, grace_s=120) == []
    unready.observe({}, now_s=1001.0)  # gone from the pool: forgotten too
    assert unready.since == {}


def facts(phase: str, **kw: object) -> AdoptedFacts:
    base: dict[str, object] = {
        "phase": phase,
        "spec_completed": False,
        "deleting": False,
        "idle_for_s": 10.0,
        "idle_timeout_s": 1800.0,
        "conditions": {},
    }
    base.update(kw)
    return AdoptedFacts(**base)  # type: ignore[arg-type]


def test_an_end_the_operator_did_not_decide_is_found() -> None:
    assert forged_end(facts("Completed")) is not None
    assert "within its idle timeout of 1800 s" in (forged_end(facts("Completed")) or "")
    assert forged_end(facts("Completed", spec_completed=True)) is None
    assert forged_end(facts("Completed", deleting=True)) is None
    assert forged_end(facts("Completed", idle_for_s=1800.0)) is None  # the idle timeout ended it
    assert forged_end(facts("Failed")) is not None
    for reason in ("QueueWaitExceeded", "SloUnattainable", "UnknownSloClass", "NoCapacity", "DecoderLost"):
        assert forged_end(facts("Failed", conditions={"Placed": ("False", reason)})) is None
    assert forged_end(facts("Failed", conditions={"Placed": ("False", "Because")})) is not None
    assert forged_end(facts("Decoding")) is None


def test_a_status_seen_is_foreign_unless_current_or_written_lately() -> None:
    current = status_print("Decoding", "dec-0", "10.0.0.1:8000", 4000, 1)
    older = status_print("Prefilling", "dec-0", "10.0.0.1:8000", 2000, 1)
    forged = status_print("Completed", "dec-0", "10.0.0.1:8000", 0, 1)
    assert not foreign(current, current, ())
    assert not foreign(older, current, (older, current))  # a late echo of an earlier write
    assert foreign(forged, current, (older, current))
    assert reservation_floor(2000, 0) == 2000
    assert reservation_floor(0, 0) == 1


def request(key: str, tokens: int = 1000, created_at_s: float = 0.0) -> ConversationRequest:
    return ConversationRequest(key, tokens, 0, created_at_s, None, None)


def test_a_lost_decoder_queues_its_conversations_again_sized_by_what_they_hold() -> None:
    scheduler = PoolScheduler(SchedulerSettings(requeue_lost_conversations=True))
    scheduler.decoder_changed(DecoderState("dec-0", "n0", None, True, 10_000))
    scheduler.decoder_changed(DecoderState("dec-1", "n0", None, True, 3_000))
    decisions = scheduler.admit(request("a", 3000), now_s=5.0)
    assert decisions[0].decoder == "dec-0"
    scheduler.usage_observed("a", 5000, 6.0, turns=1)
    scheduler.decoder_changed(DecoderState("dec-0", "n0", None, False, 10_000))
    lost = scheduler.decoders_lost(["dec-0"], now_s=50.0)
    assert [d.verdict for d in lost] == [Verdict.QUEUED]  # 5,000 live does not fit dec-1: waits, not failed
    assert "its decoder was lost" in lost[0].message
    assert scheduler.queue() == ["a"]
    assert scheduler.waiting_since(request("a", 3000)) == 50.0  # its queue wait counts from the loss
    scheduler.decoder_changed(DecoderState("dec-0", "n0", None, True, 10_000))
    placed = scheduler.drain(now_s=60.0)
    assert [(d.verdict, d.decoder) for d in placed] == [(Verdict.PLACED, "dec-0")]
    assert (placed[0].reserved_kv_tokens or 0) >= 5000  # at least its live context
    assert scheduler.waiting_since(request("a", 3000)) == 0.0


def test_a_refused_pool_status_is_logged_once_and_blocks_no_other_pool(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "conserve.operator"):
        refused = asyncio.run(write_pools_one_refused())
    assert refused.written["other"] >= 10  # the other pool is written all along
    assert 1 <= refused.tries["llama"] < 10  # retried with back-off, not at every tick
    warnings = [r for r in caplog.records if "status not written" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].exc_info is None  # no traceback


async def write_pools_one_refused() -> RefusingKube:
    """Two pools' status writer for about 40 ticks, the API server refusing every status of `llama`."""
    kube = pool_world(1)
    other = pool_world(1).objects["decoderpools"][0]
    other["metadata"]["name"] = "other"
    kube.objects["decoderpools"].append(other)
    engine = await started_engine(kube)
    engine.config = replace(engine.config, pool_status_interval_s=0.01)
    refused = RefusingKube(kube, refuse="llama")
    engine.kube = refused
    writer = asyncio.create_task(decoderpool.status_writer(engine))
    for _ in range(40):
        engine.world.pool(NS, "llama").status_dirty.set()
        engine.world.pool(NS, "other").status_dirty.set()
        await asyncio.sleep(0.012)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    return refused


class RefusingKube(FakeKube):
    """The fake API, refusing every status write of one pool."""

    def __init__(self, inner: FakeKube, refuse: str) -> None:
        super().__init__()
        self.__dict__.update(inner.__dict__)
        self.refuse = refuse
        self.tries = {"llama": 0, "other": 0}
        self.written = {"llama": 0, "other": 0}

    async def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, object]) -> dict[str, object]:
        if plural == decoderpool.PLURAL:
            self.tries[name] = self.tries.get(name, 0) + 1
            if name == self.refuse:
                raise Refused(422, "status.decoders[0].endpoint: Too long")
            self.written[name] = self.written.get(name, 0) + 1
        return await super().patch_status(plural, namespace, name, patch)


@sync
async def test_a_forged_end_is_repaired_when_the_ledger_is_rebuilt() -> None:
    kube = pool_world(1)
    forged = stored_conv("c", 2000)
    forged["status"] = {"phase": "Completed", "decoder": {"pod": "dec-0"}, "reservedKvTokens": 0}
    kube.objects["conversations"] = [forged]
    engine = await started_engine(kube, FakeClock(epoch_s=1_767_225_660.0))  # a minute after its creation
    pool = engine.world.pool(NS, "llama")
    assert pool.scheduler.holding(f"{NS}/c") is not None
    status = kube.status[("conversations", "c")]
    assert (status["phase"], status["reservedKvTokens"]) == ("Prefilling", 2000)
    assert [c["reason"] for c in status["conditions"] if c["type"] == "StatusRepaired"] == ["ForeignStatusWrite"]
    await engine.drain_background()
    assert ("c", "StatusRepaired") in kube.events


@sync
async def test_a_status_written_by_someone_else_is_rewritten_while_running() -> None:
    kube = pool_world(1)
    engine = await started_engine(kube, FakeClock())
    await conversation.on_event(engine, "ADDED", stored_conv("c", 2000))
    ours = kube.status[("conversations", "c")]
    seen = stored_conv("c", 2000)
    seen["metadata"]["resourceVersion"] = "999999"
    seen["status"] = {**ours, "phase": "Completed", "reservedKvTokens": 0}
    await conversation.on_event(engine, "MODIFIED", seen)
    status = kube.status[("conversations", "c")]
    assert (status["phase"], status["reservedKvTokens"]) == ("Prefilling", ours["reservedKvTokens"])
    echo = stored_conv("c", 2000)  # our own earlier write seen late: not foreign
    echo["status"] = ours
    echo["metadata"]["resourceVersion"] = "999999"
    await engine.drain_background()
    before = len(kube.events)
    await conversation.on_event(engine, "MODIFIED", echo)
    await engine.drain_background()
    assert [r for _, r in kube.events[before:]] == []
    assert ("c", "StatusRepaired") in kube.events
