"""Capacity accounting that bad input cannot break, on the local control plane (issue 27): values whose sums would
leave int64 (or an unbounded string) refused by the API server with the field named; two pools selecting the same
decoder book it once (the younger is told, with a condition and a Warning Event); a status written by someone
else is repaired, while the operator runs and when it starts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conserve.controller.kube import k8s
from conserve.testkit import NOT_YET, Api, OperatorProcess, conversation_body, pool_body, wait_for

INT64_MAX = 2**63 - 1
GROUP, VERSION = "conserve.dev", "v1alpha1"


def refusal(call: Any) -> str:
    with pytest.raises(k8s("client.rest").ApiException) as info:
        call()
    assert info.value.status == 422, info.value.body
    return str(json.loads(info.value.body)["message"])


def conv(**spec: Any) -> dict[str, Any]:
    body = conversation_body("bad", "llama", 100)
    body["spec"].update(spec)
    return body


def pool(**spec: Any) -> dict[str, Any]:
    body = pool_body("bad")
    body["spec"].update(spec)
    return body


OVERFLOW_CASES = [
    (conv(usage={"inputTokens": INT64_MAX}), "spec.usage.inputTokens"),
    (conv(usage={"outputTokens": INT64_MAX}), "spec.usage.outputTokens"),
    (conv(usage={"turns": INT64_MAX}), "spec.usage.turns"),
    (conv(usage={"poolPrefills": INT64_MAX}), "spec.usage.poolPrefills"),
    (conv(usage={"sloMissedTurns": INT64_MAX}), "spec.usage.sloMissedTurns"),
    (conv(usage={"lastTurnTime": "1" * 1_000_000}), "spec.usage.lastTurnTime"),
    (conv(usage={"lastTurnTime": "yesterday"}), "spec.usage.lastTurnTime"),
    (conv(usage={"timeToFirstEffectiveTokenSeconds": 1e300}), "spec.usage.timeToFirstEffectiveTokenSeconds"),
    (pool(kvCapacity={"tokensPerDecoder": INT64_MAX}), "spec.kvCapacity.tokensPerDecoder"),
    (pool(model={"name": "llama-3-8b", "kvBytesPerToken": INT64_MAX}), "spec.model.kvBytesPerToken"),
    (
        pool(
            model={
                "name": "custom",
                "shape": {
                    "parameters": 1e9,
                    "layers": INT64_MAX,
                    "hiddenSize": 4096,
                    "attentionHeads": 32,
                    "kvHeads": 8,
                    "headDim": 128,
                },
            }
        ),
        "spec.model.shape.layers",
    ),
    (pool(placement={"decoderLostGraceSeconds": -1}), "spec.placement.decoderLostGraceSeconds"),
    (pool(placement={"decoderLostGraceSeconds": 86400}), "spec.placement.decoderLostGraceSeconds"),
]


@pytest.mark.parametrize(("body", "field"), OVERFLOW_CASES, ids=[f"{b['kind']}:{f}" for b, f in OVERFLOW_CASES])
def test_integrity_values_that_overflow_are_refused_with_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    assert field in refusal(lambda: api.create(body))


def test_integrity_usage_reported_past_the_bound_is_refused(api: Api) -> None:
    api.create(conversation_body("c", "llama", 100))
    message = refusal(lambda: api.patch_conv("c", {"usage": {"turns": 1, "inputTokens": INT64_MAX}}))
    assert "spec.usage.inputTokens" in message
    api.patch_conv("c", {"usage": {"turns": 1, "inputTokens": 100_000_000_000}})  # the bound itself is fine


def test_integrity_a_status_past_the_bounds_is_refused(api: Api) -> None:
    api.create(conversation_body("c", "llama", 100))
    patch = {"status": {"reservedKvTokens": INT64_MAX, "lastActivityTime": "x" * 100}}
    message = refusal(lambda: forge(api, "c", patch["status"]))
    assert "status.reservedKvTokens" in message
    assert "status.lastActivityTime" in message


def test_integrity_overlapping_pools_book_a_decoder_once(api: Api, operator: OperatorProcess) -> None:
    api.create_fleet(1, tokens=20_000)  # pool llama, decoder dec-0 (app=dec)
    api.wait_ready_decoders(1)
    api.create(pool_body("second", tokens_per_decoder=20_000))  # the same decoderSelector, created later
    condition = wait_for(
        "second flagged as overlapping",
        lambda: next((c for c in api.pool_status("second").get("conditions", []) if c["type"] == "Overlapping"), None),
        tolerate=NOT_YET,
    )
    assert condition["status"] == "True"
    assert "dec-0 (pool llama)" in condition["message"]
    wait_for(
        "a Warning Event OverlappingPool on second",
        lambda: [e for e in api.events("OverlappingPool") if e.involved_object.name == "second"],
        timeout_s=15,
    )
    assert next(c for c in api.pool_status("llama")["conditions"] if c["type"] == "Overlapping")["status"] == "False"
    for name, pool_name in (("a1", "llama"), ("a2", "llama"), ("b1", "second"), ("b2", "second")):
        api.create(conversation_body(name, pool_name, 4000))
    for name in ("a1", "a2"):
        api.wait_conv_phase(name, "Prefilling")
    for name in ("b1", "b2"):
        waiting = api.wait_conv_phase(name, "Pending")
        placed = next(c for c in waiting["conditions"] if c["type"] == "Placed")
        assert placed["reason"] == "NoDecoder"
    second = api.pool_status("second")
    assert (second["readyDecoders"], second["capacityKvTokens"], second["reservedKvTokens"]) == (0, 0, 0)
    first = wait_for(
        "llama's status counts its two conversations",
        lambda: (s := api.pool_status("llama")).get("conversations") == 2 and s,
        tolerate=NOT_YET,
    )
    assert first["reservedKvTokens"] <= 20_000  # booked once, on one pool
    # The older pool gone, the decoder is the other one's: its conversations are placed there.
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, api.namespace, "decoderpools", "llama")
    for name in ("b1", "b2"):
        api.wait_conv_phase(name, "Prefilling", timeout_s=30)


def forge(api: Api, name: str, status: dict[str, Any]) -> None:
    api.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, api.namespace, "conversations", name, {"status": status}
    )


def repaired(api: Api, name: str) -> dict[str, Any]:
    """The conversation's status once the operator repaired it (phase Prefilling, condition StatusRepaired)."""

    def done() -> dict[str, Any] | None:
        status = api.conv_status(name)
        marked = any(c["type"] == "StatusRepaired" for c in status.get("conditions", []))
        return status if status.get("phase") == "Prefilling" and marked else None

    return wait_for(f"{name}'s status repaired", done, timeout_s=30, tolerate=NOT_YET)


def test_integrity_a_forged_status_is_repaired_while_the_operator_runs(api: Api, operator: OperatorProcess) -> None:
    placed = api.first_placement()
    forge(api, "c0", {"phase": "Completed", "reservedKvTokens": 0})
    status = repaired(api, "c0")
    assert status["reservedKvTokens"] == placed["reservedKvTokens"]
    assert status["decoder"]["pod"] == placed["decoder"]["pod"]
    wait_for("a Warning Event StatusRepaired", lambda: api.events("StatusRepaired"), timeout_s=15)
    pool = api.pool_status("llama")
    assert pool["reservedKvTokens"] == placed["reservedKvTokens"]


def test_integrity_a_forged_status_is_repaired_on_restart(api: Api, operator: OperatorProcess) -> None:
    placed = api.first_placement()
    api.create(conversation_body("c1", "llama", 1000))
    api.wait_conv_phase("c1", "Prefilling")
    operator.stop()
    forge(api, "c0", {"phase": "Completed", "reservedKvTokens": 0, "completedAt": "2026-01-01T00:00:00Z"})
    forge(api, "c1", {"reservedKvTokens": 0})
    operator.start()
    c0 = repaired(api, "c0")
    assert c0["reservedKvTokens"] >= 2000  # at least its first turn's input: the ledger holds it again
    assert c0["decoder"]["pod"] == placed["decoder"]["pod"]
    c1 = repaired(api, "c1")
    assert c1["reservedKvTokens"] >= 1000
    held = c0["reservedKvTokens"] + c1["reservedKvTokens"]
    pool = wait_for(
        "the pool's ledger holds both as repaired",
        lambda: (s := api.pool_status("llama")).get("reservedKvTokens") == held and s,
        tolerate=NOT_YET,
    )
    assert pool["conversations"] == 2
    wait_for("two Warning Events StatusRepaired", lambda: len(api.events("StatusRepaired")) >= 2, timeout_s=15)
