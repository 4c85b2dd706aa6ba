"""The pool scheduler's read-only view (core/view.py): what adapters read answers what the events did, and
nothing read changes the scheduler."""

from __future__ import annotations

import dataclasses

import pytest

from conserve.core.decisions import ConversationRequest, Reason, Verdict
from conserve.core.lifecycle import KvState
from conserve.core.placement import DecoderState
from conserve.core.scheduler import PoolScheduler
from conserve.core.view import ConversationSnapshot, Holding


def pool() -> PoolScheduler:
    scheduler = PoolScheduler()
    scheduler.decoder_changed(DecoderState("dec-0", capacity_kv_tokens=10_000))
    return scheduler


def test_the_view_answers_what_the_events_did() -> None:
    s = pool()
    [placed] = s.admit(ConversationRequest("a", 3000), 1.0)
    assert placed.verdict is Verdict.PLACED
    [queued] = s.admit(ConversationRequest("b", 6000, created_at_s=2.0), 2.0)
    assert queued.verdict is Verdict.QUEUED
    assert s.holding("a") == Holding("dec-0", placed.reserved_kv_tokens, 0)
    assert s.holding("b") is None
    assert s.holdings() == {"a": Holding("dec-0", placed.reserved_kv_tokens, 0)}
    assert (s.queue(), s.pending_count, [r.key for r in s.queued_requests()]) == (["b"], 1, ["b"])
    assert (s.conversation_keys(), s.conversations_on("dec-0")) == (["a", "b"], ["a"])
    [dec] = s.decoders()
    assert (dec.reserved_kv_tokens, dec.pinned_conversations) == (placed.reserved_kv_tokens, 1)

    s.usage_observed("a", 3500, 5.0, turns=1)
    a = s.conversation("a")
    assert isinstance(a, ConversationSnapshot)
    assert (a.key, a.turns, a.live_kv_tokens, a.kv_state, a.in_flight, a.queued) == (
        "a",
        1,
        3500,
        KvState.ACTIVE,
        False,
        False,
    )
    assert s.growth_ratios == [round(3500 / 3000, 4)]
    b = s.conversation("b")
    assert b is not None
    assert (b.queued, b.told_waiting, b.holding) == (True, True, None)
    assert s.conversation("nobody") is None

    s.release("a", Reason.COMPLETED, now_s=6.0)  # b is placed in the room freed
    assert (s.conversation("a"), s.pending_count) == (None, 0)
    b_now = s.holding("b")
    assert b_now is not None
    assert b_now.decoder == "dec-0"


def test_nothing_read_changes_the_scheduler() -> None:
    s = pool()
    s.admit(ConversationRequest("a", 3000), 1.0)
    s.restore_history([1.5] * 3, [4.0, 6.0])
    s.growth_ratios.append(9.9)
    s.turn_gaps_s.append(99.0)
    s.holdings().clear()
    s.snapshot().clear()
    s.queue().append("x")
    assert (s.growth_ratios, s.turn_gaps_s) == ([1.5] * 3, [4.0, 6.0])
    assert (list(s.holdings()), len(s.snapshot()), s.queue()) == (["a"], 1, [])
    snap = s.conversation("a")
    assert snap is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.turns = 7  # type: ignore[misc]
    with pytest.raises(AttributeError):
        s.settings = s.settings  # type: ignore[misc]
