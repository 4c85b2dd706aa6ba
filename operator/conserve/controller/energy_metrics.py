"""The energy loop's Prometheus side: one cycle into the `conserve.metrics` energy section, and the series of
pods and GPUs that left dropped."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from conserve import metrics as m
from conserve.controller.energy_state import ServingPod
from conserve.core.energy import Attribution, DeltaKind, DeviceInterval, GpuInterval
from conserve.core.gpus import Role
from conserve.energy.reader import GpuReading

#: Pod key -> (its share of its GPUs' intervals, its power now).
PodEnergy = Mapping[str, tuple[DeviceInterval, float]]


@dataclass(slots=True)
class CycleTotals:
    """Attributed and unattributed joules of a cycle, overall and per pool."""

    attributed_j: float = 0.0
    unattributed_j: float = 0.0
    by_pool: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (ns, pool) -> [attrib, unattrib]

    def add(self, pod: ServingPod, result: Attribution) -> None:
        self.attributed_j += result.attributed_j
        self.unattributed_j += result.unattributed_j
        entry = self.by_pool.setdefault((pod.namespace, pod.pool), [0.0, 0.0])
        entry[0] += result.attributed_j
        entry[1] += result.unattributed_j


@dataclass(frozen=True, slots=True)
class CycleObservation:
    """What a cycle hands the metrics: readings and intervals per GPU, energy per pod, totals, measured J/token."""

    readings: Sequence[GpuReading]
    intervals: Mapping[str, GpuInterval]
    per_pod: PodEnergy
    pods: Mapping[str, ServingPod]
    totals: CycleTotals
    kinds: Mapping[str, int]
    #: role -> tier -> measured J per token
    tier_energy_per_token_j: Mapping[Role, Mapping[str, float]]


class EnergyMetrics(Protocol):
    def observe_cycle(self, cycle: CycleObservation) -> None: ...
    def observe_conversation(self, namespace: str, pool: str, energy_j: float) -> None: ...


class PrometheusEnergyMetrics:
    """Writes a cycle into the `conserve.metrics` energy section; drops the series of pods and GPUs that left."""

    def __init__(self) -> None:
        self._gpu_labels: set[tuple[str, str, str]] = set()
        self._pod_labels: set[tuple[str, str, str, str]] = set()
        self._pool_labels: set[tuple[str, str]] = set()

    def observe_cycle(self, cycle: CycleObservation) -> None:
        self._observe_gpus(cycle.readings, cycle.intervals)
        for kind, count in cycle.kinds.items():
            if count and kind != DeltaKind.FIRST.value:
                m.GPU_INTERVALS.labels(kind).inc(count)
        self._observe_pods(cycle.per_pod, cycle.pods)
        for pool_key, (attributed, unattributed) in cycle.totals.by_pool.items():
            if attributed > 0:
                m.ATTRIBUTED_ENERGY.labels(*pool_key).inc(attributed)
            if unattributed > 0:
                m.UNATTRIBUTED_ENERGY.labels(*pool_key).inc(unattributed)
        for role, tiers in cycle.tier_energy_per_token_j.items():
            for tier, joules in tiers.items():
                m.ENERGY_PER_TOKEN.labels(tier, role.value).set(joules)

    def observe_conversation(self, namespace: str, pool: str, energy_j: float) -> None:
        m.CONVERSATION_ENERGY_FINAL.labels(namespace, pool).observe(energy_j)

    def _observe_gpus(self, readings: Sequence[GpuReading], intervals: Mapping[str, GpuInterval]) -> None:
        gpu_labels = set()
        for reading in readings:
            labels = (reading.hostname, str(reading.gpu_index), reading.product)
            gpu_labels.add(labels)
            if reading.power_w is not None:
                m.GPU_POWER.labels(*labels).set(reading.power_w)
            interval = intervals.get(reading.key)
            if interval is not None and interval.energy_j > 0:
                m.GPU_ENERGY.labels(reading.hostname, str(reading.gpu_index)).inc(interval.energy_j)
        _remove_gone(m.GPU_POWER, self._gpu_labels, gpu_labels)
        self._gpu_labels = gpu_labels

    def _observe_pods(self, per_pod: PodEnergy, pods: Mapping[str, ServingPod]) -> None:
        pod_labels = set()
        pool_power: dict[tuple[str, str], float] = defaultdict(float)
        for key, (device, power_w) in per_pod.items():
            pod = pods[key]
            labels = (pod.namespace, pod.pool, pod.pod, pod.role.value)
            pod_labels.add(labels)
            m.DECODER_POWER.labels(*labels).set(power_w)
            if device.energy_j > 0:
                m.DECODER_ENERGY.labels(*labels).inc(device.energy_j)
            pool_power[(pod.namespace, pod.pool)] += power_w
        _remove_gone(m.DECODER_POWER, self._pod_labels, pod_labels)
        self._pod_labels = pod_labels
        for pool_key, watts in pool_power.items():
            m.POOL_POWER.labels(*pool_key).set(watts)
        _remove_gone(m.POOL_POWER, self._pool_labels, set(pool_power))
        self._pool_labels = set(pool_power)


def _remove_gone(metric: Any, before: set[Any], now: set[Any]) -> None:
    """Drop the series of label sets seen last cycle and not in this one."""
    for labels in before - now:
        with contextlib.suppress(KeyError):
            metric.remove(*labels)
