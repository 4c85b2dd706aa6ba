"""The operator killed in the middle of a burst and restarted; two replicas that must never both act."""

from __future__ import annotations

import concurrent.futures
import signal
from collections import defaultdict
from pathlib import Path

from conserve.devcluster.testing import ClusterHandle
from conserve.testkit import NOT_YET, Api, OperatorProcess, conversation_body, wait_for

CAPACITY = 10_000
USABLE = int(CAPACITY * 0.95)


def check_no_oversubscription(api: Api) -> dict[str, int]:
    held: dict[str, int] = defaultdict(int)
    for c in api.list_convs():
        s = c.get("status") or {}
        if s.get("decoder") and s.get("phase") not in ("Completed", "Failed"):
            held[s["decoder"]["pod"]] += s["reservedKvTokens"]
    assert all(v <= USABLE for v in held.values()), dict(held)
    return dict(held)


def test_killed_mid_burst_and_restarted(api: Api, cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    # 4 x 9500 usable; each conversation reserves 2000 (the 2.0 prior), 4 per decoder, then one more per decoder at
    # the floor (1000 + 256: the unconfirmed prior does not block it): 20 fit.
    api.create_fleet(4, CAPACITY)
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
            return phases.count("Prefilling") == 20 and phases.count("Pending") == 10

        wait_for("20 placed and 10 waiting", settled, 30, tolerate=NOT_YET)
        held = check_no_oversubscription(api)
        assert sorted(held.values()) == [9256] * 4
        placed = [c for c in api.list_convs() if c["status"]["phase"] == "Prefilling"]
        assert {(c["status"]["placementGeneration"], c["status"]["kvTransfers"]) for c in placed} == {(1, 1)}
        # Free everything: the 10 waiting ones are placed, each exactly once.
        for c in placed:
            api.patch_conv(c["metadata"]["name"], {"completed": True})
        wait_for(
            "the queue drained",
            lambda: sum((c.get("status") or {}).get("phase") == "Prefilling" for c in api.list_convs()) == 10,
            30,
            tolerate=NOT_YET,
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
        api.create_fleet(2, CAPACITY)
        for i in range(6):
            api.create(conversation_body(f"c{i}", "llama", 1000))
        wait_for(
            "6 placed",
            lambda: sum((c.get("status") or {}).get("phase") == "Prefilling" for c in api.list_convs()) == 6,
            tolerate=NOT_YET,
        )
        assert "ledger rebuilt" not in b.log_text(), b.log_text()[-2000:] + a.log_text()[-2000:]
        wait_for(
            "6 Placed events", lambda: len(api.events("Placed")) >= 6, tolerate=NOT_YET
        )  # a's Events follow its status writes: not lost by the kill
        a.kill(signal.SIGKILL)  # no clean release: b takes over when the lease expires
        b.wait_log("ledger rebuilt", timeout_s=20)
        api.create(conversation_body("after", "llama", 1000))
        wait_for(
            "after placed by b",
            lambda: (api.get_conv("after").get("status") or {}).get("phase") == "Prefilling",
            tolerate=NOT_YET,
        )
        convs = api.list_convs()
        assert {c["status"]["placementGeneration"] for c in convs} == {1}, [c["status"] for c in convs]
        # The Event follows the status patch: wait for it rather than race it.
        wait_for("the 7th Placed event", lambda: len(api.events("Placed")) >= 7, tolerate=NOT_YET)
        assert len(api.events("Placed")) == 7, [(e.involved_object.name, e.reporting_instance) for e in api.events()]
        check_no_oversubscription(api)
    finally:
        a.stop()
        b.stop()
        api.strip_finalizers()
