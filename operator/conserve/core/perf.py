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
  sequence (scheduling, sampling, per-sequence kernels of the engine). These differ by engine and version: the
  constants are an engine profile (core/engine_profiles.py) that the Device carries (`Device.params`).

Power limits: dynamic power goes with f x V^2 and voltage with frequency on the DVFS curve, so a limit scales
the clock by ((limit - idle) / (TDP - idle)) ^ (1/3) (CLOCK_POWER_EXPONENT): compute-bound work slows, HBM
bandwidth does not. Power follows the work of a step: idle + (the limit - idle) x activity, activity =
(MEMORY_POWER_WEIGHT x bytes / peak bandwidth + COMPUTE_POWER_WEIGHT x FLOPs / peak rate) / step time, at most
1 (the bytes moved and the FLOPs done, each as the seconds it would take at the GPU's peak); communication and
overheads add time but no work, so a step padded with engine overhead draws less.

Sources: each profile's constants come from `conserve perf-model fit` on public measurements (see
operator/conserve/perfmodel/data/README.md for the data, their licenses and the procedure); the held-out check
is NVIDIA TensorRT-LLM's published A100 tables (never used in a fit). ALLREDUCE_LINK_EFFICIENCY = 0.7: NCCL's
nccl-tests report all-reduce bus bandwidth around 70-80% of the NVLink peak. KV transfer links: NVLink 4 about
450 GB/s per direction; RDMA measured 87-190 GB/s (we take 100 GB/s); PCIe Gen4 x16 32 GB/s per direction
(PCI-SIG; about 25 GB/s achieved); TCP on a 100 Gb/s NIC 12.5 GB/s. A fixed setup latency per transfer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from conserve.core.engine_profiles import PerfParams as PerfParams  # re-exported for callers
from conserve.core.engine_profiles import lookup_profile
from conserve.core.gpus import GpuSpec
from conserve.core.llm import ModelShape

#: The default profile's constants (a current vLLM); a Device without a profile uses them.
CALIBRATED: PerfParams = lookup_profile(None).params


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
    `power_limit_w` is per GPU (default: TDP); `params` are the serving engine's constants (its profile).
    """

    gpu: GpuSpec
    gpu_count: int = 1
    tp_link: Link | None = None
    power_limit_w: float | None = None
    params: PerfParams = CALIBRATED

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

    def clock_scale(self, params: PerfParams | None = None) -> float:
        """The fraction of the full clock a power limit leaves (1.0 without one)."""
        if self.power_limit_w is None or self.power_limit_w >= self.gpu.tdp_w:
            return 1.0
        dynamic = (self.power_limit_w - self.gpu.idle_power_w) / (self.gpu.tdp_w - self.gpu.idle_power_w)
        return float(max(dynamic, 1e-3) ** (params or self.params).clock_power_exponent)

    def peak_flops_per_s(self, params: PerfParams | None = None) -> float:
        """One GPU's peak dense rate at the clock its power limit allows."""
        return self.gpu.bf16_flops_per_s * self.clock_scale(params)


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
        """Activity in [0, 1] of the power model: the step's work (`busy_activity_s`) over its time."""
        return min(self.busy_activity_s / self.time_s, 1.0) if self.time_s > 0 else 0.0


def allreduce_time_s(device: Device, message_bytes: float, params: PerfParams | None = None) -> float:
    """One ring all-reduce of `message_bytes` over the group's link (zero on one GPU)."""
    n = device.gpu_count
    if n <= 1:
        return 0.0
    p = params or device.params
    bandwidth = device.link.bandwidth_bytes_per_s * p.allreduce_link_efficiency
    return 2 * (n - 1) * p.allreduce_hop_latency_s + 2.0 * (n - 1) / n * message_bytes / bandwidth


def _communication_s(device: Device, model: ModelShape, tokens: int, params: PerfParams) -> float:
    message = tokens * model.hidden_size * model.bytes_per_element
    return 2 * model.layers * allreduce_time_s(device, message, params)


def _attention_flops(model: ModelShape, new_tokens: float, mean_context_tokens: float) -> float:
    return 4.0 * model.layers * model.hidden_size * new_tokens * mean_context_tokens


def _work_s(device: Device, params: PerfParams, memory_bytes: float, flops: float) -> float:
    """The power model's work of one GPU: bytes and FLOPs as seconds at peak, weighted by what each draws."""
    memory = memory_bytes / device.gpu.memory_bandwidth_bytes_per_s
    compute = flops / device.peak_flops_per_s(params)
    return params.memory_power_weight * memory + params.compute_power_weight * compute


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
    params: PerfParams | None = None,
) -> StepCost:
    """A prefill step of `new_tokens` split evenly over `sequences` prompts, each with `cached_context_tokens`
    already in its KV cache (a chunk of a longer prompt, or a prefix hit). No tokens: no step, zero cost."""
    if new_tokens <= 0:
        return StepCost(0.0, 0.0, 0.0, 0.0)
    p = params or device.params
    n = device.gpu_count
    flops_per_s = device.peak_flops_per_s(p)
    per_sequence = new_tokens / max(sequences, 1)
    dense = 2.0 * model.parameters * new_tokens / n
    attention = _attention_flops(model, new_tokens, cached_context_tokens + per_sequence / 2.0) / n
    compute = dense / (flops_per_s * p.gemm_mfu(new_tokens)) + attention / (flops_per_s * p.attention_mfu)
    kv_read = model.kv_bytes_per_token_per_gpu(n) * cached_context_tokens * max(sequences, 1)
    memory_bytes = model.weight_bytes / n + kv_read
    memory = memory_bytes / (device.gpu.memory_bandwidth_bytes_per_s * p.decode_mbu)
    busy = _work_s(device, p, memory_bytes, dense + attention)
    communication = _communication_s(device, model, new_tokens, p)
    return StepCost(compute, memory, communication, p.prefill_step_overhead_s, busy)


#: Activity of a prefill at its attainable rate (an upper bound; `prefill_activity` gives the modelled share).
PREFILL_ACTIVITY = 1.0


def prefill_activity(
    device: Device,
    model: ModelShape,
    new_tokens: int,
    cached_context_tokens: int = 0,
    params: PerfParams | None = None,
) -> float:
    """Activity in [0, 1] of a prefill step of one prompt."""
    return prefill_cost(device, model, new_tokens, cached_context_tokens, 1, params).activity


def prefill_power_w(
    device: Device,
    model: ModelShape,
    new_tokens: int,
    cached_context_tokens: int = 0,
    params: PerfParams | None = None,
) -> float:
    """Board power of the whole group while it prefills."""
    return power_w(device, prefill_activity(device, model, new_tokens, cached_context_tokens, params))


@dataclass(frozen=True, slots=True)
class _DecodeTerms:
    """A decode step of a fixed batch at step j (one GPU): memory `m0 + m1 j`, compute `c0 + c1 j`, work
    `w0 + w1 j` (the power model's), and `fixed` (overheads and communication)."""

    m0: float
    m1: float
    c0: float
    c1: float
    w0: float
    w1: float
    fixed: float


def _decode_terms(device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int) -> _DecodeTerms:
    p = device.params
    n = device.gpu_count
    bandwidth = device.gpu.memory_bandwidth_bytes_per_s
    flops_per_s = device.peak_flops_per_s(p)
    kv_per_token = model.kv_bytes_per_token_per_gpu(n)
    bytes0 = model.weight_bytes / n + kv_per_token * batch_context_tokens
    bytes1 = kv_per_token * batch_size
    attention_per_token = 4.0 * model.layers * model.hidden_size / n
    flops0 = 2.0 * model.parameters * batch_size / n + attention_per_token * batch_context_tokens
    flops1 = attention_per_token * batch_size
    mfu = p.gemm_mfu(batch_size)
    overhead = p.decode_step_overhead_s + p.decode_per_sequence_s * batch_size
    return _DecodeTerms(
        m0=bytes0 / (bandwidth * p.decode_mbu),
        m1=bytes1 / (bandwidth * p.decode_mbu),
        c0=flops0 / (flops_per_s * mfu),
        c1=flops1 / (flops_per_s * mfu),
        w0=_work_s(device, p, bytes0, flops0),
        w1=_work_s(device, p, bytes1, flops1),
        fixed=overhead + _communication_s(device, model, batch_size, p),
    )


def _with_params(device: Device, params: PerfParams | None) -> Device:
    return device if params is None or params is device.params else replace(device, params=params)


def decode_step_time_s(
    device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int, params: PerfParams | None = None
) -> float:
    """One decode iteration producing one token for each of `batch_size` sequences.

    `batch_context_tokens` is the sum of the context lengths of the running sequences (the KV to read).
    """
    if batch_size <= 0:
        return 0.0
    t = _decode_terms(_with_params(device, params), model, batch_size, batch_context_tokens)
    return t.fixed + max(t.m0, t.c0)


def decode_step_activity(
    device: Device, model: ModelShape, batch_size: int, batch_context_tokens: int, params: PerfParams | None = None
) -> float:
    """Activity in [0, 1] of the power model during a decode step: its work over its time."""
    if batch_size <= 0:
        return 0.0
    t = _decode_terms(_with_params(device, params), model, batch_size, batch_context_tokens)
    return min(t.w0 / (t.fixed + max(t.m0, t.c0)), 1.0)


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
# context read by step j is C + b x j: the memory time, the compute time and the work of step j are affine in
# j; the fixed part (overheads, communication) depends on the batch only. A step's time (fixed plus the max)
# and its busy time (min(work, step time), the activity's cap) are piecewise affine in j, with breaks only where
# two of their affine pieces cross; their sums over a run are exact in closed form (`DecodeRun`): the results
# equal summing `decode_step_time_s` and `power_w(decode_step_activity(...)) x decode_step_time_s` step by step.

Affine = tuple[float, float]


def _at(line: Affine, j: float) -> float:
    return line[0] + line[1] * j


def _sum_piecewise(f: Callable[[int], float], lines: Sequence[Affine], n: int) -> float:
    """Sum over j in [0, n) of f, which is affine between the points where two of `lines` cross."""
    if n <= 0:
        return 0.0
    cuts = {0, n}
    for i, a in enumerate(lines):
        for b in lines[i + 1 :]:
            if a[1] != b[1]:
                root = (b[0] - a[0]) / (a[1] - b[1])
                if 0.0 < root < n:
                    cuts.add(min(math.floor(root) + 1, n))
    ordered = sorted(cuts)
    total = 0.0
    for lo, hi in itertools.pairwise(ordered):
        if hi > lo:
            total += (hi - lo) * (f(lo) + f(hi - 1)) / 2.0
    return total


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """Decode steps of a fixed batch from its starting context, in closed form: step j reads memory for
    `memory0_s + memory1_s x j`, computes for `compute0_s + compute1_s x j` and does `work0_s + work1_s x j`
    of the power model's work (one GPU), plus `fixed_s`."""

    batch_size: int
    memory0_s: float
    memory1_s: float
    compute0_s: float
    compute1_s: float
    fixed_s: float
    idle_power_w: float
    dynamic_power_w: float  # the group's max power less its idle power
    work0_s: float = 0.0
    work1_s: float = 0.0

    def _step_s(self, j: float) -> float:
        return self.fixed_s + max(_at((self.memory0_s, self.memory1_s), j), _at((self.compute0_s, self.compute1_s), j))

    def _lines(self) -> tuple[Affine, Affine, Affine]:
        memory = (self.fixed_s + self.memory0_s, self.memory1_s)
        compute = (self.fixed_s + self.compute0_s, self.compute1_s)
        return memory, compute, (self.work0_s, self.work1_s)

    def time_s(self, steps: int) -> float:
        """Time of the first `steps` steps."""
        if steps <= 0:
            return 0.0
        return _sum_piecewise(lambda j: self._step_s(j), self._lines()[:2], steps)

    def energy_j(self, steps: int) -> float:
        """Energy (idle included) of the first `steps` steps, as `power_w` x step time summed."""
        if steps <= 0:
            return 0.0
        work = (self.work0_s, self.work1_s)
        busy = _sum_piecewise(lambda j: min(_at(work, j), self._step_s(j)), self._lines(), steps)
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
    t = _decode_terms(device, model, batch_size, batch_context_tokens)
    return DecodeRun(batch_size, t.m0, t.m1, t.c0, t.c1, t.fixed, device.idle_power_w, dynamic_w, t.w0, t.w1)
