"""The load generator's pure report helpers that read the router's metrics."""

from __future__ import annotations

import math

import pytest

from conserve.load.report import histogram_quantile

INF = math.inf


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([], 50, None),
        ([(1.0, 0.0), (INF, 0.0)], 50, None),
        # 10 samples, all in (0.5, 1.0]: the median interpolates halfway into that bucket.
        ([(0.5, 0.0), (1.0, 10.0), (INF, 10.0)], 50, 0.75),
        # Lowest bucket interpolates from 0.
        ([(0.1, 4.0), (1.0, 4.0), (INF, 4.0)], 50, 0.05),
        # A rank in +Inf answers the highest finite bound, as Prometheus does.
        ([(0.1, 1.0), (1.0, 2.0), (INF, 10.0)], 95, 1.0),
        ([(0.1, 5.0), (0.2, 10.0), (INF, 10.0)], 100, 0.2),
    ],
)
def test_histogram_quantile(buckets: list[tuple[float, float]], q: float, expected: float | None) -> None:
    got = histogram_quantile(buckets, q)
    assert got == expected if expected is None else got == pytest.approx(expected)
