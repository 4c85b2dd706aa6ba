"""Every conserve_* metric follows the naming rules (prefix, base unit or counted noun, _total on counters), and
the rules do catch a wrong name or unit."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from conserve import metrics
from conserve.extender.metrics import ExtenderMetrics
from conserve.gpusim.engine import Role
from conserve.gpusim.server import GpuSimConfig, GpuSimServer
from conserve.testkit.metrics import naming_violations

pytestmark = pytest.mark.unit


def test_metric_names() -> None:
    assert list(metrics.REGISTRY.collect())
    assert naming_violations(metrics.REGISTRY) == []
    assert naming_violations(ExtenderMetrics().registry) == []
    gpusim = GpuSimServer(GpuSimConfig(role=Role.DECODE))
    own = [f for f in gpusim.registry.collect() if f.name.startswith("conserve_")]  # vllm:* mimic vLLM's names
    assert own
    assert naming_violations([_Fixed(own)]) == []
    names = {f.name for f in metrics.REGISTRY.collect()}
    for wanted in (
        "conserve_placements",
        "conserve_placement_latency_seconds",
        "conserve_pending_conversations",
        "conserve_reserved_kv_tokens",
        "conserve_live_kv_tokens",
        "conserve_kv_transfers",
    ):
        assert wanted in names, wanted


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda r: Counter("conserve_bad_name", "A counter of nothing nameable.", registry=r), "neither a base unit"),
        (lambda r: Histogram("conserve_wait_milliseconds", "Wait.", registry=r), "not a base unit (use _seconds)"),
        (lambda r: Gauge("conserve_kv_usage_percent", "KV use.", registry=r), "not a base unit (use _ratio)"),
        (lambda r: Histogram("conserve_turn_latency", "Latency.", registry=r), "neither a base unit"),
        (lambda r: Gauge("conserve_power_watts", "", registry=r), "no help text"),
        (lambda r: Gauge("conserveWatts", "Power.", registry=r), "not conserve_<lower_snake_case>"),
    ],
)
def test_a_wrong_name_or_unit_is_caught(make: object, reason: str, metric_registry: CollectorRegistry) -> None:
    make(metric_registry)  # type: ignore[operator]
    problems = naming_violations(metric_registry)
    assert len(problems) == 1, problems
    assert reason in problems[0]


def test_forget_pool_drops_series() -> None:
    metrics.QUEUE_LENGTH.labels("ns-x", "pool-x").set(3)
    metrics.forget_pool("ns-x", "pool-x")
    samples = [s for f in metrics.REGISTRY.collect() for s in f.samples if s.labels.get("pool") == "pool-x"]
    assert not [s for s in samples if s.name == "conserve_pending_conversations"]


class _Fixed(Collector):
    """A collector of already collected families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
