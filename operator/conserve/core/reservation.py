"""How many KV tokens to reserve for a conversation: sized from its live context, grown per turn.

Rule (documented, no learned model): a conversation's reservation is its live context (at admission, the
first turn's input) times the pool's per-turn growth factor: room for its next turn, not for a whole future
that nobody knows. The factor is the GROWTH_QUANTILE of the per-turn growth ratios observed in the pool (the
context after a turn over the context before it, from every turn report, also when clients never say that a
conversation ended), clamped to [1, MAX_GROWTH_FACTOR]. After each turn the reservation is grown in place to the
new live context times the factor when the decoder has room (core.scheduler). The result is at least the
input plus MIN_OUTPUT_ALLOWANCE_TOKENS and at most the largest decoder's capacity.

Until MIN_OBSERVATIONS turns have been observed, PRIOR_GROWTH_FACTOR is used, but only where it fits: a prior
no observation confirmed never blocks a conversation (the scheduler then reserves the floor: the input plus the
allowance). A conversation's hint of expected turns raises the unconfirmed factor to at least
1 + 0.5 x (turns - 1) (each later turn adds, on average, half the first turn's size).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PRIOR_GROWTH_FACTOR = 2.0
MAX_GROWTH_FACTOR = 8.0
GROWTH_QUANTILE = 0.75
MIN_OBSERVATIONS = 10
HISTORY_LIMIT = 256
MIN_OUTPUT_ALLOWANCE_TOKENS = 256


@dataclass(frozen=True, slots=True)
class GrowthObservation:
    first_input_tokens: int
    final_context_tokens: int

    @property
    def ratio(self) -> float:
        return self.final_context_tokens / max(self.first_input_tokens, 1)


@dataclass(slots=True)
class GrowthHistory:
    """The pool's observed per-turn growth ratios (context after a turn / before it), newest last, bounded.
    The factor per expected-turns hint is cached until a ratio arrives."""

    ratios: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_LIMIT))
    _factors: dict[int | None, tuple[float, bool]] = field(default_factory=dict)

    def observe_turn(self, context_before_tokens: int, context_after_tokens: int) -> None:
        self.record(round(max(context_after_tokens, 1) / max(context_before_tokens, 1), 4))

    def record(self, ratio: float) -> None:
        self.ratios.append(ratio)
        self._factors.clear()

    def factor(self, expected_turns: int | None) -> tuple[float, bool]:
        """The growth factor and whether observations back it (False: the prior)."""
        cached = self._factors.get(expected_turns)
        if cached is None:
            confirmed = len(self.ratios) >= MIN_OBSERVATIONS
            cached = (growth_factor(observations_from_ratios(self.ratios), expected_turns), confirmed)
            self._factors[expected_turns] = cached
        return cached

    def sizing(
        self, first_input_tokens: int, expected_turns: int | None, max_decoder_capacity_kv_tokens: int | None
    ) -> tuple[int, int | None]:
        """The reservation for a conversation, and the floor to fall back to when the factor is an unconfirmed
        prior (None when observations back the factor): a prior nobody observed never blocks a conversation."""
        factor, confirmed = self.factor(expected_turns)
        cap = max_decoder_capacity_kv_tokens
        wanted = reservation_for_factor(first_input_tokens, factor, max_decoder_capacity_kv_tokens=cap)
        if confirmed:
            return wanted, None
        floor = reservation_for_factor(first_input_tokens, 1.0, max_decoder_capacity_kv_tokens=cap)
        return wanted, floor if floor < wanted else None


def observations_from_ratios(ratios: Iterable[float]) -> list[GrowthObservation]:
    """Growth history kept as ratios (per turn: context after it / before it), as the pairs `growth_factor` reads."""
    scale = 1_000_000
    return [GrowthObservation(scale, max(round(r * scale), 0)) for r in ratios]


def growth_factor(history: Sequence[GrowthObservation], expected_turns: int | None = None) -> float:
    recent = list(history)[-HISTORY_LIMIT:]
    if len(recent) < MIN_OBSERVATIONS:
        factor = PRIOR_GROWTH_FACTOR
        if expected_turns is not None and expected_turns > 1:
            factor = max(factor, 1.0 + 0.5 * (expected_turns - 1))
    else:
        factor = quantile(sorted(o.ratio for o in recent), GROWTH_QUANTILE)
    return min(max(factor, 1.0), MAX_GROWTH_FACTOR)


def reservation_kv_tokens(
    first_input_tokens: int,
    history: Sequence[GrowthObservation],
    *,
    expected_turns: int | None = None,
    max_decoder_capacity_kv_tokens: int | None = None,
) -> int:
    factor = growth_factor(history, expected_turns)
    return reservation_for_factor(
        first_input_tokens, factor, max_decoder_capacity_kv_tokens=max_decoder_capacity_kv_tokens
    )


def reservation_for_factor(
    first_input_tokens: int, factor: float, *, max_decoder_capacity_kv_tokens: int | None = None
) -> int:
    """The reservation for a growth factor already computed by `growth_factor` (callers that place many
    conversations between two changes of the history compute the factor once)."""
    wanted = max(math.ceil(first_input_tokens * factor), first_input_tokens + MIN_OUTPUT_ALLOWANCE_TOKENS)
    if max_decoder_capacity_kv_tokens is not None and max_decoder_capacity_kv_tokens > 0:
        # Never ask for more than any decoder could give; the input itself must still fit.
        wanted = min(wanted, max(max_decoder_capacity_kv_tokens, first_input_tokens))
    return wanted


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (q in [0, 1])."""
    if not sorted_values:
        raise ValueError("quantile of an empty sequence")
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
