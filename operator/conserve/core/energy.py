"""Energy accounting arithmetic: GPU counter deltas and their attribution to conversations.

Pure: readings and times in, joules out. The operator's energy loop (`conserve.controller.energy`) feeds it what
the GPUs report (NVML or dcgm-exporter) and the conversations' reported work.

Counters. A GPU reports a cumulative energy counter in mJ (NVML `nvmlDeviceGetTotalEnergyConsumption`, DCGM
`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`): an unsigned 64-bit value since the driver was loaded. Between two
samples of one GPU (`counter_delta_mj`):
- both present, current >= previous: the difference (clamped to what the board could draw, see below);
- current < previous: a wrap when `wrap_mj - previous + current` is plausible (at most the bound, or half the
  counter range when no bound is known), else a reset (driver reload, GPU reset): the energy since the reset is
  `current` (the Prometheus `increase` rule); what the board drew between the last sample and the reset is
  lost, never invented;
- a missing sample: no delta, and the baseline stays where it was, so the next good sample covers the whole gap
  exactly once;
- no counter at all (an exporter without the field, a pre-Volta GPU): power integrated over time (trapezoid).
The bound is the board's maximum power times the elapsed time times a margin: a counter that jumps further
(a misread, a swapped GPU with the same key) is clamped, so one bad sample cannot produce absurd energy.

Attribution (`attribute_interval`), for one GPU (or one pod's GPUs) over one interval:
1. Idle energy is the idle power of the board times the interval (capped at the measured energy); the rest is
   dynamic energy.
2. Dynamic energy goes to the conversations in proportion to the work done on the device in the interval:
   tokens processed (new input tokens prefilled plus output tokens decoded). With no reported work, the dynamic
   energy joins the idle energy (reports lag the work; the holders of KV are its likeliest cause).
3. Idle energy is shared by KV occupancy: a conversation holding k of the device's C KV tokens gets k/C of it.
   The unoccupied share is unattributed idle (the cost of capacity nobody holds).
Conservation, the invariant the tests check: the sum over conversations plus unattributed equals the energy the
GPU reported for the interval. Every joule is counted once: an interval's energy is split, never copied.

J per token: energy per output token (the unit of the placement energy scorer, `DecoderState.
energy_per_token_j`), measured per decoder and per tier with an exponentially decaying window (`RateWindow`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

#: NVML's energy counter is an unsigned long long in mJ.
NVML_ENERGY_COUNTER_WRAP_MJ = 2**64

#: Headroom over the board's maximum power when bounding a counter delta (power limits can be raised and
#: samples are timestamped by the reader, not by the GPU).
POWER_BOUND_MARGIN = 1.5

MJ_PER_J = 1000.0


class DeltaKind(enum.StrEnum):
    """How one interval's energy was obtained; a bounded set (it labels a metric)."""

    FIRST = "first"  # no baseline yet: nothing counted
    NORMAL = "normal"
    WRAP = "wrap"
    RESET = "reset"
    MISSING = "missing"  # no sample: nothing counted, the baseline is kept
    CLAMPED = "clamped"  # a jump beyond what the board can draw
    POWER = "power"  # no counter: power integrated over time


@dataclass(frozen=True, slots=True)
class CounterDelta:
    energy_mj: float
    kind: DeltaKind


def counter_delta_mj(
    previous_mj: float | None,
    current_mj: float | None,
    *,
    wrap_mj: float = NVML_ENERGY_COUNTER_WRAP_MJ,
    max_delta_mj: float | None = None,
) -> CounterDelta:
    """The energy between two samples of a cumulative mJ counter; never negative (rules in the module doc)."""
    if current_mj is None or not math.isfinite(current_mj) or current_mj < 0:
        return CounterDelta(0.0, DeltaKind.MISSING)
    if previous_mj is None or not math.isfinite(previous_mj) or previous_mj < 0:
        return CounterDelta(0.0, DeltaKind.FIRST)
    bound = max_delta_mj if max_delta_mj is not None and max_delta_mj >= 0 else None
    if current_mj >= previous_mj:
        delta, kind = current_mj - previous_mj, DeltaKind.NORMAL
    else:
        wrapped = wrap_mj - previous_mj + current_mj
        plausible_wrap = wrapped <= (bound if bound is not None else wrap_mj / 2)
        if wrapped >= 0 and plausible_wrap:
            delta, kind = wrapped, DeltaKind.WRAP
        else:
            delta, kind = current_mj, DeltaKind.RESET
    if bound is not None and delta > bound:
        return CounterDelta(bound, DeltaKind.CLAMPED)
    return CounterDelta(delta, kind)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU at a time on the reader's clock (seconds, any origin)."""

    time_s: float
    energy_mj: float | None
    power_w: float | None


@dataclass(frozen=True, slots=True)
class GpuInterval:
    """Energy a GPU drew between two of its samples."""

    start_s: float
    end_s: float
    energy_j: float
    kind: DeltaKind
    power_w: float | None  # the latest instantaneous reading, when there is one

    @property
    def duration_s(self) -> float:
        return max(self.end_s - self.start_s, 0.0)

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0


def gpu_interval(
    baseline: GpuSample | None,
    sample: GpuSample,
    *,
    max_power_w: float | None = None,
    wrap_mj: float = NVML_ENERGY_COUNTER_WRAP_MJ,
) -> tuple[GpuSample | None, GpuInterval | None]:
    """Advance one GPU: (new baseline, the interval since the old one, or None when nothing can be counted).

    A sample with neither energy nor power keeps the old baseline (missing); so does a sample that is not
    later than the baseline (a duplicate, or a clock step backwards), so nothing is counted twice.
    """
    if sample.energy_mj is None and sample.power_w is None:
        return baseline, None
    if baseline is None:
        return sample, None
    elapsed_s = sample.time_s - baseline.time_s
    if elapsed_s <= 0:
        return baseline, None
    bound_mj = max_power_w * POWER_BOUND_MARGIN * elapsed_s * MJ_PER_J if max_power_w else None
    if baseline.energy_mj is not None and sample.energy_mj is not None:
        delta = counter_delta_mj(baseline.energy_mj, sample.energy_mj, wrap_mj=wrap_mj, max_delta_mj=bound_mj)
        energy_j, kind = delta.energy_mj / MJ_PER_J, delta.kind
    elif sample.energy_mj is None and sample.power_w is not None:
        # No counter: trapezoid over the interval (the previous power when known, else the current one).
        before_w = baseline.power_w if baseline.power_w is not None else sample.power_w
        energy_j = max((before_w + sample.power_w) / 2.0, 0.0) * elapsed_s
        if bound_mj is not None:
            energy_j = min(energy_j, bound_mj / MJ_PER_J)
        kind = DeltaKind.POWER
    else:
        # The counter appeared (or vanished) between samples: start over from this one.
        return sample, None
    return sample, GpuInterval(baseline.time_s, sample.time_s, energy_j, kind, sample.power_w)


# --- attribution -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConversationWork:
    """What one conversation did on a device during an interval, and what it held there."""

    key: str  # "namespace/name"
    tokens: int = 0  # tokens processed in the interval (input prefilled + output decoded)
    kv_tokens: int = 0  # KV tokens it occupies on the device


@dataclass(frozen=True, slots=True)
class DeviceInterval:
    """One device (a GPU, or the GPUs of one pod) over one interval."""

    energy_j: float
    duration_s: float
    idle_power_w: float = 0.0
    capacity_kv_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Attribution:
    per_conversation_j: Mapping[str, float]
    unattributed_j: float
    dynamic_j: float
    idle_j: float

    @property
    def attributed_j(self) -> float:
        return math.fsum(self.per_conversation_j.values())


def _merge_work(work: Iterable[ConversationWork]) -> dict[str, tuple[int, int]]:
    merged: dict[str, tuple[int, int]] = {}
    for item in work:
        tokens, kv = merged.get(item.key, (0, 0))
        merged[item.key] = (tokens + max(item.tokens, 0), kv + max(item.kv_tokens, 0))
    return merged


def attribute_interval(device: DeviceInterval, work: Sequence[ConversationWork]) -> Attribution:
    """Split one interval's energy among conversations (the rule in the module doc). Conserves energy."""
    energy_j = device.energy_j if math.isfinite(device.energy_j) and device.energy_j > 0 else 0.0
    idle_j = min(max(device.idle_power_w, 0.0) * max(device.duration_s, 0.0), energy_j)
    dynamic_j = energy_j - idle_j
    merged = _merge_work(work)
    total_tokens = sum(tokens for tokens, _ in merged.values())
    total_kv = sum(kv for _, kv in merged.values())
    shares: dict[str, float] = dict.fromkeys(merged, 0.0)
    occupancy_pool_j = idle_j
    if total_tokens > 0:
        for key, (tokens, _) in merged.items():
            shares[key] += dynamic_j * tokens / total_tokens
    else:
        occupancy_pool_j += dynamic_j
    denominator = max(device.capacity_kv_tokens, total_kv)
    if denominator > 0:
        for key, (_, kv) in merged.items():
            shares[key] += occupancy_pool_j * kv / denominator
    per_conversation = {key: j for key, j in shares.items() if j > 0}
    attributed = math.fsum(per_conversation.values())
    if attributed > energy_j:  # float rounding only; scale down so nothing is created
        scale = energy_j / attributed
        per_conversation = {key: j * scale for key, j in per_conversation.items()}
        attributed = math.fsum(per_conversation.values())
    return Attribution(per_conversation, max(energy_j - attributed, 0.0), dynamic_j, idle_j)


# --- J per token -----------------------------------------------------------------------------------------


def energy_per_token_j(energy_j: float | None, tokens: int | None) -> float | None:
    """Joules per token, or None when there is no token (or no energy) to divide."""
    if energy_j is None or tokens is None or tokens <= 0 or not math.isfinite(energy_j) or energy_j < 0:
        return None
    return energy_j / tokens


@dataclass(frozen=True, slots=True)
class RateWindow:
    """Energy and output tokens over an exponentially decaying window: J/token = energy / tokens.

    Each `add` first multiplies what is there by `decay` (per interval), so an old load fades; decaying both
    sides keeps the ratio a weighted mean of recent intervals, weighted by their tokens.
    """

    energy_j: float = 0.0
    tokens: float = 0.0
    decay: float = 0.9

    def add(self, energy_j: float, tokens: int) -> RateWindow:
        return RateWindow(
            self.energy_j * self.decay + max(energy_j, 0.0), self.tokens * self.decay + max(tokens, 0), self.decay
        )

    @property
    def energy_per_token_j(self) -> float | None:
        if self.tokens < 1e-9:
            return None
        return self.energy_j / self.tokens


@dataclass(frozen=True, slots=True)
class TierEnergy:
    """Measured J per output token of every tier (keys are tier names, as `Tier` values)."""

    by_tier: Mapping[str, RateWindow] = field(default_factory=dict)

    def add(self, tier: str, energy_j: float, output_tokens: int, decay: float = 0.9) -> TierEnergy:
        window = self.by_tier.get(tier, RateWindow(decay=decay))
        return TierEnergy({**self.by_tier, tier: window.add(energy_j, output_tokens)})

    def energy_per_token_j(self) -> dict[str, float]:
        return {tier: rate for tier, w in self.by_tier.items() if (rate := w.energy_per_token_j) is not None}
