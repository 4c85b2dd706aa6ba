"""The demo's PNG plots, drawn from Prometheus range queries recorded from a real run (tests/unit/data/prometheus/:
the demo's own plot queries answered by the Prometheus of tests/e2e/test_prometheus.py while its workload ran)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from conserve.load import plots

RECORDED = Path(__file__).resolve().parent / "data" / "prometheus" / "demo_range_queries.json"


def recorded() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(RECORDED.read_text())
    return data


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_demo_plots_from_prometheus_ranges_are_pngs_of_every_line(tmp_path: Path) -> None:
    data = recorded()
    specs = plots.demo_plots(data["namespace"])
    assert [s.filename for s in specs] == ["ttfet-over-time.png", "kv-occupancy-per-decoder.png"]
    for spec in specs:
        lines: plots.Lines = {}
        for query in spec.queries:
            lines.update(plots.series_of(data["ranges"][query.expr], query.legend))
        assert lines, spec.filename
        path = plots.plot_lines(tmp_path / spec.filename, spec.title, spec.ylabel, lines)
        assert png_size(path) == (1000, 450)
        assert path.stat().st_size > 10_000  # axes, a legend and lines, not a blank canvas


def test_prometheus_range_series_take_their_legends_and_drop_nan() -> None:
    data = recorded()
    ttfet_query = plots.demo_plots(data["namespace"])[0].queries[1]
    matrix = data["ranges"][ttfet_query.expr]
    ttfet = plots.series_of(matrix, ttfet_query.legend)
    assert set(ttfet) == {"conversation p95", "per-turn p95"}
    raw = {s["metric"]["mode"]: s["values"] for s in matrix}
    for mode, points in ttfet.items():
        values = raw[mode.split()[0]]
        assert len(points) == sum(1 for _, v in values if v not in ("NaN", "+Inf", "-Inf"))
        assert all(v >= 0 for _, v in points)
    kv_query = plots.demo_plots(data["namespace"])[1].queries[0]
    kv = plots.series_of(data["ranges"][kv_query.expr], kv_query.legend)
    assert len(kv) == 2
    assert all(0 <= v <= 1 for points in kv.values() for _, v in points)


def test_prometheus_plot_of_no_data_is_refused_not_drawn_empty(tmp_path: Path) -> None:
    nan_only = [{"metric": {"mode": "conversation"}, "values": [[1.0, "NaN"], [2.0, "NaN"]]}]
    lines = plots.series_of(nan_only, "{{mode}}")
    assert lines == {}
    with pytest.raises(ValueError, match="no data"):
        plots.plot_lines(tmp_path / "empty.png", "t", "s", lines)
    assert not (tmp_path / "empty.png").exists()


def test_dashboard_legend_format_names_the_series() -> None:
    assert plots.legend_of("{{pool}} {{ state }}", {"pool": "chat", "state": "Idle"}) == "chat Idle"
    assert plots.legend_of("{{decoder}}", {}) == ""
