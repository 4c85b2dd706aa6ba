"""PNG plots of the demo's headline series, drawn from a Prometheus range query (matplotlib, imported only here).

`series_of` turns a range query's matrix into named lines; `plot_lines` draws them against seconds since the start
of the run. The demo draws TTFET over time per routing mode and KV occupancy per decoder beside its report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Lines = dict[str, list[tuple[float, float]]]
KV_USAGE = "conserve_observed_kv_usage_ratio"


@dataclass(frozen=True, slots=True)
class PlotQuery:
    """One line family of a plot: a PromQL range query and its legend ("{{label}}" replaced per series)."""

    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class PlotSpec:
    filename: str
    title: str
    ylabel: str
    queries: tuple[PlotQuery, ...]


def demo_plots(namespace: str, window: str = "30s") -> tuple[PlotSpec, ...]:
    """The demo's plots: TTFET (p50, p95) per routing mode over time, KV occupancy of each decoder."""
    ttfet = "conserve_router_time_to_first_effective_token_seconds_bucket"
    return (
        PlotSpec(
            "ttfet-over-time.png",
            f"TTFET per routing mode (router, over {window})",
            "seconds",
            tuple(
                PlotQuery(f"histogram_quantile({q}, sum by (le, mode) (rate({ttfet}[{window}])))", f"{{{{mode}}}} {p}")
                for q, p in ((0.5, "p50"), (0.95, "p95"))
            ),
        ),
        PlotSpec(
            "kv-occupancy-per-decoder.png",
            "KV cache usage per decoder (engine-reported)",
            "share of KV capacity",
            (PlotQuery(f'max by (decoder) ({KV_USAGE}{{namespace="{namespace}"}})', "{{decoder}}"),),
        ),
    )


def legend_of(template: str, labels: Mapping[str, str]) -> str:
    """Grafana's legend format: each "{{name}}" replaced by that label's value (empty when absent)."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def series_of(matrix: Sequence[Mapping[str, Any]], legend: str) -> Lines:
    """A range query's result (`[{"metric": {...}, "values": [[t, "v"], ...]}, ...]`) as lines by legend; NaN and
    infinite points (a quantile of no observations) are dropped, and so are lines left empty."""
    lines: Lines = {}
    for series in matrix:
        points = [(float(t), float(v)) for t, v in series["values"] if math.isfinite(float(v))]
        if points:
            lines.setdefault(legend_of(legend, series["metric"]), []).extend(points)
    return lines


def plot_lines(path: Path, title: str, ylabel: str, lines: Mapping[str, Sequence[tuple[float, float]]]) -> Path:
    """Draw the lines against seconds since the earliest point and save a PNG; ValueError when there is nothing."""
    if not any(lines.values()):
        raise ValueError(f"{path.name}: no data to plot")
    try:
        import matplotlib
    except ImportError as exc:  # the container image leaves the plotting extra out
        raise RuntimeError("PNG plots need matplotlib: pip install 'conserve[bench]'") from exc
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    t0 = min(t for points in lines.values() for t, _ in points)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    try:
        for name, points in sorted(lines.items()):
            ax.plot([t - t0 for t, _ in points], [v for _, v in points], label=name, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("seconds since the start of the run")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small", ncol=2)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
