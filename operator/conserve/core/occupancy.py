"""Observed KV occupancy folded into placement: which source wins when the engine and the ledger disagree.

A decoder's used KV for placement is max(reservations, reported live KV, observed KV): the larger wins.
- Observed below the reservations frees nothing: a reservation is room promised to pinned conversations' next
  turns, whose KV does not exist yet, so the engine cannot see it.
- Observed above the ledger is KV that exists and the ledger does not know of (usage reported late, prefix
  caches, outside traffic, recompute after preemption): ignoring it would place onto a full decoder.
A reading older than the caller's `max_age_s` is ignored (a decoder that stopped answering): the ledger decides.
The readings come from the decoders' engines (`controller/occupancy.py` scrapes them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from conserve.core.placement import DecoderState


@dataclass(frozen=True, slots=True)
class ObservedOccupancy:
    kv_used_fraction: float
    requests_running: int
    at_s: float  # monotonic time of the scrape


def with_observed(
    states: Iterable[DecoderState], observed: Mapping[str, ObservedOccupancy], now_s: float, max_age_s: float
) -> list[DecoderState]:
    """The placement's decoder states with fresh observed occupancy folded in: live KV = max(ledger's live,
    observed); reservations unchanged (so free = capacity - max(reserved, live, observed)); turns running = max(the
    scheduler's count, the engine's running requests)."""
    out = []
    for state in states:
        seen = observed.get(state.name)
        if seen is not None and now_s - seen.at_s <= max_age_s:
            tokens = round(seen.kv_used_fraction * state.capacity_kv_tokens)
            if tokens > state.live_kv_tokens:
                state = dataclasses.replace(state, live_kv_tokens=tokens)
            if seen.requests_running > state.active_turns:
                state = dataclasses.replace(state, active_turns=seen.requests_running)
        out.append(state)
    return out


class ObservedReadings:
    """The latest reading of each decoder's engine, kept until the scheduler's sweep finds it too old."""

    def __init__(self) -> None:
        self.latest: dict[str, ObservedOccupancy] = {}

    def expire(self, now_s: float, max_age_s: float) -> bool:
        """Forget the readings older than `max_age_s`; True when any was forgotten."""
        stale = [d for d, r in self.latest.items() if now_s - r.at_s > max_age_s]
        for decoder in stale:
            del self.latest[decoder]
        return bool(stale)

    def fold(self, states: list[DecoderState]) -> list[DecoderState]:
        """`with_observed` over the readings kept (their age is checked by `expire`, not here)."""
        return with_observed(states, self.latest, float("-inf"), float("inf")) if self.latest else states
