"""The test kit behaves as the API server where tests rely on it: merge patches, resourceVersion preconditions,
404s; its builders refuse what the CRDs refuse; `wait_for` names what it waited for."""

from __future__ import annotations

import asyncio
import http.server
import threading

import pydantic
import pytest

from conserve.devcluster.cluster import free_port
from conserve.kube import Conflict, NotFound
from conserve.testkit import ConversationBuilder, FakeClock, FakeKube, PodBuilder, PoolBuilder, wait_for
from conserve.testkit.probes import http_get

pytestmark = pytest.mark.unit


def test_status_patches_merge_as_rfc7386_and_bump_the_resource_version() -> None:
    conv = ConversationBuilder("c1", pool="llama").namespace("ns").build()
    conv["metadata"]["resourceVersion"] = "7"
    conv["status"] = {"phase": "Decoding", "decoder": {"pod": "d0", "node": "n0"}, "conditions": [{"type": "A"}]}
    kube = FakeKube({"conversations": [conv]})
    patch = {"status": {"decoder": {"node": None, "endpoint": "h:1"}, "conditions": [{"type": "B"}], "turnsServed": 2}}
    asyncio.run(kube.patch_status("conversations", "ns", "c1", patch))
    stored = kube.get("conversations", "c1")
    assert stored["status"] == {
        "phase": "Decoding",
        "decoder": {"pod": "d0", "endpoint": "h:1"},  # nested merge; None removed the node
        "conditions": [{"type": "B"}],  # lists are replaced, not merged
        "turnsServed": 2,
    }
    assert stored["metadata"]["resourceVersion"] == "8"
    assert kube.status[("conversations", "c1")] is stored["status"]


def test_a_stale_resource_version_is_a_conflict_and_an_unknown_object_a_404_when_strict() -> None:
    conv = ConversationBuilder("c1").namespace("ns").build()
    conv["metadata"]["resourceVersion"] = "3"
    kube = FakeKube({"conversations": [conv]}, strict=True)
    with pytest.raises(Conflict):
        asyncio.run(
            kube.patch_status("conversations", "ns", "c1", {"metadata": {"resourceVersion": "2"}, "status": {}})
        )
    asyncio.run(kube.patch_status("conversations", "ns", "c1", {"metadata": {"resourceVersion": "3"}, "status": {}}))
    with pytest.raises(NotFound):
        asyncio.run(kube.patch_object("conversations", "ns", "gone", {"metadata": {"finalizers": ["x"]}}))
    assert [p[1] for p in kube.patches] == ["c1"]


def test_lists_are_copies_filtered_by_namespace() -> None:
    kube = FakeKube(
        {"decoderpools": [PoolBuilder("a").namespace("x").build(), PoolBuilder("b").namespace("y").build()]}
    )
    listed = asyncio.run(kube.list_objects("decoderpools", "x"))
    assert [o["metadata"]["name"] for o in listed] == ["a"]
    listed[0]["spec"]["model"]["name"] = "changed"
    assert kube.get("decoderpools", "a")["spec"]["model"]["name"] == "llama-3-8b"


def test_builders_refuse_what_the_crd_refuses() -> None:
    with pytest.raises(pydantic.ValidationError, match="firstTurnInputTokens"):
        ConversationBuilder("c").tokens(0).build()
    assert ConversationBuilder("c").tokens(0).build(validate=False)["spec"]["firstTurnInputTokens"] == 0
    pool = PoolBuilder("p").decoders("dec").kv_tokens(50_000).build()
    assert pool["spec"]["decoderSelector"] == {"matchLabels": {"app": "dec"}}
    pod = PodBuilder("d0").on("n0").app("dec").role("decode").gpus(2).endpoint("127.0.0.1:9").running().build()
    assert pod["spec"]["nodeName"] == "n0"
    assert pod["status"]["phase"] == "Running"
    assert pod["metadata"]["labels"] == {"app": "dec", "conserve.dev/role": "decode"}
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}


def test_fake_clock_moves_only_forward_and_by_hand() -> None:
    clock = FakeClock()
    start = clock.now(), clock.monotonic()
    clock.advance(2.5)
    assert (clock.now() - start[0], clock.monotonic() - start[1]) == (2.5, 2.5)
    assert clock() == clock.monotonic()  # where code takes `time.monotonic`
    clock.advance_to(clock.now() + 1)
    assert clock.now() - start[0] == 3.5
    with pytest.raises(ValueError, match="back"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="back"):
        clock.advance_to(start[0])


def test_wait_for_returns_the_first_truthy_result_and_names_what_timed_out() -> None:
    answers = iter([None, 0, KeyError("not yet"), "ready"])

    def probe() -> str | None:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    assert wait_for("the answer", probe, timeout_s=5, interval_s=0, tolerate=(KeyError,)) == "ready"
    with pytest.raises(TimeoutError, match="waiting for the impossible: last=False"):
        wait_for("the impossible", lambda: False, timeout_s=0.05, interval_s=0.01)


def test_http_get_answers_nothing_until_a_server_listens_and_then_its_status() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/readyz" else 503)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: object) -> None:
            pass

    port = free_port()
    assert http_get(f"http://127.0.0.1:{port}/readyz") == (0, "")
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert http_get(f"http://127.0.0.1:{port}/readyz") == (200, "ok")
        assert http_get(f"http://127.0.0.1:{port}/other")[0] == 503
    finally:
        server.shutdown()
        server.server_close()
