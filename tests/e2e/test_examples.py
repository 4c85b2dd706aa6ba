"""examples/ applied as its README says: the pool finds its servers and every conversation is placed."""

from __future__ import annotations

from pathlib import Path

from conserve.devcluster.testing import ClusterHandle
from conserve.testkit import NOT_YET, Api, OperatorProcess, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_examples_apply_and_place(cluster: ClusterHandle, namespace: str, api: Api, operator: OperatorProcess) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
    # The pool's servers come into its status as their pods appear: the prefill server may follow the decoders.
    pool = wait_for(
        "two decoders ready and the prefill server found",
        lambda: (s := api.get_pool("llama-3-8b").get("status") or {}).get("readyDecoders") == 2 and s["prefills"] and s,
        30,
        tolerate=NOT_YET,
    )
    assert {d["tier"] for d in pool["decoders"]} == {"bandwidth"}
    assert {d["capacityKvTokens"] for d in pool["decoders"]} == {912_623}
    assert [p["tier"] for p in pool["prefills"]] == ["compute"]

    def all_placed() -> bool:
        return all((c.get("status") or {}).get("phase") == "Prefilling" for c in api.list_convs())

    wait_for("every example conversation placed", all_placed, 20, tolerate=NOT_YET)
    reserved = {c["metadata"]["name"]: c["status"]["reservedKvTokens"] for c in api.list_convs()}
    assert reserved == {"chat-1": 3600, "agent-1": 39000, "urgent-1": 1800}

    # The README's turn interface.
    patch = '{"spec":{"usage":{"turns":1,"inputTokens":1800,"outputTokens":250}}}'
    cluster.kubectl("patch", "conv", "chat-1", "-n", namespace, "--type", "merge", "-p", patch)
    wait_for("chat-1 Decoding", lambda: api.get_conv("chat-1")["status"]["phase"] == "Decoding", tolerate=NOT_YET)
    out = cluster.kubectl("get", "conv", "chat-1", "-n", namespace).stdout
    assert "Decoding" in out
    assert "bandwidth" in out
    cluster.kubectl("patch", "conv", "chat-1", "-n", namespace, "--type", "merge", "-p", '{"spec":{"completed":true}}')
    wait_for("chat-1 Completed", lambda: api.get_conv("chat-1")["status"]["phase"] == "Completed", tolerate=NOT_YET)
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
    assert refused.returncode != 0
    assert "cannot decrease" in refused.stderr
