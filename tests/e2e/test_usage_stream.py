"""Turn reports streamed to the operator survive restarts (issue 29), on the local control plane: the operator,
gpu-sim pods and the router as processes, the router reporting turns to the operator's usage endpoint.

A conversation's turns reach the operator without a Conversation write per turn (spec.usage stays empty until the
end); the router is killed mid-conversation (SIGKILL), then the operator; after each the conversation goes on,
and at its end the operator's status counts every turn, and the context (input + output tokens) the engine
actually served, with a reservation that holds it.
"""

from __future__ import annotations

import json
import secrets
import signal
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from conserve.api.common import GROUP, VERSION
from conserve.api.usage_wire import USAGE_PATH
from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle
from conserve.router.policy import END_HEADER, conversation_object_name
from conserve.testkit import ConserveProcesses, PoolBuilder, wait_for
from conserve.testkit.builders import serving_deployment

POOL = PoolBuilder("pool").decoders("dec").prefills("pre").kv_tokens(200_000).build()


@dataclass
class Plane:
    namespace: str
    processes: ConserveProcesses
    kubeconfig: Path
    token_file: Path
    custom: Any
    usage_port: int = field(default_factory=free_port)
    router_port: int = 0
    runs: int = 0

    def start_operator(self) -> None:
        self.runs += 1
        self.processes.start(
            f"operator-{self.runs}",
            "operator",
            f"--namespace={self.namespace}",
            "--no-leader-elect",
            "--metrics-port=0",
            f"--usage-port={self.usage_port}",
            f"--usage-token-file={self.token_file}",
        )

    def start_router(self) -> None:
        self.runs += 1
        self.router_port = free_port()
        self.processes.start(
            f"router-{self.runs}",
            "router",
            f"--kubeconfig={self.kubeconfig}",
            f"--namespace={self.namespace}",
            "--pool=pool",
            f"--port={self.router_port}",
            f"--usage-endpoint=http://127.0.0.1:{self.usage_port}",
            f"--usage-token-file={self.token_file}",
        )
        wait_for("the router's decoders", lambda: self.backends().get("decoders"), timeout_s=90)

    def kill(self, name: str) -> None:
        """SIGKILL the latest process of that name: nothing flushed, nothing handed over."""
        proc = next(p for p, log in reversed(self.processes.procs) if log.name.startswith(name))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def http(self, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(url, data=data, headers=all_headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError as err:
            return 0, str(err)

    def backends(self) -> dict[str, list[Any]]:
        status, text = self.http(f"http://127.0.0.1:{self.router_port}/conserve/backends")
        found: dict[str, list[Any]] = json.loads(text) if status == 200 else {}
        return found

    def operator_usage(self, name: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
        auth = token if token is not None else self.token_file.read_text().strip()
        url = f"http://127.0.0.1:{self.usage_port}{USAGE_PATH}/{self.namespace}/{name}"
        status, text = self.http(url, headers={"Authorization": f"Bearer {auth}"})
        try:
            return status, json.loads(text)
        except ValueError:
            return status, {}

    def conversation(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "conversations", name
        )
        return obj


@pytest.fixture
def plane(cluster: ClusterHandle, namespace: str, conserve_processes: ConserveProcesses, tmp_path: Path) -> Plane:
    api = cluster.api_client()
    apps, custom = client.AppsV1Api(api), client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", POOL)
    apps.create_namespaced_deployment(namespace, serving_deployment("pre", "prefill", 1))  # type: ignore[arg-type]
    apps.create_namespaced_deployment(namespace, serving_deployment("dec", "decode", 1))  # type: ignore[arg-type]
    token_file = tmp_path / "usage-token"
    token_file.write_text(secrets.token_hex(24))
    plane = Plane(namespace, conserve_processes, cluster.kubeconfig, token_file, custom)
    plane.start_operator()
    conserve_processes.start(
        "gpusim",
        "gpu-sim",
        "pods",
        f"--kubeconfig={cluster.kubeconfig}",
        f"--namespace={namespace}",
        "--time-scale=0.02",
    )
    plane.start_router()
    return plane


@dataclass
class Chat:
    """A client's conversation: every turn sends the whole history, as an OpenAI client does."""

    plane: Plane
    conv_id: str
    messages: list[dict[str, str]] = field(default_factory=list)
    served: list[dict[str, int]] = field(default_factory=list)  # each turn's usage, as the engine counted it

    def turn(self, text: str, *, end: bool = False) -> None:
        self.messages.append({"role": "user", "content": text})
        body = {"model": "llama-3-8b", "messages": self.messages, "max_tokens": 24}
        headers = {"X-Conversation-Id": self.conv_id, **({END_HEADER: "true"} if end else {})}
        status, data = self.plane.http(f"http://127.0.0.1:{self.plane.router_port}/v1/chat/completions", body, headers)
        assert status == 200, data
        answer = json.loads(data)
        self.messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        self.served.append(answer["usage"])

    @property
    def context_tokens(self) -> int:
        """The KV the conversation holds after its latest turn: that turn's prompt and output."""
        return self.served[-1]["prompt_tokens"] + self.served[-1]["completion_tokens"]


def _user_text(i: int) -> str:
    return f"Question {i}: " + " ".join(f"word{i}-{j}" for j in range(60 + 20 * i))


def test_usage_stream_survives_router_then_operator_kill(plane: Plane) -> None:
    name = conversation_object_name("chat-1")
    chat = Chat(plane, "chat-1")
    for i in range(3):
        chat.turn(_user_text(i))
    wait_for("3 turns at the operator", lambda: plane.operator_usage(name)[1].get("usage", {}).get("turns") == 3, 10)
    # The turns reached the operator without a Conversation write per turn: spec.usage is as created.
    assert plane.conversation(name)["spec"]["usage"]["turns"] == 0, "the router wrote spec.usage per turn"
    # The endpoint wants the shared token.
    assert plane.operator_usage(name, token="x" * 32)[0] == 401

    plane.kill("router")
    plane.start_router()
    chat.turn(_user_text(3))  # the new router resumes the count from the operator

    plane.kill("operator")
    plane.start_operator()
    # The new operator run rebuilt from the API server; the router re-sends what it knows.
    wait_for(
        "the restarted operator to hold 4 turns",
        lambda: plane.operator_usage(name)[1].get("usage", {}).get("turns") == 4,
        60,
        0.5,
    )
    chat.turn(_user_text(4), end=True)

    def ended() -> dict[str, Any] | None:
        obj = plane.conversation(name)
        return obj if obj.get("status", {}).get("phase") == "Completed" else None

    wait_for("the conversation to end", ended, 30, 0.5)
    obj = plane.conversation(name)
    status = obj["status"]
    assert status["turnsServed"] == 5
    # The end went through the stream too (acknowledged): no write of the spec at all.
    assert obj["spec"]["usage"]["turns"] == 0
    assert not obj["spec"]["completed"]
    assert obj["status"]["conditions"]
    assert any(c["type"] == "Ended" for c in obj["status"]["conditions"])
    # The context the engine served, as the operator counted it: new input of each turn plus every output.
    assert status["inputTokens"] + status["outputTokens"] == chat.context_tokens
    assert status["outputTokens"] == sum(turn["completion_tokens"] for turn in chat.served)


def test_usage_stream_reservation_holds_the_served_context_after_restarts(plane: Plane) -> None:
    """The reservation as the API server has it (the operator's decisions are written at once) holds the context
    served, after the router and then the operator were killed mid-conversation."""
    name = conversation_object_name("chat-2")
    chat = Chat(plane, "chat-2")
    chat.turn(_user_text(0))
    chat.turn(_user_text(1))
    wait_for("2 turns at the operator", lambda: plane.operator_usage(name)[1].get("usage", {}).get("turns") == 2, 10)
    plane.kill("router")
    plane.start_router()
    chat.turn(_user_text(2) * 4)
    plane.kill("operator")
    plane.start_operator()
    wait_for(
        "the restarted operator to hold 3 turns",
        lambda: plane.operator_usage(name)[1].get("usage", {}).get("turns") == 3,
        60,
        0.5,
    )
    chat.turn(_user_text(3) * 4)
    wait_for(
        "the operator to hold 4 turns", lambda: plane.operator_usage(name)[1].get("usage", {}).get("turns") == 4, 10
    )

    def reserved() -> int:
        return int(plane.conversation(name).get("status", {}).get("reservedKvTokens", 0))

    wait_for(f"a reservation of {chat.context_tokens} KV tokens or more", lambda: reserved() >= chat.context_tokens, 10)
    known = plane.operator_usage(name)[1]["usage"]
    assert known["inputTokens"] + known["outputTokens"] == chat.context_tokens
