"""What `conserve simulate` and `conserve bench` print and write: tables, CSV, JSON (plots and the markdown
report: `conserve.sim.report`)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from conserve.sim.bench import BenchResult, Comparison, Run
from conserve.sim.metrics import RunMetrics
from conserve.sim.report import write_plots, write_report

#: (title, RunMetrics field, width, format, scale)
TABLE_COLUMNS: tuple[tuple[str, str, int, str, float], ...] = (
    ("policy", "policy", 21, "s", 1.0),
    ("TTFET50", "ttfet_p50_s", 8, ".2f", 1.0),
    ("TTFET95", "ttfet_p95_s", 8, ".2f", 1.0),
    ("TTFET99", "ttfet_p99_s", 8, ".2f", 1.0),
    ("TTFT95", "ttft_p95_s", 7, ".2f", 1.0),
    ("TBT95ms", "tbt_p95_s", 8, ".1f", 1000.0),
    ("lastTBT95", "last_turn_tbt_p95_s", 9, ".1f", 1000.0),
    ("SLO", "slo_attainment", 6, ".1%", 1.0),
    ("tok/s", "throughput_tokens_per_s", 6, ".0f", 1.0),
    ("J/tok", "j_per_token", 6, ".3f", 1.0),
    ("tok/J", "tokens_per_j", 6, ".3f", 1.0),
    ("xfer/conv", "kv_transfers_per_conversation", 9, ".2f", 1.0),
    ("reprefM", "reprefilled_tokens", 7, ".2f", 1e-6),
    ("pBusy", "prefill_busy_share", 6, ".0%", 1.0),
    ("KVutil", "decoder_kv_utilization", 6, ".1%", 1.0),
    ("preempt", "preemptions", 7, "d", 1.0),
    ("offload", "offloads", 7, "d", 1.0),
    ("reload", "reloads", 6, "d", 1.0),
    ("waits", "placement_waits", 6, "d", 1.0),
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
        lines.append(" ".join(f"{t:<{w}s}" if k == "policy" else f"{t:>{w}s}" for t, k, w, _, _ in TABLE_COLUMNS))
        for m in ms:
            cells = []
            for _, key, width, fmt, scale in TABLE_COLUMNS:
                value = getattr(m, key)
                if fmt == "s":
                    cells.append(f"{value:<{width}s}")
                elif fmt == "d":
                    cells.append(f"{value:>{width}d}")
                else:
                    cells.append(f"{value * scale:>{width}{fmt}}")
            lines.append(" ".join(cells))
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
