"""Roofline performance and power model of LLM serving on one GPU (or a tensor-parallel group).

Prefill is compute-bound: FLOPs = 2 x parameters x new tokens plus attention (4 x layers x hidden x new tokens x
mean context), at a fraction of peak (MFU). A decode step is memory-bound: it reads the weights once plus the KV
of every running sequence, at a fraction of peak bandwidth (MBU); its FLOPs bound it from below as well.

Constants and sources:
- PREFILL_MFU = 0.5: prefill of long prompts on H100 reaches 40-60% of dense bf16 peak in vLLM and SGLang
  published benchmarks; we take the middle.
- DECODE_MBU = 0.7: memory-bandwidth utilization of batched decode reported around 60-80% (e.g. the
  Databricks/MosaicML "LLM inference performance engineering" note).
- DECODE_MFU = 0.5: the compute bound of a large decode batch, as for prefill.
- STEP_OVERHEAD_S = 0.002: per-step scheduling and kernel-launch time of a continuous-batching engine with CUDA
  graphs (vLLM reports a few milliseconds of CPU overhead per step).
- Power: P = idle + (TDP - idle) x activity. Activity is 1.0 for a compute-bound phase at its attainable
  rate (Splitwise, Patel et al. ISCA 2024: prompt phase draws close to TDP) and MEMORY_BOUND_ACTIVITY = 0.5 of
  the dynamic range for a bandwidth-bound phase (Splitwise: the token phase draws well below TDP, about half
  of the dynamic range), weighted by how busy each is.
- KV transfer links: NVLink 4 about 450 GB/s per direction; RDMA measured 87-190 GB/s (we take 100 GB/s);
  TCP several times slower (we take 12.5 GB/s, a 100 Gb/s NIC). A fixed setup latency per transfer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from conserve.core.gpus import GpuSpec
from conserve.core.llm import ModelShape

PREFILL_MFU = 0.5
DECODE_MBU = 0.7
DECODE_MFU = 0.5
STEP_OVERHEAD_S = 0.002
MEMORY_BOUND_ACTIVITY = 0.5


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    bandwidth_bytes_per_s: float
    setup_latency_s: float


LINKS: Mapping[str, Link] = {
    "nvlink": Link("nvlink", 450e9, 20e-6),
    "rdma": Link("rdma", 100e9, 50e-6),
    "tcp": Link("tcp", 12.5e9, 1e-3),
}


@dataclass(frozen=True, slots=True)
class Device:
    """A serving instance: a GPU product times a tensor-parallel degree."""

    gpu: GpuSpec
    gpu_count: int = 1

    @property
    def flops_per_s(self) -> float:
        return self.gpu.bf16_flops_per_s * self.gpu_count

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.gpu.memory_bandwidth_bytes_per_s * self.gpu_count

    @property
    def tdp_w(self) -> float:
        return self.gpu.tdp_w * self.gpu_count

    @property
    def idle_power_w(self) -> float:
        return self.gpu.idle_power_w * self.gpu_count


def prefill_flops(model: ModelShape, new_tokens: int, cached_context_tokens: int = 0) -> float:
    """Dense FLOPs plus causal attention over the cached context and the new tokens themselves."""
    dense = 2.0 * model.parameters * new_tokens
    mean_context = cached_context_tokens + new_tokens / 2.0
    attention = 4.0 * model.layers * model.hidden_size * new_tokens * mean_context
    return dense + attention


def prefill_time_s(device: Device, model: ModelShape, new_tokens: int, cached_context_tokens: int = 0) -> float:
    if new_tokens <= 0:
        return 0.0
    return prefill_flops(model, new_tokens, cached_context_tokens) / (device.flops_per_s * PREFILL_MFU)


def decode_step_time_s(device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int) -> float:
    """One decode iteration producing one token for each of `batch_size` sequences.

    `batch_context_tokens` is the sum of the context lengths of the running sequences (the KV to read).
    """
    if batch_size <= 0:
        return 0.0
    bytes_read = model.weight_bytes + model.kv_bytes_per_token * batch_context_tokens
    memory_time = bytes_read / (device.bandwidth_bytes_per_s * DECODE_MBU)
    flops = 2.0 * model.parameters * batch_size + 4.0 * model.layers * model.hidden_size * batch_context_tokens
    compute_time = flops / (device.flops_per_s * DECODE_MFU)
    return max(memory_time, compute_time) + STEP_OVERHEAD_S


def decode_step_activity(device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int) -> float:
    """Activity in [0, 1] of the power model during a decode step (bandwidth-bound share at 0.5)."""
    if batch_size <= 0:
        return 0.0
    step = decode_step_time_s(device, model, batch_size, batch_context_tokens)
    flops = 2.0 * model.parameters * batch_size + 4.0 * model.layers * model.hidden_size * batch_context_tokens
    compute_busy = min(flops / (device.flops_per_s * DECODE_MFU) / step, 1.0)
    bytes_read = model.weight_bytes + model.kv_bytes_per_token * batch_context_tokens
    memory_busy = min(bytes_read / (device.bandwidth_bytes_per_s * DECODE_MBU) / step, 1.0)
    return min(max(compute_busy, MEMORY_BOUND_ACTIVITY * memory_busy), 1.0)


#: Activity of a prefill at its attainable rate: compute-bound, close to TDP.
PREFILL_ACTIVITY = 1.0


def power_w(device: Device, activity: float) -> float:
    """Board power at an activity level in [0, 1]: idle plus the dynamic range times activity."""
    clipped = min(max(activity, 0.0), 1.0)
    return device.idle_power_w + (device.tdp_w - device.idle_power_w) * clipped


def kv_transfer_time_s(model: ModelShape, tokens: int, link: Link) -> float:
    if tokens <= 0:
        return 0.0
    return link.setup_latency_s + model.kv_bytes_per_token * tokens / link.bandwidth_bytes_per_s


def decode_energy_per_token_j(device: Device, model: ModelShape, batch_size: int, mean_context_tokens: int) -> float:
    """Modelled joules per output token of a decode batch at steady state (a scorer's prior)."""
    if batch_size <= 0:
        return 0.0
    context = batch_size * mean_context_tokens
    step = decode_step_time_s(device, model, batch_size, context)
    watts = power_w(device, decode_step_activity(device, model, batch_size, context))
    return watts * step / batch_size


def prefill_energy_per_token_j(device: Device, model: ModelShape, tokens: int) -> float:
    if tokens <= 0:
        return 0.0
    return power_w(device, PREFILL_ACTIVITY) * prefill_time_s(device, model, tokens) / tokens


# --- runs of decode steps in closed form (the simulator advances a fixed batch many steps at once) ---------
#
# While a batch does not change, every step adds one token to each of its `batch_size` sequences, so the
# context read by step j is C + b x j: both the memory time and the compute time of step j are affine in j, and
# a step's time (their max plus the overhead) and its energy (idle x time plus the dynamic range times
# max(compute time, MEMORY_BOUND_ACTIVITY x memory time), which is what `decode_step_activity` x step time
# reduces to) are maxima of affine functions. Their sums over a run are exact in closed form: the results
# equal summing `decode_step_time_s` and `power_w(decode_step_activity(...)) x decode_step_time_s` step by step.


def _decode_affine_terms(
    device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int
) -> tuple[float, float, float, float]:
    """(memory time at step 0, its slope per step, compute time at step 0, its slope per step)."""
    bandwidth = device.bandwidth_bytes_per_s * DECODE_MBU
    flops = device.flops_per_s * DECODE_MFU
    memory0 = (model.weight_bytes + model.kv_bytes_per_token * batch_context_tokens) / bandwidth
    memory1 = model.kv_bytes_per_token * batch_size / bandwidth
    attention_per_token = 4.0 * model.layers * model.hidden_size
    compute0 = (2.0 * model.parameters * batch_size + attention_per_token * batch_context_tokens) / flops
    compute1 = attention_per_token * batch_size / flops
    return memory0, memory1, compute0, compute1


def _sum_affine(x0: float, x1: float, lo: int, hi: int) -> float:
    n = hi - lo
    return 0.0 if n <= 0 else n * x0 + x1 * (lo + hi - 1) * n / 2.0


def _sum_max_affine(a0: float, a1: float, b0: float, b1: float, n: int) -> float:
    """Sum over j in [0, n) of max(a0 + a1 j, b0 + b1 j)."""
    if n <= 0:
        return 0.0
    d0, d1 = a0 - b0, a1 - b1
    if d1 == 0.0:
        return _sum_affine(a0, a1, 0, n) if d0 >= 0 else _sum_affine(b0, b1, 0, n)
    root = -d0 / d1
    if d1 > 0:  # a dominates from the root on
        k = min(max(math.ceil(root), 0), n)
        return _sum_affine(b0, b1, 0, k) + _sum_affine(a0, a1, k, n)
    k = min(max(math.floor(root) + 1, 0), n)  # a dominates up to the root
    return _sum_affine(a0, a1, 0, k) + _sum_affine(b0, b1, k, n)


def decode_run_time_s(
    device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int, steps: int
) -> float:
    """Time of `steps` decode steps of a fixed batch whose context starts at `batch_context_tokens`."""
    if batch_size <= 0 or steps <= 0:
        return 0.0
    m0, m1, c0, c1 = _decode_affine_terms(device, model, batch_size, batch_context_tokens)
    return _sum_max_affine(m0, m1, c0, c1, steps) + STEP_OVERHEAD_S * steps


def decode_run_energy_j(
    device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int, steps: int
) -> float:
    """Energy (idle included) of `steps` decode steps of a fixed batch, as `power_w` x step time summed."""
    if batch_size <= 0 or steps <= 0:
        return 0.0
    m0, m1, c0, c1 = _decode_affine_terms(device, model, batch_size, batch_context_tokens)
    busy = _sum_max_affine(c0, c1, MEMORY_BOUND_ACTIVITY * m0, MEMORY_BOUND_ACTIVITY * m1, steps)
    total = decode_run_time_s(device, model, batch_size, batch_context_tokens, steps)
    return device.idle_power_w * total + (device.tdp_w - device.idle_power_w) * busy


def decode_steps_within_s(
    device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int, max_steps: int, budget_s: float
) -> int:
    """The most steps (at most `max_steps`) of a fixed batch that complete within `budget_s` seconds."""
    if batch_size <= 0 or max_steps <= 0 or budget_s <= 0:
        return 0
    low, high = 0, max_steps
    while low < high:
        mid = (low + high + 1) // 2
        if decode_run_time_s(device, model, batch_size, batch_context_tokens, mid) <= budget_s:
            low = mid
        else:
            high = mid - 1
    return low
