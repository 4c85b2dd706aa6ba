"""A real Prometheus scrapes a running local cluster: every recording rule of the chart and every query of its
dashboard returns data, and an alert fires when its condition is made.

The processes are the product's: the operator (energy from a fake dcgm-exporter that follows the gpu-sim servers),
the scheduler extender (the `conserve-scheduler` profile calls it for the serving pods), the gpu-sim pod runner
and the router. Prometheus (built from its Go module) scrapes each of them, and finds the gpu-sim servers as the
chart's PodMonitor finds vLLM pods: through the Kubernetes API. Its rules are the chart's PrometheusRule, with
shorter windows and the queueing alert's threshold and `for` lowered so it fires within the test.

The pool declares an SLO with two classes. A workload runs through the router in both routing modes and classes
(conversations of several turns, then ended) while the queries run; beside it a turn for a pool that does not
exist (503) and a Conversation of a class the pool does not declare (refused). Then the pool is saturated:
Conversations wait in its queue and ConservePoolQueueing fires.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from conserve.api.common import GROUP, VERSION
from conserve.core.tokens import filler_text
from conserve.devcluster import prometheus
from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle
from conserve.load import demo_prometheus
from conserve.testkit import PoolBuilder, wait_for
from conserve.testkit.builders import serving_deployment
from conserve.testkit.processes import ConserveProcesses

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "conserve" / "dashboards" / "conserve.json"
RATE_WINDOW = "5m"
#: Two decoders of 4,000 KV tokens (3,800 after headroom): a conversation whose first turn is 1,800 tokens takes
#: at least half of one. No idle-KV reclaim (it would make room). An SLO with classes, so the SLO series exist:
#: interactive (the default) and batch, whose TTFET budget (250 s) lets a saturated pool's conversations queue.
POOL = (
    PoolBuilder("pool")
    .decoders("dec")
    .prefills("pre")
    .kv_tokens(4_000)
    .spec(
        placement={"maxQueueWaitSeconds": 300},
        kvLifecycle={"enabled": False},
        slo={
            "ttfetSeconds": 30,
            "tbtSeconds": 1,
            "attainmentTarget": 0.9,
            "classes": [{"name": "interactive", "priority": 10}, {"name": "batch", "ttfetSeconds": 250}],
            "defaultClass": "interactive",
        },
    )
    .build()
)


@dataclass
class Observed:
    namespace: str
    router_url: str
    prom: prometheus.Prometheus
    custom: Any
    apps: Any
    started_s: float
    plots_dir: Path

    def http(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        method = "POST" if body is not None else ("DELETE" if path.startswith("/v1/conversations/") else "GET")
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.router_url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError as err:
            return 0, str(err)

    def turn(
        self, conv: str, tokens: int, *, mode: str = "conversation", pool: str | None = None, slo_class: str = ""
    ) -> int:
        body = {
            "model": "llama-3-8b",
            "messages": [{"role": "user", "content": filler_text(tokens)}],
            "max_tokens": 16,
            "stream": True,
        }
        headers = {"X-Conversation-Id": conv, "X-Conserve-Routing": mode}
        if pool is not None:
            headers["X-Conserve-Pool"] = pool
        if slo_class:
            headers["X-Conserve-Slo-Class"] = slo_class
        return self.http("/v1/chat/completions", body, headers)[0]

    def backends(self) -> dict[str, list[Any]]:
        status, text = self.http("/conserve/backends")
        found: dict[str, list[Any]] = json.loads(text) if status == 200 else {}
        return found

    def conversation(self, name: str, tokens: int, slo_class: str) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Conversation",
            "metadata": {"name": name},
            "spec": {"pool": "pool", "firstTurnInputTokens": tokens, "sloClass": slo_class},
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "conversations", body)


def _scheduled_by_conserve(deployment: dict[str, Any], scheduler: str) -> dict[str, Any]:
    deployment["spec"]["template"]["spec"]["schedulerName"] = scheduler
    return deployment


@pytest.fixture
def observed(
    cluster: ClusterHandle, namespace: str, conserve_processes: ConserveProcesses, tmp_path: Path
) -> Iterator[Observed]:
    extender_port = cluster.extender_port
    assert extender_port is not None, "the cluster names no extender URL (set CONSERVE_EXTENDER_URL)"
    router_port, metrics_port, dcgm_port = free_port(), free_port(), free_port()
    kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
    start = conserve_processes.start
    start("extender", "extender", "--host=127.0.0.1", f"--port={extender_port}", kubeconfig)
    start(
        "fake-dcgm", "fake-dcgm", "--from-cluster", kubeconfig, f"--namespace={namespace}", "--host=127.0.0.1",
        f"--port={dcgm_port}", "--refresh-seconds=1", "--tick-seconds=0.5",
    )  # fmt: skip
    start(
        "operator", "operator", f"--namespace={namespace}", "--no-leader-elect", f"--metrics-port={metrics_port}",
        "--energy-source=dcgm", f"--dcgm-url=http://127.0.0.1:{dcgm_port}/metrics", "--energy-interval-seconds=1",
    )  # fmt: skip
    start("gpusim", "gpu-sim", "pods", kubeconfig, f"--namespace={namespace}", "--time-scale=0.05")
    start(
        "router", "router", kubeconfig, f"--namespace={namespace}", "--pool=pool", f"--port={router_port}",
        "--usage-interval=0.3", "--placement-timeout=10",  # (the turn for a pool that does not exist waits this long)
    )  # fmt: skip
    rules = prometheus.chart_rules(
        f"prometheusRule.rateWindow={RATE_WINDOW}",
        "prometheusRule.alerts.poolQueueing.threshold=1",
        "prometheusRule.alerts.poolQueueing.for=0s",
    )
    config = prometheus.scrape_config(
        {
            "operator": [f"127.0.0.1:{metrics_port}"],
            "router": [f"127.0.0.1:{router_port}"],
            "extender": [f"127.0.0.1:{extender_port}"],
        },
        kubeconfig=cluster.kubeconfig,
        server_namespaces=[namespace],
        interval_s=1.0,
    )
    prom = prometheus.Prometheus(tmp_path / "prometheus", config, rules).start()
    try:
        with cluster.api_client() as api:
            apps: Any = client.AppsV1Api(api)
            custom: Any = client.CustomObjectsApi(api)
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", POOL)
            for name, role, replicas in (("pre", "prefill", 1), ("dec", "decode", 2)):
                body = _scheduled_by_conserve(serving_deployment(name, role, replicas), cluster.scheduler_name)
                apps.create_namespaced_deployment(namespace, body)
            plane = Observed(
                namespace, f"http://127.0.0.1:{router_port}", prom, custom, apps, time.time(), tmp_path / "plots"
            )
            wait_for(
                "1 prefill and 2 decoders ready behind the router",
                lambda: (
                    len(plane.backends().get("prefills", [])) == 1 and len(plane.backends().get("decoders", [])) == 2
                ),
                timeout_s=120,
            )
            yield plane
    finally:
        prom.stop()


def _substitute(expr: str, namespace: str) -> str:
    """A dashboard query as Grafana sends it: its variables replaced."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$namespace", namespace)


def _has_data(prom: prometheus.Prometheus, expr: str) -> bool:
    """At least one sample, and one that is a number (a quantile of no observations is NaN: nothing to draw)."""
    return any(not math.isnan(float(s["value"][1])) for s in prom.query(expr))


def _without_data(prom: prometheus.Prometheus, queries: dict[str, str], timeout_s: float) -> dict[str, str]:
    """The queries that still have no data (or fail) once `timeout_s` is over, with why; all asked again each
    round, so one slow series does not hold the others."""
    left = dict(queries)
    why: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while left:
        for what, expr in list(left.items()):
            try:
                if _has_data(prom, expr):
                    del left[what]
                else:
                    why[what] = f"no data: {expr}"
            except prometheus.PrometheusError as err:
                why[what] = str(err)
        if time.monotonic() > deadline:
            break
        time.sleep(2.0)
    return {what: why[what] for what in left}


class Workload:
    """Conversations of three turns through the router, alternating routing modes (and SLO classes), each ended
    after its last turn, until stopped: the router's, the servers' and the operator's series move while the
    queries run."""

    def __init__(self, plane: Observed) -> None:
        self.plane = plane
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.conversations = 0
        self.thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            n = self.conversations
            conv, mode = f"chat-{n}", ("conversation", "per-turn")[n % 2]
            slo_class = ("interactive", "batch")[n // 2 % 2]
            for turn in range(3):
                status = self.plane.turn(conv, 1500 if turn == 0 else 200, mode=mode, slo_class=slo_class)
                if status != 200:
                    self.failures.append(f"{conv} turn {turn}: HTTP {status}")
            self.plane.http(f"/v1/conversations/{conv}")
            self.conversations += 1

    def __enter__(self) -> Workload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def test_prometheus_scrapes_every_component_and_every_rule_and_dashboard_query_has_data(observed: Observed) -> None:
    prom = observed.prom
    # Not firing while the pool is quiet.
    wait_for("the operator's queue gauge scraped", lambda: bool(prom.query("conserve_pending_conversations")), 60)
    assert not [a for a in prom.alerts() if a["labels"]["alertname"] == "ConservePoolQueueing"]

    with Workload(observed) as workload:
        # One more prefill pod while the workload runs: the scheduler calls the extender for it. (The first pods'
        # calls can come before Prometheus' first scrape of the extender, and so show in no rate.)
        wait_for("the extender's calls scraped", lambda: prom.query("conserve_extender_requests_total"), 60)
        observed.apps.patch_namespaced_deployment_scale("pre", observed.namespace, {"spec": {"replicas": 2}})
        # A turn for a pool that does not exist: the router answers it without a placement (503, or 429). A
        # Conversation naming a class the pool does not declare: the operator refuses it (UnknownSloClass).
        assert observed.turn("lost", 200, pool="no-such-pool") in (429, 503)
        observed.conversation("unknown-class", 500, "no-such-class")
        wait_for("3 conversations served", lambda: workload.conversations >= 3, timeout_s=120)

        # Every component is scraped: the operator, router, extender and each gpu-sim server (found by its pod).
        def all_up() -> bool:
            targets = prom.targets()
            jobs = {t["labels"]["job"] for t in targets if t["health"] == "up"}
            servers = [t for t in targets if t["labels"]["job"] == "servers" and t["health"] == "up"]
            return jobs >= {"operator", "router", "extender", "servers"} and len(servers) == 4

        wait_for("every target up", all_up, timeout_s=60)

        rules = prometheus.chart_rules(f"prometheusRule.rateWindow={RATE_WINDOW}")
        recorded = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
        dashboard = json.loads(DASHBOARD.read_text())
        panels = {
            f"panel {p['title']!r} query {t['refId']}": _substitute(t["expr"], observed.namespace)
            for p in dashboard["panels"]
            for t in p.get("targets", [])
        }
        assert len(recorded) >= 14
        assert len(panels) >= 60
        queries = {f"rule {name}": name for name in recorded} | panels
        empty = _without_data(prom, queries, timeout_s=90)
        assert not empty, "\n".join(f"{what}: {why}" for what, why in empty.items())

        # The demo's plots, drawn from this Prometheus as `conserve demo` draws them.
        pngs = demo_prometheus.save_plots(prom, observed.namespace, observed.started_s, observed.plots_dir)
        assert [p.name for p in pngs] == ["ttfet-over-time.png", "kv-occupancy-per-decoder.png"]
        assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    assert not workload.failures, workload.failures[:5]
    # One operator without leader election leads its one shard: the leadership alert stays quiet.
    assert _max(prom, "sum(conserve_operator_leading_shards)") == _max(prom, "max(conserve_operator_shards)") == 1
    assert not [a for a in prom.alerts() if a["labels"]["alertname"] == "ConserveOperatorNotLeading"]

    # The pool is saturated: more conversations of 1,800 tokens than its two decoders of 3,800 usable tokens
    # can hold (at most two each, whatever growth the pool has learnt): they wait in its queue, and the alert
    # (threshold 1, no `for`) fires.
    for i in range(8):
        observed.conversation(f"queued-{i}", 1800, "batch")
    wait_for("conversations pending", lambda: _max(prom, "namespace_pool:conserve_pending_conversations:max") >= 2)

    def firing() -> list[dict[str, Any]]:
        return [
            a for a in prom.alerts() if a["labels"]["alertname"] == "ConservePoolQueueing" and a["state"] == "firing"
        ]

    (alert,) = wait_for("ConservePoolQueueing firing", firing, timeout_s=60)
    assert alert["labels"]["namespace"] == observed.namespace
    assert alert["labels"]["pool"] == "pool"
    summary = re.fullmatch(
        rf"Pool {re.escape(observed.namespace)}/pool has (\d+) conversations waiting for a decoder",
        alert["annotations"]["summary"],
    )
    assert summary is not None, alert["annotations"]
    assert int(summary.group(1)) >= 2


def _max(prom: prometheus.Prometheus, expr: str) -> float:
    return max((float(s["value"][1]) for s in prom.query(expr)), default=0.0)
