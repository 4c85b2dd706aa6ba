"""The scheduler balances turns running now, not only reservations: idle pinned conversations hold KV but do not
decode, so free KV alone can pile the active conversations (and their decode batches) on one decoder."""

from __future__ import annotations

import pytest

from conserve.core.decisions import ConversationRequest
from conserve.core.occupancy import ObservedOccupancy
from conserve.core.placement import DecoderState, PlacementSettings, PlacementWeights
from conserve.core.scheduler import PoolScheduler, SchedulerSettings

pytestmark = pytest.mark.unit


def scheduler(load_weight: float) -> PoolScheduler:
    s = PoolScheduler(SchedulerSettings(placement=PlacementSettings(weights=PlacementWeights(load=load_weight))))
    for name in ("d0", "d1"):
        s.decoder_changed(DecoderState(name, capacity_kv_tokens=100_000))
    return s


def placed_on(decisions: list, key: str) -> str | None:  # type: ignore[type-arg]
    return next((d.decoder for d in decisions if d.placed and d.conversation == key), None)


def busy_small_and_idle_big(s: PoolScheduler) -> None:
    """d0: a small conversation whose first turn is still running; d1: a big one between turns."""
    assert placed_on(s.admit(ConversationRequest("a", 1_000), 0.0), "a") == "d0"
    assert placed_on(s.admit(ConversationRequest("b", 20_000), 0.0), "b") == "d1"
    s.usage_observed("b", 20_500, 1.0, turns=1)


@pytest.mark.parametrize(("load_weight", "expected"), [(1.0, "d1"), (0.0, "d0")])
def test_a_new_conversation_goes_where_fewer_turns_run(load_weight: float, expected: str) -> None:
    s = scheduler(load_weight)
    busy_small_and_idle_big(s)
    # d0 has more free KV; d1 runs nothing: with the load scorer the new conversation goes to d1
    assert placed_on(s.admit(ConversationRequest("c", 1_000), 2.0), "c") == expected


def test_the_engines_running_requests_count_too() -> None:
    s = scheduler(1.0)
    busy_small_and_idle_big(s)
    s.usage_observed("a", 1_200, 2.0, turns=1)  # a's turn ended: nothing runs on d0 by the scheduler's count
    s.occupancy_observed("d0", ObservedOccupancy(0.0, 0, 2.0))
    s.occupancy_observed("d1", ObservedOccupancy(0.2, 12, 2.0))  # outside traffic: 12 requests running on d1
    assert placed_on(s.admit(ConversationRequest("c", 1_000), 2.0), "c") == "d0"
