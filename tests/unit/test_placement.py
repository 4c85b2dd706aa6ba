"""Placement: filters, scorers and the picker (table-driven), and its properties."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve.core.gpus import Tier
from conserve.core.placement import (
    DecoderState,
    PlacementRequest,
    PlacementSettings,
    PlacementWeights,
    TierPolicy,
    place,
)


def dec(
    name: str,
    cap: int = 1000,
    reserved: int = 0,
    tier: Tier | None = Tier.BANDWIDTH,
    *,
    ready: bool = True,
    live: int = 0,
    pinned: int = 0,
    energy: float | None = None,
) -> DecoderState:
    """A decoder on no particular node; the arguments in DecoderState's field order."""
    return DecoderState(name, "", tier, ready, cap, reserved, live, pinned, energy)


DEFAULT = PlacementSettings()
STRICT = PlacementSettings(tier_policy=TierPolicy.STRICT)
PACK = PlacementSettings(weights=PlacementWeights(kv_balance=0, kv_pack=1, tier=0, energy=0, conversations=0))


@pytest.mark.parametrize(
    ("decoders", "need", "settings", "decoder", "reason"),
    [
        ([], 10, DEFAULT, None, "NoDecoder"),
        ([dec("a", ready=False)], 10, DEFAULT, None, "NoReadyDecoder"),
        ([dec("a", reserved=990)], 100, DEFAULT, None, "NoCapacity"),
        # headroom: 5% of 1000 is kept free, so 950 free is the most a request may take
        ([dec("a")], 950, DEFAULT, "a", "Placed"),
        ([dec("a")], 951, DEFAULT, None, "NoCapacity"),
        # live KV above the reservation counts
        ([dec("a", reserved=100, live=900)], 100, DEFAULT, None, "NoCapacity"),
        # balance: the emptier decoder
        ([dec("a", reserved=500), dec("b", reserved=100)], 100, DEFAULT, "b", "Placed"),
        # pack: the tighter fit
        ([dec("a", reserved=500), dec("b", reserved=100)], 100, PACK, "a", "Placed"),
        # tier preferred: the bandwidth tier wins at equal load
        ([dec("a", tier=Tier.COMPUTE), dec("b")], 100, DEFAULT, "b", "Placed"),
        # tier strict: a compute decoder is filtered out even when it is the only one
        ([dec("a", tier=Tier.COMPUTE)], 100, STRICT, None, "NoCapacity"),
        # energy: cheaper joules per token wins at equal load
        ([dec("a", energy=0.2), dec("b", energy=0.1)], 100, DEFAULT, "b", "Placed"),
        # ties go to the smallest name
        ([dec("b"), dec("a")], 100, DEFAULT, "a", "Placed"),
        # load: fewer turns running now wins at equal free KV (idle pinned KV does not decode)
        ([replace(dec("a"), active_turns=6), replace(dec("b"), active_turns=1)], 100, DEFAULT, "b", "Placed"),
        # ... and outweighs a little more free KV
        (
            [replace(dec("a", reserved=50), active_turns=0), replace(dec("b"), active_turns=8)],
            100,
            DEFAULT,
            "a",
            "Placed",
        ),
    ],
)
def test_place_table(
    decoders: list[DecoderState], need: int, settings: PlacementSettings, decoder: str | None, reason: str
) -> None:
    decision = place(PlacementRequest("ns/c", need), decoders, settings)
    assert decision.decoder == decoder
    assert decision.reason == reason
    assert all(0.0 <= s <= 1.0 for s in decision.scores.values())


decoder_states = st.builds(
    lambda i, cap, res, live, tier, ready, pinned: dec(
        f"d{i}", cap, min(res, cap), tier, ready=ready, live=min(live, cap), pinned=pinned
    ),
    st.integers(0, 50),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.sampled_from([Tier.COMPUTE, Tier.BANDWIDTH, None]),
    st.booleans(),
    st.integers(0, 20),
)


@settings(max_examples=200, deadline=None)
@given(
    decoders=st.lists(decoder_states, max_size=8, unique_by=lambda d: d.name),
    need=st.integers(1, 12_000),
    strict=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_place_properties(decoders: list[DecoderState], need: int, strict: bool, seed: int) -> None:
    settings = STRICT if strict else DEFAULT
    request = PlacementRequest("ns/c", need)
    decision = place(request, decoders, settings)
    # a pure function: the same inputs give the same decision, in any order of the decoders
    assert place(request, decoders, settings) == decision
    shuffled = list(decoders)
    random.Random(seed).shuffle(shuffled)
    assert place(request, shuffled, settings).decoder == decision.decoder
    if decision.decoder is not None:
        chosen = next(d for d in decoders if d.name == decision.decoder)
        # capacity is never oversubscribed, headroom included
        assert chosen.ready
        assert max(chosen.reserved_kv_tokens, chosen.live_kv_tokens) + need <= chosen.capacity_kv_tokens - int(
            chosen.capacity_kv_tokens * settings.headroom_fraction
        )
        if strict:
            assert chosen.tier is Tier.BANDWIDTH
        # the best score wins
        assert decision.scores[chosen.name] == max(decision.scores.values())
    else:
        assert set(decision.rejected) == {d.name for d in decoders}
