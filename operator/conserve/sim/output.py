"""What `conserve simulate` and `conserve bench` print and write: tables, CSV, JSON (plots and the markdown
report: `conserve.sim.report`)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from conserve.sim.bench import BenchResult, Comparison, Run
from conserve.sim.metrics import RunMetrics
from conserve.sim.report import write_plots, write_report


class TableColumn(NamedTuple):
    """One column of the printed table: a RunMetrics field in `width` characters, text left-aligned, numbers right."""

    title: str
    field: str
    width: int
    format: str  # a format spec; "s" and "d" print the value as it is
    scale: float = 1.0  # applied before formatting (seconds to milliseconds, tokens to millions)

    def heading(self) -> str:
        return f"{self.title:<{self.width}s}" if self.format == "s" else f"{self.title:>{self.width}s}"

    def cell(self, metrics: RunMetrics) -> str:
        value = getattr(metrics, self.field)
        if self.format == "s":
            return f"{value:<{self.width}s}"
        if self.format == "d":
            return f"{value:>{self.width}d}"
        return f"{value * self.scale:>{self.width}{self.format}}"


TABLE_COLUMNS: tuple[TableColumn, ...] = (
    TableColumn("policy", "policy", 27, "s"),
    TableColumn("TTFET50", "ttfet_p50_s", 8, ".2f"),
    TableColumn("TTFET95", "ttfet_p95_s", 8, ".2f"),
    TableColumn("TTFET99", "ttfet_p99_s", 8, ".2f"),
    TableColumn("TTFT95", "ttft_p95_s", 7, ".2f"),
    TableColumn("TBT95ms", "tbt_p95_s", 8, ".1f", 1000.0),
    TableColumn("lastTBT95", "last_turn_tbt_p95_s", 9, ".1f", 1000.0),
    TableColumn("SLO", "slo_attainment", 6, ".1%"),
    TableColumn("refused", "refused", 7, "d"),
    TableColumn("good/s", "goodput_per_s", 6, ".3f"),
    TableColumn("tok/s", "throughput_tokens_per_s", 6, ".0f"),
    TableColumn("J/tok", "j_per_token", 6, ".3f"),
    TableColumn("tok/J", "tokens_per_j", 6, ".3f"),
    TableColumn("xfer/conv", "kv_transfers_per_conversation", 9, ".2f"),
    TableColumn("reprefM", "reprefilled_tokens", 7, ".2f", 1e-6),
    TableColumn("pBusy", "prefill_busy_share", 6, ".0%"),
    TableColumn("KVutil", "decoder_kv_utilization", 6, ".1%"),
    TableColumn("preempt", "preemptions", 7, "d"),
    TableColumn("offload", "offloads", 7, "d"),
    TableColumn("reload", "reloads", 6, "d"),
    TableColumn("waits", "placement_waits", 6, "d"),
    TableColumn("poolPf", "pool_prefill_share", 6, ".0%"),
)

#: A comparison's fields in the order comparison.csv (which heads `conserve` "value") and results.json list them.
COMPARISON_FIELDS = (
    "workload",
    "fleet",
    "policy",
    "metric",
    "conserve",
    "best_baseline",
    "baseline",
    "ratio",
    "target",
    "met",
)


def format_table(runs: Sequence[Run]) -> str:
    lines: list[str] = []
    groups: dict[tuple[str, str], list[RunMetrics]] = {}
    for r in runs:
        groups.setdefault((r.metrics.workload, r.metrics.fleet), []).append(r.metrics)
    for (workload, fleet), ms in groups.items():
        lines.append(
            f"\n== {workload} on the {fleet} fleet ({ms[0].conversations} conversations, {ms[0].turns} turns; "
            "times in s, TBT in ms)"
        )
        lines.append(" ".join(c.heading() for c in TABLE_COLUMNS))
        lines.extend(" ".join(c.cell(m) for c in TABLE_COLUMNS) for m in ms)
    return "\n".join(lines)


def format_comparisons(comparisons: Sequence[Comparison]) -> str:
    return "\n".join(
        ["", "== ConServe vs the best per-turn baseline and vs per-turn-prediction (same fleet, workload, load)"]
        + [c.line() for c in comparisons]
    )


def write_results(result: BenchResult, out: Path, *, meta: dict[str, object]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = [r.metrics.as_dict() for r in result.runs]
    csv_path = out / "runs.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    written.append(csv_path)
    comp_path = out / "comparison.csv"
    with comp_path.open("w", newline="", encoding="utf-8") as f:
        plain = csv.writer(f)
        plain.writerow(["value" if name == "conserve" else name for name in COMPARISON_FIELDS])
        plain.writerows([getattr(c, name) for name in COMPARISON_FIELDS] for c in result.comparisons)
    written.append(comp_path)
    json_path = out / "results.json"
    payload = {
        "meta": meta,
        "runs": rows,
        "comparisons": [{name: getattr(c, name) for name in COMPARISON_FIELDS} for c in result.comparisons],
        "attributions": [a.as_dict() for a in result.attributions],
        "knees": [k.as_dict() for k in result.knees],
    }
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    written.append(json_path)
    written.extend(write_plots(result.runs, out))
    written.append(write_report(result, out, meta=meta))
    return written


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
