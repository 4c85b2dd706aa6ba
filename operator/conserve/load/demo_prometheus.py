"""The demo's Prometheus: a real one (built with the control plane) scraping the demo's operator, router,
extender and gpu-sim servers with the chart's rules loaded; the demo's PNG plots are drawn from it, and
`--keep-prometheus` leaves it running afterwards for a look at its data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from conserve.devcluster import prometheus
from conserve.load import plots


def start(args: argparse.Namespace, kubeconfig: Path, ports: dict[str, int]) -> prometheus.Prometheus | None:
    """Start it (unless --no-prometheus) under the demo's log folder; `ports` maps a job (operator, router,
    extender) to its port on 127.0.0.1."""
    if not args.prometheus:
        return None
    return _start(args.logs.resolve() / "prometheus", kubeconfig, args.namespace, ports, args.prometheus_port)


def operator_metrics_port(args: argparse.Namespace) -> int:
    """A free port for the operator's /metrics when Prometheus scrapes it; 0 (none served) otherwise."""
    return prometheus.free_port() if args.prometheus else 0


def _start(
    state_dir: Path, kubeconfig: Path, namespace: str, ports: dict[str, int], port: int
) -> prometheus.Prometheus:
    targets = {job: f"127.0.0.1:{p}" for job, p in ports.items()}
    config = prometheus.scrape_config(
        {job: [address] for job, address in targets.items()},
        kubeconfig=kubeconfig,
        server_namespaces=[namespace],
        interval_s=2.0,
    )
    # The chart's rules, where the chart is beside the package (a checkout); an installed wheel has none.
    rules = prometheus.chart_rules() if (prometheus.CHART / "Chart.yaml").is_file() else None
    prom = prometheus.Prometheus(state_dir, config, rules, port=port).start()
    print(f"prometheus: {prom.url} (scraping {', '.join(sorted(targets))} and the gpu-sim servers)", flush=True)
    return prom


def save_plots(prom: prometheus.Prometheus | None, namespace: str, since: float, out_dir: Path) -> list[Path]:
    """The demo's plots from `since` (epoch seconds) to now, as PNG files in `out_dir`; those with no data are
    named and skipped (a run too short for a rate, say), not drawn empty. None without a Prometheus."""
    if prom is None:
        return []
    end = time.time()
    step_s = max(2.0, (end - since) / 500)
    saved = []
    for spec in plots.demo_plots(namespace):
        lines: plots.Lines = {}
        for query in spec.queries:
            lines.update(plots.series_of(prom.query_range(query.expr, since, end, step_s), query.legend))
        if not lines:
            print(f"plot {spec.filename}: no data in Prometheus for it", flush=True)
            continue
        saved.append(plots.plot_lines(out_dir / spec.filename, spec.title, spec.ylabel, lines))
    if saved:
        print("plots: " + ", ".join(str(p) for p in saved), flush=True)
    return saved


def finish(prom: prometheus.Prometheus | None, keep: bool) -> None:
    """Stop it, or leave it running (`--keep-prometheus`) and say where."""
    if prom is None:
        return
    if keep and prom.process is not None:
        print(
            f"prometheus left running: {prom.url} (data in {prom.directory}); stop it with `kill {prom.process.pid}`",
            flush=True,
        )
        return
    prom.stop()
