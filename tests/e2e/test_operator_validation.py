"""Bad objects are refused by the API server itself (schema + CEL), each with the offending field named."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conserve.controller.kube import k8s
from conserve.devcluster.testing import ClusterHandle
from conserve.testkit import Api, conversation_body, pool_body


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


CREATE_CASES = [
    (conv(firstTurnInputTokens=0), "spec.firstTurnInputTokens"),
    (conv(firstTurnInputTokens="many"), "spec.firstTurnInputTokens"),
    (conv(pool=""), "spec.pool"),
    (conv(priority=5000), "spec.priority"),
    (conv(idleTimeoutSeconds=0), "spec.idleTimeoutSeconds"),
    (conv(usage={"turns": -1}), "spec.usage.turns"),
    (pool(decoderSelector={}), "spec.decoderSelector"),
    (
        pool(decoderSelector={"matchExpressions": [{"key": "app", "operator": "In"}]}),
        "spec.decoderSelector.matchExpressions[0].values",
    ),
    (pool(model={"name": "mystery-1b"}, kvCapacity={}), "spec.model.name"),
    (pool(placement={"headroomFraction": 1.5}), "spec.placement.headroomFraction"),
    (pool(placement={"tierPolicy": "bogus"}), "spec.placement.tierPolicy"),
    (pool(placement={"maxQueueWaitSeconds": 0}), "spec.placement.maxQueueWaitSeconds"),
    (pool(placement={"maxQueueWaitSeconds": 86400}), "spec.placement.maxQueueWaitSeconds"),
    (
        pool(placement={"weights": {"kvBalance": 0, "tier": 0, "energy": 0, "conversations": 0, "load": 0}}),
        "spec.placement.weights",
    ),
    (pool(kvCapacity={"gpuMemoryFraction": 0}), "spec.kvCapacity.gpuMemoryFraction"),
    (pool(kvLifecycle={"maxResidentTtlSeconds": 0}), "spec.kvLifecycle.maxResidentTtlSeconds"),
    (pool(kvLifecycle={"maxHostTtlSeconds": -5}), "spec.kvLifecycle.maxHostTtlSeconds"),
    (pool(kvLifecycle={"hostKvTokensPerDecoder": -1}), "spec.kvLifecycle.hostKvTokensPerDecoder"),
    (pool(kvLifecycle={"maxActiveWindowSeconds": 7200}), "spec.kvLifecycle.maxActiveWindowSeconds"),
    (pool(prefillDecider={"rule": "Sometimes"}), "spec.prefillDecider.rule"),
    (pool(prefillDecider={"decoderMaxTokens": -1}), "spec.prefillDecider.decoderMaxTokens"),
    (pool(prefillDecider={"stallWeight": 1000}), "spec.prefillDecider.stallWeight"),
    (pool(prefillDecider={"kvLinkGbps": 0}), "spec.prefillDecider.kvLinkGbps"),
    (conv(usage={"poolPrefills": -1}), "spec.usage.poolPrefills"),
]


@pytest.mark.parametrize(("body", "field"), CREATE_CASES, ids=[f"{b['kind']}:{f}" for b, f in CREATE_CASES])
def test_create_refused_with_field(api: Api, body: dict[str, Any], field: str) -> None:
    assert field in refusal(lambda: api.create(body))


def test_missing_required_field(api: Api) -> None:
    body = conversation_body("bad", "llama", 100)
    del body["spec"]["firstTurnInputTokens"]
    assert "spec.firstTurnInputTokens: Required value" in refusal(lambda: api.create(body))


@pytest.mark.parametrize(
    ("first", "second", "field", "message"),
    [
        ({"usage": {"turns": 3}}, {"usage": {"turns": 2}}, "spec.usage.turns", "cannot decrease"),
        ({"usage": {"outputTokens": 9}}, {"usage": {"outputTokens": 1}}, "spec.usage.outputTokens", "cannot decrease"),
        ({"usage": {"poolPrefills": 2}}, {"usage": {"poolPrefills": 1}}, "spec.usage.poolPrefills", "cannot decrease"),
        ({}, {"pool": "other"}, "spec.pool", "immutable"),
        ({}, {"firstTurnInputTokens": 7}, "spec.firstTurnInputTokens", "immutable"),
        ({"completed": True}, {"completed": False}, "spec.completed", "cannot be unset"),
    ],
)
def test_update_refused_with_field(
    api: Api, first: dict[str, Any], second: dict[str, Any], field: str, message: str
) -> None:
    api.create(conversation_body("c", "llama", 100))
    if first:
        api.patch_conv("c", first)
    text = refusal(lambda: api.patch_conv("c", second))
    assert field in text
    assert message in text


def test_kubectl_refuses_unknown_fields(cluster: ClusterHandle, namespace: str, crds: None) -> None:
    manifest = json.dumps({**conv(bogusField=1), "metadata": {"name": "typo", "namespace": namespace}})
    out = cluster.kubectl("apply", "-f", "-", input=manifest, check=False)
    assert out.returncode != 0
    assert 'unknown field "spec.bogusField"' in out.stderr
