"""The operator killed in the middle of a burst and restarted; two replicas that must never both act."""

from __future__ import annotations

import concurrent.futures
import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

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

CAPACITY = 10_000
USABLE = int(CAPACITY * 0.95)


@pytest.fixture
def api(cluster: ClusterHandle, namespace: str, crds: None) -> Iterator[Api]:
    with cluster.api_client(pool_size=8) as client:
        yield Api(client, namespace)


def fleet(api: Api, decoders: int) -> None:
    api.create(pool_body("llama", tokens_per_decoder=CAPACITY))
    for i in range(decoders):
        api.create(pod_body(f"dec-{i}", f"kwok-h200-{i % 2}"))


def check_no_oversubscription(api: Api) -> dict[str, int]:
    held: dict[str, int] = defaultdict(int)
    for c in api.list_convs():
        s = c.get("status") or {}
        if s.get("decoder") and s.get("phase") not in ("Completed", "Failed"):
            held[s["decoder"]["pod"]] += s["reservedKvTokens"]
    assert all(v <= USABLE for v in held.values()), dict(held)
    return dict(held)


def test_killed_mid_burst_and_restarted(api: Api, cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    fleet(api, 4)  # 4 x 9500 usable; each conversation reserves 2000: 16 fit, 4 per decoder
    op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log").start()
    names = [f"burst-{i:02d}" for i in range(30)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: api.create(conversation_body(n, "llama", 1000)), names[:12]))
        op.kill(signal.SIGKILL)  # mid-burst: some placed, some decided but maybe not written
        list(pool.map(lambda n: api.create(conversation_body(n, "llama", 1000)), names[12:]))
    op.start()
    try:

        def settled() -> bool:
            phases = [(c.get("status") or {}).get("phase") for c in api.list_convs()]
            return phases.count("Prefilling") == 16 and phases.count("Pending") == 14

        wait_for(settled, timeout_s=30, what="16 placed and 14 waiting")
        held = check_no_oversubscription(api)
        assert sorted(held.values()) == [8000] * 4
        placed = [c for c in api.list_convs() if c["status"]["phase"] == "Prefilling"]
        assert {(c["status"]["placementGeneration"], c["status"]["kvTransfers"]) for c in placed} == {(1, 1)}
        # Free everything: the 14 waiting ones are placed, each exactly once.
        for c in placed:
            api.patch_conv(c["metadata"]["name"], {"completed": True})
        wait_for(
            lambda: sum((c.get("status") or {}).get("phase") == "Prefilling" for c in api.list_convs()) == 14,
            timeout_s=30,
            what="the queue drained",
        )
        check_no_oversubscription(api)
        assert {c["status"]["placementGeneration"] for c in api.list_convs()} == {1}
        assert len(api.events("Placed")) <= 30  # one per conversation at most (one may be lost with the kill)
    finally:
        op.stop()
        api.strip_finalizers()


def test_two_replicas_one_leader(api: Api, cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    lease = ["--lease-name", "conserve-operator", "--lease-namespace", namespace, "--lease-duration", "5"]
    a = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "a.log", [*lease, "--identity", "a"]).start()
    b = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "b.log", [*lease, "--identity", "b"])
    b.start(wait_ready=False)
    try:
        b.wait_log("waiting for lease")
        fleet(api, 2)
        for i in range(6):
            api.create(conversation_body(f"c{i}", "llama", 1000))
        wait_for(lambda: sum((c.get("status") or {}).get("phase") == "Prefilling" for c in api.list_convs()) == 6)
        assert "ledger rebuilt" not in b.log_text(), b.log_text()[-2000:] + a.log_text()[-2000:]
        wait_for(lambda: len(api.events("Placed")) >= 6)  # a's Events follow its status writes: not lost by the kill
        a.kill(signal.SIGKILL)  # no clean release: b takes over when the lease expires
        b.wait_log("ledger rebuilt", timeout_s=20)
        api.create(conversation_body("after", "llama", 1000))
        wait_for(lambda: (api.get_conv("after").get("status") or {}).get("phase") == "Prefilling")
        convs = api.list_convs()
        assert {c["status"]["placementGeneration"] for c in convs} == {1}, [c["status"] for c in convs]
        # The Event follows the status patch: wait for it rather than race it.
        wait_for(lambda: len(api.events("Placed")) >= 7)
        assert len(api.events("Placed")) == 7, [(e.involved_object.name, e.reporting_instance) for e in api.events()]
        check_no_oversubscription(api)
    finally:
        a.stop()
        b.stop()
        api.strip_finalizers()
