"""The operator's energy loop: GPU readings in; decoder, pool and conversation energy out.

Every `interval_s`:
1. read every GPU through an `EnergyReader` (dcgm-exporter endpoints found by a Service or a pod selector, or
   given as URLs; NVML; a fake) and turn each GPU's counter into an interval (`conserve.core.energy.gpu_interval`:
   resets, wraps and missing samples never give negative or double-counted energy);
2. map each GPU to the serving pods that use it, from the exporter's `pod`/`namespace` labels (dcgm-exporter's
   Kubernetes mapping; the fake exporter sets them too); a GPU shared by several serving pods is split evenly;
   a GPU no serving pod uses is counted on its node only;
3. know each pod's pool and role from the DecoderPool statuses (decoders[] and prefills[] with their KV
   capacity), and each conversation's work and KV from its Conversation (spec.usage, status);
4. attribute each pod's interval among its conversations (`attribute_interval`): decode pods by tokens processed
   in the interval (input + output reported since the last cycle) and idle by KV held (max of reservation and
   live context); prefill pods by the first turn's input tokens, once, in the cycle that sees the first turn;
5. write: Conversation status `energyJoules` and `energyPerTokenJoules` (J per output token) by merge patch of
   those two fields only; per-decoder power and energy and J per output token through a `DecoderEnergySink`
   (in the operator: `World.set_decoder_energy`, which the pool status writer and placement read; standalone:
   `PoolStatusPatchSink`, a read-modify-write of decoders[] guarded by resourceVersion); Prometheus metrics.
Cumulative figures start from what status already holds, so an operator restart neither loses nor repeats them.
Measured J per token per tier (and per GPU product and role) is kept over a decaying window: a decoder without
its own measurement yet gets its tier's, which is what the placement energy scorer sees.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from conserve.core.energy import (
    Attribution,
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
from conserve.core.gpus import lookup_product
from conserve.energy.reader import EnergyReader, GpuReading

log = logging.getLogger(__name__)

Body = dict[str, Any]
TERMINAL_PHASES = ("Completed", "Failed")
#: Writes smaller than this (J) wait for the next cycle: status traffic stays proportional to real change.
MIN_WRITE_DELTA_J = 0.5


class EnergyKube(Protocol):
    """The reads and writes the loop needs (`conserve.controller.kube.KubeClient` has them)."""

    async def list_objects(self, plural: str, namespace: str | None) -> list[Body]: ...
    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body: ...


class DecoderEnergySink(Protocol):
    """Where per-pod figures go; `conserve.controller.state.World` is one."""

    def set_decoder_energy(
        self,
        namespace: str,
        pool: str,
        pod: str,
        *,
        power_watts: float | None = None,
        energy_joules: float | None = None,
        energy_per_token_j: float | None = None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class ServingPod:
    namespace: str
    pod: str
    pool: str
    role: str  # "decode" or "prefill"
    tier: str = ""
    gpu_product: str = ""
    capacity_kv_tokens: int = 0
    energy_joules: float | None = None  # as status has it (the starting point after a restart)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.pod}"


@dataclass(frozen=True, slots=True)
class ConversationView:
    key: str
    namespace: str
    pool: str
    decoder_pod: str
    prefill_pod: str
    tokens: int  # input + output reported so far
    output_tokens: int
    first_turn_input_tokens: int
    turns: int
    kv_tokens: int
    terminal: bool
    energy_joules: float | None


def serving_pods(pools: Sequence[Body]) -> dict[str, ServingPod]:
    """Pod key -> its pool and role, from DecoderPool statuses."""
    out: dict[str, ServingPod] = {}
    for pool in pools:
        meta, status = pool.get("metadata") or {}, pool.get("status") or {}
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        for role, entries in (("decode", status.get("decoders") or []), ("prefill", status.get("prefills") or [])):
            for entry in entries:
                if not entry.get("pod"):
                    continue
                pod = ServingPod(
                    namespace,
                    str(entry["pod"]),
                    name,
                    role,
                    str(entry.get("tier") or ""),
                    str(entry.get("gpuProduct") or ""),
                    int(entry.get("capacityKvTokens") or 0),
                    _float_or_none(entry.get("energyJoules")),
                )
                out[pod.key] = pod
    return out


def conversation_view(body: Body) -> ConversationView:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    usage = spec.get("usage") or {}
    namespace = str(meta.get("namespace", ""))
    input_tokens, output_tokens = int(usage.get("inputTokens") or 0), int(usage.get("outputTokens") or 0)
    return ConversationView(
        key=f"{namespace}/{meta.get('name', '')}",
        namespace=namespace,
        pool=str(spec.get("pool", "")),
        decoder_pod=str((status.get("decoder") or {}).get("pod") or ""),
        prefill_pod=str((status.get("prefill") or {}).get("pod") or ""),
        tokens=input_tokens + output_tokens,
        output_tokens=output_tokens,
        first_turn_input_tokens=int(spec.get("firstTurnInputTokens") or 0),
        turns=int(usage.get("turns") or 0),
        kv_tokens=max(int(status.get("reservedKvTokens") or 0), int(status.get("liveKvTokens") or 0)),
        terminal=str(status.get("phase", "")) in TERMINAL_PHASES or bool(spec.get("completed")),
        energy_joules=_float_or_none(status.get("energyJoules")),
    )


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(slots=True)
class _ConvLedger:
    namespace: str
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


class EnergyAccountant:
    """The loop's state and one cycle's work; no timer of its own (`run_forever` adds one)."""

    def __init__(
        self,
        reader: EnergyReader,
        kube: EnergyKube,
        sink: DecoderEnergySink,
        *,
        clock: Callable[[], float] = time.monotonic,
        namespaces: Sequence[str] | None = None,
        metrics: EnergyMetricsLike | None = None,
    ) -> None:
        self.reader, self.kube, self.sink, self.clock = reader, kube, sink, clock
        self.namespaces: list[str | None] = list(namespaces) if namespaces else [None]  # None: every namespace
        self.metrics = metrics
        self._baselines: dict[str, GpuSample | None] = {}
        self._convs: dict[str, _ConvLedger] = {}
        self._pods: dict[str, _PodLedger] = {}
        self._tiers: dict[tuple[str, str], RateWindow] = {}  # (role, tier) -> window
        self._products: dict[tuple[str, str], RateWindow] = {}  # (role, product) -> window
        self._first_cycle = True

    # --- measured J per token -----------------------------------------------------------------------------
    def tier_energy_per_token_j(self, role: str = "decode") -> dict[str, float]:
        """Measured J per token of each tier for a role (output tokens for decode, input tokens for prefill)."""
        return {t: v for (r, t), w in self._tiers.items() if r == role and (v := w.energy_per_token_j) is not None}

    def product_energy_per_token_j(self, role: str = "decode") -> dict[str, float]:
        return {p: v for (r, p), w in self._products.items() if r == role and (v := w.energy_per_token_j) is not None}

    # --- one cycle ----------------------------------------------------------------------------------------
    async def cycle(self) -> CycleReport:
        readings = await self.reader.read()
        now_s = self.clock()
        pools, conversation_bodies = [], []
        for namespace in self.namespaces:
            pools += await self.kube.list_objects("decoderpools", namespace)
            conversation_bodies += await self.kube.list_objects("conversations", namespace)
        conversations = [conversation_view(b) for b in conversation_bodies]
        pods = serving_pods(pools)
        intervals, kinds = self._gpu_intervals(readings, now_s)
        per_pod, unmapped_j = self._pod_energy(readings, intervals, pods)
        work, prefill_work, output_delta = self._work(conversations, pods)
        totals = self._attribute(per_pod, pods, work, prefill_work, output_delta)
        written = await self._write(conversations, pods, pools)
        gpu_j = math.fsum(i.energy_j for i in intervals.values())
        if self.metrics is not None:
            self.metrics.observe_cycle(readings, intervals, per_pod, pods, totals, kinds, self)
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

    def _pod_energy(
        self, readings: Sequence[GpuReading], intervals: Mapping[str, GpuInterval], pods: Mapping[str, ServingPod]
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

    def _work(
        self, conversations: Sequence[ConversationView], pods: Mapping[str, ServingPod]
    ) -> tuple[dict[str, list[ConversationWork]], dict[str, list[ConversationWork]], dict[str, int]]:
        """Per decode pod and per prefill pod, what each conversation did since the last cycle."""
        decode: dict[str, list[ConversationWork]] = defaultdict(list)
        prefill: dict[str, list[ConversationWork]] = defaultdict(list)
        output_delta: dict[str, int] = defaultdict(int)  # pod -> output tokens in the interval
        for conv in conversations:
            ledger = self._convs.get(conv.key)
            if ledger is None:
                # Known from status: accounted by an earlier operator; its past tokens were counted then.
                accounted = conv.energy_joules is not None or self._first_cycle
                ledger = _ConvLedger(
                    conv.namespace,
                    conv.energy_joules or 0.0,
                    conv.tokens if accounted else 0,
                    conv.output_tokens if accounted else 0,
                    prefill_counted=accounted and conv.turns > 0,
                    written_j=conv.energy_joules,
                    final_observed=conv.terminal and conv.energy_joules is not None,
                )
                self._convs[conv.key] = ledger
            ledger.pool, ledger.terminal = conv.pool, conv.terminal
            tokens = max(conv.tokens - ledger.tokens_seen, 0)
            outputs = max(conv.output_tokens - ledger.output_tokens, 0)
            ledger.tokens_seen = max(ledger.tokens_seen, conv.tokens)
            ledger.output_tokens = max(ledger.output_tokens, conv.output_tokens)
            decoder = f"{conv.namespace}/{conv.decoder_pod}"
            if conv.decoder_pod and decoder in pods:
                kv = 0 if conv.terminal else conv.kv_tokens
                if tokens or kv:
                    decode[decoder].append(ConversationWork(conv.key, tokens, kv))
                output_delta[decoder] += outputs
            prefiller = f"{conv.namespace}/{conv.prefill_pod}"
            if conv.prefill_pod and prefiller in pods and conv.turns > 0 and not ledger.prefill_counted:
                prefill[prefiller].append(ConversationWork(conv.key, conv.first_turn_input_tokens, 0))
                output_delta[prefiller] += conv.first_turn_input_tokens  # prefill J/token is per input token
                ledger.prefill_counted = True
        seen = {c.key for c in conversations}
        for key in [k for k in self._convs if k not in seen]:
            del self._convs[key]  # deleted: its energy stays in the pod's and the pool's totals
        return decode, prefill, output_delta

    def _attribute(
        self,
        per_pod: Mapping[str, tuple[DeviceInterval, float]],
        pods: Mapping[str, ServingPod],
        decode_work: Mapping[str, list[ConversationWork]],
        prefill_work: Mapping[str, list[ConversationWork]],
        token_delta: Mapping[str, int],
    ) -> _Totals:
        totals = _Totals()
        tier_sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        product_sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for key, (device, power_w) in per_pod.items():
            pod = pods[key]
            work = decode_work.get(key, []) if pod.role == "decode" else prefill_work.get(key, [])
            result = attribute_interval(device, work)
            totals.add(pod, result)
            for conv_key, joules in result.per_conversation_j.items():
                self._convs[conv_key].energy_j += joules
            ledger = self._pods.get(key)
            if ledger is None:
                ledger = self._pods[key] = _PodLedger(pod.energy_joules or 0.0)
            ledger.energy_j += device.energy_j
            ledger.power_w = power_w
            ledger.window = ledger.window.add(device.energy_j, token_delta.get(key, 0))
            for sums, label in ((tier_sums, pod.tier), (product_sums, pod.gpu_product)):
                if label and device.energy_j > 0:
                    sums[(pod.role, label)][0] += device.energy_j
                    sums[(pod.role, label)][1] += token_delta.get(key, 0)
        # One window step per cycle (not per pod), so the decay is per interval whatever the fleet's size.
        for table, sums in ((self._tiers, tier_sums), (self._products, product_sums)):
            for label_key, (joules, tokens) in sums.items():
                table[label_key] = table.get(label_key, RateWindow()).add(joules, int(tokens))
        for key in [k for k in self._pods if k not in pods]:
            del self._pods[key]
        return totals

    async def _write(
        self, conversations: Sequence[ConversationView], pods: Mapping[str, ServingPod], pools: Sequence[Body]
    ) -> int:
        tiers = {"decode": self.tier_energy_per_token_j("decode"), "prefill": self.tier_energy_per_token_j("prefill")}
        for key, pod_ledger in self._pods.items():
            pod = pods[key]
            measured = pod_ledger.window.energy_per_token_j
            self.sink.set_decoder_energy(
                pod.namespace,
                pod.pool,
                pod.pod,
                power_watts=None if pod_ledger.power_w is None else round(pod_ledger.power_w, 3),
                energy_joules=round(pod_ledger.energy_j, 3),
                energy_per_token_j=measured if measured is not None else tiers[pod.role].get(pod.tier),
            )
        flush = getattr(self.sink, "flush", None)
        if flush is not None:
            await flush(pools)
        written = 0
        by_key = {c.key: c for c in conversations}
        for key, ledger in self._convs.items():
            conv = by_key[key]
            if ledger.energy_j <= 0 or (
                ledger.written_j is not None and ledger.energy_j - ledger.written_j < MIN_WRITE_DELTA_J
            ):
                continue
            patch = {
                "status": {
                    "energyJoules": round(ledger.energy_j, 3),
                    "energyPerTokenJoules": _round(energy_per_token_j(ledger.energy_j, conv.output_tokens)),
                }
            }
            name = key.split("/", 1)[1]
            try:
                await self.kube.patch_status("conversations", conv.namespace, name, patch)
            except Exception as exc:  # a deleted conversation, a transient API error: retried next cycle
                log.info("energy: status of conversation %s not written: %s", key, exc)
                continue
            ledger.written_j = ledger.energy_j
            written += 1
        for ledger in self._convs.values():
            if ledger.terminal and not ledger.final_observed and ledger.written_j is not None:
                ledger.final_observed = True
                if self.metrics is not None:
                    self.metrics.observe_conversation(ledger.namespace, ledger.pool, ledger.energy_j)
        return written

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


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(slots=True)
class _Totals:
    attributed_j: float = 0.0
    unattributed_j: float = 0.0
    by_pool: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (ns, pool) -> [attrib, unattrib]

    def add(self, pod: ServingPod, result: Attribution) -> None:
        self.attributed_j += result.attributed_j
        self.unattributed_j += result.unattributed_j
        entry = self.by_pool.setdefault((pod.namespace, pod.pool), [0.0, 0.0])
        entry[0] += result.attributed_j
        entry[1] += result.unattributed_j


class EnergyMetricsLike(Protocol):
    def observe_cycle(
        self,
        readings: Sequence[GpuReading],
        intervals: Mapping[str, GpuInterval],
        per_pod: Mapping[str, tuple[DeviceInterval, float]],
        pods: Mapping[str, ServingPod],
        totals: _Totals,
        kinds: Mapping[str, int],
        accountant: EnergyAccountant,
    ) -> None: ...

    def observe_conversation(self, namespace: str, pool: str, energy_j: float) -> None: ...


class PrometheusEnergyMetrics:
    """Writes a cycle into the `conserve.metrics` energy section; drops the series of pods and GPUs that left."""

    def __init__(self) -> None:
        self._gpu_labels: set[tuple[str, str, str]] = set()
        self._pod_labels: set[tuple[str, str, str, str]] = set()
        self._pool_labels: set[tuple[str, str]] = set()

    def observe_cycle(
        self,
        readings: Sequence[GpuReading],
        intervals: Mapping[str, GpuInterval],
        per_pod: Mapping[str, tuple[DeviceInterval, float]],
        pods: Mapping[str, ServingPod],
        totals: _Totals,
        kinds: Mapping[str, int],
        accountant: EnergyAccountant,
    ) -> None:
        from conserve import metrics as m

        gpu_labels = set()
        for reading in readings:
            labels = (reading.hostname, str(reading.gpu_index), reading.product)
            gpu_labels.add(labels)
            if reading.power_w is not None:
                m.GPU_POWER.labels(*labels).set(reading.power_w)
            interval = intervals.get(reading.key)
            if interval is not None and interval.energy_j > 0:
                m.GPU_ENERGY.labels(reading.hostname, str(reading.gpu_index)).inc(interval.energy_j)
        for labels in self._gpu_labels - gpu_labels:
            _remove(m.GPU_POWER, labels)
        self._gpu_labels = gpu_labels
        for kind, count in kinds.items():
            if count and kind != DeltaKind.FIRST.value:
                m.GPU_INTERVALS.labels(kind).inc(count)
        pod_labels = set()
        pool_power: dict[tuple[str, str], float] = defaultdict(float)
        for key, (device, power_w) in per_pod.items():
            pod = pods[key]
            labels4 = (pod.namespace, pod.pool, pod.pod, pod.role)
            pod_labels.add(labels4)
            m.DECODER_POWER.labels(*labels4).set(power_w)
            if device.energy_j > 0:
                m.DECODER_ENERGY.labels(*labels4).inc(device.energy_j)
            pool_power[(pod.namespace, pod.pool)] += power_w
        for labels4 in self._pod_labels - pod_labels:
            _remove(m.DECODER_POWER, labels4)
        self._pod_labels = pod_labels
        for pool_key, watts in pool_power.items():
            m.POOL_POWER.labels(*pool_key).set(watts)
        for pool_key in self._pool_labels - set(pool_power):
            _remove(m.POOL_POWER, pool_key)
        self._pool_labels = set(pool_power)
        for pool_key, (attributed, unattributed) in totals.by_pool.items():
            if attributed > 0:
                m.ATTRIBUTED_ENERGY.labels(*pool_key).inc(attributed)
            if unattributed > 0:
                m.UNATTRIBUTED_ENERGY.labels(*pool_key).inc(unattributed)
        for role in ("decode", "prefill"):
            for tier, joules in accountant.tier_energy_per_token_j(role).items():
                m.ENERGY_PER_TOKEN.labels(tier, role).set(joules)

    def observe_conversation(self, namespace: str, pool: str, energy_j: float) -> None:
        from conserve import metrics as m

        m.CONVERSATION_ENERGY_FINAL.labels(namespace, pool).observe(energy_j)


def _remove(metric: Any, labels: Sequence[str]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


# --- sinks -----------------------------------------------------------------------------------------------


@dataclass
class MemorySink:
    """Keeps the figures (tests; and the store a pool handler can read when it writes status)."""

    figures: dict[tuple[str, str, str], tuple[float | None, float | None, float | None]] = field(default_factory=dict)

    def set_decoder_energy(
        self,
        namespace: str,
        pool: str,
        pod: str,
        *,
        power_watts: float | None = None,
        energy_joules: float | None = None,
        energy_per_token_j: float | None = None,
    ) -> None:
        self.figures[(namespace, pool, pod)] = (power_watts, energy_joules, energy_per_token_j)


def merge_decoder_energy(
    decoders: Sequence[Body], figures: Mapping[str, tuple[float | None, float | None]]
) -> list[Body]:
    """decoders[] of a pool status with powerWatts/energyJoules set from `figures` (pod -> (W, J)); the rest of
    each entry untouched. Pure: the pool status writer can call it."""
    out = []
    for entry in decoders:
        figure = figures.get(str(entry.get("pod", "")))
        if figure is None:
            out.append(dict(entry))
            continue
        out.append({**entry, "powerWatts": figure[0], "energyJoules": figure[1]})
    return out


class PoolStatusPatchSink(MemorySink):
    """Standalone mode (no operator in this process): writes decoders[].powerWatts/energyJoules and the pool's
    powerWatts/energyJoules itself. decoders[] is a list, which a merge patch replaces whole, so the patch carries
    the resourceVersion it was built from: if the operator wrote in between, the API server refuses it (409) and
    the next cycle rebuilds it from the newer object."""

    def __init__(self, kube: EnergyKube) -> None:
        super().__init__()
        self.kube = kube
        self.conflicts = 0

    async def flush(self, pools: Sequence[Body]) -> None:
        for pool in pools:
            meta, status = pool.get("metadata") or {}, pool.get("status") or {}
            namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
            mine = {pod: f for (ns, p, pod), f in self.figures.items() if ns == namespace and p == name}
            if not mine:
                continue
            decoders = status.get("decoders") or []
            merged = merge_decoder_energy(decoders, {pod: (f[0], f[1]) for pod, f in mine.items()})
            power = [f[0] for f in mine.values() if f[0] is not None]
            energy = [f[1] for f in mine.values() if f[1] is not None]
            patch: Body = {
                "metadata": {"resourceVersion": meta.get("resourceVersion")},
                "status": {
                    "powerWatts": round(math.fsum(power), 3) if power else None,
                    "energyJoules": round(math.fsum(energy), 3) if energy else None,
                },
            }
            if merged != decoders:
                patch["status"]["decoders"] = merged
            try:
                await self.kube.patch_status("decoderpools", namespace, name, patch)
            except Exception as exc:  # 409: the operator wrote first; the next cycle has the newer object
                self.conflicts += 1
                log.info("energy: pool %s/%s status not written: %s", namespace, name, exc)


# --- command line ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnergyOptions:
    """Where GPU readings come from and how often the loop runs."""

    source: str = "dcgm"  # "dcgm", "nvml" or "none"
    interval_s: float = 10.0
    dcgm_urls: tuple[str, ...] = ()
    dcgm_service: str = ""  # NAMESPACE/NAME
    dcgm_pod_selector: str = ""  # NAMESPACE/LABEL-SELECTOR
    dcgm_port: int = 9400

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EnergyOptions:
        return cls(
            args.energy_source,
            args.energy_interval_seconds,
            tuple(args.dcgm_url),
            args.dcgm_service,
            args.dcgm_pod_selector,
            args.dcgm_port,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The energy loop's flags (the operator's command can add them too, then `EnergyOptions.from_args`)."""
    group = parser.add_argument_group("energy")
    group.add_argument("--energy-source", choices=["dcgm", "nvml", "none"], default="dcgm")
    group.add_argument("--energy-interval-seconds", type=float, default=10.0)
    group.add_argument("--dcgm-url", action="append", default=[], help="a dcgm-exporter /metrics URL (repeatable)")
    group.add_argument(
        "--dcgm-service", default="", help="NAMESPACE/NAME of the dcgm-exporter Service (its endpoints are scraped)"
    )
    group.add_argument(
        "--dcgm-pod-selector",
        default="",
        help="NAMESPACE/LABEL-SELECTOR of the dcgm-exporter pods, e.g. gpu-operator/app=nvidia-dcgm-exporter",
    )
    group.add_argument("--dcgm-port", type=int, default=9400, help="port when the Service does not name one")


class ExporterDiscovery:
    """dcgm-exporter endpoints from a Service (its EndpointSlices' ready addresses) or a pod label selector,
    looked up on every read so exporters that come and go are followed."""

    def __init__(self, api_client: Any, *, service: str = "", pod_selector: str = "", port: int = 9400) -> None:
        self.api_client, self.service, self.pod_selector, self.port = api_client, service, pod_selector, port

    async def __call__(self) -> Sequence[str]:
        return await asyncio.to_thread(self._lookup)

    def _lookup(self) -> list[str]:
        from kubernetes import client

        urls: list[str] = []
        if self.service:
            namespace, name = self.service.split("/", 1)
            slices = client.DiscoveryV1Api(self.api_client).list_namespaced_endpoint_slice(
                namespace, label_selector=f"kubernetes.io/service-name={name}"
            )
            for item in slices.items:
                ports = [p.port for p in item.ports or [] if p.port]
                named = [p.port for p in item.ports or [] if p.name == "metrics" and p.port]
                port = (named or ports or [self.port])[0]
                for endpoint in item.endpoints or []:
                    if endpoint.conditions is not None and endpoint.conditions.ready is False:
                        continue
                    urls.extend(_url(address, port) for address in endpoint.addresses or [])
        if self.pod_selector:
            namespace, selector = self.pod_selector.split("/", 1)
            pods = client.CoreV1Api(self.api_client).list_namespaced_pod(namespace, label_selector=selector)
            for pod in pods.items:
                if pod.status and pod.status.phase == "Running" and pod.status.pod_ip:
                    urls.append(_url(pod.status.pod_ip, self.port))
        return sorted(set(urls))


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/metrics"


def build_reader(options: EnergyOptions, api_client: Any | None) -> EnergyReader:
    """The reader the options ask for."""
    if options.source == "none":
        from conserve.energy.reader import NullReader

        return NullReader()
    if options.source == "nvml":
        from conserve.energy.nvml import NvmlReader

        return NvmlReader()
    from conserve.energy.dcgm import DcgmExporterReader, static_endpoints

    if options.dcgm_urls:
        return DcgmExporterReader(static_endpoints(options.dcgm_urls))
    if not (options.dcgm_service or options.dcgm_pod_selector) or api_client is None:
        raise ValueError("the dcgm energy source needs exporter URLs, a Service or a pod selector")
    discovery = ExporterDiscovery(
        api_client, service=options.dcgm_service, pod_selector=options.dcgm_pod_selector, port=options.dcgm_port
    )
    return DcgmExporterReader(discovery)


def start_in_operator(
    world: DecoderEnergySink,
    kube: EnergyKube,
    options: EnergyOptions,
    api_client: Any | None,
    namespaces: Sequence[str] | None = None,
) -> tuple[EnergyAccountant, asyncio.Task[None]]:
    """For the operator's startup: the loop as a task, writing decoder figures into the operator's World (the
    pool status writer and placement read them) and conversation energy by merge patch of its two fields."""
    reader = build_reader(options, api_client)
    accountant = EnergyAccountant(reader, kube, world, namespaces=namespaces, metrics=PrometheusEnergyMetrics())
    return accountant, asyncio.create_task(accountant.run_forever(options.interval_s), name="conserve-energy")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "energy", help="run the energy loop alone (GPU readings -> pool and conversation status, metrics)"
    )
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--namespace", default=None, help="only this namespace (default: all)")
    parser.add_argument("--metrics-port", type=int, default=8081, help="serve /metrics here (0: do not serve)")
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from conserve.controller.kube import KubeClient
    from conserve.metrics import REGISTRY

    kube = KubeClient.from_kubeconfig(args.kubeconfig)
    options = EnergyOptions.from_args(args)
    try:
        reader = build_reader(options, kube.api_client)
    except ValueError as exc:
        raise SystemExit(f"conserve energy: {exc}") from exc
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=REGISTRY)
    accountant = EnergyAccountant(
        reader,
        kube,
        PoolStatusPatchSink(kube),
        namespaces=[args.namespace] if args.namespace else None,
        metrics=PrometheusEnergyMetrics(),
    )
    try:
        await accountant.run_forever(options.interval_s)
    finally:
        await reader.close()
        kube.close()
    return 0
