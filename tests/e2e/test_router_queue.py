"""A busy pool through the router, on the local control plane (operator, gpu-sim pods and router as processes).

The pool has one small decoder: a first conversation takes it, a second waits in the queue. Checked: the second's
turn gets HTTP 429 with Retry-After once the pool's `maxQueueWaitSeconds` is over (not a 503), its Conversation
shows why (phase Failed, condition Placed=False, reason QueueWaitExceeded, a Warning Event), and once the first
conversation ends, a retry with the same conversation id is served.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

from conserve.api.common import GROUP, VERSION
from conserve.core.tokens import filler_text
from conserve.router.policy import conversation_object_name
from conserve.testkit import PoolBuilder, wait_for
from conserve.testkit.processes import StartServingStack

#: One decoder of 4,000 KV tokens (3,800 after headroom): a first turn of 1,500 tokens reserves about 3,000, so a
#: second conversation waits. No idle-KV reclaim, which would make room by offloading the first one's KV.
POOL = (
    PoolBuilder("pool")
    .decoders("dec")
    .prefills("pre")
    .kv_tokens(4_000)
    .spec(placement={"maxQueueWaitSeconds": 2}, kvLifecycle={"enabled": False})
    .build()
)


@dataclass
class BusyPlane:
    namespace: str
    router_url: str
    custom: Any
    core: Any

    def http(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], str]:
        """The router's answer: status, headers, body text (0 and the error while it does not listen yet)."""
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.router_url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()
        except OSError as err:
            return 0, {}, str(err)

    def backends(self) -> dict[str, list[Any]]:
        status, _, text = self.http("GET", "/conserve/backends")
        found: dict[str, list[Any]] = json.loads(text) if status == 200 else {}
        return found

    def conversation(self, conv_id: str) -> dict[str, Any]:
        name = conversation_object_name(conv_id)
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "conversations", name
        )
        return obj


def one_decoder_plane(namespace: str, serving_stack: StartServingStack, pool: dict[str, Any]) -> BusyPlane:
    """The pool with one prefill server and one decoder, served behind the router, once both are ready."""
    stack = serving_stack(pool, 1)
    plane = BusyPlane(namespace, stack.router_url, stack.custom, stack.core)
    wait_for(
        "1 prefill and 1 decoder ready behind the router",
        lambda: len(plane.backends().get("prefills", [])) == 1 and len(plane.backends().get("decoders", [])) == 1,
        timeout_s=90,
    )
    return plane


@pytest.fixture
def busy_plane(namespace: str, serving_stack: StartServingStack) -> BusyPlane:
    return one_decoder_plane(namespace, serving_stack, POOL)


def _turn(plane: BusyPlane, conv: str, *, stream: bool) -> tuple[int, dict[str, str], str]:
    body = {
        "model": "llama-3-8b",
        "messages": [{"role": "user", "content": filler_text(1500)}],
        "max_tokens": 8,
        "stream": stream,
    }
    return plane.http("POST", "/v1/chat/completions", body, {"X-Conversation-Id": conv})


def _refused(plane: BusyPlane, conv: str) -> dict[str, Any] | None:
    """The Conversation's Placed condition once the operator refused it."""
    obj = plane.conversation(conv)
    placed = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Placed"]
    if obj["status"].get("phase") == "Failed" and placed and placed[0]["reason"] == "QueueWaitExceeded":
        return {"uid": obj["metadata"]["uid"], **placed[0]}
    return None


def _warning_events(plane: BusyPlane, name: str) -> list[Any]:
    events = plane.core.list_namespaced_event(plane.namespace, field_selector=f"involvedObject.name={name}").items
    return [e for e in events if e.reason == "QueueWaitExceeded" and e.type == "Warning"]


def test_a_turn_of_a_conversation_queued_too_long_gets_429_and_a_retry_is_served(busy_plane: BusyPlane) -> None:
    status, headers, _ = _turn(busy_plane, "first", stream=False)
    assert status == 200
    decoder = headers["X-Conserve-Decoder"]

    # The pool is full: the second conversation waits in the queue, and its streamed turn with it, until the
    # pool's limit; then 429 with Retry-After and why, not 503.
    status, headers, data = _turn(busy_plane, "second", stream=True)
    assert status == 429, data
    assert int(headers["Retry-After"]) >= 1
    error = json.loads(data)["error"]
    assert error["code"] in ("QueueWaitExceeded", "NoCapacity")  # the operator's refusal, or the router's own wait
    assert error["message"].startswith("conversation second waited ")
    assert "in the queue" in error["message"]
    assert "NoCapacity" in error["message"]

    # The Conversation says so: Failed, Placed=False with reason QueueWaitExceeded, and a Warning Event.
    refused = wait_for("the operator's refusal", lambda: _refused(busy_plane, "second"), timeout_s=30)
    assert refused["status"] == "False"
    assert "over its budget of 2 s (NoCapacity: " in refused["message"]
    name = busy_plane.conversation("second")["metadata"]["name"]
    assert wait_for("a QueueWaitExceeded Event", lambda: _warning_events(busy_plane, name), timeout_s=30)

    # Room frees when the first conversation ends; the client retries the same conversation and is served.
    assert busy_plane.http("DELETE", "/v1/conversations/first")[0] == 200
    wait_for(
        "first completed", lambda: busy_plane.conversation("first")["status"].get("phase") == "Completed", timeout_s=30
    )
    # The router answered either from the operator's refusal (the retry then queues a new Conversation at once) or
    # from its own wait a moment before it (the retry then meets the refusal: 429 again, and the next one queues
    # afresh): a client that honours 429 is served either way.
    for _ in range(2):
        status, headers, data = _turn(busy_plane, "second", stream=True)
        if status != 429:
            break
    assert status == 200, data
    assert headers["X-Conserve-Decoder"] == decoder
    again = busy_plane.conversation("second")
    assert again["metadata"]["uid"] != refused["uid"]  # a new Conversation, not the refused one
    assert again["status"]["phase"] in ("Prefilling", "Decoding")
