"""The data plane on the local control plane: operator, gpu-sim pod runner and router as real processes.

Prefill and decode Deployments land on fake GPU nodes (KWOK); the pod runner gives each pod a gpu-sim server
and its `conserve.dev/endpoint`; the operator places conversations; the router serves turns. Checked: every turn
of a conversation reaches the same decoder, the first turn's KV moves once (the P/D decider's default: a long
first turn on the prefill server, short later ones on the decoder), turn reports reach the Conversation's status,
and a decoder deleted mid-conversation is followed to its re-placement.
"""

from __future__ import annotations

import functools
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conserve.core.tokens import filler_text
from conserve.devcluster.testing import ClusterHandle
from conserve.router.policy import conversation_object_name
from conserve.testkit import PoolBuilder, wait_for
from conserve.testkit.processes import StartServingStack

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "conserve.dev", "v1alpha1"
POOL = PoolBuilder("pool").decoders("dec").prefills("pre").build()


@dataclass
class DataPlane:
    cluster: ClusterHandle
    namespace: str
    router_url: str
    custom: Any
    core: Any

    def http(
        self, method: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.router_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read().decode()
                return resp.status, dict(resp.headers), json.loads(raw) if raw.startswith("{") else raw
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()
        except OSError as err:  # not listening yet
            return 0, {}, str(err)

    def backends(self) -> dict[str, list[dict[str, str]]]:
        _, _, data = self.http("GET", "/conserve/backends")
        return data if isinstance(data, dict) else {}

    def turn(
        self, conv: str, messages: list[dict[str, str]], *, stream: bool, end: bool = False, max_tokens: int = 12
    ) -> tuple[dict[str, str], str]:
        headers = {"X-Conversation-Id": conv}
        if end:
            headers["X-Conversation-End"] = "true"
        body = {"model": "llama-3-8b", "messages": messages, "max_tokens": max_tokens, "stream": stream}
        status, resp_headers, data = self.http("POST", "/v1/chat/completions", body, headers)
        assert status == 200, data
        if stream:
            text = ""
            for line in str(data).splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content", "")
        else:
            text = data["choices"][0]["message"]["content"]
        return resp_headers, text

    def conversation(self, conv_id: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "conversations", conversation_object_name(conv_id)
        )
        return obj

    def sim_stats(self, endpoint: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{endpoint}/conserve/stats", timeout=5) as resp:
            stats: dict[str, Any] = json.loads(resp.read())
            return stats


@pytest.fixture
def dataplane(cluster: ClusterHandle, namespace: str, serving_stack: StartServingStack) -> DataPlane:
    stack = serving_stack(POOL, 2)
    plane = DataPlane(cluster, namespace, stack.router_url, stack.custom, stack.core)
    wait_for(
        "1 prefill and 2 decoders ready behind the router",
        lambda: len(plane.backends().get("prefills", [])) == 1 and len(plane.backends().get("decoders", [])) == 2,
        timeout_s=90,
    )
    return plane


def test_every_turn_follows_the_placement_and_reports_reach_status(dataplane: DataPlane) -> None:
    convs = {f"e2e-{i}": [{"role": "user", "content": filler_text(900 + 100 * i)}] for i in range(3)}
    decoders: dict[str, set[str]] = {c: set() for c in convs}
    pool_prefills = dict.fromkeys(convs, 0)
    for turn in range(3):
        for conv, messages in convs.items():
            headers, text = dataplane.turn(conv, messages, stream=turn != 1)
            decoders[conv].add(headers["X-Conserve-Decoder"])
            # The pool's default decider: a first turn where it is sooner (on a quiet decoder as fast as the prefill
            # server, the decoder itself: no transfer), 20 new tokens always on the decoder.
            site = headers["X-Conserve-Prefill-Site"]
            assert site in (("pool", "decoder") if turn == 0 else ("decoder",)), (conv, turn, site)
            pool_prefills[conv] += site == "pool"
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(20)}]
    for conv, used in decoders.items():
        assert len(used) == 1, (conv, used)
        obj = dataplane.conversation(conv)
        status = obj["status"]
        assert status["decoder"]["pod"] in used
        assert status.get("kvTransfers") == 1
        usage = wait_for(f"usage of {conv}", functools.partial(_usage_with_turns, dataplane, conv, 3), timeout_s=10)
        assert usage["outputTokens"] == 36
        assert usage.get("poolPrefills", 0) == pool_prefills[conv]
        assert usage["timeToFirstEffectiveTokenSeconds"] > 0
        assert wait_for(
            f"turns served of {conv}",
            functools.partial(_turns_served, dataplane, conv, 3),
            timeout_s=10,
        )
        status = dataplane.conversation(conv)["status"]
        assert (status.get("poolPrefills", 0), status.get("decoderPrefills", 0)) == (
            pool_prefills[conv],
            3 - pool_prefills[conv],
        )
    # Each decoder saw only the conversations pinned to it (gpu-sim counts turns per conversation id).
    for backend in dataplane.backends()["decoders"]:
        served = dataplane.sim_stats(backend["endpoint"])["conversationTurns"]
        for conv in served:
            assert decoders[conv] == {backend["name"]}
            assert served[conv] == 3
    # The last turn ends the conversation: the operator completes it.
    messages = convs["e2e-0"]
    dataplane.turn("e2e-0", messages, stream=False, end=True)
    wait_for(
        "e2e-0 completed", lambda: dataplane.conversation("e2e-0")["status"].get("phase") == "Completed", timeout_s=15
    )


def _turns_served(plane: DataPlane, conv: str, turns: int) -> bool:
    return bool(plane.conversation(conv)["status"].get("turnsServed") == turns)


def _usage_with_turns(plane: DataPlane, conv: str, turns: int) -> dict[str, Any] | None:
    usage: dict[str, Any] = plane.conversation(conv)["spec"].get("usage") or {}
    return usage if usage.get("turns") == turns else None


def test_a_deleted_decoder_is_followed_to_the_re_placement(dataplane: DataPlane) -> None:
    messages = [{"role": "user", "content": filler_text(700)}]
    headers, text = dataplane.turn("move-me", messages, stream=True)
    first = headers["X-Conserve-Decoder"]
    before = dataplane.conversation("move-me")["status"]
    assert before["decoder"]["pod"] == first
    assert before["kvTransfers"] == 1
    dataplane.core.delete_namespaced_pod(first, dataplane.namespace, grace_period_seconds=0)
    moved = wait_for(
        "the conversation re-placed",
        lambda: (
            (s := dataplane.conversation("move-me")["status"]).get("placementGeneration", 0)
            > before.get("placementGeneration", 1)
            and s.get("decoder")
            and s["decoder"]["pod"] != first
            and s["decoder"].get("endpoint")
            and s
        ),
        timeout_s=60,
    )
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(30)}]
    headers, _ = dataplane.turn("move-me", messages, stream=False)
    assert headers["X-Conserve-Decoder"] == moved["decoder"]["pod"]
    assert int(headers["X-Conserve-Placement-Generation"]) == moved["placementGeneration"]
    after = dataplane.conversation("move-me")["status"]
    assert after["kvTransfers"] == 2
    headers, _ = dataplane.turn("move-me", [*messages, {"role": "user", "content": "again"}], stream=True)
    assert headers["X-Conserve-Decoder"] == moved["decoder"]["pod"]
