"""The capacity ledger: bookkeeping (table-driven) and its invariant (property)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve.core.ledger import CapacityError, CapacityLedger
from conserve.core.placement import DecoderState


def ledger(*caps: int) -> CapacityLedger:
    book = CapacityLedger()
    for i, cap in enumerate(caps):
        book.upsert_decoder(DecoderState(name=f"d{i}", capacity_kv_tokens=cap))
    return book


def test_reserve_release() -> None:
    book = ledger(1000)
    book.reserve("c1", "d0", 600)
    assert book.reserved_on("d0") == 600
    with pytest.raises(CapacityError):
        book.reserve("c2", "d0", 401)
    assert book.holding("c2") is None
    book.reserve("c2", "d0", 400)
    assert book.release("c1") is True
    assert book.release("c1") is False
    assert book.reserved_on("d0") == 400


def test_unknown_decoder() -> None:
    with pytest.raises(CapacityError):
        ledger(100).reserve("c", "nope", 1)


def test_re_reserve_keeps_the_old_one_on_failure() -> None:
    book = ledger(1000, 100)
    book.reserve("c", "d0", 500)
    with pytest.raises(CapacityError):
        book.reserve("c", "d1", 200)
    assert book.holding("c") == ("d0", 500, 0)


def test_live_counts_above_the_reservation() -> None:
    book = ledger(1000)
    book.reserve("c", "d0", 100)
    book.update_live("c", 700)
    assert book.reserved_on("d0") == 700
    assert book.snapshot()[0].free_kv_tokens == 300


@pytest.mark.parametrize(("others", "want", "ok"), [(0, 1000, True), (500, 500, True), (500, 501, False)])
def test_try_extend(others: int, want: int, ok: bool) -> None:
    book = ledger(1000)
    if others:
        book.reserve("other", "d0", others)
    book.reserve("c", "d0", 100)
    assert book.try_extend("c", want) is ok
    assert book.holding("c") == ("d0", want if ok else 100, 0)


def test_remove_decoder_returns_orphans() -> None:
    book = ledger(1000, 1000)
    book.reserve("b", "d0", 1)
    book.reserve("a", "d0", 1)
    book.reserve("c", "d1", 1)
    assert book.remove_decoder("d0") == ["a", "b"]
    assert book.totals()["conversations"] == 1


def test_snapshot() -> None:
    book = ledger(1000, 500)
    book.reserve("a", "d1", 100, live_kv_tokens=50)
    book.reserve("b", "d1", 100)
    d0, d1 = book.snapshot()
    assert (d0.name, d0.reserved_kv_tokens, d0.pinned_conversations) == ("d0", 0, 0)
    assert (d1.name, d1.reserved_kv_tokens, d1.live_kv_tokens, d1.pinned_conversations) == ("d1", 200, 50, 2)


ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "release", "extend"]), st.integers(0, 9), st.integers(0, 2), st.integers(0, 700)
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_capacity_never_oversubscribed(ops: list[tuple[str, int, int, int]]) -> None:
    book = ledger(1000, 800, 300)
    for op, conv, decoder, tokens in ops:
        key = f"c{conv}"
        if op == "reserve":
            with contextlib.suppress(CapacityError):
                book.reserve(key, f"d{decoder}", tokens)
        elif op == "release":
            book.release(key)
        else:
            book.try_extend(key, tokens)
        for state in book.snapshot():
            assert book.reserved_on(state.name) <= state.capacity_kv_tokens
