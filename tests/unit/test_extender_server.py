"""The aiohttp layer over loopback: verbs, health, metrics, malformed and oversized bodies (never a crash)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from conserve.extender.cache import ClusterCache
from conserve.extender.server import BackgroundServer, ExtenderApp
from conserve.extender.service import ExtenderService, ExtenderSettings
from conserve.extender.testing import node, pod

pytestmark = pytest.mark.unit

NODES = [node("h100-0", "H100"), node("h200-0", "H200")]


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    cache = ClusterCache()
    cache.replace_nodes(NODES)
    cache.replace_pods([])
    app = ExtenderApp(ExtenderService(ExtenderSettings(), cache), max_body_bytes=64 * 1024).build()
    with BackgroundServer(app) as running:
        yield running


def call(server: BackgroundServer, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(server.url + path, data=body, method="POST" if body is not None else "GET")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post(server: BackgroundServer, path: str, payload: Any) -> tuple[int, Any]:
    status, body = call(server, path, json.dumps(payload).encode())
    return status, json.loads(body)


def test_filter_and_prioritize(server: BackgroundServer) -> None:
    args = {"Pod": pod("p", "prefill"), "Nodes": None, "NodeNames": ["h100-0", "h200-0"]}
    status, result = post(server, "/filter", args)
    assert status == 200
    assert result["NodeNames"] == ["h100-0"]
    assert result["Nodes"] is None
    assert result["Error"] == ""
    assert "compute-tier" in result["FailedAndUnresolvableNodes"]["h200-0"]
    status, scores = post(server, "/prioritize", args)
    assert status == 200
    assert [s["Host"] for s in scores] == ["h100-0", "h200-0"]


def test_full_node_mode(server: BackgroundServer) -> None:
    args = {"Pod": pod("d", "decode"), "Nodes": {"metadata": {}, "items": NODES}, "NodeNames": None}
    status, result = post(server, "/filter", args)
    assert status == 200
    assert [n["metadata"]["name"] for n in result["Nodes"]["items"]] == ["h200-0"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/filter", b"{oops", 400),
        ("/filter", b"", 400),
        ("/prioritize", b'{"Pod": "x", "NodeNames": []}', 400),
        ("/prioritize", b"\xff\xfe", 400),
        ("/filter", b'{"Pod": {}, "NodeNames": ["' + b"a" * 70_000 + b'"]}', 413),
    ],
)
def test_bad_requests_get_an_error_body(server: BackgroundServer, path: str, body: bytes, status: int) -> None:
    got, raw = call(server, path, body)
    assert got == status
    assert json.loads(raw)["Error"]
    # and the server still answers
    assert call(server, "/healthz")[0] == 200


def test_bind_is_answered_with_an_error(server: BackgroundServer) -> None:
    status, result = post(server, "/bind", {"PodName": "p", "PodNamespace": "n", "PodUID": "u", "Node": "h100-0"})
    assert status == 200
    assert "does not bind" in result["Error"]


def test_health_ready_metrics(server: BackgroundServer) -> None:
    assert call(server, "/healthz") == (200, b"ok")
    assert call(server, "/readyz") == (200, b"ok")
    post(server, "/filter", {"Pod": pod("p", "decode"), "NodeNames": ["h100-0", "h200-0", "ghost"]})
    call(server, "/filter", b"{oops")  # its own bad request: the counter must not depend on another test's
    status, text = call(server, "/metrics")
    assert status == 200
    metrics = text.decode()
    assert 'conserve_extender_request_duration_seconds_bucket{le="0.005",verb="filter"}' in metrics
    assert 'conserve_extender_filtered_nodes_total{reason="tier-mismatch"}' in metrics
    assert 'conserve_extender_filtered_nodes_total{reason="unknown-node"}' in metrics
    assert 'conserve_extender_requests_total{outcome="bad_request",verb="filter"}' in metrics
    assert "conserve_extender_cache_nodes" in metrics


def test_readyz_waits_for_the_cache() -> None:
    app = ExtenderApp(ExtenderService(ExtenderSettings()), ready=lambda: False).build()
    with BackgroundServer(app) as running:
        assert call(running, "/readyz")[0] == 503
