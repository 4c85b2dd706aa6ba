"""Placement, queueing and release against the real control plane, with `conserve operator` as a subprocess."""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle
from conserve.testkit import NOT_YET, Api, OperatorProcess, conversation_body, pod_body, pool_body, wait_for


def phase(api: Api, name: str) -> str:
    return str(api.get_conv(name).get("status", {}).get("phase", ""))


def placed_on(api: Api) -> Counter[str]:
    return Counter(
        c["status"]["decoder"]["pod"]
        for c in api.list_convs()
        if c.get("status", {}).get("decoder") and c["status"]["phase"] not in ("Completed", "Failed")
    )


def make_fleet(api: Api, decoders: int = 2, tokens: int = 10_000, **spec: Any) -> None:
    api.create_fleet(decoders, tokens, prefills=1, **spec)
    api.wait_ready_decoders(decoders)


def test_place_queue_and_release(api: Api, operator: OperatorProcess) -> None:
    make_fleet(api)
    # Reservation 2 x 2000 = 4000 KV tokens (no history yet); 9500 usable per decoder after 5% headroom: 2 each.
    for i in range(5):
        api.create(conversation_body(f"c{i}", "llama", 2000))
    wait_for("4 placed", lambda: sum(placed_on(api).values()) == 4, tolerate=NOT_YET)
    assert max(placed_on(api).values()) == 2

    def pending() -> list[dict[str, Any]] | None:  # its status is written apart from the placements': wait for it
        found = [c for c in api.list_convs() if (c.get("status") or {}).get("phase") == "Pending"]
        return found or None

    waiting = wait_for("the fifth pending", pending, tolerate=NOT_YET)
    assert len(waiting) == 1
    (cond,) = [c for c in waiting[0]["status"]["conditions"] if c["type"] == "Placed"]
    assert (cond["status"], cond["reason"]) == ("False", "NoCapacity")

    placed = api.get_conv("c0")["status"]
    assert placed["phase"] == "Prefilling"
    assert placed["decoder"]["tier"] == "bandwidth"
    assert placed["decoder"]["endpoint"]
    assert placed["prefill"]["pod"] == "pre-0"
    assert placed["prefill"]["tier"] == "compute"
    assert placed["reservedKvTokens"] == 4000
    assert placed["kvTransfers"] == 1
    assert placed["placementGeneration"] == 1
    # One write per placement: the status, no finalizer.
    assert not api.get_conv("c0")["metadata"].get("finalizers")
    wait_for("4 Placed events", lambda: len(api.events("Placed")) == 4, tolerate=NOT_YET)

    # Completion releases capacity: the waiting conversation gets it.
    api.patch_conv("c0", {"completed": True})
    wait_for("c0 completed", lambda: phase(api, "c0") == "Completed", tolerate=NOT_YET)
    wait_for("queued one placed", lambda: phase(api, waiting[0]["metadata"]["name"]) == "Prefilling", tolerate=NOT_YET)
    assert "conserve.dev/release-capacity" not in (api.get_conv("c0")["metadata"].get("finalizers") or [])

    # Deletion: the object goes away at once, and the watch releases its capacity once.
    api.delete_conv("c1")
    wait_for("c1 deleted", lambda: not api.conv_exists("c1"), tolerate=NOT_YET)
    pool = wait_for(
        "pool status follows",
        lambda: (s := api.get_pool("llama")["status"])["conversations"] == 3 and s,
        tolerate=NOT_YET,
    )
    assert pool["kvUsage"] == "12000/20000"
    assert pool["readyDecoders"] == 2
    assert {d["pod"]: d["conversations"] for d in pool["decoders"]} == dict(placed_on(api))
    conds = {c["type"]: c["status"] for c in pool["conditions"]}
    assert conds == {"Ready": "True", "Degraded": "False", "Overlapping": "False"}
    assert len(api.events("Released")) == 2


def test_priority_orders_the_queue(api: Api, operator: OperatorProcess) -> None:
    make_fleet(api, decoders=1, tokens=10_000)
    api.create(conversation_body("big", "llama", 4000))  # 8000 reserved: the decoder is full
    wait_for("big placed", lambda: phase(api, "big") == "Prefilling", tolerate=NOT_YET)
    api.create(conversation_body("low", "llama", 2000, priority=0))
    api.create(conversation_body("high", "llama", 2000, priority=10))
    wait_for(
        "low and high waiting",
        lambda: phase(api, "low") == "Pending" and phase(api, "high") == "Pending",
        tolerate=NOT_YET,
    )
    api.patch_conv("big", {"completed": True})
    # Room for two 4000-token reservations: both placed, the higher priority first (generation order of events).
    wait_for(
        "low and high placed",
        lambda: phase(api, "low") == "Prefilling" and phase(api, "high") == "Prefilling",
        tolerate=NOT_YET,
    )
    high_at = api.get_conv("high")["status"]["placedAt"]
    assert high_at <= api.get_conv("low")["status"]["placedAt"]


def test_bad_references_are_reported(api: Api, operator: OperatorProcess) -> None:
    api.create(conversation_body("orphan", "no-such-pool", 100))
    cond = wait_for("orphan condition", lambda: api.conv_condition("orphan", "Placed"), tolerate=NOT_YET)
    assert (cond["status"], cond["reason"]) == ("False", "PoolNotFound")
    api.create(pool_body("empty", app="nothing-matches"))
    api.create(conversation_body("lonely", "empty", 100))
    cond = wait_for("lonely condition", lambda: api.conv_condition("lonely", "Placed"), tolerate=NOT_YET)
    assert cond["reason"] == "NoDecoder"
    pool = wait_for("pool status", lambda: api.get_pool("empty").get("status"), tolerate=NOT_YET)
    assert {c["type"]: c["reason"] for c in pool["conditions"]}["Ready"] == "NoDecoder"
    assert {e.reason for e in api.events()} >= {"PoolNotFound", "NoDecoder"}
    # The pool appears later: the waiting conversation is placed.
    api.create(pool_body("no-such-pool", app="late"))
    api.create(pod_body("late-0", "kwok-a100-0", app="late"))
    wait_for("orphan placed once its pool exists", lambda: phase(api, "orphan") == "Prefilling", tolerate=NOT_YET)
    assert operator.running


def test_metrics_endpoint(api: Api, cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "op.log", ["--metrics-port", str(port)]).start()
    try:
        make_fleet(api, decoders=1)
        api.create(conversation_body("m", "llama", 1000))
        wait_for("m placed", lambda: phase(api, "m") == "Prefilling", tolerate=NOT_YET)

        labels = f'namespace="{namespace}",pool="llama"'

        def scrape() -> str:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return text if f"conserve_reserved_kv_tokens{{{labels}}} 2000.0" in text else ""

        text = wait_for("pool gauges", scrape, tolerate=(*NOT_YET, OSError))
        assert f'conserve_placements_total{{{labels},result="placed"}} 1.0' in text
        assert f"conserve_reserved_kv_tokens{{{labels}}} 2000.0" in text
        assert f"conserve_kv_transfers_total{{{labels}}} 1.0" in text
        assert f"conserve_placement_latency_seconds_count{{{labels}}} 1.0" in text
        assert f"conserve_pending_conversations{{{labels}}} 0.0" in text
    finally:
        op.stop()
        api.strip_finalizers()
