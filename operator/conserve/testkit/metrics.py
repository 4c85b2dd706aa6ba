"""ConServe's metric naming rules as a check any registry can be run through, and fresh registries for tests.

A name is `conserve_<what>_<unit>`: lower snake case; its last word a base unit (seconds, joules, watts, bytes,
tokens, ratio) or, for a count, the plural noun of what is counted (`COUNTED`). Derived units (ms, kWh,
percent, MiB) are refused with the base unit to use. Counters expose `_total` samples; every family has help
text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

BASE_UNITS = frozenset({"seconds", "joules", "watts", "bytes", "tokens", "ratio"})
#: Derived units, and the base unit to use instead.
DERIVED_UNITS = {
    "ms": "seconds",
    "milliseconds": "seconds",
    "microseconds": "seconds",
    "minutes": "seconds",
    "hours": "seconds",
    "millijoules": "joules",
    "kwh": "joules",
    "kilowatts": "watts",
    "milliwatts": "watts",
    "percent": "ratio",
    "kib": "bytes",
    "mib": "bytes",
    "gib": "bytes",
    "kilobytes": "bytes",
    "megabytes": "bytes",
}
#: What ConServe counts (the last word of a count's name).
COUNTED = frozenset(
    {
        "conversations",
        "decoders",
        "errors",
        "events",
        "intervals",
        "nodes",
        "patches",
        "placements",
        "pods",
        "releases",
        "requests",
        "transfers",
        "transitions",  # conserve_kv_lifecycle_transitions_total: KV state changes
        "offloads",  # conserve_gpusim_kv_offloads_total: KV entries moved to host memory
        "reloads",  # conserve_gpusim_kv_reloads_total: KV entries brought back from host memory
        "drops",  # conserve_gpusim_kv_host_drops_total: host KV entries dropped
        "turns",
        "writes",
        "closed",  # conserve_router_conversations_closed_total: conversations closed
        "outgrown",  # conserve_reservation_outgrown_total: reservations outgrown
        "received",  # conserve_gpusim_kv_transfers_received_total: KV transfers received
        "shards",  # conserve_operator_shards, conserve_operator_leading_shards: Leases the pools are sharded over
    }
)
_NAME = re.compile(r"^conserve_[a-z][a-z0-9_]*[a-z0-9]$")


def naming_violations(families: Iterable[Collector] | CollectorRegistry) -> list[str]:
    """Every breach of the naming rules among the `conserve_*` families, as 'name: reason' lines."""
    collected = families.collect() if isinstance(families, CollectorRegistry) else _collect(families)
    problems = []
    for family in collected:
        name = family.name
        if not _NAME.match(name) or "__" in name:
            problems.append(f"{name}: not conserve_<lower_snake_case>")
            continue
        last = name.rsplit("_", 1)[-1]
        if not family.documentation:
            problems.append(f"{name}: no help text")
        if last in DERIVED_UNITS:
            problems.append(f"{name}: '{last}' is not a base unit (use _{DERIVED_UNITS[last]})")
        elif last not in BASE_UNITS | COUNTED:
            problems.append(
                f"{name}: ends in '{last}', neither a base unit nor a counted noun (testkit.metrics.COUNTED)"
            )
        if family.type == "counter" and family.samples and not any(s.name.endswith("_total") for s in family.samples):
            problems.append(f"{name}: a counter's samples end in _total")
    return problems


def _collect(collectors: Iterable[Collector]) -> Iterable[Metric]:
    for collector in collectors:
        yield from collector.collect()


def fresh_registry() -> CollectorRegistry:
    """A registry of a test's own: metrics registered there start at zero and leave the process's alone."""
    return CollectorRegistry(auto_describe=True)
