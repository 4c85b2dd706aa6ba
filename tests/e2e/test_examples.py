"""examples/ applied as its README says: the pool finds its servers and every conversation is placed."""

from __future__ import annotations

from pathlib import Path

from conserve.controller.testing import Api, OperatorProcess, install_crds, wait_for
from conserve.devcluster.testing import ClusterHandle

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_examples_apply_and_place(cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    with cluster.api_client() as client:
        install_crds(client)
        api = Api(client, namespace)
        op = OperatorProcess(cluster.kubeconfig, namespace, tmp_path / "operator.log").start()
        try:
            cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
            pool = wait_for(
                lambda: (s := api.get_pool("llama-3-8b").get("status") or {}).get("readyDecoders") == 2 and s,
                timeout_s=30,
                what="two decoders ready",
            )
            assert {d["tier"] for d in pool["decoders"]} == {"bandwidth"}
            assert {d["capacityKvTokens"] for d in pool["decoders"]} == {912_623}
            assert [p["tier"] for p in pool["prefills"]] == ["compute"]

            def all_placed() -> bool:
                return all((c.get("status") or {}).get("phase") == "Prefilling" for c in api.list_convs())

            wait_for(all_placed, timeout_s=20, what="every example conversation placed")
            reserved = {c["metadata"]["name"]: c["status"]["reservedKvTokens"] for c in api.list_convs()}
            assert reserved == {"chat-1": 3600, "agent-1": 39000, "urgent-1": 1800}

            # The README's turn interface.
            patch = '{"spec":{"usage":{"turns":1,"inputTokens":1800,"outputTokens":250}}}'
            cluster.kubectl("patch", "conv", "chat-1", "-n", namespace, "--type", "merge", "-p", patch)
            wait_for(lambda: api.get_conv("chat-1")["status"]["phase"] == "Decoding")
            out = cluster.kubectl("get", "conv", "chat-1", "-n", namespace).stdout
            assert "Decoding" in out and "bandwidth" in out
            cluster.kubectl(
                "patch", "conv", "chat-1", "-n", namespace, "--type", "merge", "-p", '{"spec":{"completed":true}}'
            )
            wait_for(lambda: api.get_conv("chat-1")["status"]["phase"] == "Completed")
            refused = cluster.kubectl(
                "patch",
                "conv",
                "chat-1",
                "-n",
                namespace,
                "--type",
                "merge",
                "-p",
                '{"spec":{"usage":{"turns":0}}}',
                check=False,
            )
            assert refused.returncode != 0 and "cannot decrease" in refused.stderr
        finally:
            op.stop()
            api.strip_finalizers()
