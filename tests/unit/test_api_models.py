"""The pydantic models refuse what the CRD schema and its CEL rules refuse (both come from the same models)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from conserve.api import conversation, decoderpool
from conserve.api.common import LabelSelector, status_patch
from conserve.api.conversation import ConversationSpec, ConversationStatus, Endpoint, Phase
from conserve.api.corev1 import Node, Pod
from conserve.api.decoderpool import DecoderPoolSpec, DecoderPoolStatus
from conserve.controller.decoderpool import load_spec
from conserve.controller.pods import sync_pool
from conserve.controller.state import ConvRecord, NodeInfo, PodInfo, World
from conserve.controller.status import conversation_status_patch, pool_status_patch
from conserve.core.lifecycle import KvState
from conserve.testkit import pool_body

POOL: dict[str, Any] = {"model": {"name": "llama-3-8b"}, "decoderSelector": {"matchLabels": {"app": "dec"}}}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"pool": "p"}, "firstTurnInputTokens"),
        ({"pool": "", "firstTurnInputTokens": 10}, "pool"),
        ({"pool": "p", "firstTurnInputTokens": 0}, "firstTurnInputTokens"),
        ({"pool": "p", "firstTurnInputTokens": 10, "priority": 5000}, "priority"),
        ({"pool": "p", "firstTurnInputTokens": 10, "usage": {"turns": -1}}, "turns"),
        ({"pool": "p", "firstTurnInputTokens": 10, "bogus": 1}, "bogus"),
    ],
)
def test_conversation_spec_refused(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ConversationSpec.model_validate(spec)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"decoderSelector": {}}, "decoderSelector must select something"),
        ({"prefillSelector": {}}, "prefillSelector must select something"),
        ({"model": {"name": "mystery-1b"}}, "unknown model"),
        ({"placement": {"weights": {"kvBalance": 0, "tier": 0, "energy": 0, "conversations": 0, "load": 0}}}, "weight"),
        (
            {"decoderSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
            "values must be non-empty",
        ),
        ({"kvLifecycle": {"maxResidentTtlSeconds": 0}}, "kvLifecycle.maxResidentTtlSeconds"),
        ({"kvLifecycle": {"hostKvTokensPerDecoder": -1}}, "kvLifecycle.hostKvTokensPerDecoder"),
        ({"placement": {"maxQueueWaitSeconds": 0}}, "placement.maxQueueWaitSeconds"),
        ({"placement": {"maxQueueWaitSeconds": 3601}}, "placement.maxQueueWaitSeconds"),
    ],
)
def test_pool_spec_refused(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        DecoderPoolSpec.model_validate({**POOL, **patch})
    assert message in str(info.value)


def test_pool_spec_unknown_model_ok_with_declared_size() -> None:
    spec = DecoderPoolSpec.model_validate({**POOL, "model": {"name": "mystery", "kvBytesPerToken": 4096}})
    assert spec.model.resolved_kv_bytes_per_token() == 4096
    spec = DecoderPoolSpec.model_validate({**POOL, "model": {"name": "meta-llama/Meta-Llama-3-70B"}})
    assert spec.model.resolved_kv_bytes_per_token() == 320 * 1024


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "x"}, False),
    ],
)
def test_label_selector(selector: dict[str, Any], labels: dict[str, str], matches: bool) -> None:
    assert LabelSelector.model_validate(selector).matches(labels) is matches


def test_status_tolerates_unknown_fields() -> None:
    status = ConversationStatus.model_validate({"phase": "Decoding", "kopf": {"progress": {}}, "energyJoules": 3.5})
    assert status.energy_joules == 3.5


def _aliases(model: type[BaseModel], fields: frozenset[str]) -> set[str]:
    return {model.model_fields[name].alias or name for name in fields}


def test_conversation_status_patch_is_a_model_dump_of_owned_fields() -> None:
    spec = ConversationSpec(pool="llama", first_turn_input_tokens=1000)
    record = ConvRecord("ns", "c1", "uid-1", spec, 0.0, generation=3)
    record.status.phase, record.status.turns_served = Phase.DECODING, 2
    record.status.decoder = Endpoint(pod="dec-0", node="n0", tier="bandwidth", endpoint="10.0.0.1:8000")
    record.status.reserved_kv_tokens, record.kv_state, record.last_activity_s = 1200, KvState.IDLE, 1_767_225_600.0
    record.set_condition("Placed", "True", "Placed", "on dec-0", 1_767_225_600.0)
    patch = conversation_status_patch(record)
    assert set(patch) == {"status"}
    status = patch["status"]
    assert set(status) == _aliases(ConversationStatus, conversation.OPERATOR_STATUS_FIELDS)
    assert not {"energyJoules", "energyPerTokenJoules"} & set(status)  # the energy loop's
    assert (status["prefill"], status["completedAt"]) == (None, None)  # cleared by merge patch: written as null
    assert (status["kvState"], status["lastActivityTime"], status["turnsServed"]) == ("Idle", "2026-01-01T00:00:00Z", 2)
    parsed = ConversationStatus.model_validate(status)
    assert status_patch(parsed, conversation.OPERATOR_STATUS_FIELDS) == patch
    identity = {"namespace": "ns", "name": "c1", "uid": "uid-1", "spec": spec, "created_at_s": 0.0, "generation": 3}
    assert conversation_status_patch(ConvRecord.adopt(parsed, **identity)) == patch


def test_pool_status_patch_is_a_model_dump_of_owned_fields() -> None:
    world = World()
    world.nodes["n0"] = NodeInfo.from_labels("n0", {"nvidia.com/gpu.product": "NVIDIA-H200"})
    world.pods["ns/dec-0"] = PodInfo("ns", "dec-0", {"app": "dec"}, "n0", True, "10.0.0.1", "", 1)
    pool = world.pool("ns", "llama")
    body = pool_body("llama")
    body["metadata"].update(namespace="ns", generation=2)
    load_spec(pool, body)
    sync_pool(world, pool)
    status = pool_status_patch(pool, 4)["status"]
    assert set(status) == _aliases(DecoderPoolStatus, decoderpool.OPERATOR_STATUS_FIELDS)  # no energy measured yet
    assert status["decoders"][0]["endpoint"] == "10.0.0.1:8000"
    assert (status["pendingConversations"], status["observedGeneration"]) == (4, 2)
    assert status_patch(DecoderPoolStatus.model_validate(status), decoderpool.OPERATOR_STATUS_FIELDS) == {
        "status": status
    }
    world.set_decoder_energy("ns", "llama", "dec-0", power_watts=400.0, energy_joules=12.0)
    measured = pool_status_patch(pool, 4)["status"]
    assert set(measured) - set(status) == {"powerWatts", "energyJoules"}
    assert (measured["powerWatts"], measured["decoders"][0]["energyJoules"]) == (400.0, 12.0)


def test_core_objects_parse_leniently() -> None:
    pod = Pod.model_validate(
        {
            "metadata": {"name": "p", "labels": {"conserve.dev/role": " Decode ", "n": 3}, "deletionTimestamp": None},
            "spec": {
                "nodeName": None,
                "containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}}, "nope", {"resources": 7}],
                "initContainers": [{"resources": {"requests": {"nvidia.com/gpu": 3}}}],
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }
    )
    assert (pod.role, pod.gpus, pod.spec.node_name, pod.status.pod_ip) == ("decode", 3, "", "10.0.0.1")
    assert pod.metadata.labels == {"conserve.dev/role": " Decode "}
    assert pod.ready
    assert not pod.finished
    assert Pod.model_validate({"metadata": None, "spec": {"containers": "nope"}}).gpus == 0
    assert Node.model_validate({"status": {"allocatable": {"nvidia.com/gpu": "lots"}}}).allocatable_gpus == 0
    assert Node.model_validate({"status": {"allocatable": {"nvidia.com/gpu": "8"}}}).allocatable_gpus == 8
