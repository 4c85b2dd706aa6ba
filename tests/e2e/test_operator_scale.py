"""The operator at scale on the real control plane: no finalizer (a delete while the operator is down still
releases), and replicas sharded by pool (each leads a disjoint set of DecoderPools; a replica killed hands its
pools to the other within the Lease duration, and nothing is placed twice)."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from conserve.controller.shards import shard_of
from conserve.devcluster.testing import ClusterHandle
from conserve.kube.clients import CoordinationV1Api
from conserve.testkit import NOT_YET, Api, OperatorProcess, conversation_body, pod_body, pool_body, wait_for

pytestmark = pytest.mark.e2e

SHARDS = 4
LEASE_S = 5.0
CAPACITY = 10_000


def pools_one_per_shard(namespace: str) -> dict[int, str]:
    """A pool name for every shard (names chosen by their hash, as any set of pools would spread)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < SHARDS:
        name = f"pool-{i}"
        found.setdefault(shard_of(namespace, name, SHARDS), name)
        i += 1
    return found


def shard_holders(api: Api, namespace: str) -> dict[int, str]:
    leases = CoordinationV1Api(api.core.api_client).list_namespaced_lease(namespace).items
    now = time.time()
    out = {}
    for lease in leases:
        name = lease.metadata.name
        if not name.startswith("conserve-operator-shard-") or not lease.spec.holder_identity:
            continue
        renewed = lease.spec.renew_time.timestamp() if lease.spec.renew_time else 0.0
        if renewed + (lease.spec.lease_duration_seconds or 0) >= now:
            out[int(name.rsplit("-", 1)[1])] = lease.spec.holder_identity
    return out


def placed(api: Api) -> dict[str, dict[str, Any]]:
    return {
        c["metadata"]["name"]: c["status"]
        for c in api.list_convs()
        if (c.get("status") or {}).get("phase") == "Prefilling"
    }


def placed_by(api: Api, conversations: int) -> dict[str, list[str]] | None:
    """Conversation -> the replicas whose Placed Event names it, once Events name `conversations` of them."""
    out: dict[str, list[str]] = defaultdict(list)
    for event in api.events("Placed"):
        out[event.involved_object.name].append(event.reporting_instance)
    return dict(out) if len(out) == conversations else None


def test_replicas_lead_disjoint_pools_and_a_dead_ones_pools_move(
    api: Api, cluster: ClusterHandle, namespace: str, tmp_path: Path
) -> None:
    pools = pools_one_per_shard(namespace)
    for shard, pool in pools.items():
        api.create(pool_body(pool, app=f"dec-{shard}", tokens_per_decoder=CAPACITY))
        api.create(pod_body(f"dec-{shard}", f"kwok-h200-{shard % 2}", app=f"dec-{shard}"))
    args = ["--lease-name", "conserve-operator", "--lease-namespace", namespace, "--lease-duration", str(LEASE_S)]
    # Every Event posted (not aggregated): each names the replica that decided (reportingInstance).
    args += ["--shards", str(SHARDS), "--events", "all"]
    replicas = {
        ident: OperatorProcess(cluster.kubeconfig, namespace, tmp_path / f"{ident}.log", [*args, "--identity", ident])
        for ident in ("a", "b")
    }
    for op in replicas.values():
        op.start(wait_ready=False)
    try:

        def two_shards_each() -> dict[int, str] | None:
            holders = shard_holders(api, namespace)
            return holders if sorted(holders.values()) == ["a", "a", "b", "b"] else None

        # Each replica leads its fair share: two shards each, disjoint, all four led.
        holders = wait_for("two shards per replica", two_shards_each, 60, tolerate=NOT_YET)
        for pool in pools.values():
            for i in range(3):
                api.create(conversation_body(f"{pool}-c{i}", pool, 1000))
        wait_for("12 placed", lambda: len(placed(api)) == 12, 60, tolerate=NOT_YET)
        # Each conversation placed once, by the replica leading its pool's shard.
        deciders = wait_for("12 Placed Events", lambda: placed_by(api, 12), tolerate=NOT_YET)
        for name, ident in deciders.items():
            assert ident == [holders[s] for s, pool in pools.items() if name.startswith(f"{pool}-")], (name, ident)

        # Kill a (no clean release): b takes a's shards once their Leases expire, and places what came meanwhile.
        killed_at = time.monotonic()
        replicas["a"].kill(signal.SIGKILL)
        orphaned = [pools[s] for s, h in holders.items() if h == "a"]
        for pool in orphaned:
            api.create(conversation_body(f"{pool}-late", pool, 1000))
        wait_for(
            "b leads every shard",
            lambda: sorted(shard_holders(api, namespace).values()) == ["b"] * SHARDS,
            LEASE_S * 4,
            tolerate=NOT_YET,
        )
        handover_s = time.monotonic() - killed_at
        # Within the Lease duration plus b's renew period (the ratio of client-go) and scheduling slack.
        assert handover_s <= LEASE_S + 2 * LEASE_S * 2 / 15 + 3.0, handover_s
        wait_for("the late ones placed by b", lambda: len(placed(api)) == 14, 30, tolerate=NOT_YET)
        statuses = placed(api)
        # Nothing placed twice: every conversation has its first placement only, on a decoder of its own pool.
        assert {(s["placementGeneration"], s["kvTransfers"]) for s in statuses.values()} == {(1, 1)}
        per_decoder: dict[str, int] = defaultdict(int)
        for name, s in statuses.items():
            decoder = s["decoder"]["pod"]
            shard = next(sh for sh, pool in pools.items() if name.startswith(f"{pool}-"))
            assert decoder == f"dec-{shard}", (name, decoder)
            per_decoder[decoder] += int(s["reservedKvTokens"])
        assert all(v <= CAPACITY * 0.95 for v in per_decoder.values()), dict(per_decoder)
        deciders = wait_for("14 Placed Events", lambda: placed_by(api, 14), tolerate=NOT_YET)
        assert all(len(ident) == 1 for ident in deciders.values()), deciders
        assert {deciders[f"{pool}-late"][0] for pool in orphaned} == {"b"}
    finally:
        for op in replicas.values():
            op.stop()


def test_a_delete_while_the_operator_is_down_releases_capacity(
    api: Api, cluster: ClusterHandle, namespace: str, tmp_path: Path
) -> None:
    api.create_fleet(1, CAPACITY)
    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log").start()
    try:
        api.create(conversation_body("big", "llama", 4500))  # 9,000 of 9,500 usable: no room even for a floor
        wait_for(
            "big placed",
            lambda: (api.get_conv("big").get("status") or {}).get("phase") == "Prefilling",
            tolerate=NOT_YET,
        )
        api.create(conversation_body("next", "llama", 1000))
        wait_for(
            "next waits", lambda: (api.get_conv("next").get("status") or {}).get("phase") == "Pending", tolerate=NOT_YET
        )
        assert not api.get_conv("big")["metadata"].get("finalizers")  # the placement was its only write
        op.stop()
        api.delete_conv("big")
        wait_for("big gone at once (nothing holds it)", lambda: not api.conv_exists("big"), tolerate=NOT_YET)
        op.start()  # the rebuild does not find it: its capacity is free, and the waiting one gets it
        wait_for(
            "next placed",
            lambda: (api.get_conv("next").get("status") or {}).get("phase") == "Prefilling",
            tolerate=NOT_YET,
        )
    finally:
        op.stop()
