"""Turn reports streamed to the operator (issue 29), without a cluster: the merge of reports, the checkpoint rule,
the operator's intake on a fake API, and the router's stream against the operator's real endpoint on loopback."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from fake_operator import NS, engine_with, stored_conv, sync

from conserve.api.conversation import ConversationStatus, ConversationUsage
from conserve.api.usage_wire import UsageBatch, UsageReport, behind_status, merge_usage
from conserve.controller import conversation
from conserve.controller.engine import Engine
from conserve.controller.usage_intake import Checkpoints, UsageIntake, make_app
from conserve.router.policy import Usage, UsageBatcher
from conserve.router.usage_stream import UsageStream
from conserve.testkit import FakeKube

TOKEN = "t" * 32


def usage(turns: int, tokens_in: int, tokens_out: int = 0, at: str | None = None, **more: object) -> ConversationUsage:
    return ConversationUsage.model_validate(
        {"turns": turns, "inputTokens": tokens_in, "outputTokens": tokens_out, "lastTurnTime": at, **more}
    )


def test_merge_keeps_every_counter_at_its_largest_and_the_rest_from_the_later_report() -> None:
    known = usage(5, 900, 100, "2026-01-01T00:00:10Z", prefillPod="pre-0")
    stale = usage(3, 950, 80, "2026-01-01T00:00:05Z", prefillPod="pre-1", poolPrefills=2)
    merged = merge_usage(known, stale)
    assert (merged.turns, merged.input_tokens, merged.output_tokens, merged.pool_prefills) == (5, 950, 100, 2)
    assert merged.prefill_pod == "pre-0"  # not a counter: the later report's
    assert merged.last_turn_time == "2026-01-01T00:00:10Z"
    # Idempotent and order-free: a retry or a re-send changes nothing.
    assert merge_usage(merged, stale) == merged
    assert merge_usage(merge_usage(stale, known), stale) == merged
    assert merge_usage(merged, merged) is merged  # unchanged: the caller sees there is nothing to apply


def test_a_spec_usage_behind_the_status_checkpoint_is_behind() -> None:
    status = ConversationStatus(turns_served=4, input_tokens=500, output_tokens=100)
    assert behind_status(usage(3, 900, 100), status)
    assert behind_status(usage(4, 400, 100), status)
    assert not behind_status(usage(4, 500, 100), status)
    assert not behind_status(usage(5, 0, 0), status)


def test_checkpoints_write_decisions_and_outgrowth_at_once_and_owe_the_rest_one_interval() -> None:
    cp = Checkpoints(300.0)
    assert not cp.must_write("a", 10.0, decided=False, outgrown=False)
    assert not cp.must_write("a", 50.0, decided=False, outgrown=False)  # owed since 10 still
    assert cp.due(309.0) == []
    assert cp.due(310.0) == ["a"]
    assert cp.must_write("a", 60.0, decided=False, outgrown=True)  # written now: owes nothing more
    assert cp.due(1000.0) == []
    assert not cp.must_write("b", 0.0, decided=False, outgrown=False)
    assert cp.must_write("b", 1.0, decided=True, outgrown=False)
    assert len(cp) == 0


def test_the_batcher_with_a_stream_patches_only_a_completion_not_acknowledged() -> None:
    batcher = UsageBatcher(30.0, periodic=False, completion_hold_s=5.0)
    batcher.record("a", Usage(1, 100, 10))
    batcher.record("b", Usage(1, 100, 10))
    assert batcher.due(1000.0) == []  # turns are streamed: no periodic patch
    batcher.complete("a", 1000.0)
    batcher.complete("b", 1000.0)
    assert batcher.due(1004.0) == []  # held while the stream delivers it
    batcher.forget("a")  # acknowledged by the operator
    [(name, patch)] = batcher.due(1005.0)
    assert name == "b"
    assert patch == {"spec": {"usage": {"turns": 1, "inputTokens": 100, "outputTokens": 10}, "completed": True}}


async def _placed(name: str = "a") -> tuple[UsageIntake, Engine, FakeKube]:
    engine, kube = await engine_with(1)
    await conversation.on_event(engine, "ADDED", stored_conv(name, 1000))
    await engine.drain_background()
    return UsageIntake(engine, Checkpoints(300.0)), engine, kube


def _batch(name: str, report: ConversationUsage, *, completed: bool = False) -> UsageBatch:
    return UsageBatch(reports=[UsageReport(namespace=NS, name=name, usage=report, completed=completed)])


@sync
async def test_a_report_is_applied_in_memory_and_its_counters_are_owed_not_written() -> None:
    intake, engine, kube = await _placed()
    record = engine.world.convs[f"{NS}/a"]
    reserved = record.status.reserved_kv_tokens
    writes = len(kube.patches)
    answer = await intake.apply(_batch("a", usage(1, 1000, 50, "2026-01-01T00:01:00Z")))
    assert answer.applied == 1
    assert (record.status.turns_served, record.status.live_kv_tokens) == (1, 1050)
    assert len(kube.patches) == writes  # owed: nothing written
    assert len(intake.checkpoints) == 1
    # A watch event with the spec as the API server has it (no usage) takes nothing back.
    await conversation.on_event(engine, "MODIFIED", stored_conv("a", 1000))
    assert record.status.turns_served == 1
    assert record.spec.usage.turns == 1
    # The context past the reservation held: written at once.
    await intake.apply(_batch("a", usage(2, reserved + 500, 60, "2026-01-01T00:01:30Z")))
    assert len(kube.patches) == writes + 1
    assert kube.status[("conversations", "a")]["turnsServed"] == 2
    assert kube.status[("conversations", "a")]["reservedKvTokens"] >= reserved + 560


@sync
async def test_a_due_checkpoint_writes_the_counters_and_a_completion_releases() -> None:
    intake, engine, kube = await _placed()
    intake.checkpoints.interval_s = 0.0
    await intake.apply(_batch("a", usage(1, 1000, 50, "2026-01-01T00:01:00Z")))
    assert await intake.write_due() == 1
    assert kube.status[("conversations", "a")]["turnsServed"] == 1
    answer = await intake.apply(_batch("a", usage(2, 1100, 90, "2026-01-01T00:02:00Z"), completed=True))
    assert answer.applied == 1
    status = kube.status[("conversations", "a")]
    assert (status["phase"], status["turnsServed"], status["outputTokens"]) == ("Completed", 2, 90)
    assert engine.world.pool(NS, "llama").scheduler.conversation(f"{NS}/a") is None


@sync
async def test_the_router_stream_reaches_the_endpoint_and_sends_again_to_a_new_operator_run() -> None:
    intake, engine, _ = await _placed()
    runner = web.AppRunner(make_app(intake, TOKEN))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    completed: list[str] = []
    async with aiohttp.ClientSession() as session:
        try:
            wrong = UsageStream(url, "x" * 32, NS, lambda: session)
            wrong.record("a", Usage(1, 1000, 50, "2026-01-01T00:01:00Z"))
            assert not await wrong.send()  # 401: kept for the next try
            assert wrong.pending() == 1

            stream = UsageStream(url, TOKEN, NS, lambda: session, completed.append)
            stream.record("a", Usage(1, 1000, 50, "2026-01-01T00:01:00Z"))
            stream.record("ghost", Usage(1, 10, 1))  # not held by this operator: deferred, sent again
            assert await stream.send()
            record = engine.world.convs[f"{NS}/a"]
            assert record.status.turns_served == 1
            assert stream.pending() == 2  # "ghost" again, and on first contact every live one
            # The operator restarted (its checkpoint older than the router's count): everything is sent again.
            await stream.send()
            record.spec = record.spec.model_copy(update={"usage": ConversationUsage()})
            record.status.turns_served = 0
            intake.run_id = "a-new-run"
            await stream.send()  # the answer names a new run
            assert stream.pending() >= 1
            await stream.send()
            assert record.status.turns_served == 1
            stream.complete("a")
            await stream.send()
            assert completed == ["a"]
            assert record.terminal
            known = await stream.known("a", None)
            assert known is not None
            assert known.turns == 1
        finally:
            await runner.cleanup()
