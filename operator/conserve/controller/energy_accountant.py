"""The energy loop's accounting: one cycle turns GPU readings into per-pod, per-conversation and per-tier
figures (the arithmetic is `conserve.core.energy`'s; what it reads and where figures go is an `EnergyState`)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field

from conserve.controller.energy_metrics import CycleObservation, CycleTotals, EnergyMetrics, PodEnergy
from conserve.controller.energy_state import (
    Body,
    ConversationEnergyWriter,
    ConversationView,
    EnergyState,
    PodFigureKey,
    ServingPod,
)
from conserve.controller.state import DecoderEnergy
from conserve.core.energy import (
    ConversationWork,
    DeltaKind,
    DeviceInterval,
    GpuInterval,
    GpuSample,
    RateWindow,
    attribute_interval,
    energy_per_token_j,
    gpu_interval,
)
from conserve.core.gpus import Role, lookup_product
from conserve.energy.reader import EnergyReader, GpuReading

log = logging.getLogger(__name__)

#: Writes smaller than this (J) wait for the next cycle: status traffic stays proportional to real change.
MIN_WRITE_DELTA_J = 0.5

#: Pod key -> what each conversation did on it since the last cycle.
WorkByPod = dict[str, list[ConversationWork]]


@dataclass(slots=True)
class _ConvLedger:
    namespace: str
    name: str
    energy_j: float
    tokens_seen: int
    output_tokens: int = 0
    prefill_counted: bool = False
    written_j: float | None = None
    pool: str = ""
    terminal: bool = False
    final_observed: bool = False  # its J per conversation went into the histogram


@dataclass(slots=True)
class _PodLedger:
    energy_j: float
    power_w: float | None = None
    window: RateWindow = field(default_factory=RateWindow)


@dataclass(frozen=True, slots=True)
class CycleReport:
    """What one cycle did (tests and logs read it)."""

    gpu_energy_j: float
    attributed_j: float
    unattributed_j: float
    unmapped_j: float
    conversations_written: int
    kinds: Mapping[str, int]


@dataclass(slots=True)
class _Work:
    """Per decode pod and per prefill pod, what each conversation did since the last cycle; per pod, the tokens
    its J per token counts (output tokens on a decoder, first-turn input tokens on a prefill server)."""

    decode: WorkByPod = field(default_factory=lambda: defaultdict(list))
    prefill: WorkByPod = field(default_factory=lambda: defaultdict(list))
    token_delta: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def of(self, pod: ServingPod) -> list[ConversationWork]:
        return (self.decode if pod.role == Role.DECODE else self.prefill).get(pod.key, [])

    def take(self, key: str) -> _Work:
        """This pod's share, removed from this cycle's work (to wait for an interval that covers it)."""
        taken = _Work()
        for mine, theirs in ((self.decode, taken.decode), (self.prefill, taken.prefill)):
            if key in mine:
                theirs[key] = mine.pop(key)
        if key in self.token_delta:
            taken.token_delta[key] = self.token_delta.pop(key)
        return taken

    def absorb(self, earlier: _Work) -> None:
        """Add work carried from earlier cycles: tokens add up; the KV held is this cycle's when known."""
        for mine, theirs in ((self.decode, earlier.decode), (self.prefill, earlier.prefill)):
            for key, carried in theirs.items():
                now = {w.key: w for w in mine.get(key, [])}
                for old in carried:
                    current = now.get(old.key)
                    kv = current.kv_tokens if current is not None else old.kv_tokens
                    tokens = old.tokens + (current.tokens if current is not None else 0)
                    now[old.key] = ConversationWork(old.key, tokens, kv)
                mine[key] = list(now.values())
        for key, tokens in earlier.token_delta.items():
            self.token_delta[key] += tokens

    def pods(self) -> set[str]:
        return set(self.decode) | set(self.prefill) | set(self.token_delta)

    def keep(self, pods: Container[str], conversations: Container[str]) -> None:
        """Forget the work of pods and of conversations that are gone."""
        for by_pod in (self.decode, self.prefill):
            for key in list(by_pod):
                remaining = [w for w in by_pod[key] if w.key in conversations]
                if key in pods and remaining:
                    by_pod[key] = remaining
                else:
                    del by_pod[key]
        for key in [k for k in self.token_delta if k not in pods]:
            del self.token_delta[key]


class EnergyAccountant:
    """The loop's state and one cycle's work; no timer of its own (`run_forever` adds one)."""

    def __init__(
        self,
        reader: EnergyReader,
        state: EnergyState,
        writer: ConversationEnergyWriter,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: EnergyMetrics | None = None,
    ) -> None:
        self.reader, self.state, self.writer, self.clock = reader, state, writer, clock
        self.metrics = metrics
        self._baselines: dict[str, GpuSample | None] = {}
        self._convs: dict[str, _ConvLedger] = {}
        self._pods: dict[str, _PodLedger] = {}
        self._tiers: dict[tuple[Role, str], RateWindow] = {}  # (role, tier) -> window
        self._products: dict[tuple[Role, str], RateWindow] = {}  # (role, product) -> window
        self._first_cycle = True
        #: Work done on a pod in cycles that read no interval for it (a missed scrape), waiting for the
        #: interval that covers those cycles: the counter's next delta spans them.
        self._carried = _Work()

    # --- measured J per token -----------------------------------------------------------------------------
    def tier_energy_per_token_j(self, role: str = Role.DECODE) -> dict[str, float]:
        """Measured J per token of each tier for a role (output tokens for decode, input tokens for prefill)."""
        return _rates(self._tiers, role)

    def product_energy_per_token_j(self, role: str = Role.DECODE) -> dict[str, float]:
        return _rates(self._products, role)

    # --- one cycle ----------------------------------------------------------------------------------------
    async def cycle(self) -> CycleReport:
        readings = await self.reader.read()
        now_s = self.clock()
        snapshot = await self.state.snapshot()
        pods, conversations = snapshot.pods, snapshot.conversations
        intervals, kinds = self._gpu_intervals(readings, now_s)
        per_pod, unmapped_j = _pod_energy(readings, intervals, pods)
        work = self._work(conversations, pods)
        self._carry(work, per_pod, pods)
        totals = self._attribute(per_pod, pods, work)
        await self.state.publish_decoders(self._decoder_figures(pods))
        written = await self._write_conversations(conversations)
        gpu_j = math.fsum(i.energy_j for i in intervals.values())
        if self.metrics is not None:
            tiers = {role: self.tier_energy_per_token_j(role) for role in (Role.DECODE, Role.PREFILL)}
            self.metrics.observe_cycle(CycleObservation(readings, intervals, per_pod, pods, totals, kinds, tiers))
        self._first_cycle = False
        return CycleReport(gpu_j, totals.attributed_j, totals.unattributed_j, unmapped_j, written, kinds)

    def _gpu_intervals(
        self, readings: Sequence[GpuReading], now_s: float
    ) -> tuple[dict[str, GpuInterval], dict[str, int]]:
        intervals: dict[str, GpuInterval] = {}
        kinds: dict[str, int] = defaultdict(int)
        seen = set()
        for reading in readings:
            seen.add(reading.key)
            spec = lookup_product(reading.product) if reading.product else None
            baseline, interval = gpu_interval(
                self._baselines.get(reading.key),
                GpuSample(now_s, reading.energy_mj, reading.power_w),
                max_power_w=spec.tdp_w if spec else None,
            )
            self._baselines[reading.key] = baseline
            if interval is not None:
                intervals[reading.key] = interval
                kinds[interval.kind.value] += 1
        kinds[DeltaKind.MISSING.value] += sum(1 for key in self._baselines if key not in seen)
        return intervals, dict(kinds)

    def _ledger(self, conv: ConversationView) -> _ConvLedger:
        ledger = self._convs.get(conv.key)
        if ledger is None:
            # Known from status: accounted by an earlier operator; its past tokens were counted then.
            accounted = conv.energy_joules is not None or self._first_cycle
            ledger = self._convs[conv.key] = _ConvLedger(
                conv.namespace,
                conv.name,
                conv.energy_joules or 0.0,
                conv.tokens if accounted else 0,
                conv.output_tokens if accounted else 0,
                prefill_counted=accounted and conv.turns > 0,
                written_j=conv.energy_joules,
                final_observed=conv.terminal and conv.energy_joules is not None,
            )
        ledger.pool, ledger.terminal = conv.pool, conv.terminal
        return ledger

    def _work(self, conversations: Sequence[ConversationView], pods: Mapping[str, ServingPod]) -> _Work:
        """Per decode pod and per prefill pod, what each conversation did since the last cycle."""
        work = _Work()
        for conv in conversations:
            ledger = self._ledger(conv)
            tokens = max(conv.tokens - ledger.tokens_seen, 0)
            outputs = max(conv.output_tokens - ledger.output_tokens, 0)
            ledger.tokens_seen = max(ledger.tokens_seen, conv.tokens)
            ledger.output_tokens = max(ledger.output_tokens, conv.output_tokens)
            decoder = f"{conv.namespace}/{conv.decoder_pod}"
            if conv.decoder_pod and decoder in pods:
                kv = 0 if conv.terminal else conv.kv_tokens
                if tokens or kv:
                    work.decode[decoder].append(ConversationWork(conv.key, tokens, kv))
                work.token_delta[decoder] += outputs
            prefiller = f"{conv.namespace}/{conv.prefill_pod}"
            if conv.prefill_pod and prefiller in pods and conv.turns > 0 and not ledger.prefill_counted:
                work.prefill[prefiller].append(ConversationWork(conv.key, conv.first_turn_input_tokens, 0))
                work.token_delta[prefiller] += conv.first_turn_input_tokens  # prefill J/token is per input token
                ledger.prefill_counted = True
        seen = {c.key for c in conversations}
        for key in [k for k in self._convs if k not in seen]:
            del self._convs[key]  # deleted: its energy stays in the pod's and the pool's totals
        return work

    def _carry(self, work: _Work, per_pod: PodEnergy, pods: Mapping[str, ServingPod]) -> None:
        """Hold back the work of pods measured before but without an interval now; add what was held back
        earlier to the pods that have one. A pod never measured has no baseline: its work before the first
        reading falls in no interval and is not counted (its energy is unknown)."""
        held, self._carried = self._carried, _Work()
        held.keep(pods, self._convs)  # a deleted conversation's share goes to the others (or unattributed)
        work.absorb(held)
        for key in work.pods():
            measured_now = key in per_pod and per_pod[key][0].duration_s > 0
            if not measured_now and key in self._pods:
                self._carried.absorb(work.take(key))

    def _attribute(self, per_pod: PodEnergy, pods: Mapping[str, ServingPod], work: _Work) -> CycleTotals:
        totals = CycleTotals()
        tier_sums: dict[tuple[Role, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        product_sums: dict[tuple[Role, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for key, (device, power_w) in per_pod.items():
            pod = pods[key]
            result = attribute_interval(device, work.of(pod))
            totals.add(pod, result)
            for conv_key, joules in result.per_conversation_j.items():
                self._convs[conv_key].energy_j += joules
            tokens = work.token_delta.get(key, 0)
            ledger = self._pods.get(key)
            if ledger is None:
                ledger = self._pods[key] = _PodLedger(pod.energy_joules or 0.0)
            ledger.energy_j += device.energy_j
            ledger.power_w = power_w
            ledger.window = ledger.window.add(device.energy_j, tokens)
            for sums, label in ((tier_sums, pod.entry.tier), (product_sums, pod.entry.gpu_product)):
                if label and device.energy_j > 0:
                    sums[(pod.role, label)][0] += device.energy_j
                    sums[(pod.role, label)][1] += tokens
        # One window step per cycle (not per pod), so the decay is per interval whatever the fleet's size.
        for table, sums in ((self._tiers, tier_sums), (self._products, product_sums)):
            for label_key, (joules, token_sum) in sums.items():
                table[label_key] = table.get(label_key, RateWindow()).add(joules, int(token_sum))
        for key in [k for k in self._pods if k not in pods]:
            del self._pods[key]
        return totals

    def _decoder_figures(self, pods: Mapping[str, ServingPod]) -> dict[PodFigureKey, DecoderEnergy]:
        """Every measured pod's power now, energy so far, and J per token (its tier's until it has its own)."""
        tiers = {role: self.tier_energy_per_token_j(role) for role in (Role.DECODE, Role.PREFILL)}
        figures = {}
        for key, ledger in self._pods.items():
            pod = pods[key]
            measured = ledger.window.energy_per_token_j
            figures[(pod.namespace, pod.pool, pod.pod)] = DecoderEnergy(
                power_watts=None if ledger.power_w is None else round(ledger.power_w, 3),
                energy_joules=round(ledger.energy_j, 3),
                energy_per_token_j=measured if measured is not None else tiers[pod.role].get(pod.entry.tier),
            )
        return figures

    async def _write_conversations(self, conversations: Sequence[ConversationView]) -> int:
        """The conversations whose energy moved by at least MIN_WRITE_DELTA_J, in one flush."""
        output_tokens = {c.key: c.output_tokens for c in conversations}
        due: dict[str, tuple[str, str, Body]] = {}
        for key, ledger in self._convs.items():
            if ledger.energy_j <= 0 or (
                ledger.written_j is not None and ledger.energy_j - ledger.written_j < MIN_WRITE_DELTA_J
            ):
                continue
            fields = {
                "energyJoules": round(ledger.energy_j, 3),
                "energyPerTokenJoules": _round(energy_per_token_j(ledger.energy_j, output_tokens[key])),
            }
            due[key] = (ledger.namespace, ledger.name, fields)
        written = await self.writer.flush(due)
        for key in written:
            self._convs[key].written_j = self._convs[key].energy_j
        for ledger in self._convs.values():
            if ledger.terminal and not ledger.final_observed and ledger.written_j is not None:
                ledger.final_observed = True
                if self.metrics is not None:
                    self.metrics.observe_conversation(ledger.namespace, ledger.pool, ledger.energy_j)
        return len(written)

    async def run_forever(self, interval_s: float) -> None:
        """Cycle every `interval_s`; an error is logged and the next cycle tries again."""
        while True:
            started = self.clock()
            try:
                report = await self.cycle()
                log.debug("energy cycle: %s", report)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("energy cycle failed")
            await asyncio.sleep(max(interval_s - (self.clock() - started), 0.1))


def _pod_energy(
    readings: Sequence[GpuReading], intervals: Mapping[str, GpuInterval], pods: Mapping[str, ServingPod]
) -> tuple[dict[str, tuple[DeviceInterval, float]], float]:
    """Pod key -> (its share of its GPUs' intervals, its power now); and the energy of GPUs no pod uses."""
    energy: dict[str, float] = defaultdict(float)
    duration: dict[str, float] = defaultdict(float)
    idle_w: dict[str, float] = defaultdict(float)
    power: dict[str, float] = defaultdict(float)
    unmapped_j = 0.0
    for reading in readings:
        users = [f"{p.namespace}/{p.pod}" for p in reading.pods if f"{p.namespace}/{p.pod}" in pods]
        interval = intervals.get(reading.key)
        if not users:
            unmapped_j += interval.energy_j if interval else 0.0
            continue
        spec = lookup_product(reading.product) if reading.product else None
        share = 1.0 / len(users)  # time-sliced GPU: an even split, no better signal in the exporter
        for key in users:
            if reading.power_w is not None:
                power[key] += reading.power_w * share
            if interval is not None:
                energy[key] += interval.energy_j * share
                duration[key] = max(duration[key], interval.duration_s)
                idle_w[key] += (spec.idle_power_w if spec else 0.0) * share
    per_pod = {
        key: (DeviceInterval(energy[key], duration[key], idle_w[key], pods[key].capacity_kv_tokens), power[key])
        for key in set(energy) | set(power)
    }
    return per_pod, unmapped_j


def _rates(windows: Mapping[tuple[Role, str], RateWindow], role: str) -> dict[str, float]:
    return {label: v for (r, label), w in windows.items() if r == role and (v := w.energy_per_token_j) is not None}


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)
