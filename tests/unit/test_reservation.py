"""The reservation rule (table-driven)."""

from __future__ import annotations

import pytest

from conserve.core.reservation import (
    MIN_OUTPUT_ALLOWANCE_TOKENS,
    GrowthObservation,
    growth_factor,
    quantile,
    reservation_for_factor,
    reservation_kv_tokens,
)


def _history(ratios: list[float]) -> list[GrowthObservation]:
    return [GrowthObservation(1000, round(1000 * r)) for r in ratios]


@pytest.mark.parametrize(
    ("first", "history", "turns", "cap", "expected"),
    [
        (1000, [], None, None, 2000),  # prior factor 2
        (100, [], None, None, 100 + MIN_OUTPUT_ALLOWANCE_TOKENS),  # the output allowance wins for short inputs
        (1000, [], 5, None, 3000),  # expected turns: 1 + 0.5 x 4
        (1000, _history([3.0] * 10), None, None, 3000),  # the 0.75 quantile of the history
        (1000, _history([20.0] * 10), None, None, 8000),  # clamped to MAX_GROWTH_FACTOR
        (1000, _history([0.5] * 10), None, None, 1256),  # factor clamped to 1, allowance added
        (10_000, [], None, 15_000, 15_000),  # never more than the largest decoder
        (20_000, [], None, 15_000, 20_000),  # ... but the input itself
    ],
)
def test_reservation(
    first: int, history: list[GrowthObservation], turns: int | None, cap: int | None, expected: int
) -> None:
    got = reservation_kv_tokens(first, history, expected_turns=turns, max_decoder_capacity_kv_tokens=cap)
    assert got == expected
    assert reservation_for_factor(first, growth_factor(history, turns), max_decoder_capacity_kv_tokens=cap) == got


def test_history_quantile() -> None:
    history = _history([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 4.0])
    assert growth_factor(history) == pytest.approx(quantile(sorted(o.ratio for o in history), 0.75))


def test_quantile_by_hand() -> None:
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert quantile([5.0], 0.9) == 5.0
    with pytest.raises(ValueError, match="empty"):
        quantile([], 0.5)
