"""Conversation SLOs in the one scheduler: each class's queue wait bounded by its TTFET target, priority across
classes, an early refusal when the expected wait is past the budget, no preemption of admitted conversations, an
unknown class refused by name; the API's validation of inconsistent targets; attainment over a window."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.api.scheduling import scheduler_settings
from conserve.core.admission import MIN_DEPARTURES, DepartureRate, expected_wait_s, queue_budget_s
from conserve.core.decisions import ConversationRequest, Decision, Reason, Verdict
from conserve.core.placement import DecoderState
from conserve.core.scheduler import PoolScheduler
from conserve.core.slo import AttainmentWindow, SloClass, SloPolicy, turn_met
from conserve.testkit import PoolBuilder

pytestmark = pytest.mark.unit

SLO = {
    "ttfetSeconds": 5,
    "tbtSeconds": 0.1,
    "classes": [{"name": "gold", "priority": 10, "ttfetSeconds": 2}, {"name": "bronze", "priority": -5}],
    "defaultClass": "bronze",
}


def pool(slo: dict[str, object] | None = SLO, **placement: object) -> DecoderPoolSpec:
    spec = PoolBuilder("p").build()["spec"]
    if slo is not None:
        spec["slo"] = slo
    if placement:
        spec["placement"] = placement
    return DecoderPoolSpec.model_validate(spec)


def scheduler(spec: DecoderPoolSpec, capacity: int = 10_000) -> PoolScheduler:
    s = PoolScheduler(scheduler_settings(spec))
    s.decoder_changed(DecoderState("d0", capacity_kv_tokens=capacity))
    return s


def verdict(decisions: list[Decision], key: str) -> tuple[Verdict, Reason] | None:
    return next(((d.verdict, d.reason) for d in decisions if d.conversation == key), None)


def test_a_turn_meets_the_slo_only_within_both_targets() -> None:
    gold = SloClass("gold", 0, ttfet_s=2.0, tbt_s=0.1)
    assert turn_met(gold, 1.9, 0.09)
    assert turn_met(gold, 1.9, None)  # one token: no gap to judge
    assert not turn_met(gold, 2.1, 0.05)
    assert not turn_met(gold, 0.5, 0.2)
    assert not turn_met(gold, None, None)  # no first token at all


def test_a_class_waits_at_most_its_ttfet_target_and_never_past_the_pools_limit() -> None:
    policy = SloPolicy(5.0, 0.1, classes={"gold": SloClass("gold", 10, 2.0, 0.1)})
    assert queue_budget_s(policy.resolve("gold"), 120.0) == 2.0
    assert queue_budget_s(policy.resolve(None), 120.0) == 5.0  # no class, no default: the pool's targets
    assert queue_budget_s(policy.resolve(None), 3.0) == 3.0  # maxQueueWaitSeconds is the outer bound
    assert queue_budget_s(None, 120.0) == 120.0  # a pool without an SLO
    assert policy.resolve("silver") is None


def test_the_queue_refuses_each_class_at_its_own_budget_and_places_higher_classes_first() -> None:
    s = scheduler(pool(), capacity=10_000)
    assert verdict(s.admit(ConversationRequest("big", 9_000), 0.0), "big") == (Verdict.PLACED, Reason.PLACED)
    waiting = [("b1", None, 0.0), ("g1", "gold", 0.5), ("b2", "bronze", 0.6)]
    for key, cls, at in waiting:
        assert verdict(s.admit(ConversationRequest(key, 800, 0, at, slo_class=cls), at), key) == (
            Verdict.QUEUED,
            Reason.NO_CAPACITY,
        )
    assert s.queue() == ["g1", "b1", "b2"]  # gold (priority 10) ahead of the default class bronze (-5)
    refused = s.sweep(2.5)  # gold's budget is 2 s (since 0.5 s); bronze waits the pool's 5 s
    assert verdict(refused, "g1") == (Verdict.FAILED, Reason.QUEUE_WAIT_EXCEEDED)
    assert s.queue() == ["b1", "b2"]
    message = next(d.message for d in refused if d.conversation == "g1")
    assert message.startswith("waited 2 s in the queue, over its budget of 2 s (NoCapacity: ")
    assert verdict(s.sweep(5.0), "b1") == (Verdict.FAILED, Reason.QUEUE_WAIT_EXCEEDED)
    # no preemption: the admitted conversation kept its reservation throughout
    holding = s.holding("big")
    assert holding is not None
    assert holding.reserved_kv_tokens >= 9_000


def test_room_freed_in_time_places_the_waiting_conversation() -> None:
    s = scheduler(pool())
    s.admit(ConversationRequest("big", 9_000), 0.0)
    s.admit(ConversationRequest("next", 800, 0, 0.0, slo_class="gold"), 0.0)
    placed = s.release("big", Reason.COMPLETED, now_s=1.0)
    assert verdict(placed, "next") == (Verdict.PLACED, Reason.PLACED)
    assert s.sweep(10.0) == []  # nothing left to refuse


def test_an_expected_wait_past_the_budget_is_refused_at_once() -> None:
    s = scheduler(pool(), capacity=10_000)
    # Departures observed: one every 10 s (a slow pool), enough of them for an estimate.
    t = 0.0
    for i in range(MIN_DEPARTURES):
        s.admit(ConversationRequest(f"old{i}", 1_500), t)
        t += 10.0
        s.release(f"old{i}", Reason.COMPLETED, now_s=t)
    s.admit(ConversationRequest("big", 9_000), t)
    first = s.admit(ConversationRequest("q1", 800, 0, t, slo_class="bronze"), t)
    # Ahead of it: none; the pool frees one conversation per 10 s: an expected 10 s, past bronze's 5 s budget.
    assert verdict(first, "q1") == (Verdict.FAILED, Reason.SLO_UNATTAINABLE)
    message = next(d.message for d in first if d.conversation == "q1")
    assert "cannot start within its budget of 5 s: the expected wait is 10 s" in message
    assert s.queue() == []


def test_without_enough_departures_there_is_no_estimate() -> None:
    rate = DepartureRate()
    for i in range(MIN_DEPARTURES - 1):
        rate.departed(float(i))
    assert rate.per_s(10.0) is None
    rate.departed(10.0)
    per_s = rate.per_s(10.0)  # 5 departures over 10 s: 4 gaps
    assert per_s is not None
    assert per_s == pytest.approx((MIN_DEPARTURES - 1) / 10.0)
    assert expected_wait_s(3, per_s) == pytest.approx(4 / per_s)
    assert expected_wait_s(3, None) is None


def test_a_class_the_pool_does_not_declare_is_refused_naming_the_field() -> None:
    s = scheduler(pool())
    out = s.admit(ConversationRequest("x", 100, slo_class="platinum"), 0.0)
    assert verdict(out, "x") == (Verdict.FAILED, Reason.UNKNOWN_SLO_CLASS)
    assert "spec.sloClass 'platinum' is not a class of its pool (classes: bronze, gold)" in out[0].message
    plain = scheduler(pool(slo=None))
    out = plain.admit(ConversationRequest("y", 100, slo_class="gold"), 0.0)
    assert verdict(out, "y") == (Verdict.FAILED, Reason.UNKNOWN_SLO_CLASS)
    assert "none: the pool has no SLO" in out[0].message


@pytest.mark.parametrize(
    ("slo", "field"),
    [
        ({"ttfetSeconds": 0, "tbtSeconds": 0.1}, "ttfetSeconds"),
        ({"ttfetSeconds": -1, "tbtSeconds": 0.1}, "ttfetSeconds"),
        ({"ttfetSeconds": 2, "tbtSeconds": 3}, "tbtSeconds (3) must be smaller than ttfetSeconds (2)"),
        ({"ttfetSeconds": 2, "tbtSeconds": 0.1, "attainmentTarget": 1.5}, "attainmentTarget"),
        ({"ttfetSeconds": 2, "tbtSeconds": 0.1, "defaultClass": "gold"}, "defaultClass 'gold' must name one"),
        (
            {"ttfetSeconds": 2, "tbtSeconds": 0.1, "classes": [{"name": "a", "ttfetSeconds": 0.05}]},
            "classes[a].tbtSeconds (0.1) must be smaller than ttfetSeconds (0.05)",
        ),
        ({"ttfetSeconds": 2, "tbtSeconds": 0.1, "classes": [{"name": "Gold"}]}, "name"),
        ({"ttfetSeconds": 2, "tbtSeconds": 0.1, "classes": [{"name": "a"}, {"name": "a"}]}, "names must be unique"),
    ],
)
def test_inconsistent_slos_are_refused_naming_the_field(slo: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        pool(slo=slo)


def test_attainment_and_goodput_over_the_window_and_counts_that_survive_a_restart() -> None:
    w = AttainmentWindow(window_s=100.0)
    w.ended("gold", True, 0.0)
    w.ended("gold", False, 10.0)
    w.ended("gold", True, 20.0)
    w.refused("gold", 30.0)
    (gold,) = w.figures(50.0)
    assert (gold.ended, gold.met, gold.refused) == (3, 2, 1)
    assert gold.attainment == pytest.approx(2 / 3)
    assert gold.goodput_per_s == pytest.approx(2 / 50.0)  # the window has run 50 s since the first count
    (later,) = w.figures(115.0)  # the first two ended over 100 s ago
    assert later.attainment == pytest.approx(1.0)
    assert later.ended == 3
    restarted = AttainmentWindow()
    restarted.restore("gold", 3, 2, 1)
    (again,) = restarted.figures(0.0, ["gold"])
    assert (again.ended, again.met, again.refused, again.attainment) == (3, 2, 1, None)
