"""The idle-KV offload rules (`conserve.core.offload`) and the ledger's resident/offloaded accounting."""

from __future__ import annotations

import pytest

from conserve.core.ledger import CapacityLedger
from conserve.core.llm import MODELS
from conserve.core.offload import (
    HOST_KV_BYTES_PER_GPU,
    DecoderOffloadView,
    IdleKv,
    choose_offload_victims,
    host_kv_capacity_tokens,
    pcie_transfer_time_s,
    plan_placement_offload,
)
from conserve.core.placement import DecoderState

LLAMA8 = MODELS["llama-3-8b"]


def test_constants_and_capacity() -> None:
    assert int(HOST_KV_BYTES_PER_GPU) == 125_000_000_000  # half of 2 TB over 8 GPUs
    # Llama-3-8B: 128 KiB per token -> 125e9 / 131072 tokens per GPU.
    assert host_kv_capacity_tokens(LLAMA8, 1) == int(125e9 // 131072)
    assert host_kv_capacity_tokens(LLAMA8, 2) == 2 * int(125e9 // 131072)
    # Llama-3-70B: 320 KiB per token; per GPU first, in whole tokens (as the scheduler's settings size it).
    assert host_kv_capacity_tokens(MODELS["llama-3-70b"], 4) == 4 * int(125e9 // 327680) < int(500e9 // 327680)
    assert host_kv_capacity_tokens(LLAMA8, 1, 0.0) == 0


def test_pcie_time_hand_computed() -> None:
    # 10,000 tokens x 131,072 B = 1.31072 GB at 50 GB/s = 26.2144 ms.
    assert pcie_transfer_time_s(LLAMA8, 10_000) == pytest.approx(0.0262144)
    assert pcie_transfer_time_s(LLAMA8, 0) == 0.0


@pytest.mark.parametrize(
    ("need", "host_free", "now", "expected"),
    [
        (0, 10**6, 100.0, ()),  # nothing needed
        (100, 10**6, 100.0, ("old",)),  # least recently active first
        (250, 10**6, 100.0, ("old", "mid")),
        (100, 150, 100.0, ("mid",)),  # "old" (200 host tokens) does not fit the host: skipped
        (100, 10**6, 10.5, ("mid",)),  # "old" not written back yet at t=10.5
        (10_000, 10**6, 100.0, ()),  # cannot free enough: all or nothing
    ],
)
def test_choose_offload_victims(need: int, host_free: int, now: float, expected: tuple[str, ...]) -> None:
    candidates = [
        IdleKv("new", 300, 300, last_active_s=30.0, ready_s=30.1),
        IdleKv("old", 200, 200, last_active_s=1.0, ready_s=11.0),
        IdleKv("mid", 100, 100, last_active_s=5.0, ready_s=5.1),
    ]
    assert choose_offload_victims(candidates, need, host_free, now) == expected


def test_plan_placement_offload_least_disruption() -> None:
    a = DecoderOffloadView("a", 1000, 950, 10**6, (IdleKv("a1", 400, 400, 1.0),))
    b = DecoderOffloadView("b", 1000, 950, 10**6, (IdleKv("b1", 200, 200, 2.0), IdleKv("b2", 500, 500, 3.0)))
    plan = plan_placement_offload([a, b], 150, 0.0, 10.0)
    assert plan is not None
    assert plan.decoder == "b"
    assert plan.victims == ("b1",)
    assert plan.freed_kv_tokens == 200
    # Headroom counts: 5% of 1000 = 50 more needed -> b1 (200) still suffices on b.
    plan = plan_placement_offload([a, b], 150, 0.05, 10.0)
    assert plan is not None
    assert plan.victims == ("b1",)
    assert plan_placement_offload([a, b], 5000, 0.0, 10.0) is None
    # A decoder with room needs no offload.
    c = DecoderOffloadView("c", 1000, 0, 0, ())
    plan = plan_placement_offload([a, c], 150, 0.0, 10.0)
    assert plan is not None
    assert plan.decoder == "c"
    assert plan.victims == ()
    # Not ready decoders are skipped.
    assert plan_placement_offload([DecoderOffloadView("d", 1000, 0, 0, (), ready=False)], 10, 0.0, 0.0) is None


def test_plan_is_pure_and_deterministic() -> None:
    views = [DecoderOffloadView(n, 1000, 990, 10**6, (IdleKv(f"{n}1", 100, 100, 1.0),)) for n in ("z", "y", "x")]
    plans = {plan_placement_offload(views, 50, 0.0, 5.0) for _ in range(3)}
    assert len(plans) == 1
    plan = next(iter(plans))
    assert plan is not None
    assert plan.decoder == "x"


def test_ledger_offloaded_holdings_free_gpu_capacity() -> None:
    ledger = CapacityLedger()
    ledger.upsert_decoder(DecoderState("d", capacity_kv_tokens=1000))
    ledger.reserve("c1", "d", 600, live_kv_tokens=500)
    assert ledger.reserved_on("d") == 600
    assert ledger.set_offloaded("c1", True)
    assert ledger.is_offloaded("c1")
    assert ledger.reserved_on("d") == 0
    assert ledger.offloaded_on("d") == 500
    snap = ledger.snapshot()[0]
    assert snap.reserved_kv_tokens == 0
    assert snap.pinned_conversations == 1
    assert snap.free_kv_tokens == 1000
    ledger.reserve("c2", "d", 900)  # fits now that c1 is in host memory
    assert ledger.try_extend("c1", 700)  # host-resident: no GPU check
    ledger.set_offloaded("c1", False)  # back on the GPU: like adopt, may oversubscribe until the caller made room
    assert ledger.reserved_on("d") == 1600
    assert not ledger.is_offloaded("c1")
    assert not ledger.set_offloaded("nobody", True)
    assert ledger.release("c1")
    assert ledger.reserved_on("d") == 900
