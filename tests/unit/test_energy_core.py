"""Energy arithmetic: counter deltas (reset, wrap, missing, clamp) and the attribution rule's conservation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve.core.energy import (
    NVML_ENERGY_COUNTER_WRAP_MJ,
    ConversationWork,
    DeltaKind,
    DeviceInterval,
    GpuSample,
    RateWindow,
    TierEnergy,
    attribute_interval,
    counter_delta_mj,
    energy_per_token_j,
    gpu_interval,
)

WRAP = NVML_ENERGY_COUNTER_WRAP_MJ


@pytest.mark.parametrize(
    ("previous", "current", "bound", "energy_mj", "kind"),
    [
        (None, 100.0, None, 0.0, DeltaKind.FIRST),
        (100.0, None, None, 0.0, DeltaKind.MISSING),
        (100.0, float("nan"), None, 0.0, DeltaKind.MISSING),
        (100.0, 350.0, None, 250.0, DeltaKind.NORMAL),
        (100.0, 100.0, None, 0.0, DeltaKind.NORMAL),
        (WRAP - 500, 300.0, None, 800.0, DeltaKind.WRAP),  # 64-bit wrap
        (WRAP - 500, 300.0, 1000.0, 800.0, DeltaKind.WRAP),
        (10_000_000.0, 200.0, None, 200.0, DeltaKind.RESET),  # driver reload: energy since the reset
        (10_000_000.0, 200.0, 100.0, 100.0, DeltaKind.CLAMPED),
        (100.0, 1e12, 5000.0, 5000.0, DeltaKind.CLAMPED),  # a jump no board can draw
    ],
)
def test_counter_delta(
    previous: float | None, current: float | None, bound: float | None, energy_mj: float, kind: DeltaKind
) -> None:
    delta = counter_delta_mj(previous, current, max_delta_mj=bound)
    assert delta.energy_mj == pytest.approx(energy_mj)
    assert delta.kind is kind


def test_small_counter_wrap_needs_a_plausible_bound() -> None:
    # A 32-bit counter: from near the top to near zero is a wrap only if the board could draw that much.
    assert counter_delta_mj(2**32 - 10, 20, wrap_mj=2**32, max_delta_mj=100).kind is DeltaKind.WRAP
    reset = counter_delta_mj(2**31, 20, wrap_mj=2**32, max_delta_mj=100)
    assert (reset.kind, reset.energy_mj) == (DeltaKind.RESET, 20)


@given(
    previous=st.one_of(st.none(), st.floats(0, 2**64, allow_nan=False)),
    current=st.one_of(st.none(), st.floats(0, 2**64, allow_nan=False)),
    bound=st.one_of(st.none(), st.floats(0, 1e9)),
)
def test_counter_delta_is_never_negative_and_respects_the_bound(
    previous: float | None, current: float | None, bound: float | None
) -> None:
    delta = counter_delta_mj(previous, current, max_delta_mj=bound)
    assert delta.energy_mj >= 0
    if bound is not None:
        assert delta.energy_mj <= bound


def test_missing_samples_keep_the_baseline_and_the_gap_is_counted_once() -> None:
    baseline, interval = gpu_interval(None, GpuSample(0.0, 1_000_000.0, 100.0))
    assert interval is None
    baseline, interval = gpu_interval(baseline, GpuSample(1.0, None, None))  # scrape failed
    assert interval is None
    assert baseline is not None
    assert baseline.time_s == 0.0
    baseline, interval = gpu_interval(baseline, GpuSample(3.0, 1_600_000.0, 300.0), max_power_w=700)
    assert interval is not None
    assert interval.energy_j == pytest.approx(600.0)
    assert (interval.start_s, interval.end_s) == (0.0, 3.0)
    assert interval.mean_power_w == pytest.approx(200.0)
    # The same sample again (two endpoints, or a retry) counts nothing.
    again, none = gpu_interval(baseline, GpuSample(3.0, 1_600_000.0, 300.0))
    assert none is None
    assert again == baseline


def test_a_reset_then_normal_counting() -> None:
    samples = [
        GpuSample(0, 5e9, 100),
        GpuSample(10, 5e9 + 1e6, 100),
        GpuSample(20, 4e5, 100),
        GpuSample(30, 1.4e6, 100),
    ]
    baseline, total_j, kinds = None, 0.0, []
    for sample in samples:
        baseline, interval = gpu_interval(baseline, sample, max_power_w=700)
        if interval:
            total_j += interval.energy_j
            kinds.append(interval.kind)
    assert kinds == [DeltaKind.NORMAL, DeltaKind.RESET, DeltaKind.NORMAL]
    assert total_j == pytest.approx(1000 + 400 + 1000)


def test_power_integration_when_there_is_no_counter() -> None:
    baseline, _ = gpu_interval(None, GpuSample(0.0, None, 100.0))
    _, interval = gpu_interval(baseline, GpuSample(2.0, None, 300.0))
    assert interval is not None
    assert interval.kind is DeltaKind.POWER
    assert interval.energy_j == pytest.approx(400.0)  # trapezoid: (100 + 300) / 2 x 2 s


def test_attribution_rule_by_hand() -> None:
    # 10 s at 50 W idle: 500 J idle, 500 J dynamic.
    device = DeviceInterval(energy_j=1000.0, duration_s=10.0, idle_power_w=50.0, capacity_kv_tokens=1000)
    work = [ConversationWork("ns/a", tokens=300, kv_tokens=200), ConversationWork("ns/b", tokens=100, kv_tokens=300)]
    result = attribute_interval(device, work)
    assert result.idle_j == pytest.approx(500.0)
    assert result.dynamic_j == pytest.approx(500.0)
    # dynamic by tokens (3:1), idle by KV share of capacity (0.2, 0.3), half the capacity unheld.
    assert result.per_conversation_j["ns/a"] == pytest.approx(375.0 + 100.0)
    assert result.per_conversation_j["ns/b"] == pytest.approx(125.0 + 150.0)
    assert result.unattributed_j == pytest.approx(250.0)


def test_no_work_puts_dynamic_energy_on_kv_holders() -> None:
    device = DeviceInterval(energy_j=200.0, duration_s=1.0, idle_power_w=100.0, capacity_kv_tokens=100)
    result = attribute_interval(device, [ConversationWork("ns/a", tokens=0, kv_tokens=50)])
    assert result.per_conversation_j == {"ns/a": pytest.approx(100.0)}
    assert result.unattributed_j == pytest.approx(100.0)


def test_an_empty_device_is_all_unattributed() -> None:
    result = attribute_interval(DeviceInterval(energy_j=70.0, duration_s=1.0, idle_power_w=70.0), [])
    assert result.per_conversation_j == {}
    assert result.unattributed_j == 70.0


works = st.lists(
    st.builds(
        ConversationWork,
        key=st.sampled_from([f"ns/c{i}" for i in range(6)]),
        tokens=st.integers(0, 100_000),
        kv_tokens=st.integers(0, 200_000),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    energy_j=st.floats(0, 1e7, allow_nan=False),
    duration_s=st.floats(0, 3600, allow_nan=False),
    idle_power_w=st.floats(0, 2000, allow_nan=False),
    capacity=st.integers(0, 500_000),
    work=works,
)
def test_conservation_invariant(
    energy_j: float, duration_s: float, idle_power_w: float, capacity: int, work: list[ConversationWork]
) -> None:
    result = attribute_interval(DeviceInterval(energy_j, duration_s, idle_power_w, capacity), work)
    assert all(j >= 0 for j in result.per_conversation_j.values())
    assert result.unattributed_j >= 0
    assert math.isclose(result.attributed_j + result.unattributed_j, energy_j, rel_tol=1e-9, abs_tol=1e-9)
    assert set(result.per_conversation_j) <= {w.key for w in work}


@settings(max_examples=100, deadline=None)
@given(counters=st.lists(st.one_of(st.none(), st.integers(0, 2**64 - 1).map(float)), min_size=2, max_size=30))
def test_a_counter_sequence_never_sums_to_more_than_the_board_can_draw(counters: list[float | None]) -> None:
    baseline, total_j = None, 0.0
    for step, energy_mj in enumerate(counters):
        baseline, interval = gpu_interval(baseline, GpuSample(float(step), energy_mj, None), max_power_w=700)
        if interval:
            assert interval.energy_j >= 0
            total_j += interval.energy_j
    assert total_j <= 700 * 1.5 * len(counters) + 1e-6


def test_energy_per_token_and_windows() -> None:
    assert energy_per_token_j(10.0, 0) is None
    assert energy_per_token_j(None, 5) is None
    assert energy_per_token_j(10.0, 4) == 2.5
    window = RateWindow(decay=0.5).add(100.0, 100).add(300.0, 100)
    # (100 x 0.5 + 300) / (100 x 0.5 + 100)
    assert window.energy_per_token_j == pytest.approx(350.0 / 150.0)
    tiers = TierEnergy().add("bandwidth", 50.0, 100).add("compute", 10.0, 0)
    assert tiers.energy_per_token_j() == {"bandwidth": pytest.approx(0.5)}
