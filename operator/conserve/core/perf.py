"""Performance and power model of LLM serving on one GPU or a tensor-parallel group, calibrated on measurements.

A step's time on each of the group's `n` GPUs is a roofline plus fixed costs:

    step = overhead + max(compute, memory) + communication

- compute: dense FLOPs (2 x parameters x tokens / n) at a GEMM efficiency that grows with the tokens in the step
  (`gemm_mfu(tokens) = GEMM_MFU_MAX x tokens / (tokens + GEMM_HALF_TOKENS)`, a fitted curve), plus attention
  FLOPs (growing with context) at ATTENTION_MFU; both at the clock a power limit allows.
- memory: the weights' share of one GPU, plus the KV it holds for the context, at DECODE_MBU of HBM bandwidth.
- communication: two all-reduces per layer (after attention and after the MLP) of tokens x hidden x bytes over
  the group's link: ring all-reduce = 2 (n - 1) hops of ALLREDUCE_HOP_LATENCY_S plus 2 (n - 1) / n x bytes at
  ALLREDUCE_LINK_EFFICIENCY of the link's per-direction bandwidth.
- overhead: per step (PREFILL_STEP_OVERHEAD_S, DECODE_STEP_OVERHEAD_S) plus DECODE_PER_SEQUENCE_S per running
  sequence (scheduling, sampling, per-sequence kernels of the engine).

Power limits: dynamic power goes with f x V^2 and voltage with frequency on the DVFS curve, so a limit scales
the clock by ((limit - idle) / (TDP - idle)) ^ (1/3) (CLOCK_POWER_EXPONENT): compute-bound work slows, HBM
bandwidth does not. Power: idle + (the limit - idle) x activity, activity = max(compute busy share,
MEMORY_BOUND_ACTIVITY x memory busy share) of the step; communication and overheads draw idle power.

Sources: the fitted constants (`CALIBRATED`) come from `conserve perf-model fit` on Splitwise's published vLLM
profiles (operator/conserve/perfmodel/data/splitwise.csv, MIT, see that folder's README); the held-out check
is NVIDIA TensorRT-LLM's published A100 tables (never used in the fit). ALLREDUCE_LINK_EFFICIENCY = 0.7: NCCL's
nccl-tests report all-reduce bus bandwidth around 70-80% of the NVLink peak. KV transfer links: NVLink 4 about
450 GB/s per direction; RDMA measured 87-190 GB/s (we take 100 GB/s); PCIe Gen4 x16 32 GB/s per direction
(PCI-SIG; about 25 GB/s achieved); TCP on a 100 Gb/s NIC 12.5 GB/s. A fixed setup latency per transfer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from conserve.core.gpus import GpuSpec
from conserve.core.llm import ModelShape


@dataclass(frozen=True, slots=True)
class PerfParams:
    """The model's calibration constants (units in names). `CALIBRATED` holds the fitted values."""

    prefill_step_overhead_s: float
    decode_step_overhead_s: float
    decode_per_sequence_s: float
    gemm_mfu_max: float
    gemm_half_tokens: float
    attention_mfu: float
    decode_mbu: float
    allreduce_hop_latency_s: float
    memory_bound_activity: float
    allreduce_link_efficiency: float = 0.7  # nccl-tests bus bandwidth vs NVLink peak (see module docstring)
    clock_power_exponent: float = 1.0 / 3.0  # P_dynamic ~ f^3 on the DVFS curve (see module docstring)

    def gemm_mfu(self, tokens: float) -> float:
        return self.gemm_mfu_max * tokens / (tokens + self.gemm_half_tokens)


#: Fitted by `conserve perf-model fit` on data/splitwise.csv (152 configurations, vLLM on A100/H100 x 2, 4, 8).
CALIBRATED = PerfParams(
    prefill_step_overhead_s=0.010442,
    decode_step_overhead_s=0.0093908,
    decode_per_sequence_s=0.000335722,
    gemm_mfu_max=0.499715,
    gemm_half_tokens=1.0,
    attention_mfu=0.380089,
    decode_mbu=0.767348,
    allreduce_hop_latency_s=6.33756e-06,
    memory_bound_activity=1.0,
)


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    bandwidth_bytes_per_s: float
    setup_latency_s: float


LINKS: Mapping[str, Link] = {
    "nvlink": Link("nvlink", 450e9, 20e-6),
    "rdma": Link("rdma", 100e9, 50e-6),
    "pcie": Link("pcie", 25e9, 20e-6),
    "tcp": Link("tcp", 12.5e9, 1e-3),
}


@dataclass(frozen=True, slots=True)
class Device:
    """A serving instance: a GPU product times a tensor-parallel degree, over a link, under a power limit.

    `tp_link` is the link between the group's GPUs (default: the product's own, NVLink or PCIe);
    `power_limit_w` is per GPU (default: TDP).
    """

    gpu: GpuSpec
    gpu_count: int = 1
    tp_link: Link | None = None
    power_limit_w: float | None = None

    @property
    def idle_power_w(self) -> float:
        return self.gpu.idle_power_w * self.gpu_count

    @property
    def max_power_w(self) -> float:
        """The most the group draws: its power limit, or TDP."""
        limit = self.gpu.tdp_w if self.power_limit_w is None else min(self.power_limit_w, self.gpu.tdp_w)
        return max(limit, self.gpu.idle_power_w) * self.gpu_count

    @property
    def link(self) -> Link:
        if self.tp_link is not None:
            return self.tp_link
        return Link(self.gpu.tp_link, self.gpu.tp_link_bytes_per_s, 0.0)

    def clock_scale(self, params: PerfParams = CALIBRATED) -> float:
        """The fraction of the full clock a power limit leaves (1.0 without one)."""
        if self.power_limit_w is None or self.power_limit_w >= self.gpu.tdp_w:
            return 1.0
        dynamic = (self.power_limit_w - self.gpu.idle_power_w) / (self.gpu.tdp_w - self.gpu.idle_power_w)
        return float(max(dynamic, 1e-3) ** params.clock_power_exponent)


@dataclass(frozen=True, slots=True)
class StepCost:
    """One step on one GPU of the group, split by what bounds it (seconds)."""

    compute_s: float
    memory_s: float
    communication_s: float
    overhead_s: float
    busy_activity_s: float = field(default=0.0)

    @property
    def time_s(self) -> float:
        return self.overhead_s + max(self.compute_s, self.memory_s) + self.communication_s

    @property
    def activity(self) -> float:
        """Activity in [0, 1] of the power model over the step (communication and overheads draw idle power)."""
        return min(self.busy_activity_s / self.time_s, 1.0) if self.time_s > 0 else 0.0


def allreduce_time_s(device: Device, message_bytes: float, params: PerfParams = CALIBRATED) -> float:
    """One ring all-reduce of `message_bytes` over the group's link (zero on one GPU)."""
    n = device.gpu_count
    if n <= 1:
        return 0.0
    bandwidth = device.link.bandwidth_bytes_per_s * params.allreduce_link_efficiency
    return 2 * (n - 1) * params.allreduce_hop_latency_s + 2.0 * (n - 1) / n * message_bytes / bandwidth


def _communication_s(device: Device, model: ModelShape, tokens: int, params: PerfParams) -> float:
    message = tokens * model.hidden_size * model.bytes_per_element
    return 2 * model.layers * allreduce_time_s(device, message, params)


def _attention_flops(model: ModelShape, new_tokens: float, mean_context_tokens: float) -> float:
    return 4.0 * model.layers * model.hidden_size * new_tokens * mean_context_tokens


def prefill_flops(model: ModelShape, new_tokens: int, cached_context_tokens: int = 0) -> float:
    """Dense FLOPs plus causal attention over the cached context and the new tokens themselves."""
    dense = 2.0 * model.parameters * new_tokens
    return dense + _attention_flops(model, new_tokens, cached_context_tokens + new_tokens / 2.0)


def prefill_cost(
    device: Device,
    model: ModelShape,
    new_tokens: int,
    cached_context_tokens: int = 0,
    sequences: int = 1,
    params: PerfParams = CALIBRATED,
) -> StepCost:
    """A prefill step of `new_tokens` split evenly over `sequences` prompts, each with `cached_context_tokens`
    already in its KV cache (a chunk of a longer prompt, or a prefix hit). No tokens: no step, zero cost."""
    if new_tokens <= 0:
        return StepCost(0.0, 0.0, 0.0, 0.0)
    n = device.gpu_count
    flops_per_s = device.gpu.bf16_flops_per_s * device.clock_scale(params)
    per_sequence = new_tokens / max(sequences, 1)
    dense = 2.0 * model.parameters * new_tokens / n
    attention = _attention_flops(model, new_tokens, cached_context_tokens + per_sequence / 2.0) / n
    compute = dense / (flops_per_s * params.gemm_mfu(new_tokens)) + attention / (flops_per_s * params.attention_mfu)
    kv_read = model.kv_bytes_per_token_per_gpu(n) * cached_context_tokens * max(sequences, 1)
    memory = (model.weight_bytes / n + kv_read) / (device.gpu.memory_bandwidth_bytes_per_s * params.decode_mbu)
    busy = max(compute, params.memory_bound_activity * memory)
    communication = _communication_s(device, model, new_tokens, params)
    return StepCost(compute, memory, communication, params.prefill_step_overhead_s, busy)


#: Activity of a prefill at its attainable rate (an upper bound; `prefill_activity` gives the modelled share).
PREFILL_ACTIVITY = 1.0


def prefill_activity(
    device: Device, model: ModelShape, new_tokens: int, cached_context_tokens: int = 0, params: PerfParams = CALIBRATED
) -> float:
    """Activity in [0, 1] of a prefill step of one prompt."""
    return prefill_cost(device, model, new_tokens, cached_context_tokens, 1, params).activity


def prefill_power_w(
    device: Device, model: ModelShape, new_tokens: int, cached_context_tokens: int = 0, params: PerfParams = CALIBRATED
) -> float:
    """Board power of the whole group while it prefills."""
    return power_w(device, prefill_activity(device, model, new_tokens, cached_context_tokens, params))


def _decode_affine_terms(
    device: Device,
    model: ModelShape,
    batch_size: int,
    batch_context_tokens: int,
    params: PerfParams = CALIBRATED,
) -> tuple[float, float, float, float]:
    """(memory time at step 0, its slope per step, compute time at step 0, its slope per step), one GPU."""
    n = device.gpu_count
    bandwidth = device.gpu.memory_bandwidth_bytes_per_s * params.decode_mbu
    flops = device.gpu.bf16_flops_per_s * device.clock_scale(params) * params.gemm_mfu(batch_size)
    kv_per_token = model.kv_bytes_per_token_per_gpu(n)
    memory0 = (model.weight_bytes / n + kv_per_token * batch_context_tokens) / bandwidth
    memory1 = kv_per_token * batch_size / bandwidth
    attention_per_token = 4.0 * model.layers * model.hidden_size / n
    compute0 = (2.0 * model.parameters * batch_size / n + attention_per_token * batch_context_tokens) / flops
    compute1 = attention_per_token * batch_size / flops
    return memory0, memory1, compute0, compute1


def _decode_fixed_s(device: Device, model: ModelShape, batch_size: int, params: PerfParams) -> float:
    """The part of a decode step that does not grow with context: overheads and communication."""
    overhead = params.decode_step_overhead_s + params.decode_per_sequence_s * batch_size
    return overhead + _communication_s(device, model, batch_size, params)


def decode_step_time_s(
    device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int, params: PerfParams = CALIBRATED
) -> float:
    """One decode iteration producing one token for each of `batch_size` sequences.

    `batch_context_tokens` is the sum of the context lengths of the running sequences (the KV to read).
    """
    if batch_size <= 0:
        return 0.0
    m0, _, c0, _ = _decode_affine_terms(device, model, batch_size, batch_context_tokens, params)
    return _decode_fixed_s(device, model, batch_size, params) + max(m0, c0)


def decode_step_activity(
    device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int, params: PerfParams = CALIBRATED
) -> float:
    """Activity in [0, 1] of the power model during a decode step."""
    if batch_size <= 0:
        return 0.0
    step = decode_step_time_s(device, model, batch_size, batch_context_tokens, params)
    m0, _, c0, _ = _decode_affine_terms(device, model, batch_size, batch_context_tokens, params)
    return min(max(c0, params.memory_bound_activity * m0) / step, 1.0)


def decode_power_w(device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int) -> float:
    """Board power of the whole group during a decode step."""
    return power_w(device, decode_step_activity(device, model, batch_size, batch_context_tokens))


def power_w(device: Device, activity: float) -> float:
    """Board power of the group at an activity level in [0, 1]: idle plus its dynamic range times activity."""
    clipped = min(max(activity, 0.0), 1.0)
    return device.idle_power_w + (device.max_power_w - device.idle_power_w) * clipped


def kv_transfer_time_s(model: ModelShape, tokens: int, link: Link) -> float:
    """Seconds to move `tokens` of KV over `link` (setup latency plus bytes over bandwidth)."""
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
    return prefill_power_w(device, model, tokens) * prefill_cost(device, model, tokens).time_s / tokens


# --- runs of decode steps in closed form (the simulator advances a fixed batch many steps at once) ---------
#
# While a batch does not change, every step adds one token to each of its `batch_size` sequences, so the
# context read by step j is C + b x j: both the memory time and the compute time of step j are affine in j;
# the fixed part (overheads, communication) depends on the batch only. A step's time (fixed plus the max) and
# its busy time (max(compute, MEMORY_BOUND_ACTIVITY x memory)) are maxima of affine functions, whose sums over
# a run are exact in closed form (`DecodeRun`): the results equal summing `decode_step_time_s` and
# `power_w(decode_step_activity(...)) x decode_step_time_s` step by step.


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


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """Decode steps of a fixed batch from its starting context, in closed form: step j reads memory for
    `memory0_s + memory1_s x j` and computes for `compute0_s + compute1_s x j` (one GPU), plus `fixed_s`."""

    batch_size: int
    memory0_s: float
    memory1_s: float
    compute0_s: float
    compute1_s: float
    fixed_s: float
    idle_power_w: float
    dynamic_power_w: float  # the group's max power less its idle power

    def time_s(self, steps: int) -> float:
        """Time of the first `steps` steps."""
        if steps <= 0:
            return 0.0
        growing = _sum_max_affine(self.memory0_s, self.memory1_s, self.compute0_s, self.compute1_s, steps)
        return growing + self.fixed_s * steps

    def energy_j(self, steps: int) -> float:
        """Energy (idle included) of the first `steps` steps, as `power_w` x step time summed."""
        if steps <= 0:
            return 0.0
        mba = CALIBRATED.memory_bound_activity
        busy = _sum_max_affine(self.compute0_s, self.compute1_s, mba * self.memory0_s, mba * self.memory1_s, steps)
        return self.idle_power_w * self.time_s(steps) + self.dynamic_power_w * busy

    def steps_within(self, max_steps: int, budget_s: float) -> int:
        """The most steps (at most `max_steps`) that complete within `budget_s` seconds."""
        if self.batch_size <= 0 or max_steps <= 0 or budget_s <= 0:
            return 0
        low, high = 0, max_steps
        while low < high:
            mid = (low + high + 1) // 2
            if self.time_s(mid) <= budget_s:
                low = mid
            else:
                high = mid - 1
        return low


def decode_run(device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int) -> DecodeRun:
    """A run of decode steps of `batch_size` sequences whose contexts sum to `batch_context_tokens` at its start
    (no sequences: a run that takes no time)."""
    dynamic_w = device.max_power_w - device.idle_power_w
    if batch_size <= 0:
        return DecodeRun(0, 0.0, 0.0, 0.0, 0.0, 0.0, device.idle_power_w, dynamic_w)
    m0, m1, c0, c1 = _decode_affine_terms(device, model, batch_size, batch_context_tokens)
    fixed = _decode_fixed_s(device, model, batch_size, CALIBRATED)
    return DecodeRun(batch_size, m0, m1, c0, c1, fixed, device.idle_power_w, dynamic_w)
