"""The extender wire format against literal JSON as kube-scheduler's Go encoder writes it.

k8s.io/kube-scheduler/extender/v1 types have no json tags: keys are the Go field names; nil pointers, slices
and maps encode as null. The embedded Pod and NodeList keep their own camelCase tags.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from conserve.api import extender_wire as wire

pytestmark = pytest.mark.unit

# What HTTPExtender.Filter sends with nodeCacheCapable: true (Nodes nil, NodeNames set).
ARGS_NODE_CACHE = """{"Pod":{"metadata":{"name":"prefill-7d9c5-x2x","generateName":"prefill-7d9c5-","namespace":"t1",
"uid":"0b6e6f2c-1f0e-4c1e-9d2f-0d1c2b3a4f5e","resourceVersion":"1234","creationTimestamp":"2025-01-01T00:00:00Z",
"labels":{"app":"prefill","conserve.dev/role":"prefill","pod-template-hash":"7d9c5"},"ownerReferences":[{"apiVersion":
"apps/v1","kind":"ReplicaSet","name":"prefill-7d9c5","uid":"u","controller":true,"blockOwnerDeletion":true}]},
"spec":{"containers":[{"name":"server","image":"registry.k8s.io/pause:3.10","resources":{"limits":{"nvidia.com/gpu":"1"},
"requests":{"nvidia.com/gpu":"1"}},"terminationMessagePath":"/dev/termination-log","imagePullPolicy":"IfNotPresent"}],
"restartPolicy":"Always","terminationGracePeriodSeconds":30,"dnsPolicy":"ClusterFirst","securityContext":{},
"schedulerName":"conserve-scheduler","tolerations":[{"key":"node.kubernetes.io/not-ready","operator":"Exists",
"effect":"NoExecute","tolerationSeconds":300}],"priority":0,"enableServiceLinks":true,"preemptionPolicy":
"PreemptLowerPriority"},"status":{"phase":"Pending","qosClass":"BestEffort"}},"Nodes":null,
"NodeNames":["kwok-h100-0","kwok-h200-0"]}"""

# The same with nodeCacheCapable: false (NodeNames nil, Nodes a v1.NodeList).
ARGS_FULL = """{"Pod":{"metadata":{"name":"p","namespace":"t1","labels":{"conserve.dev/role":"decode"}},
"spec":{"containers":[{"name":"c","image":"i","resources":{"limits":{"nvidia.com/gpu":"2"}}}],
"schedulerName":"conserve-scheduler"},"status":{}},
"Nodes":{"metadata":{},"items":[{"metadata":{"name":"kwok-h200-0","uid":"n1","resourceVersion":"9",
"creationTimestamp":"2025-01-01T00:00:00Z","labels":{"nvidia.com/gpu.product":"NVIDIA-H200",
"nvidia.com/gpu.count":"8","nvidia.com/gpu.memory":"143771"},"annotations":{"kwok.x-k8s.io/node":"fake"}},
"spec":{},"status":{"capacity":{"cpu":"128","nvidia.com/gpu":"8"},"allocatable":{"cpu":"128","nvidia.com/gpu":"8"},
"conditions":[{"type":"Ready","status":"True","lastHeartbeatTime":null,"lastTransitionTime":null}],
"daemonEndpoints":{"kubeletEndpoint":{"Port":0}},"nodeInfo":{"machineID":"","systemUUID":"","bootID":"",
"kernelVersion":"","osImage":"","containerRuntimeVersion":"","kubeletVersion":"","kubeProxyVersion":"",
"operatingSystem":"linux","architecture":"amd64"}}}]},"NodeNames":null}"""


def test_args_node_cache_capable_shape() -> None:
    args = wire.ExtenderArgs.model_validate_json(ARGS_NODE_CACHE)
    assert args.Nodes is None
    assert args.NodeNames == ["kwok-h100-0", "kwok-h200-0"]
    assert args.Pod is not None
    assert args.Pod["metadata"]["labels"]["conserve.dev/role"] == "prefill"


def test_args_full_node_shape() -> None:
    args = wire.ExtenderArgs.model_validate_json(ARGS_FULL)
    assert args.NodeNames is None
    assert args.Nodes is not None
    assert args.Nodes.items is not None
    assert args.Nodes.items[0]["metadata"]["name"] == "kwok-h200-0"
    # Go's decoder also accepts missing keys as nil and unknown keys silently
    sparse = wire.ExtenderArgs.model_validate_json('{"Pod":{},"NodeNames":["a"],"Future":1}')
    assert sparse.Nodes is None
    assert sparse.NodeNames == ["a"]


def test_filter_result_encodes_like_go_in_node_cache_mode() -> None:
    result = wire.ExtenderFilterResult(
        NodeNames=["kwok-h100-0"],
        FailedNodes={},
        FailedAndUnresolvableNodes={"kwok-h200-0": "conserve: prefill pod needs a compute-tier GPU node"},
    )
    expected = (
        '{"Nodes":null,"NodeNames":["kwok-h100-0"],"FailedNodes":{},'
        '"FailedAndUnresolvableNodes":{"kwok-h200-0":"conserve: prefill pod needs a compute-tier GPU node"},'
        '"Error":""}'
    )
    assert result.to_json_bytes().decode() == expected


def test_filter_result_zero_value_is_all_null() -> None:
    # json.Marshal(ExtenderFilterResult{}) in Go
    go_zero = '{"Nodes":null,"NodeNames":null,"FailedNodes":null,"FailedAndUnresolvableNodes":null,"Error":""}'
    assert wire.ExtenderFilterResult().to_json_bytes().decode() == go_zero
    assert wire.ExtenderFilterResult.model_validate_json(go_zero) == wire.ExtenderFilterResult()


def test_filter_result_full_mode_keeps_nodes_as_given() -> None:
    args = wire.ExtenderArgs.model_validate_json(ARGS_FULL)
    assert args.Nodes is not None
    result = wire.ExtenderFilterResult(Nodes=wire.NodeList(metadata={}, items=args.Nodes.items), FailedNodes={})
    decoded = json.loads(result.to_json_bytes())
    assert decoded["NodeNames"] is None
    assert decoded["Nodes"]["items"] == json.loads(ARGS_FULL)["Nodes"]["items"]
    assert decoded["Nodes"]["metadata"] == {}


def test_filter_result_with_error_roundtrip() -> None:
    go = '{"Nodes":null,"NodeNames":null,"FailedNodes":null,"FailedAndUnresolvableNodes":null,"Error":"boom"}'
    assert wire.ExtenderFilterResult.model_validate_json(go).Error == "boom"


def test_host_priority_list() -> None:
    go = '[{"Host":"kwok-h100-0","Score":10},{"Host":"kwok-l40s-0","Score":3}]'
    parsed = wire.HostPriorityList.model_validate_json(go)
    assert parsed.root == [
        wire.HostPriority(Host="kwok-h100-0", Score=10),
        wire.HostPriority(Host="kwok-l40s-0", Score=3),
    ]
    assert parsed.to_json_bytes().decode() == go
    assert wire.HostPriorityList([]).to_json_bytes() == b"[]"
    with pytest.raises(ValidationError):
        wire.HostPriority(Host="x", Score=11)  # MaxExtenderPriority is 10


def test_binding_types() -> None:
    go = '{"PodName":"p","PodNamespace":"ns","PodUID":"0b6e6f2c-1f0e-4c1e-9d2f-0d1c2b3a4f5e","Node":"kwok-h100-0"}'
    args = wire.ExtenderBindingArgs.model_validate_json(go)
    assert (args.PodName, args.PodNamespace, args.Node) == ("p", "ns", "kwok-h100-0")
    assert json.loads(args.to_json_bytes()) == json.loads(go)
    assert wire.ExtenderBindingResult().to_json_bytes() == b'{"Error":""}'


@pytest.mark.parametrize(
    "body",
    ['{"Pod":[]}', '{"NodeNames":"kwok-h100-0"}', '{"NodeNames":[1,2]}', '{"Nodes":{"items":"x"}}', "[]", "null"],
)
def test_wrong_shapes_are_rejected(body: str) -> None:
    with pytest.raises(ValidationError):
        wire.ExtenderArgs.model_validate_json(body)


def test_filter_result_fast_encoding_equals_the_plain_one() -> None:
    odd = 'we"ird\\näme'
    result = wire.ExtenderFilterResult(
        NodeNames=["a", odd],
        FailedNodes={"b": "no GPU", "c": "no GPU", odd: "ünïcode"},
        FailedAndUnresolvableNodes={},
        Error='bad "thing"',
    )
    plain = json.dumps(result.dump_go(), separators=(",", ":"))
    assert json.loads(result.to_json_bytes()) == json.loads(plain)
    assert result.to_json_bytes() == json.dumps(result.dump_go(), separators=(",", ":"), ensure_ascii=True).encode()
