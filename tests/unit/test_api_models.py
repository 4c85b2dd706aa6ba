"""The pydantic models refuse what the CRD schema and its CEL rules refuse (both come from the same models)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from conserve.api.common import LabelSelector
from conserve.api.conversation import ConversationSpec, ConversationStatus
from conserve.api.decoderpool import DecoderPoolSpec

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
        ({"placement": {"weights": {"kvBalance": 0, "tier": 0, "energy": 0, "conversations": 0}}}, "weight"),
        (
            {"decoderSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
            "values must be non-empty",
        ),
        ({"kvLifecycle": {"maxResidentTtlSeconds": 0}}, "kvLifecycle.maxResidentTtlSeconds"),
        ({"kvLifecycle": {"hostKvTokensPerDecoder": -1}}, "kvLifecycle.hostKvTokensPerDecoder"),
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
