"""The load generator's pure report helpers: the router's metrics read back, and the per-mode summary's table."""

from __future__ import annotations

import math

import pytest

from conserve.load.report import ConversationOutcome, TurnOutcome, format_table, histogram_quantile, summarize

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


def _turn(index: int, site: str, ok: bool = True) -> TurnOutcome:
    return TurnOutcome(index, ok, ttft_s=0.1, tbt_s=0.01, output_tokens=4, decoder="dec-0", prefill_site=site)


def test_the_report_counts_where_first_and_later_turns_were_prefilled() -> None:
    outcomes = [
        ConversationOutcome("a", [_turn(0, "pool"), _turn(1, "decoder"), _turn(2, "decoder"), _turn(3, "pool")]),
        ConversationOutcome("b", [_turn(0, "decoder"), _turn(1, "pool", ok=False)]),  # a failed turn counts nowhere
        ConversationOutcome("c", [_turn(0, "pool")]),
    ]
    summary = summarize("conversation", outcomes)
    first = (summary.pool_first, summary.decoder_first)
    later = (summary.pool_later, summary.decoder_later)
    assert (first, later) == ((2, 1), (1, 2))
    unknown = summarize("per-turn", [ConversationOutcome("d", [_turn(0, "")])])  # a router that did not say
    table = format_table([summary, unknown]).splitlines()
    first_row = next(line for line in table if line.startswith("prefill pool/decoder, first turns"))
    later_row = next(line for line in table if line.startswith("prefill pool/decoder, later turns"))
    assert first_row.split()[-4:] == ["2/1", "(67%", "pool)", "-"]
    assert later_row.split()[-4:] == ["1/2", "(33%", "pool)", "-"]
    assert len({len(line) for line in table}) == 1, table  # the columns line up, however wide the cells
