#!/usr/bin/env python3
"""Write dashboards/conserve.json, the Grafana dashboard of the conserve_* metrics.

    python charts/conserve/hack/dashboard.py

Edit the panels here, not the JSON. A unit test checks that every metric a panel queries is defined in the code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dashboard_layout import DS, NOSEL, RATE, SEL, Layout, quantiles
from dashboard_rows import control_plane_row, energy_row, kv_lifecycle_row, or_zero, router_row, servers_row, slo_row

OUT = Path(__file__).resolve().parent.parent / "dashboards" / "conserve.json"


def operator_rows(g: Layout) -> None:
    """Placement and KV capacity, per pool (the operator's metrics carry the pool's namespace and name)."""
    g.row("Conversations and placement")
    g.stat("Pending conversations", f"sum(conserve_pending_conversations{SEL})", "short", 0, "Waiting for a decoder.")
    g.stat("Pinned conversations", f"sum(conserve_pinned_conversations{SEL})", "short", 6, "Holding a reservation.")
    g.stat("Ready decoders", f"sum(conserve_ready_decoders{SEL})", "short", 12, "Ready decoders of the pools.")
    g.stat(
        "KV transfers/s",
        f"sum(rate(conserve_kv_transfers_total{SEL}{RATE}))",
        "ops", 18, "One per first placement, one more per move after a decoder loss.",
    )  # fmt: skip
    g.next_line(4)
    g.timeseries(
        "Placements by pool and result",
        [(f"sum by (pool, result) (rate(conserve_placements_total{SEL}{RATE}))", "{{pool}} {{result}}")],
        "ops", 0, "placed, replaced (after a decoder loss), queued (no decoder fits), failed.",
    )  # fmt: skip
    g.timeseries(
        "Placement latency by pool (p50, p95, p99)",
        quantiles("conserve_placement_latency_seconds", (0.5, 0.95, 0.99), "pool"),
        "s", 12, "From the operator first seeing a conversation to its placement in status.",
    )  # fmt: skip
    g.next_line(8)
    g.row("KV capacity")
    g.timeseries(
        "KV tokens by pool: capacity, reserved, live",
        [
            (f"sum by (pool) (conserve_capacity_kv_tokens{SEL})", "{{pool}} capacity"),
            (f"sum by (pool) (conserve_reserved_kv_tokens{SEL})", "{{pool}} reserved"),
            (f"sum by (pool) (conserve_live_kv_tokens{SEL})", "{{pool}} live"),
        ],
        "short", 0, "KV capacity of the ready decoders, tokens held by reservations, live context.",
    )  # fmt: skip
    g.timeseries(
        "KV reserved / capacity by pool",
        [
            (
                f"sum by (pool) (conserve_reserved_kv_tokens{SEL}) / sum by (pool) (conserve_capacity_kv_tokens{SEL})",
                "{{pool}}",
            )
        ],
        "percentunit", 12, "How full the pool's decoders are.",
    )  # fmt: skip
    g.next_line(8)
    g.timeseries(
        "Releases and outgrown reservations",
        [
            (f"sum by (reason) (rate(conserve_releases_total{SEL}{RATE}))", "released {{reason}}"),
            (or_zero(f"sum by (result) (rate(conserve_reservation_outgrown_total{SEL}{RATE}))"), "outgrown {{result}}"),
        ],
        "ops", 0, "Reservations released by reason; turns that outgrew their reservation.",
    )  # fmt: skip
    g.timeseries(
        "Decision time (p99) and status write errors",
        [
            *quantiles("conserve_placement_decision_seconds", (0.99,), "pool"),
            (or_zero(f"sum by (kind) (rate(conserve_status_write_errors_total{RATE}))"), "write errors {{kind}}"),
        ],
        "s", 12, "Time the core takes per decision; status patches that failed after retries (per second).",
    )  # fmt: skip
    g.next_line(8)


def dashboard() -> dict[str, Any]:
    g = Layout()
    operator_rows(g)
    slo_row(g)
    kv_lifecycle_row(g)
    energy_row(g)
    router_row(g)
    servers_row(g)
    g.row("Scheduler extender")
    g.stat("Nodes in cache", f"max(conserve_extender_cache_nodes{NOSEL})", "short", 0, "Nodes in the watch cache.")
    g.stat(
        "Pods in cache", f"max(conserve_extender_cache_pods{NOSEL})", "short", 6, "Bound, unfinished pods in the cache."
    )
    g.stat(
        "Calls/s",
        f"sum(rate(conserve_extender_requests_total{NOSEL}{RATE}))",
        "reqps", 12, "Scheduler calls answered per second.",
    )  # fmt: skip
    g.stat(
        "Errors/s",
        or_zero(f'sum(rate(conserve_extender_requests_total{{outcome!="ok"}}{RATE}))'),
        "reqps", 18, "Scheduler calls answered with bad_request or error.",
    )  # fmt: skip
    g.next_line(4)
    g.timeseries(
        "Scheduler calls by verb and outcome",
        [(f"sum by (verb, outcome) (rate(conserve_extender_requests_total{NOSEL}{RATE}))", "{{verb}} {{outcome}}")],
        "reqps", 0, "Filter and prioritize calls per second.",
    )  # fmt: skip
    g.timeseries(
        "Call latency by verb (p50, p95, p99)",
        quantiles("conserve_extender_request_duration_seconds", (0.5, 0.95, 0.99), "verb", NOSEL),
        "s", 12, "Time to answer one scheduler call.",
    )  # fmt: skip
    g.next_line(8)
    g.timeseries(
        "Nodes filtered out by reason",
        [(or_zero(f"sum by (reason) (rate(conserve_extender_filtered_nodes_total{NOSEL}{RATE}))"), "{{reason}}")],
        "short", 0, "Candidate nodes the filter rejected per second, by reason.",
    )  # fmt: skip
    g.timeseries(
        "Candidate nodes per call (p50, p95)",
        quantiles("conserve_extender_request_nodes", (0.5, 0.95), "verb", NOSEL),
        "short", 12, "Nodes the scheduler sent per call.",
    )  # fmt: skip
    g.next_line(8)
    control_plane_row(g)
    namespaces = "label_values(conserve_ready_decoders, namespace)"
    return {
        "title": "ConServe",
        "uid": "conserve",
        "description": "ConServe: placement, KV capacity and lifecycle, latency against the SLO, energy, the router, "
        "the servers, the scheduler extender and the control plane's health.",
        "tags": ["conserve", "llm", "scheduling"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "graphTooltip": 1,
        "annotations": {"list": []},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                {
                    "name": "namespace",
                    "label": "Pool namespace",
                    "type": "query",
                    "datasource": DS,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "query": {"query": namespaces, "refId": "namespace"},
                    "definition": namespaces,
                },
            ]
        },
        "panels": g.panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
