"""Placement, queueing and release against the real control plane, with `conserve operator` as a subprocess."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conserve.controller.testing import (
    Api,
    OperatorProcess,
    conversation_body,
    pod_body,
    pool_body,
    wait_for,
)
from conserve.devcluster.testing import ClusterHandle


@pytest.fixture
def operator(cluster: ClusterHandle, namespace: str, api: Api, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log").start()
    yield op
    op.stop()
    api.strip_finalizers()


def phase(api: Api, name: str) -> str:
    return str(api.get_conv(name).get("status", {}).get("phase", ""))


def placed_on(api: Api) -> Counter[str]:
    return Counter(
        c["status"]["decoder"]["pod"]
        for c in api.list_convs()
        if c.get("status", {}).get("decoder") and c["status"]["phase"] not in ("Completed", "Failed")
    )


def make_fleet(api: Api, decoders: int = 2, tokens: int = 10_000, **spec: Any) -> None:
    api.create(pool_body("llama", tokens_per_decoder=tokens, **spec))
    for i in range(decoders):
        api.create(pod_body(f"dec-{i}", f"kwok-h200-{i % 2}"))
    api.create(pod_body("pre-0", "kwok-h100-0", app="dec-prefill"))
    wait_for(lambda: api.get_pool("llama").get("status", {}).get("readyDecoders") == decoders, what="decoders ready")


def test_place_queue_and_release(api: Api, operator: OperatorProcess) -> None:
    make_fleet(api)
    # Reservation 2 x 2000 = 4000 KV tokens (no history yet); 9500 usable per decoder after 5% headroom: 2 each.
    for i in range(5):
        api.create(conversation_body(f"c{i}", "llama", 2000))
    wait_for(lambda: sum(placed_on(api).values()) == 4, what="4 placed")
    assert max(placed_on(api).values()) == 2
    waiting = [c for c in api.list_convs() if c["status"]["phase"] == "Pending"]
    assert len(waiting) == 1
    (cond,) = [c for c in waiting[0]["status"]["conditions"] if c["type"] == "Placed"]
    assert (cond["status"], cond["reason"]) == ("False", "NoCapacity")

    placed = api.get_conv("c0")["status"]
    assert placed["phase"] == "Prefilling"
    assert placed["decoder"]["tier"] == "bandwidth" and placed["decoder"]["endpoint"]
    assert placed["prefill"]["pod"] == "pre-0" and placed["prefill"]["tier"] == "compute"
    assert placed["reservedKvTokens"] == 4000 and placed["kvTransfers"] == 1 and placed["placementGeneration"] == 1
    # One write per placement: the status, no finalizer.
    assert not (api.get_conv("c0")["metadata"].get("finalizers") or [])
    wait_for(lambda: len(api.events("Placed")) == 4, what="4 Placed events")

    # Completion releases capacity: the waiting conversation gets it.
    api.patch_conv("c0", {"completed": True})
    wait_for(lambda: phase(api, "c0") == "Completed", what="c0 completed")
    wait_for(lambda: phase(api, waiting[0]["metadata"]["name"]) == "Prefilling", what="queued one placed")
    assert "conserve.dev/release-capacity" not in (api.get_conv("c0")["metadata"].get("finalizers") or [])

    # Deletion: the object goes away at once, and the watch releases its capacity once.
    api.delete_conv("c1")
    wait_for(lambda: not api.conv_exists("c1"), what="c1 deleted")
    pool = wait_for(
        lambda: (s := api.get_pool("llama")["status"])["conversations"] == 3 and s, what="pool status follows"
    )
    assert pool["kvUsage"] == "12000/20000" and pool["readyDecoders"] == 2
    assert {d["pod"]: d["conversations"] for d in pool["decoders"]} == dict(placed_on(api))
    conds = {c["type"]: c["status"] for c in pool["conditions"]}
    assert conds == {"Ready": "True", "Degraded": "False"}
    assert len(api.events("Released")) == 2


def test_priority_orders_the_queue(api: Api, operator: OperatorProcess) -> None:
    make_fleet(api, decoders=1, tokens=10_000)
    api.create(conversation_body("big", "llama", 4000))  # 8000 reserved: the decoder is full
    wait_for(lambda: phase(api, "big") == "Prefilling")
    api.create(conversation_body("low", "llama", 2000, priority=0))
    api.create(conversation_body("high", "llama", 2000, priority=10))
    wait_for(lambda: phase(api, "low") == "Pending" and phase(api, "high") == "Pending")
    api.patch_conv("big", {"completed": True})
    # Room for two 4000-token reservations: both placed, the higher priority first (generation order of events).
    wait_for(lambda: phase(api, "low") == "Prefilling" and phase(api, "high") == "Prefilling")
    high_at = api.get_conv("high")["status"]["placedAt"]
    assert high_at <= api.get_conv("low")["status"]["placedAt"]


def test_bad_references_are_reported(api: Api, operator: OperatorProcess) -> None:
    api.create(conversation_body("orphan", "no-such-pool", 100))
    cond = wait_for(
        lambda: next(
            (c for c in api.get_conv("orphan").get("status", {}).get("conditions", []) if c["type"] == "Placed"), None
        ),
        what="orphan condition",
    )
    assert (cond["status"], cond["reason"]) == ("False", "PoolNotFound")
    api.create(pool_body("empty", app="nothing-matches"))
    api.create(conversation_body("lonely", "empty", 100))
    cond = wait_for(
        lambda: next(
            (c for c in api.get_conv("lonely").get("status", {}).get("conditions", []) if c["type"] == "Placed"), None
        ),
        what="lonely condition",
    )
    assert cond["reason"] == "NoDecoder"
    pool = wait_for(lambda: api.get_pool("empty").get("status"), what="pool status")
    assert {c["type"]: c["reason"] for c in pool["conditions"]}["Ready"] == "NoDecoder"
    assert {e.reason for e in api.events()} >= {"PoolNotFound", "NoDecoder"}
    # The pool appears later: the waiting conversation is placed.
    api.create(pool_body("no-such-pool", app="late"))
    api.create(pod_body("late-0", "kwok-a100-0", app="late"))
    wait_for(lambda: phase(api, "orphan") == "Prefilling", what="orphan placed once its pool exists")
    assert operator.proc is not None and operator.proc.poll() is None


def test_metrics_endpoint(api: Api, cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "op.log", ["--metrics-port", str(port)]).start()
    try:
        make_fleet(api, decoders=1)
        api.create(conversation_body("m", "llama", 1000))
        wait_for(lambda: phase(api, "m") == "Prefilling")

        labels = f'namespace="{namespace}",pool="llama"'

        def scrape() -> str:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return text if f"conserve_reserved_kv_tokens{{{labels}}} 2000.0" in text else ""

        text = wait_for(scrape, what="pool gauges")
        assert f'conserve_placements_total{{{labels},result="placed"}} 1.0' in text
        assert f"conserve_reserved_kv_tokens{{{labels}}} 2000.0" in text
        assert f"conserve_kv_transfers_total{{{labels}}} 1.0" in text
        assert f"conserve_placement_latency_seconds_count{{{labels}}} 1.0" in text
        assert f"conserve_pending_conversations{{{labels}}} 0.0" in text
    finally:
        op.stop()
        api.strip_finalizers()
