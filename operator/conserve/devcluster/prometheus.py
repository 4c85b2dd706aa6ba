"""A real Prometheus beside the local cluster: it scrapes conserve's processes and evaluates the chart's rules.

The binaries are built like the control plane's (``build.part("prometheus")``). The scrape configuration names
each process's /metrics address (operator, router, extender, ...) and finds the serving pods' gpu-sim servers as
the chart's PodMonitor finds vLLM pods: through the Kubernetes API (``kubernetes_sd_configs`` with the cluster's
kubeconfig), pods annotated ``conserve.dev/endpoint`` scraped at that address, labelled with their namespace and
pod name. The rules are the chart's PrometheusRule (``helm template``), so what runs here is what the chart ships.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conserve.devcluster import build

CHART = Path(__file__).resolve().parents[3] / "charts" / "conserve"
#: Jobs whose series carry their own `namespace` label (the pool's), kept over the target's (as the chart's
#: ServiceMonitor does for the operator).
HONOR_LABELS_JOBS = frozenset({"operator"})


def binaries() -> tuple[Path, Path]:
    """prometheus and promtool, built (once, cached) from their Go module."""
    part = build.part("prometheus")
    if not part.is_built():
        build.build_part(part)
    found = build.binaries()
    return found.prometheus, found.promtool


def chart_rules(*sets: str, chart: Path = CHART) -> dict[str, Any]:
    """The chart's PrometheusRule rendered with `--set` pairs: its spec, a Prometheus rule file ({"groups": ...})."""
    helm = build.binaries().helm
    if not helm.is_file():
        build.build_part(build.part("helm"))
    cmd = [str(helm), "template", "conserve", str(chart), "--show-only", "templates/monitoring/prometheusrule.yaml"]
    for s in ("prometheusRule.enabled=true", *sets):
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    doc = yaml.safe_load(out)
    return dict(doc["spec"])


def scrape_config(
    jobs: Mapping[str, Sequence[str]],
    *,
    kubeconfig: Path | None = None,
    server_namespaces: Sequence[str] = (),
    rule_files: Sequence[Path] = (),
    interval_s: float = 2.0,
) -> dict[str, Any]:
    """prometheus.yml: one static job per process (host:port list) and, with a kubeconfig, the serving pods."""
    interval = f"{int(interval_s * 1000)}ms"
    scrape: list[dict[str, Any]] = [
        {
            "job_name": name,
            "honor_labels": name in HONOR_LABELS_JOBS,
            "static_configs": [{"targets": list(targets)}],
        }
        for name, targets in jobs.items()
    ]
    if kubeconfig is not None:
        sd: dict[str, Any] = {"role": "pod", "kubeconfig_file": str(kubeconfig)}
        if server_namespaces:
            sd["namespaces"] = {"names": list(server_namespaces)}
        endpoint = "__meta_kubernetes_pod_annotation_conserve_dev_endpoint"
        scrape.append(
            {
                "job_name": "servers",
                "kubernetes_sd_configs": [sd],
                "relabel_configs": [
                    {"source_labels": [endpoint], "regex": ".+", "action": "keep"},
                    {"source_labels": [endpoint], "target_label": "__address__"},
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        )
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": scrape,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusError(RuntimeError):
    pass


@dataclass
class Prometheus:
    """One prometheus process on 127.0.0.1 with its config and TSDB under `directory`."""

    directory: Path
    config: dict[str, Any]
    rules: dict[str, Any] | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Prometheus:
        prometheus, _ = binaries()
        self.directory.mkdir(parents=True, exist_ok=True)
        config = dict(self.config)
        if self.rules is not None:
            rules_file = self.directory / "rules.yaml"
            rules_file.write_text(yaml.safe_dump(self.rules))
            config["rule_files"] = [*config.get("rule_files", []), str(rules_file)]
        config_file = self.directory / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.port = self.port or free_port()
        log = (self.directory / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                str(prometheus),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise PrometheusError(f"prometheus not ready in {timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        path = self.directory / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; its `data`, or PrometheusError with the server's error."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (a scalar comes back as one unlabelled sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=str(start), end=str(end), step=f"{step_s:g}")
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])
