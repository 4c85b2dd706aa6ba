"""The chart's PrometheusRule checked by a real promtool (built from its Go module, like helm: `packaging`).

`promtool check rules` on the rendered rules, and `promtool test rules` with input series for each alert, firing
on its condition and not beside it (tests/packaging/data/conserve_rules_test.yaml), and for the recording rules
whose arithmetic is not obvious (J per output token, SLO ratios, quantiles).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conserve.devcluster import build, prometheus

DATA = Path(__file__).resolve().parent / "data"
ALERTS = {
    "ConservePoolQueueing",
    "ConserveSLOAttainmentBelowTarget",
    "ConserveDecoderLost",
    "ConserveKVNearCapacity",
    "ConserveEnergyReadingsMissing",
    "ConserveOperatorNotLeading",
    "ConserveRouterErrors",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    _, tool = prometheus.binaries()
    return subprocess.run([str(tool), *args], capture_output=True, text=True)


def test_prometheus_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(prometheus.chart_rules()))
    proc = promtool("check", "rules", str(rules))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_prometheus_alert_unit_tests_fire_and_stay_quiet(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(prometheus.chart_rules()))
    shutil.copy(DATA / "conserve_rules_test.yaml", tmp_path)
    proc = promtool("test", "rules", str(tmp_path / "conserve_rules_test.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_documented() -> None:
    rules = prometheus.chart_rules()
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == ALERTS
    tests = yaml.safe_load((DATA / "conserve_rules_test.yaml").read_text())["tests"]
    fired = {t["alertname"] for g in tests for t in g.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for g in tests for t in g.get("alert_rule_test", []) if not t["exp_alerts"]}
    assert fired == ALERTS
    assert quiet == ALERTS
    readme = (prometheus.CHART / "README.md").read_text()
    for name, rule in alerts.items():
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        assert rule["annotations"]["runbook_url"].endswith(f"#{name.lower()}")
        assert f"\n### {name}\n" in readme, f"no runbook section for {name} in the chart README"


ALERT_VALUES = (
    "poolQueueing", "sloAttainment", "decoderLost", "kvNearCapacity", "energyReadingsMissing", "operatorNotLeading",
    "routerErrors",
)  # fmt: skip


@pytest.mark.parametrize("alert", ALERT_VALUES)
def test_each_prometheus_alert_can_be_turned_off(alert: str) -> None:
    off = prometheus.chart_rules(f"prometheusRule.alerts.{alert}.enabled=false")
    names = {r.get("alert") for g in off["groups"] for r in g["rules"]} & ALERTS
    assert len(names) == len(ALERTS) - 1


def test_prometheus_alert_thresholds_and_window_are_values() -> None:
    tuned = prometheus.chart_rules("prometheusRule.alerts.poolQueueing.threshold=3", "prometheusRule.rateWindow=2m")
    queueing = next(r for g in tuned["groups"] for r in g["rules"] if r.get("alert") == "ConservePoolQueueing")
    assert queueing["expr"].endswith("> 3")
    text = yaml.safe_dump(tuned)
    assert "[2m]" in text
    assert "[5m]" not in text


def helm_template(*sets: str) -> list[dict[str, Any]]:
    cmd = [str(build.binaries().helm), "template", "conserve", str(prometheus.CHART), "--namespace", "conserve-system"]
    proc = subprocess.run([*cmd, *(a for s in sets for a in ("--set", s))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_prometheus_monitors_and_rule_render_only_when_enabled() -> None:
    kinds = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert not [d for d in helm_template() if d["kind"] in kinds]
    on = ("serviceMonitor.enabled=true", "prometheusRule.enabled=true", "serviceMonitor.labels.release=p")
    docs = helm_template(*on)
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    assert set(pods) == {"conserve-router", "conserve-servers"}
    router = pods["conserve-router"]["spec"]
    assert router["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "conserve",
        "app.kubernetes.io/instance": "conserve",
        "app.kubernetes.io/component": "router",
    }
    assert router["podMetricsEndpoints"][0]["port"] == "http"
    servers = pods["conserve-servers"]["spec"]
    assert servers["namespaceSelector"] == {"any": True}
    assert servers["selector"]["matchExpressions"][0]["key"] == "conserve.dev/role"
    assert all(p["metadata"]["labels"]["release"] == "p" for p in pods.values())
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["namespace"] == "conserve-system"
    assert rule["spec"] == prometheus.chart_rules()
    only_ops = helm_template(
        "serviceMonitor.enabled=true", "serviceMonitor.router.enabled=false", "serviceMonitor.servers.namespaces={a,b}"
    )
    (servers_only,) = [d for d in only_ops if d["kind"] == "PodMonitor"]
    assert servers_only["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}
