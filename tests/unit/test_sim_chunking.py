"""The engine's chunked prefill (prefill instances), chunked append-prefill (decoders), prefill-side caches
and the accounting of KV transfers: known answers from `conserve.core.perf`."""

from __future__ import annotations

import pytest

from conserve.core import perf
from conserve.core.gpus import CATALOG
from conserve.core.llm import MODELS
from conserve.sim.engine import simulate
from conserve.sim.fleet import Fleet, build_fleet
from conserve.sim.policies import make_policy
from conserve.sim.transfer import NIC_ACTIVE_POWER_W
from conserve.sim.workload import Conversation, Signals, Turn, Workload

MODEL = MODELS["llama-3-8b"]
H100, H200 = perf.Device(CATALOG["H100"]), perf.Device(CATALOG["H200"])
OVERHEAD_S = perf.CALIBRATED.prefill_step_overhead_s  # paid once per iteration


def fleet(*, chunk: int = 8192, decode: int = 1, prefix_cache: bool = False, store_gb: float = 0.0) -> Fleet:
    raw = {
        "model": "llama-3-8b",
        "link": "rdma",
        "chunk_tokens": chunk,
        "prefill_prefix_cache": prefix_cache,
        "shared_kv_store_gb": store_gb,
        "tiered": {"prefill": [{"gpu": "H100", "count": 1}], "decode": [{"gpu": "H200", "count": decode}]},
    }
    return build_fleet(raw, tiered=True)


def one(key: str, at: float, *turns: tuple[int, int, int, float]) -> Conversation:
    return Conversation(key, at, tuple(Turn(i, n, o, t) for i, n, o, t in turns))


def test_prefill_instance_chunks_prompts_first_come_first_served() -> None:
    # A (10,000 tokens) then B (1,000) at t=0 on one prefill instance, 8192-token chunks: iteration 1 is A's
    # first 8192 tokens; iteration 2 is A's last 1808 and all of B; both finish with iteration 2.
    f = fleet()
    w = Workload("t", (one("a", 0.0, (10_000, 10_000, 2, 0.0)), one("b", 0.0, (1000, 1000, 2, 0.0))))
    result = simulate(f, w, make_policy("round-robin@native"))
    a, b = (s.turns[0] for s in result.conversations)
    t1 = perf.prefill_cost(H100, MODEL, 8192).time_s
    t2 = perf.prefill_cost(H100, MODEL, 1808, 8192).time_s + perf.prefill_cost(H100, MODEL, 1000).time_s - OVERHEAD_S
    assert b.first_token_s == pytest.approx(t1 + t2 + perf.kv_transfer_time_s(MODEL, 1000, f.link))
    assert a.first_token_s == pytest.approx(t1 + t2 + perf.kv_transfer_time_s(MODEL, 10_000, f.link))
    p = result.prefill[0]
    assert p.iterations == 2
    assert p.tokens == 11_000
    assert p.dynamic_energy_j == pytest.approx((700 - 70) * (t1 + t2))
    # in chunks, A's prefill costs what it costs whole plus one more iteration's overhead
    whole = perf.prefill_cost(H100, MODEL, 10_000).time_s
    assert t1 + perf.prefill_cost(H100, MODEL, 1808, 8192).time_s == pytest.approx(whole + OVERHEAD_S, rel=1e-3)


def test_transfer_and_reprefill_accounting() -> None:
    # Round-robin moves the second turn to the other decoder: its whole context is prefilled again and moved.
    f = fleet(decode=2)
    w = Workload("t", (one("c", 0.0, (2000, 2000, 10, 0.0), (2100, 90, 10, 10.0)),), signals=Signals(True))
    result = simulate(f, w, make_policy("round-robin@native"))
    first, second = result.conversations[0].turns
    assert second.prefill_tokens == 2100
    assert second.reprefilled_tokens == 2010
    assert first.transferred_tokens == 2000
    assert second.transferred_tokens == 2100
    link = sum(perf.kv_transfer_time_s(MODEL, n, f.link) for n in (2000, 2100))
    assert result.transfer_energy_j == pytest.approx(2 * NIC_ACTIVE_POWER_W * link)


def test_prefill_prefix_cache_serves_the_next_turn() -> None:
    # With the prefill-side prefix cache (for every policy), round-robin's moved turn computes only what the
    # prefill instance has not seen: the 2000-token prompt it prefilled before is reused.
    w = Workload("t", (one("c", 0.0, (2000, 2000, 10, 0.0), (2100, 90, 10, 10.0)),), signals=Signals(True))
    result = simulate(fleet(decode=2, prefix_cache=True), w, make_policy("round-robin@native"))
    second = result.conversations[0].turns[1]
    assert second.prefill_tokens == 100
    assert second.transferred_tokens == 2100
    assert all(not p.cache for p in result.prefill)  # the end signal dropped it


def test_shared_store_loads_the_prefix_over_the_link() -> None:
    f = fleet(decode=2, store_gb=1000.0)
    w = Workload("t", (one("c", 0.0, (2000, 2000, 10, 0.0), (2100, 90, 10, 10.0)),), signals=Signals(True))
    result = simulate(f, w, make_policy("round-robin@native"))
    second = result.conversations[0].turns[1]
    # the decoder wrote the first turn's 2009-token KV (its last output token has none yet) to the store
    assert second.loaded_tokens == 2009
    assert second.prefill_tokens == 91
    load = perf.kv_transfer_time_s(MODEL, 2009, f.link)
    compute = perf.prefill_cost(H100, MODEL, 91, 2009).time_s
    assert second.ttft_s == pytest.approx(load + compute + perf.kv_transfer_time_s(MODEL, 2100, f.link))


def _append_prefill_case(chunk: int) -> tuple[float, float]:
    """a decodes 600 tokens; b's second turn prefills 20,000 new tokens on the same (pinned) decoder meanwhile.
    Returns (a's completion, b's second-turn TTFT)."""
    a = one("a", 0.0, (1000, 1000, 600, 0.0))
    b = one("b", 0.0, (500, 500, 2, 0.0), (20_502, 20_000, 2, 0.3))
    result = simulate(fleet(chunk=chunk), Workload("t", (a, b), signals=Signals(True)), make_policy("conserve@decoder"))
    first, second = result.conversations
    assert second.turns[1].prefill_instance == ""
    assert second.turns[1].prefill_tokens == 20_001
    assert first.turns[0].done_s > second.turns[1].first_token_s  # a was decoding during b's prefill
    return first.turns[0].done_s, second.turns[1].ttft_s


def test_chunked_append_prefill_keeps_the_batch_decoding() -> None:
    chunked_done, chunked_ttft = _append_prefill_case(8192)
    whole_done, whole_ttft = _append_prefill_case(10**9)
    # in three chunks the prompt pays two more iteration overheads; meanwhile a's decode steps ride along each
    # iteration (three instead of one), so a finishes two steps sooner, less those overheads
    assert chunked_ttft == pytest.approx(whole_ttft + 2 * OVERHEAD_S, rel=1e-3)
    step = perf.decode_step_time_s(H200, MODEL, 1, 1300)
    assert whole_done - chunked_done == pytest.approx(2 * step - 2 * OVERHEAD_S, rel=0.05)
