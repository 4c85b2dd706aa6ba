"""The extender's Prometheus metrics (`conserve_extender_*`, base units), on a registry per server.

One registry per `ExtenderMetrics` (no module-level singletons): tests and benchmarks may run several servers in
one process. Label sets are bounded: verb in {filter, prioritize, bind}, outcome in {ok, bad_request, error},
reason in `NodeFilterReason`.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from conserve.core.node_scoring import NodeFilterReason

#: From 0.25 ms (a small fleet) to 5 s (the scheduler's default extender timeout).
LATENCY_BUCKETS_S = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ExtenderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.request_duration_seconds = Histogram(
            "conserve_extender_request_duration_seconds",
            "Time to answer one scheduler call, by verb.",
            ["verb"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.requests_total = Counter(
            "conserve_extender_requests_total",
            "Scheduler calls answered, by verb and outcome (ok, bad_request, error).",
            ["verb", "outcome"],
            registry=self.registry,
        )
        self.filtered_nodes_total = Counter(
            "conserve_extender_filtered_nodes_total",
            "Nodes the filter rejected, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.request_nodes = Histogram(
            "conserve_extender_request_nodes",
            "Candidate nodes per scheduler call, by verb.",
            ["verb"],
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000),
            registry=self.registry,
        )
        self.cache_nodes = Gauge(
            "conserve_extender_cache_nodes", "Nodes in the extender's watch cache.", registry=self.registry
        )
        self.cache_pods = Gauge(
            "conserve_extender_cache_pods",
            "Bound, unfinished pods in the extender's watch cache.",
            registry=self.registry,
        )
        for reason in NodeFilterReason:
            self.filtered_nodes_total.labels(reason=reason.value)

    def record_filtered(self, counts: Mapping[NodeFilterReason, int]) -> None:
        for reason, count in counts.items():
            if count:
                self.filtered_nodes_total.labels(reason=reason.value).inc(count)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))
