"""Reading a serving engine's Prometheus text exposition (real vLLM and conserve gpu-sim expose the same names).

One reader for every consumer: the operator's occupancy scrape (KV usage, running requests), the router's P/D
signals (running and waiting requests), the load generator and the real-engine checks (counter sums).

- Load: `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (a fraction, 0 to 1,
  despite the name; `vllm:gpu_cache_usage_perc`, vLLM V0's and gpu-sim's older name, is accepted too). Several
  series (one per model or engine) combine: running and waiting add up, KV usage is the largest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

KV_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"


def sample_values(exposition: str, name: str, labels: Mapping[str, str] | None = None) -> list[float]:
    """The values of the samples called `name` whose labels include `labels`. ValueError: not an exposition."""
    want = dict(labels or {})
    return [
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items())
    ]


def sample_sum(exposition: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(sample_values(exposition, name, labels))


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One server's load as its metrics say: requests running and waiting, and KV usage (None: not exposed)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float | None = None


def engine_load(exposition: str) -> EngineLoad | None:
    """The load an exposition reports; None when it does not parse. Missing counts read as 0."""
    usage: dict[str, list[float]] = {name: [] for name in KV_USAGE_METRICS}
    running = waiting = 0.0
    try:
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name in usage:
                    usage[sample.name].append(sample.value)
                elif sample.name == RUNNING_METRIC:
                    running += sample.value
                elif sample.name == WAITING_METRIC:
                    waiting += sample.value
    except ValueError:
        return None
    kv = next((max(usage[n]) for n in KV_USAGE_METRICS if usage[n]), None)  # the real vLLM name wins
    return EngineLoad(
        running=max(int(running), 0),
        waiting=max(int(waiting), 0),
        kv_usage=None if kv is None else min(max(kv, 0.0), 1.0),
    )
