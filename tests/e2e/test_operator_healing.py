"""Failures that heal, on the local control plane (issue 27): a decoder unready within its pool's grace keeps its
conversations and past it they move; an API-server outage long enough for the controller-manager to mark the
nodes NotReady loses no conversation (turns after it are served, on the same decoders); a GPU server restarted on
a new port is followed by the operator and the router."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

from conserve.api.common import GROUP, VERSION
from conserve.core.tokens import filler_text
from conserve.devcluster.testing import ClusterHandle
from conserve.router.policy import conversation_object_name
from conserve.testkit import NOT_YET, Api, ConserveProcesses, OperatorProcess, PoolBuilder, conversation_body, wait_for
from conserve.testkit.processes import StartServingStack

POOL = PoolBuilder("pool").decoders("dec").prefills("pre").build()


@dataclass
class DataPlane:
    """The router of a serving stack, and the cluster behind it, as these tests use them."""

    namespace: str
    router_url: str
    custom: Any
    core: Any

    def http(self, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.router_url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read().decode()
            return dict(resp.headers), json.loads(raw) if raw.startswith("{") else raw

    def backends(self) -> dict[str, list[dict[str, str]]]:
        try:
            _, data = self.http("/conserve/backends")
        except OSError:  # not listening yet
            return {}
        return data if isinstance(data, dict) else {}

    def turn(self, conv: str, messages: list[dict[str, str]], *, stream: bool) -> tuple[dict[str, str], str]:
        body = {"model": "llama-3-8b", "messages": messages, "max_tokens": 12, "stream": stream}
        headers, data = self.http("/v1/chat/completions", body, {"X-Conversation-Id": conv})
        if not stream:
            return headers, str(data["choices"][0]["message"]["content"])
        chunks = [json.loads(line[6:]) for line in str(data).splitlines() if line.startswith("data: {")]
        return headers, "".join(c["delta"].get("content", "") for chunk in chunks for c in chunk["choices"])

    def conversation(self, conv_id: str) -> dict[str, Any]:
        name = conversation_object_name(conv_id)
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "conversations", name
        )
        return obj


#: Long enough for the controller-manager's node monitor (its grace is 50 s) to find every node's Lease stale.
OUTAGE_S = 75.0


def set_ready(core: Any, namespace: str, pod: str, ready: bool) -> None:
    """The pod's Ready condition as a kubelet (or the node controller, for a node gone NotReady) writes it."""
    condition = {"type": "Ready", "status": "True" if ready else "False", "reason": "" if ready else "NodeNotReady"}
    core.patch_namespaced_pod_status(pod, namespace, {"status": {"conditions": [condition]}})


def test_healing_a_decoder_unready_past_its_grace_is_re_placed(api: Api, operator: OperatorProcess) -> None:
    api.create_fleet(2, placement={"decoderLostGraceSeconds": 6})
    api.wait_ready_decoders(2)
    api.create(conversation_body("a", "llama", 2000))
    placed = api.wait_conv_phase("a", "Prefilling")
    victim = placed["decoder"]["pod"]
    set_ready(api.core, api.namespace, victim, False)
    api.wait_ready_decoders(1)
    kept = api.conv_status("a")  # the pool saw it unready: within the grace nothing moves
    assert (kept["decoder"]["pod"], kept["placementGeneration"]) == (victim, 1)
    moved = wait_for(
        "a re-placed past the grace",
        lambda: (s := api.conv_status("a")).get("placementGeneration") == 2 and s,
        timeout_s=30,
        tolerate=NOT_YET,
    )
    assert moved["phase"] == "Prefilling"
    assert moved["decoder"]["pod"] != victim
    assert moved["kvTransfers"] == 2
    lost = wait_for(
        "a Warning Event DecoderLost",
        lambda: [e for e in api.events("DecoderLost") if victim in (e.message or "")],
        timeout_s=15,
    )
    assert "not ready for over 6 s" in lost[0].message


def test_healing_a_decoder_ready_again_within_its_grace_keeps_its_conversations(
    api: Api, operator: OperatorProcess
) -> None:
    api.create_fleet(2, placement={"decoderLostGraceSeconds": 60})
    api.wait_ready_decoders(2)
    api.create(conversation_body("a", "llama", 2000))
    placed = api.wait_conv_phase("a", "Prefilling")
    victim = placed["decoder"]["pod"]
    set_ready(api.core, api.namespace, victim, False)
    api.wait_ready_decoders(1)
    time.sleep(3)
    set_ready(api.core, api.namespace, victim, True)
    api.wait_ready_decoders(2)
    status = api.conv_status("a")
    assert (status["phase"], status["decoder"]["pod"], status["placementGeneration"]) == ("Prefilling", victim, 1)
    assert status["reservedKvTokens"] == placed["reservedKvTokens"]
    assert not api.events("DecoderLost")


@pytest.fixture
def plane(cluster: ClusterHandle, namespace: str, serving_stack: StartServingStack) -> DataPlane:
    stack = serving_stack(POOL, 2)
    plane = DataPlane(namespace, stack.router_url, stack.custom, stack.core)
    wait_for(
        "1 prefill and 2 decoders ready behind the router",
        lambda: len(plane.backends().get("prefills", [])) == 1 and len(plane.backends().get("decoders", [])) == 2,
        timeout_s=90,
    )
    return plane


def first_turns(plane: DataPlane, count: int) -> dict[str, list[dict[str, str]]]:
    convs = {f"heal-{i}": [{"role": "user", "content": filler_text(300 + 50 * i)}] for i in range(count)}
    for conv, messages in convs.items():
        _, text = plane.turn(conv, messages, stream=False)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(20)}]
    return convs


def decoder_pods_ready(plane: DataPlane) -> dict[str, bool]:
    """Each decoder pod's Ready condition; empty while the API server does not answer."""
    with contextlib.suppress(Exception):
        pods = plane.core.list_namespaced_pod(plane.namespace, label_selector="app=dec").items
        return {
            p.metadata.name: any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
            for p in pods
        }
    return {}


def test_healing_an_api_server_outage_loses_no_conversation(cluster: ClusterHandle, plane: DataPlane) -> None:
    if cluster.local is None:
        pytest.skip("stops the kube-apiserver: needs the control plane this test session started")
    convs = first_turns(plane, 6)
    before = {c: plane.conversation(c)["status"] for c in convs}
    cluster.local.kill_component("kube-apiserver")
    time.sleep(OUTAGE_S)
    cluster.local.start_component("kube-apiserver")
    back = time.monotonic()
    # The controller-manager finds the nodes' Leases stale: it marks the nodes NotReady, and their pods. It may
    # not (its first writes after the restart can be refused while the API server's authorizer warms up, or it
    # sees every node stale at once and holds back): then the test marks the pods as it would.
    try:
        wait_for(
            "the decoder pods marked NotReady by the node controller",
            lambda: (ready := decoder_pods_ready(plane)) and not any(ready.values()),
            timeout_s=30,
        )
        marked_by = "the node controller"
    except TimeoutError:
        for pod in decoder_pods_ready(plane):
            set_ready(plane.core, plane.namespace, pod, False)
        marked_by = "the test"
    wait_for("the pool sees no ready decoder", lambda: not plane.backends().get("decoders"), timeout_s=30)
    # Within the pool's grace (120 s by default) the conversations keep their decoders, whose servers still
    # answer: their turns are served there.
    for conv, messages in convs.items():
        headers, text = plane.turn(conv, messages, stream=False)
        assert headers["X-Conserve-Decoder"] == before[conv]["decoder"]["pod"]
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(20)}]
    # KWOK renews the nodes but, unlike a kubelet, does not report its pods Ready again: write what the kubelet
    # would once its node is back.
    wait_for("the nodes Ready again", lambda: nodes_ready(plane), timeout_s=60)
    for pod in decoder_pods_ready(plane):
        set_ready(plane.core, plane.namespace, pod, True)
    wait_for("2 decoders ready behind the router", lambda: len(plane.backends().get("decoders", [])) == 2, 60)
    print(f"decoders marked NotReady by {marked_by}, Ready again {time.monotonic() - back:.0f} s after the outage")
    after = {c: plane.conversation(c)["status"] for c in convs}
    for conv, messages in convs.items():  # none failed or moved, and served again after it all
        assert after[conv]["phase"] not in ("Failed", "Completed", "Pending"), (conv, after[conv])
        assert after[conv]["decoder"]["pod"] == before[conv]["decoder"]["pod"]
        assert after[conv]["placementGeneration"] == before[conv]["placementGeneration"]
        headers, _ = plane.turn(conv, messages, stream=True)
        assert headers["X-Conserve-Decoder"] == before[conv]["decoder"]["pod"]


def nodes_ready(plane: DataPlane) -> bool:
    with contextlib.suppress(Exception):
        nodes = plane.core.list_node().items
        return all(any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or []) for n in nodes)
    return False


def test_healing_servers_restarted_on_new_ports_are_followed(
    cluster: ClusterHandle, plane: DataPlane, conserve_processes: ConserveProcesses
) -> None:
    convs = first_turns(plane, 2)
    before = {c: plane.conversation(c)["status"] for c in convs}
    old = {b["name"]: b["endpoint"] for b in plane.backends()["decoders"]}
    conserve_processes.kill("gpusim")
    conserve_processes.start(
        "gpusim-again",
        "gpu-sim",
        "pods",
        f"--kubeconfig={cluster.kubeconfig}",
        f"--namespace={plane.namespace}",
        "--time-scale=0.02",
    )

    def moved() -> dict[str, Any] | None:
        now = {c: plane.conversation(c)["status"] for c in convs}
        done = all(now[c]["decoder"]["endpoint"] != old[now[c]["decoder"]["pod"]] for c in convs)
        return now if done else None

    after = wait_for("every conversation's endpoint follows its decoder's new port", moved, timeout_s=60)
    for conv, messages in convs.items():
        assert after[conv]["decoder"]["pod"] == before[conv]["decoder"]["pod"]
        assert after[conv]["placementGeneration"] == before[conv]["placementGeneration"] + 1
        started = time.monotonic()
        headers, _ = plane.turn(conv, messages, stream=True)
        print(f"{conv}: turn after the restart served in {time.monotonic() - started:.2f} s")
        assert headers["X-Conserve-Decoder"] == before[conv]["decoder"]["pod"]
        assert int(headers["X-Conserve-Placement-Generation"]) == after[conv]["placementGeneration"]
