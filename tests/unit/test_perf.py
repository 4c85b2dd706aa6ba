"""The performance model against hand-computed values and measured trends; closed-form decode runs vs step sums."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conserve.core import perf
from conserve.core.engine_profiles import PROFILE_NAMES, PROFILES
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


P = perf.CALIBRATED


def test_prefill_time_by_hand() -> None:
    # 1000 new tokens, no cache, llama-3-8b on one H100: compute-bound (dense at the GEMM curve's efficiency,
    # attention at ATTENTION_MFU), plus the per-step overhead; no communication on one GPU.
    dense = 2 * 8.03e9 * 1000
    attention = 4 * 32 * 4096 * 1000 * 500
    assert perf.prefill_flops(LLAMA8, 1000) == pytest.approx(dense + attention)
    compute = dense / (989e12 * P.gemm_mfu(1000)) + attention / (989e12 * P.attention_mfu)
    assert compute > 16.06e9 / (3.35e12 * P.decode_mbu)  # the weights' read is hidden under compute
    assert perf.prefill_cost(H100, LLAMA8, 1000).time_s == pytest.approx(compute + P.prefill_step_overhead_s)
    assert perf.prefill_cost(H100, LLAMA8, 0).time_s == 0.0
    # a chunk with cached context: attention over the cache grows, the dense part does not
    chunk = perf.prefill_cost(H100, LLAMA8, 100, 5000).time_s
    attention_chunk = 4 * 32 * 4096 * 100 * (5000 + 50)
    dense_chunk = 2 * 8.03e9 * 100
    expected = dense_chunk / (989e12 * P.gemm_mfu(100)) + attention_chunk / (989e12 * P.attention_mfu)
    memory = (16.06e9 + 131072 * 5000) / (3.35e12 * P.decode_mbu)
    assert chunk == pytest.approx(max(expected, memory) + P.prefill_step_overhead_s)


def test_short_prefill_has_a_floor() -> None:
    # The finding: a 128-token prefill of a 70B model on H100 x 8 measured 48-81 ms, the old model
    # said 4.5 ms. Weights' read, the per-step overhead and 160 all-reduces now bound it from below.
    h100x8 = Device(CATALOG["H100"], 8)
    assert perf.prefill_cost(h100x8, LLAMA70, 128).time_s > 0.02


def test_decode_step_memory_bound_by_hand() -> None:
    # batch 16, 16 x 2048 tokens of context on an H200: weights 16.06 GB + KV 32768 x 131072 B, at the MBU.
    memory = (8.03e9 * 2 + 131072 * 32768) / (4.8e12 * P.decode_mbu)
    fixed = P.decode_step_overhead_s + 16 * P.decode_per_sequence_s
    assert perf.decode_step_time_s(H200, LLAMA8, 16, 32768) == pytest.approx(memory + fixed)
    assert perf.decode_step_time_s(H200, LLAMA8, 0, 0) == 0.0
    step = memory + fixed
    # power follows the work: the bytes read and the FLOPs done, each as seconds at the GPU's peak
    work = P.memory_power_weight * (8.03e9 * 2 + 131072 * 32768) / 4.8e12
    work += P.compute_power_weight * (2 * 8.03e9 * 16 + 4 * 32 * 4096 * 32768) / 989e12
    activity = perf.decode_step_activity(H200, LLAMA8, 16, 32768)
    assert activity == pytest.approx(min(work / step, 1.0))


def test_tensor_parallel_pays_for_communication() -> None:
    # Measured decode (vLLM 2023, Splitwise) speeds up about 1.2x from TP 2 to TP 8; linear scaling would be 4x.
    vllm_2023 = PROFILES["vllm-2023"].params
    tp2, tp8 = Device(CATALOG["A100"], 2, params=vllm_2023), Device(CATALOG["A100"], 8, params=vllm_2023)
    speedup = perf.decode_step_time_s(tp2, LLAMA70, 1, 600) / perf.decode_step_time_s(tp8, LLAMA70, 1, 600)
    assert 1.0 < speedup < 2.0
    # the all-reduce is a ring: zero on one GPU, and slower over PCIe than over NVLink
    assert perf.allreduce_time_s(Device(CATALOG["A100"]), 1e6) == 0.0
    nvlink = Device(CATALOG["A100"], 4)
    pcie = Device(CATALOG["A100"], 4, tp_link=perf.LINKS["pcie"])
    assert perf.allreduce_time_s(pcie, 16e6) > 5 * perf.allreduce_time_s(nvlink, 16e6)
    assert perf.prefill_cost(pcie, LLAMA70, 2048).time_s > perf.prefill_cost(nvlink, LLAMA70, 2048).time_s


def test_decode_step_grows_with_batch() -> None:
    # Measured +7 to +17 ms from batch 1 to 32 on 70B models (vLLM 2023, Splitwise's A100 rows).
    device = Device(CATALOG["A100"], 4, params=PROFILES["vllm-2023"].params)
    growth = perf.decode_step_time_s(device, LLAMA70, 32, 32 * 600) - perf.decode_step_time_s(device, LLAMA70, 1, 600)
    assert 0.005 < growth < 0.03


def test_power_limit_slows_compute_not_memory() -> None:
    capped = Device(CATALOG["H100"], 2, power_limit_w=350.0)
    full = Device(CATALOG["H100"], 2)
    assert capped.clock_scale() == pytest.approx(((350 - 70) / (700 - 70)) ** (1 / 3))
    assert perf.prefill_cost(capped, LLAMA70, 4096).time_s > 1.15 * perf.prefill_cost(full, LLAMA70, 4096).time_s
    assert perf.decode_step_time_s(capped, LLAMA70, 1, 1000) == pytest.approx(
        perf.decode_step_time_s(full, LLAMA70, 1, 1000)
    )
    assert perf.power_w(capped, 1.0) == pytest.approx(700.0)  # two GPUs at their 350 W limit
    assert Device(CATALOG["H100"], power_limit_w=900.0).clock_scale() == 1.0  # above TDP: no effect


def test_power_by_hand() -> None:
    assert perf.power_w(H100, 0.0) == pytest.approx(70.0)
    assert perf.power_w(H100, 1.0) == pytest.approx(700.0)
    assert perf.power_w(H100, 0.5) == pytest.approx(385.0)
    assert perf.power_w(Device(CATALOG["H100"], 2), 2.0) == pytest.approx(1400.0)  # clipped at TDP
    # a prefill draws more than a decode step, and no more than TDP
    prefill = perf.prefill_power_w(H100, LLAMA8, 4096)
    assert perf.power_w(H100, perf.decode_step_activity(H100, LLAMA8, 1, 1000)) < prefill <= 700.0


def test_kv_bytes_per_gpu_split_over_tensor_parallel() -> None:
    assert LLAMA70.kv_bytes_per_token_per_gpu(1) == LLAMA70.kv_bytes_per_token
    assert LLAMA70.kv_bytes_per_token_per_gpu(4) == LLAMA70.kv_bytes_per_token // 4
    # 8 KV heads over 16 GPUs: each keeps one head (replicated), not half of one
    assert LLAMA70.kv_bytes_per_token_per_gpu(16) == LLAMA70.kv_bytes_per_token // 8


def test_kv_transfer_by_hand() -> None:
    link = perf.LINKS["rdma"]
    assert perf.kv_transfer_time_s(LLAMA8, 10_000, link) == pytest.approx(50e-6 + 10_000 * 131072 / 100e9)
    assert perf.kv_transfer_time_s(LLAMA8, 0, link) == 0.0
    assert perf.LINKS["nvlink"].bandwidth_bytes_per_s > perf.LINKS["rdma"].bandwidth_bytes_per_s
    assert perf.LINKS["rdma"].bandwidth_bytes_per_s > perf.LINKS["tcp"].bandwidth_bytes_per_s


def _loop(device: Device, model_name: str, batch: int, context: int, steps: int) -> tuple[float, float]:
    """Time and energy summed step by step (what `DecodeRun` must equal in closed form)."""
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
    run = perf.decode_run(device, MODELS[model], batch, context)
    assert run.time_s(steps) == pytest.approx(t, rel=1e-9)
    assert run.energy_j(steps) == pytest.approx(e, rel=1e-9)


def test_a_run_crosses_the_ridge() -> None:
    # The parametrized case above is only a real check of the crossover if both regimes occur in it.
    device, model = Device(CATALOG["A100"]), MODELS["qwen2.5-32b"]
    t = perf._decode_terms(device, model, 200, 200 * 100)
    assert t.c0 > t.m0
    assert t.c0 + t.c1 * 1999 < t.m0 + t.m1 * 1999


@settings(max_examples=60, deadline=None)
@given(
    gpu=st.sampled_from(sorted(CATALOG)),
    model=st.sampled_from(sorted(MODELS)),
    profile=st.sampled_from(PROFILE_NAMES),
    batch=st.integers(1, 300),
    context_per_seq=st.integers(1, 20000),
    steps=st.integers(0, 300),
)
def test_decode_run_property(gpu: str, model: str, profile: str, batch: int, context_per_seq: int, steps: int) -> None:
    device = Device(CATALOG[gpu], params=PROFILES[profile].params)
    t, e = _loop(device, model, batch, batch * context_per_seq, steps)
    run = perf.decode_run(device, MODELS[model], batch, batch * context_per_seq)
    assert math.isclose(
        run.time_s(steps),
        t,
        rel_tol=1e-9,
        abs_tol=1e-12,
    )
    assert math.isclose(
        run.energy_j(steps),
        e,
        rel_tol=1e-9,
        abs_tol=1e-9,
    )


def test_steps_within_budget() -> None:
    run = perf.decode_run(H200, LLAMA8, 8, 8000)
    total = run.time_s(100)
    assert run.steps_within(100, total) == 100
    assert run.steps_within(100, total * 10) == 100
    assert run.steps_within(100, 0.0) == 0
    k = run.steps_within(100, total / 2)
    assert run.time_s(k) <= total / 2
    assert run.time_s(k + 1) > total / 2


def test_bandwidth_tier_decodes_cheaper_per_token() -> None:
    # Same TDP, more bandwidth: the H200 spends fewer joules per decoded token than the H100.
    assert perf.decode_energy_per_token_j(H200, LLAMA8, 32, 2048) < perf.decode_energy_per_token_j(
        H100, LLAMA8, 32, 2048
    )


def test_decode_power_is_between_idle_and_the_limit() -> None:
    watts = perf.decode_power_w(H200, LLAMA8, 16, 32768)
    assert watts == pytest.approx(perf.power_w(H200, perf.decode_step_activity(H200, LLAMA8, 16, 32768)))
    assert 70.0 < watts < 700.0
