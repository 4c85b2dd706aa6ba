"""The router's pure decisions: conversation ids, where a turn goes, least load, batched usage reports."""

from __future__ import annotations

import re

import pytest

from conserve.core.decisions import PrefillSite
from conserve.core.pd import PdChoice
from conserve.router import policy
from conserve.router.control import backends_from_pool_status, max_queue_wait_of, placement_from_status
from conserve.router.policy import Backend, LoadBook, Mode, NoBackend, Placement, Usage, UsageBatcher

P1, P2 = Backend("pre-0", "127.0.0.1:1"), Backend("pre-1", "127.0.0.1:2")
D1, D2 = Backend("dec-0", "127.0.0.1:3"), Backend("dec-1", "127.0.0.1:4")


def test_conversation_id_header_then_user_then_metadata() -> None:
    assert policy.conversation_id_of({"X-Conversation-Id": " c1 "}, {"user": "u"}) == "c1"
    assert policy.conversation_id_of({}, {"user": "u"}) == "u"
    assert policy.conversation_id_of({}, {"metadata": {"conversation_id": "m"}}) == "m"
    assert policy.conversation_id_of({}, {}) is None


@pytest.mark.parametrize("cid", ["chat-1", "User@Example.com/ session#9", "x" * 300, "---", "ÄÖ"])
def test_object_names_are_dns_labels_and_distinct(cid: str) -> None:
    name = policy.conversation_object_name(cid)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name)
    assert len(name) <= 63
    assert name != policy.conversation_object_name(cid + "x")


def test_flags_and_modes() -> None:
    assert policy.header_flag("TRUE", False)
    assert not policy.header_flag("0", True)
    assert policy.header_flag("maybe", True)
    assert policy.parse_mode("per-turn", Mode.CONVERSATION) is Mode.PER_TURN
    assert policy.parse_mode("bogus", Mode.CONVERSATION) is Mode.CONVERSATION


def test_least_loaded_by_requests_then_tokens_then_name() -> None:
    book = LoadBook()
    assert policy.least_loaded([D2, D1], book) == D1
    book.start(D1.endpoint, 10)
    assert policy.least_loaded([D1, D2], book) == D2
    book.start(D2.endpoint, 100)
    assert policy.least_loaded([D1, D2], book) == D1
    book.finish(D1.endpoint, 10)
    book.finish(D1.endpoint, 10)  # never below zero
    assert book.requests[D1.endpoint] == 0
    assert policy.least_loaded([], book) is None


@pytest.mark.parametrize(
    ("choice", "expect_prefill"),
    [
        (PdChoice(PrefillSite.POOL, "pre-1", "pool sooner"), P2),  # the decider's server prefills, KV moves
        (PdChoice(PrefillSite.DECODER, None, "decoder sooner"), None),  # straight to the decoder
        (PdChoice(PrefillSite.POOL, "gone", "pool sooner"), None),  # its server no longer ready: the decoder
        (None, None),
    ],
)
def test_conversation_mode_plan_follows_the_deciders_choice(
    choice: PdChoice | None, expect_prefill: Backend | None
) -> None:
    placement = Placement(2, D1, P1)  # the operator's prefill server is not the router's choice
    plan = policy.plan_turn(
        mode=Mode.CONVERSATION,
        placement=placement,
        prefills=[P1, P2],
        decoders=[D1, D2],
        book=LoadBook(),
        choice=choice,
    )
    assert plan.decoder == D1
    assert plan.prefill == expect_prefill
    assert plan.generation == 2
    assert plan.kv_transfer == (expect_prefill is not None)
    assert plan.site is (PrefillSite.POOL if expect_prefill is not None else PrefillSite.DECODER)


def test_per_turn_mode_picks_least_loaded_every_turn() -> None:
    book = LoadBook()
    book.start(D1.endpoint, 5)
    book.start(P1.endpoint, 5)
    choice = PdChoice(PrefillSite.DECODER, None, "ignored in per-turn mode")
    plan = policy.plan_turn(
        mode=Mode.PER_TURN, placement=Placement(1, D1), prefills=[P1, P2], decoders=[D1, D2], book=book, choice=choice
    )
    assert plan.decoder == D2
    assert plan.prefill == P2
    assert plan.kv_transfer
    with pytest.raises(NoBackend):
        policy.plan_turn(mode=Mode.PER_TURN, placement=None, prefills=[], decoders=[], book=book)
    with pytest.raises(NoBackend):
        policy.plan_turn(mode=Mode.CONVERSATION, placement=None, prefills=[P1], decoders=[D1], book=book)


def test_new_input_tokens() -> None:
    assert policy.new_input_tokens(1000, 0) == 1000
    assert policy.new_input_tokens(1300, 1200) == 100
    assert policy.new_input_tokens(900, 1200) == 0


def test_usage_batcher_coalesces_per_interval_and_flushes_completion() -> None:
    b = UsageBatcher(interval_s=1.0)
    b.record("a", Usage(1, 100, 10))
    assert b.due(0.0) == [("a", {"spec": {"usage": {"turns": 1, "inputTokens": 100, "outputTokens": 10}}})]
    b.record("a", Usage(2, 120, 20))
    b.record("a", Usage(3, 150, 30, "2026-01-01T00:00:00Z", 0.25))
    assert b.due(0.5) == []  # within the interval: coalesced
    ((_name, patch),) = b.due(1.0)
    assert patch["spec"]["usage"]["turns"] == 3
    assert patch["spec"]["usage"]["timeToFirstEffectiveTokenSeconds"] == 0.25
    assert b.due(5.0) == []  # nothing new
    b.record("a", Usage(4, 160, 40))
    b.complete("a")
    ((_name, patch),) = b.due(1.1)  # completion goes out at once, with the latest counters
    assert patch["spec"]["completed"] is True
    assert patch["spec"]["usage"]["turns"] == 4
    assert len(b) == 0


def test_placement_and_pool_backends_from_status() -> None:
    assert placement_from_status(None) is None
    assert placement_from_status({"phase": "Pending", "decoder": {"pod": "d", "endpoint": "h:1"}}) is None
    status = {
        "phase": "Decoding",
        "placementGeneration": 3,
        "decoder": {"pod": "d", "endpoint": "h:1"},
        "prefill": {"pod": "p", "endpoint": "h:2"},
    }
    assert placement_from_status(status) == Placement(3, Backend("d", "h:1"), Backend("p", "h:2"))
    pool = {
        "decoders": [{"pod": "d0", "ready": True, "endpoint": "h:1"}, {"pod": "d1", "ready": False, "endpoint": "h:2"}],
        "prefills": [{"pod": "p0", "ready": True, "endpoint": ""}, {"pod": "p1", "ready": True, "endpoint": "h:3"}],
    }
    assert backends_from_pool_status(pool) == ([Backend("p1", "h:3")], [Backend("d0", "h:1")])


def test_the_first_turn_waits_the_pools_queue_limit_and_a_margin_bounded_by_the_flag() -> None:
    margin = policy.PLACEMENT_WAIT_MARGIN_S
    assert policy.placement_wait_s(None, 30.0) == 30.0 + margin
    assert policy.placement_wait_s(10.0, 30.0) == 10.0  # the flag is an upper bound
    assert policy.placement_wait_s(None, None) == policy.DEFAULT_PLACEMENT_WAIT_S  # a pool not seen yet
    assert policy.placement_wait_s(7.0, None) == 7.0
    assert max_queue_wait_of({"placement": {"maxQueueWaitSeconds": 45}}) == 45.0
    assert max_queue_wait_of({"placement": {"maxQueueWaitSeconds": "soon"}}) == 120.0  # unreadable: the default
    assert max_queue_wait_of(None) == 120.0


def test_retry_after_is_a_quarter_of_the_pools_limit_within_bounds() -> None:
    assert policy.retry_after_s(120.0) == 30
    assert policy.retry_after_s(3600.0) == 30
    assert policy.retry_after_s(10.0) == 3
    assert policy.retry_after_s(1.0) == 1
    assert policy.retry_after_s(None) == 30


def _not_placed(failed: bool, reason: str | None, detail: str = "why") -> policy.NotPlaced:
    return policy.not_placed("c1", "p", failed=failed, reason=reason, detail=detail, waited_s=125.2, pool_max_wait_s=8)


def test_a_busy_pool_is_429_with_retry_after_and_a_fault_is_503() -> None:
    waited = "waited 121 s in the queue of pool p, over its limit of 120 s (NoCapacity: no room)"
    assert _not_placed(True, "QueueWaitExceeded", waited) == policy.NotPlaced(
        429, f"conversation c1 {waited}", "QueueWaitExceeded", 2
    )
    assert _not_placed(True, "NoCapacity") == policy.NotPlaced(
        429, "conversation c1 refused by pool p (NoCapacity: why)", "NoCapacity", 2
    )  # whenFull: Reject
    for reason in ("NoCapacity", "NoReadyDecoder", "NoDecoder"):  # the router's own wait ended first
        answer = _not_placed(False, reason)
        assert (answer.status, answer.retry_after_s) == (429, 2)
        assert answer.message == f"conversation c1 waited 125 s in the queue of pool p ({reason}: why)"
    # Faults: no such pool, an invalid one, no word from the operator, a conversation ended otherwise.
    assert _not_placed(False, "PoolNotFound") == policy.NotPlaced(
        503, "conversation c1 not placed after 125 s (PoolNotFound: why)", "PoolNotFound"
    )
    assert _not_placed(False, "InvalidPool").status == 503
    assert _not_placed(False, None, "") == policy.NotPlaced(
        503, "conversation c1 not placed after 125 s (no word from the operator)", ""
    )
    assert _not_placed(True, "Deleted", "the conversation was deleted").status == 503
    assert _not_placed(True, "Completed").retry_after_s is None
