"""The roofline model against hand-computed values, and the closed-form decode runs against step-by-step sums."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve.core import perf
from conserve.core.gpus import CATALOG
from conserve.core.llm import MODELS
from conserve.core.perf import Device

H100 = Device(CATALOG["H100"])
H200 = Device(CATALOG["H200"])
L4 = Device(CATALOG["L4"])
LLAMA8 = MODELS["llama-3-8b"]
LLAMA70 = MODELS["llama-3-70b"]


def test_kv_bytes_per_token_by_hand() -> None:
    # 2 x layers x kv heads x head dim x 2 bytes
    assert LLAMA8.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert LLAMA70.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 320 * 1024
    assert MODELS["qwen2.5-7b"].kv_bytes_per_token == 56 * 1024
    assert MODELS["qwen2.5-32b"].kv_bytes_per_token == 256 * 1024


def test_prefill_time_by_hand() -> None:
    # 1000 new tokens, no cache, llama-3-8b on an H100 at MFU 0.5:
    # dense 2 x 8.03e9 x 1000 = 1.606e13; attention 4 x 32 x 4096 x 1000 x 500 = 2.62144e11.
    flops = 2 * 8.03e9 * 1000 + 4 * 32 * 4096 * 1000 * 500
    assert perf.prefill_flops(LLAMA8, 1000) == pytest.approx(flops)
    assert perf.prefill_time_s(H100, LLAMA8, 1000) == pytest.approx(flops / (989e12 * 0.5))
    assert perf.prefill_time_s(H100, LLAMA8, 0) == 0.0
    # cached context raises the attention part only
    cached = 2 * 8.03e9 * 100 + 4 * 32 * 4096 * 100 * (5000 + 50)
    assert perf.prefill_time_s(H100, LLAMA8, 100, 5000) == pytest.approx(cached / (989e12 * 0.5))


def test_decode_step_memory_bound_by_hand() -> None:
    # batch 16, 16 x 2048 tokens of context on an H200: weights 16.06 GB + KV 32768 x 131072 B, at MBU 0.7.
    bytes_read = 8.03e9 * 2 + 131072 * 32768
    expected = bytes_read / (4.8e12 * 0.7) + 0.002
    assert perf.decode_step_time_s(H200, LLAMA8, 16, 32768) == pytest.approx(expected)
    assert perf.decode_step_time_s(H200, LLAMA8, 0, 0) == 0.0
    # memory-bound: activity is half the memory-busy share
    step = expected
    assert perf.decode_step_activity(H200, LLAMA8, 16, 32768) == pytest.approx(0.5 * (step - 0.002) / step)


def test_power_by_hand() -> None:
    assert perf.power_w(H100, 0.0) == pytest.approx(70.0)
    assert perf.power_w(H100, 1.0) == pytest.approx(700.0)
    assert perf.power_w(H100, 0.5) == pytest.approx(385.0)
    assert perf.power_w(Device(CATALOG["H100"], 2), 2.0) == pytest.approx(1400.0)  # clipped at TDP


def test_kv_transfer_by_hand() -> None:
    link = perf.LINKS["rdma"]
    assert perf.kv_transfer_time_s(LLAMA8, 10_000, link) == pytest.approx(50e-6 + 10_000 * 131072 / 100e9)
    assert perf.kv_transfer_time_s(LLAMA8, 0, link) == 0.0
    assert perf.LINKS["nvlink"].bandwidth_bytes_per_s > perf.LINKS["rdma"].bandwidth_bytes_per_s
    assert perf.LINKS["rdma"].bandwidth_bytes_per_s > perf.LINKS["tcp"].bandwidth_bytes_per_s


def _loop(device: Device, model_name: str, batch: int, context: int, steps: int) -> tuple[float, float]:
    model = MODELS[model_name]
    time_s = energy_j = 0.0
    for j in range(steps):
        step = perf.decode_step_time_s(device, model, batch, context + batch * j)
        time_s += step
        energy_j += perf.power_w(device, perf.decode_step_activity(device, model, batch, context + batch * j)) * step
    return time_s, energy_j


@pytest.mark.parametrize(
    ("gpu", "model", "batch", "context", "steps"),
    [
        ("H100", "llama-3-8b", 1, 100, 50),
        ("H200", "llama-3-8b", 64, 64 * 8000, 300),
        ("L4", "qwen2.5-7b", 256, 256 * 50, 400),  # compute-bound (L4, big batch, short context)
        ("H20", "llama-3-70b", 32, 32 * 30000, 17),
        ("A100", "qwen2.5-32b", 200, 200 * 100, 2000),  # crosses from compute- to memory-bound within the run
    ],
)
def test_decode_run_closed_form_equals_step_sum(gpu: str, model: str, batch: int, context: int, steps: int) -> None:
    device = Device(CATALOG[gpu])
    t, e = _loop(device, model, batch, context, steps)
    assert perf.decode_run_time_s(device, MODELS[model], batch, context, steps) == pytest.approx(t, rel=1e-9)
    assert perf.decode_run_energy_j(device, MODELS[model], batch, context, steps) == pytest.approx(e, rel=1e-9)


def test_a_run_crosses_the_ridge() -> None:
    # The parametrized case above is only a real check of the crossover if both regimes occur in it.
    device, model = Device(CATALOG["A100"]), MODELS["qwen2.5-32b"]
    m0, m1, c0, c1 = perf._decode_affine_terms(device, model, 200, 200 * 100)
    assert c0 > m0 and c0 + c1 * 1999 < m0 + m1 * 1999


@settings(max_examples=60, deadline=None)
@given(
    gpu=st.sampled_from(sorted(CATALOG)),
    model=st.sampled_from(sorted(MODELS)),
    batch=st.integers(1, 300),
    context_per_seq=st.integers(1, 20000),
    steps=st.integers(0, 300),
)
def test_decode_run_property(gpu: str, model: str, batch: int, context_per_seq: int, steps: int) -> None:
    device = Device(CATALOG[gpu])
    t, e = _loop(device, model, batch, batch * context_per_seq, steps)
    assert math.isclose(
        perf.decode_run_time_s(device, MODELS[model], batch, batch * context_per_seq, steps),
        t,
        rel_tol=1e-9,
        abs_tol=1e-12,
    )
    assert math.isclose(
        perf.decode_run_energy_j(device, MODELS[model], batch, batch * context_per_seq, steps),
        e,
        rel_tol=1e-9,
        abs_tol=1e-9,
    )


def test_steps_within_budget() -> None:
    total = perf.decode_run_time_s(H200, LLAMA8, 8, 8000, 100)
    assert perf.decode_steps_within_s(H200, LLAMA8, 8, 8000, 100, total) == 100
    assert perf.decode_steps_within_s(H200, LLAMA8, 8, 8000, 100, total * 10) == 100
    assert perf.decode_steps_within_s(H200, LLAMA8, 8, 8000, 100, 0.0) == 0
    k = perf.decode_steps_within_s(H200, LLAMA8, 8, 8000, 100, total / 2)
    assert perf.decode_run_time_s(H200, LLAMA8, 8, 8000, k) <= total / 2
    assert perf.decode_run_time_s(H200, LLAMA8, 8, 8000, k + 1) > total / 2


def test_bandwidth_tier_decodes_cheaper_per_token() -> None:
    # Same TDP, more bandwidth: the H200 spends fewer joules per decoded token than the H100.
    assert perf.decode_energy_per_token_j(H200, LLAMA8, 32, 2048) < perf.decode_energy_per_token_j(
        H100, LLAMA8, 32, 2048
    )
