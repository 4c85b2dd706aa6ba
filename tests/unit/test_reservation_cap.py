"""The reservation cap and the capacity filter agree: a capped reservation fits an empty decoder."""

from __future__ import annotations

from conserve.core.placement import (
    DecoderState,
    PlacementRequest,
    PlacementSettings,
    largest_placeable_kv_tokens,
    place,
)
from conserve.core.reservation import reservation_kv_tokens


def test_a_reservation_capped_for_the_largest_decoder_is_placed() -> None:
    settings = PlacementSettings(headroom_fraction=0.05)
    capacity = 100_000
    cap = largest_placeable_kv_tokens(capacity, settings.headroom_fraction)
    reservation = reservation_kv_tokens(90_000, [], max_decoder_capacity_kv_tokens=cap)
    decision = place(
        PlacementRequest("ns/huge", reservation), [DecoderState("d0", capacity_kv_tokens=capacity)], settings
    )
    assert reservation == 95_000
    assert decision.decoder == "d0"


def test_one_token_more_than_the_cap_is_refused() -> None:
    settings = PlacementSettings(headroom_fraction=0.05)
    cap = largest_placeable_kv_tokens(100_000, settings.headroom_fraction)
    decision = place(PlacementRequest("ns/x", cap + 1), [DecoderState("d0", capacity_kv_tokens=100_000)], settings)
    assert decision.reason == "NoCapacity"
