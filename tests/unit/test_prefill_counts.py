"""A pool's prefill servers and their first turns (core.prefill.PrefillCounts): the least used ready server,
compute tier first; counts survive a refresh of the servers and follow a first turn the data plane ran
elsewhere."""

from __future__ import annotations

from conserve.core.gpus import Tier
from conserve.core.prefill import PrefillCounts, PrefillState


def test_first_turns_spread_over_ready_servers_compute_tier_first() -> None:
    counts = PrefillCounts()
    counts.refresh([PrefillState("p-bw", Tier.BANDWIDTH), PrefillState("p-c", Tier.COMPUTE), PrefillState("p-x")])
    assert [counts.pick() for _ in range(3)] == ["p-c", "p-c", "p-c"]
    counts.refresh([PrefillState("p-bw", Tier.BANDWIDTH), PrefillState("p-c", Tier.COMPUTE, ready=False)])
    assert counts.pick() == "p-bw"
    counts.refresh([])
    assert counts.pick() is None


def test_counts_survive_a_refresh_and_follow_the_server_that_ran_the_turn() -> None:
    counts = PrefillCounts()
    counts.refresh([PrefillState("p-0", Tier.COMPUTE), PrefillState("p-1", Tier.COMPUTE)])
    assert counts.pick() == "p-0"
    counts.refresh([PrefillState("p-0", Tier.COMPUTE), PrefillState("p-1", Tier.COMPUTE)])
    assert counts.servers["p-0"].assigned == 1
    counts.moved("p-0", "p-1")  # the router's early prefill ran it on p-1
    assert (counts.servers["p-0"].assigned, counts.servers["p-1"].assigned) == (0, 1)
    counts.moved("p-0", "p-gone")  # nothing below zero, nothing counted on a server that is not known
    assert (counts.servers["p-0"].assigned, counts.servers["p-1"].assigned) == (0, 1)
    assert counts.pick() == "p-0"
