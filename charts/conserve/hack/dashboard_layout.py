"""The dashboard's building blocks: Grafana's grid, its panel kinds, the label selectors and quantile queries."""

from __future__ import annotations

from typing import Any

DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
SEL = '{namespace=~"$namespace"}'
NOSEL = ""
RATE = "[$__rate_interval]"


class Layout:
    """Panels laid out top to bottom on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0

    def _panel(self, kind: str, title: str, x: int, w: int, h: int, **fields: Any) -> None:
        self.panels.append(
            {"type": kind, "title": title, "id": len(self.panels) + 1, "gridPos": {"h": h, "w": w, "x": x, "y": self.y}}
            | fields
        )

    def row(self, title: str) -> None:
        self._panel("row", title, 0, 24, 1, collapsed=False, panels=[])
        self.y += 1

    def stat(self, title: str, expr: str, unit: str, x: int, desc: str) -> None:
        self._panel(
            "stat", title, x, 6, 4,
            description=desc,
            datasource=DS,
            fieldConfig={"defaults": {"unit": unit}, "overrides": []},
            options={"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "area"},
            targets=[{"datasource": DS, "expr": expr, "refId": "A"}],
        )  # fmt: skip

    def timeseries(self, title: str, queries: list[tuple[str, str]], unit: str, x: int, desc: str) -> None:
        self._panel(
            "timeseries", title, x, 12, 8,
            description=desc,
            datasource=DS,
            fieldConfig={"defaults": {"unit": unit}, "overrides": []},
            options={
                "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                "tooltip": {"mode": "multi"},
            },
            targets=[
                {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                for i, (expr, legend) in enumerate(queries)
            ],
        )  # fmt: skip

    def next_line(self, h: int) -> None:
        self.y += h


def quantiles(histogram: str, qs: tuple[float, ...], by: str, sel: str = SEL) -> list[tuple[str, str]]:
    """histogram_quantile queries of a histogram by one label, one per quantile."""
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({histogram}_bucket{sel}{RATE})))",
            f"{{{{{by}}}}} p{round(q * 100)}",
        )
        for q in qs
    ]
