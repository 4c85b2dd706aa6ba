"""The router as a platform exposes it, on the local control plane: tenancy (`-k tenancy`) and failures that heal
or end cleanly (`-k healing`).

The stack: the operator, the router (API keys from a directory laid out as a mounted Secret, a tenants file) and
two standalone gpu-sim servers (a decoder and a prefill server) as processes, behind pods whose
`conserve.dev/endpoint` annotation names them, so a test can kill a server. The router reaches the API server
through a TCP relay the test can cut (an API-server outage as the router sees it, the cluster untouched).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from kubernetes import client

from conserve.api.common import GROUP, VERSION
from conserve.api.labels import ANNOTATION_ENDPOINT
from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle
from conserve.router.auth import owned_name
from conserve.testkit import ConserveProcesses, PoolBuilder, wait_for
from conserve.testkit.builders import serving_deployment

KEYS = {"alice": "key-alice-0001", "bob": "key-bob-0002", "carol": "key-carol-0003", "ops": "key-ops-0004"}
TENANTS = {"admins": ["ops"], "pools": {"carol": ["other"], "*": ["pool"]}}
POOL = PoolBuilder("pool").decoders("dec").prefills("pre").kv_tokens(200_000).build()
#: Real seconds per modelled second of the servers: a few thousand tokens take seconds (a turn to kill).
TIME_SCALE = 0.5


class ApiRelay:
    """A TCP relay to the API server that can be cut: while cut, every connection (open or new) is dropped."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._up = True
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._server.settimeout(0.2)
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._up = False
        with self._lock:
            for s in list(self._socks):
                _close(s)
            self._socks.clear()

    def restore(self) -> None:
        self._up = True

    def close(self) -> None:
        self._stop = True
        self.cut()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            if not self._up:
                _close(conn)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(conn)
                continue
            with self._lock:
                self._socks.update((conn, upstream))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            src.settimeout(None)
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


@dataclass
class Stack:
    namespace: str
    url: str
    custom: Any
    processes: ConserveProcesses
    relay: ApiRelay
    servers: dict[str, str] = field(default_factory=dict)  # role: base URL

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        raw: bytes | None = None,
        timeout_s: float = 120,
    ) -> tuple[int, dict[str, str], str]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read().decode()
        except OSError as err:
            return 0, {}, str(err)

    def turn(
        self, who: str, conv: str | None, *, max_tokens: Any = 8, extra: dict[str, str] | None = None, **body: Any
    ) -> tuple[int, dict[str, str], str]:
        headers = {"Authorization": f"Bearer {KEYS[who]}", **(extra or {})}
        if conv is not None:
            headers["X-Conversation-Id"] = conv
        payload = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hello " * 50}], **body}
        payload["max_tokens"] = max_tokens
        return self.http("POST", "/v1/chat/completions", payload, headers)

    def conversation(self, owner: str, conv: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "conversations", owned_name(owner, conv)
            )
        except client.ApiException as err:
            if err.status == 404:
                return None
            raise
        return obj

    def conversations(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "conversations"
        )["items"]
        return items

    def server_stats(self, role: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.servers[role] + "/conserve/stats", timeout=10) as resp:
            stats: dict[str, Any] = json.loads(resp.read())
        return stats

    def kill_server(self, role: str) -> None:
        for proc, log in self.processes.procs:
            if log.name == f"gpusim-{role}.log":
                proc.kill()
                proc.wait(timeout=10)


def _relayed_kubeconfig(kubeconfig: Path, relay: ApiRelay, path: Path) -> Path:
    config = yaml.safe_load(kubeconfig.read_text())
    server = urlparse(config["clusters"][0]["cluster"]["server"])
    config["clusters"][0]["cluster"]["server"] = f"{server.scheme}://127.0.0.1:{relay.port}"
    path.write_text(yaml.safe_dump(config))
    return path


def _api_target(kubeconfig: Path) -> tuple[str, int]:
    server = urlparse(yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"])
    return server.hostname or "127.0.0.1", server.port or 443


@pytest.fixture
def stack(
    cluster: ClusterHandle, namespace: str, conserve_processes: ConserveProcesses, tmp_path: Path
) -> Iterator[Stack]:
    api = cluster.api_client()
    custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
    relay = ApiRelay(_api_target(cluster.kubeconfig))
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "..data").mkdir()  # the kubelet's own entry in a mounted Secret
    for name, key in KEYS.items():
        (keys / name).write_text(key)
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump(TENANTS))
    servers: dict[str, str] = {}
    for app, role in (("dec", "decode"), ("pre", "prefill")):
        port = free_port()
        conserve_processes.start(
            f"gpusim-{role}", "gpu-sim", f"--role={role}", f"--port={port}", f"--name={app}",
            f"--time-scale={TIME_SCALE}",
        )  # fmt: skip
        servers[role] = f"http://127.0.0.1:{port}"
        deployment = serving_deployment(app, role, 1)
        deployment["spec"]["template"]["metadata"]["annotations"] = {ANNOTATION_ENDPOINT: f"127.0.0.1:{port}"}
        apps.create_namespaced_deployment(namespace, deployment)  # type: ignore[arg-type]
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "decoderpools", POOL)
    conserve_processes.start(
        "operator", "operator", f"--namespace={namespace}", "--no-leader-elect", "--metrics-port=0"
    )
    router_port = free_port()
    conserve_processes.start(
        "router", "router", f"--kubeconfig={_relayed_kubeconfig(cluster.kubeconfig, relay, tmp_path / 'kc')}",
        f"--namespace={namespace}", "--pool=pool", f"--port={router_port}", "--usage-interval=0.3",
        "--auth=api-keys", f"--api-keys-dir={keys}", f"--tenants-file={tenants}", "--placement-timeout=30",
    )  # fmt: skip
    plane = Stack(namespace, f"http://127.0.0.1:{router_port}", custom, conserve_processes, relay, servers)

    def ready() -> bool:
        status, _, text = plane.http("GET", "/conserve/backends", headers={"Authorization": f"Bearer {KEYS['ops']}"})
        found = json.loads(text) if status == 200 else {}
        return len(found.get("decoders", [])) == 1 and len(found.get("prefills", [])) == 1

    wait_for("1 decoder and 1 prefill server behind the router", ready, timeout_s=90)
    try:
        yield plane
    finally:
        relay.close()
        api.close()


# --- tenancy ---------------------------------------------------------------------------------------------------


def test_tenancy_a_second_identity_cannot_reach_anothers_conversation(stack: Stack) -> None:
    # No key, a wrong key: 401, nothing created.
    assert stack.http("POST", "/v1/chat/completions", {"messages": []})[0] == 401
    assert stack.turn("alice", "x", extra={"Authorization": "Bearer nope"})[0] == 401
    assert stack.conversations() == []

    status, headers, text = stack.turn("alice", "alice-chat")
    assert status == 200, text
    assert "X-Conserve-Decoder" not in headers  # the servers are named to administrators only
    assert "X-Conserve-Prefill" not in headers
    owned = stack.conversation("alice", "alice-chat")
    assert owned is not None
    assert owned["metadata"]["annotations"]["conserve.dev/owner"] == "alice"
    usage = wait_for("alice's usage report", lambda: _usage(stack, "alice", "alice-chat", turns=1))

    # Bob, with alice's id: cannot delete it (404), and his turns (one ending the conversation) are his own
    # conversation's: alice's is neither extended nor ended.
    status, _, text = stack.http(
        "DELETE", "/v1/conversations/alice-chat", headers={"Authorization": f"Bearer {KEYS['bob']}"}
    )
    assert status == 404, text
    status, _, text = stack.turn("bob", "alice-chat", max_tokens=500, extra={"X-Conversation-End": "true"})
    assert status == 200, text
    bobs = wait_for("bob's own conversation", lambda: stack.conversation("bob", "alice-chat"))
    assert bobs["metadata"]["annotations"]["conserve.dev/owner"] == "bob"
    wait_for(
        "bob's conversation ended", lambda: (stack.conversation("bob", "alice-chat") or {})["spec"].get("completed")
    )
    time.sleep(1.0)  # two usage intervals: anything bob's turns did to alice's would show by now
    alices = stack.conversation("alice", "alice-chat")
    assert alices is not None
    assert alices["spec"]["usage"]["turns"] == 1
    assert alices["spec"]["usage"]["outputTokens"] == usage["outputTokens"]
    assert not alices["spec"].get("completed")
    assert alices["status"]["phase"] not in ("Completed", "Failed")

    # Alice's conversation goes on; her DELETE ends it.
    assert stack.turn("alice", "alice-chat")[0] == 200
    status, _, _ = stack.http(
        "DELETE", "/v1/conversations/alice-chat", headers={"Authorization": f"Bearer {KEYS['alice']}"}
    )
    assert status == 200


def _usage(stack: Stack, owner: str, conv: str, *, turns: int) -> dict[str, Any] | None:
    usage: dict[str, Any] = ((stack.conversation(owner, conv) or {}).get("spec") or {}).get("usage") or {}
    return usage if usage.get("turns") == turns else None


def test_tenancy_only_admins_see_the_servers_and_pools_are_allowed_per_identity(stack: Stack) -> None:
    for who in ("alice", "bob"):
        status, _, text = stack.http("GET", "/conserve/backends", headers={"Authorization": f"Bearer {KEYS[who]}"})
        assert status == 403, text
        assert "127.0.0.1" not in text
    status, _, text = stack.http("GET", "/conserve/backends", headers={"Authorization": f"Bearer {KEYS['ops']}"})
    assert status == 200
    assert json.loads(text)["decoders"][0]["name"].startswith("dec-")
    status, headers, _ = stack.turn("ops", "ops-chat")
    assert status == 200
    assert headers["X-Conserve-Decoder"].startswith("dec-")

    # Pools: carol may use "other" only; alice ("*") "pool" only. Refused before anything is created.
    before = len(stack.conversations())
    status, _, text = stack.turn("carol", "c1", extra={"X-Conserve-Pool": "pool"})
    assert status == 403, text
    assert "X-Conserve-Pool" in json.loads(text)["error"]["message"]
    status, _, text = stack.turn("alice", "a1", extra={"X-Conserve-Pool": "other"})
    assert status == 403, text
    assert len(stack.conversations()) == before


# --- healing -----------------------------------------------------------------------------------------------------


def test_healing_bad_requests_are_refused_before_anything_is_created(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {KEYS['alice']}", "X-Conversation-Id": "bad"}
    cases: list[tuple[bytes, str]] = [
        (b'{"messages": [{"role": "user", "content": "\xff"}]}', "UTF-8"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "abc"}).encode(), "max_tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "user": "a\u0000b"}).encode(), "user"),
    ]
    for raw, field_named in cases:
        status, _, text = stack.http("POST", "/v1/chat/completions", headers=auth, raw=raw)
        assert status == 400, text
        assert field_named in json.loads(text)["error"]["message"]
    prompts_before = stack.server_stats("decode")["kvUsedTokens"], _prompt_tokens(stack)
    # 17 MB with no conversation id: refused whole (413), never forwarded to any server.
    big = json.dumps({"messages": [{"role": "user", "content": "y" * (17 * 1024 * 1024)}]}).encode()
    started = time.monotonic()
    status, _, text = stack.http(
        "POST", "/v1/chat/completions", headers={"Authorization": auth["Authorization"]}, raw=big
    )
    assert status == 413, text[:300]
    assert time.monotonic() - started < 30
    assert stack.conversations() == []
    assert (stack.server_stats("decode")["kvUsedTokens"], _prompt_tokens(stack)) == prompts_before


def _prompt_tokens(stack: Stack) -> int:
    total = 0
    for role in ("decode", "prefill"):
        with urllib.request.urlopen(stack.servers[role] + "/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("vllm:prompt_tokens_total"):
                    total += int(float(line.split()[-1]))
    return total


def test_healing_a_backend_4xx_passes_through_and_the_next_turn_is_served(stack: Stack) -> None:
    assert stack.turn("alice", "big")[0] == 200
    started = time.monotonic()
    status, _, text = stack.turn("alice", "big", max_tokens=10_000_000)
    assert status == 400, text
    assert "capacity" in json.loads(text)["error"]["message"]  # the server's own message
    assert time.monotonic() - started < 10  # not waited on as a lost decoder
    started = time.monotonic()
    status, _, text = stack.turn("alice", "big")
    assert status == 200, text
    assert time.monotonic() - started < 10
    conv = stack.conversation("alice", "big")
    assert conv is not None
    assert conv["status"]["phase"] not in ("Failed", "Completed")
    assert conv["status"].get("placementGeneration", 1) == 1  # never re-placed


def test_healing_a_failed_create_is_retried_on_the_next_turn(stack: Stack) -> None:
    stack.relay.cut()  # the API server unreachable from the router
    try:
        status, _, text = stack.turn("alice", "outage")
        assert status == 502, text
        message = json.loads(text)["error"]["message"]
        assert "127.0.0.1" not in message
        assert str(stack.relay.port) not in message
    finally:
        stack.relay.restore()

    def served() -> bool:
        return stack.turn("alice", "outage")[0] == 200

    wait_for("a later turn of the conversation served", served, timeout_s=90, interval_s=2.0)
    assert stack.conversation("alice", "outage") is not None


def _raw_turn(stack: Stack, conv: str, max_tokens: int, *, stream: bool) -> socket.socket:
    """A turn sent over a raw socket (the test closes it to play a client that leaves)."""
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens, "stream": stream})
    port = int(stack.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEYS['alice']}\r\nX-Conversation-Id: {conv}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall((head + body).encode())
    return sock


def _stream_first_chunk(stack: Stack, conv: str, max_tokens: int) -> tuple[socket.socket, bytes]:
    """A streamed turn, read up to its first data event."""
    sock = _raw_turn(stack, conv, max_tokens, stream=True)
    got = b""
    while b"data: {" not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return sock, got


def test_healing_a_client_that_leaves_aborts_the_decode(stack: Stack) -> None:
    assert stack.turn("alice", "leaver")[0] == 200
    generated_before = _generated(stack)
    sock, got = _stream_first_chunk(stack, "leaver", 4000)
    assert b"200 OK" in got
    _close(sock)
    wait_for("the decoder to stop the turn", lambda: stack.server_stats("decode")["running"] == 0, timeout_s=10)
    assert stack.server_stats("decode")["requestsAborted"] >= 1
    time.sleep(1.0)
    assert _generated(stack) - generated_before < 4000  # stopped, not decoded to the end

    # A non-streamed turn whose client leaves: the same.
    sock = _raw_turn(stack, "leaver", 4000, stream=False)
    wait_for("the decoder to run the turn", lambda: stack.server_stats("decode")["running"] == 1, timeout_s=20)
    aborted = stack.server_stats("decode")["requestsAborted"]
    _close(sock)
    wait_for("the decoder to stop the turn", lambda: stack.server_stats("decode")["running"] == 0, timeout_s=10)
    assert stack.server_stats("decode")["requestsAborted"] == aborted + 1


def _generated(stack: Stack) -> int:
    with urllib.request.urlopen(stack.servers["decode"] + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("vllm:generation_tokens_total"):
                return int(float(line.split()[-1]))
    return 0


def test_healing_a_server_killed_mid_turn_gives_502_and_an_sse_error(stack: Stack) -> None:
    assert stack.turn("alice", "doomed")[0] == 200
    assert stack.turn("alice", "doomed-too")[0] == 200
    results: dict[str, tuple[int, dict[str, str], str]] = {}
    whole = threading.Thread(target=lambda: results.update(whole=stack.turn("alice", "doomed-too", max_tokens=4000)))
    whole.start()
    sock, got = _stream_first_chunk(stack, "doomed", 4000)
    generated = _generated(stack)
    wait_for("both turns decoding", lambda: stack.server_stats("decode")["running"] == 2, timeout_s=20)
    wait_for("both turns' first tokens", lambda: _generated(stack) > generated + 40, timeout_s=20)
    stack.kill_server("decode")

    sock.settimeout(30)
    while b"[DONE]" not in got:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    _close(sock)
    events = [line[6:] for line in got.decode(errors="replace").splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", got[-500:]
    error = json.loads(events[-2])["error"]
    assert "mid-answer" in error["message"]

    whole.join(timeout=60)
    status, _, text = results["whole"]
    assert status == 502, text
    assert "mid-answer" in json.loads(text)["error"]["message"]
