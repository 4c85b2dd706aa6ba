"""The extender's verbs over wire models (no HTTP): both request modes, pass-through, the cache, the reasons."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conserve.api.extender_wire import ExtenderArgs, ExtenderBindingArgs, NodeList
from conserve.core.node_scoring import NodeFilterReason, NodeScoringSettings
from conserve.core.placement import TierPolicy
from conserve.extender.cache import ClusterCache
from conserve.extender.objects import pod_demand, pod_gpu_request
from conserve.extender.service import (
    UNKNOWN_NODE_MESSAGE,
    BadRequest,
    ExtenderService,
    ExtenderSettings,
    Priorities,
    parse_args,
)
from conserve.extender.testing import node, pod

pytestmark = pytest.mark.unit

NODES = [node("h100-0", "H100"), node("l40s-0", "L40S"), node("h200-0", "H200"), node("h20-0", "H20")]
NAMES = [n["metadata"]["name"] for n in NODES]


def service(policy: TierPolicy = TierPolicy.STRICT, cache: ClusterCache | None = None) -> ExtenderService:
    return ExtenderService(ExtenderSettings(scoring=NodeScoringSettings(tier_policy=policy)), cache)


def cached(*pods: dict[str, Any]) -> ClusterCache:
    cache = ClusterCache()
    cache.replace_nodes(NODES)
    cache.replace_pods(pods)
    return cache


def by_names(p: dict[str, Any], names: list[str] = NAMES) -> ExtenderArgs:
    return ExtenderArgs(Pod=p, NodeNames=names)


def full(p: dict[str, Any], nodes: list[dict[str, Any]] = NODES) -> ExtenderArgs:
    return ExtenderArgs(Pod=p, Nodes=NodeList(metadata={}, items=nodes))


def test_strict_node_cache_mode() -> None:
    svc = service(cache=cached())
    out = svc.filter(by_names(pod("p", "prefill")))
    assert sorted(out.result.NodeNames or []) == ["h100-0", "l40s-0"]
    assert out.result.Nodes is None
    assert set(out.result.FailedAndUnresolvableNodes or {}) == {"h200-0", "h20-0"}
    assert out.result.FailedNodes == {}
    assert out.rejected == {NodeFilterReason.TIER_MISMATCH: 2}
    decode = svc.filter(by_names(pod("d", "decode")))
    assert sorted(decode.result.NodeNames or []) == ["h20-0", "h200-0"]


def test_full_node_mode_returns_the_node_objects() -> None:
    out = service().filter(full(pod("d", "decode")))
    assert out.result.NodeNames is None
    assert out.result.Nodes is not None
    assert out.result.Nodes.items == [NODES[2], NODES[3]]
    go = json.loads(out.result.to_json_bytes())
    assert go["Nodes"]["items"][0]["metadata"]["name"] == "h200-0"


def test_preferred_lets_every_tier_through_and_ranks_by_fit() -> None:
    svc = service(TierPolicy.PREFERRED, cached())
    out = svc.filter(by_names(pod("p", "prefill")))
    assert sorted(out.result.NodeNames or []) == sorted(NAMES)
    scores = {h.Host: h.Score for h in svc.prioritize(by_names(pod("p", "prefill"))).to_wire().root}
    assert min(scores["h100-0"], scores["l40s-0"]) > max(scores["h200-0"], scores["h20-0"])
    decode = {h.Host: h.Score for h in svc.prioritize(by_names(pod("d", "decode"))).to_wire().root}
    assert min(decode["h200-0"], decode["h20-0"]) > max(decode["h100-0"], decode["l40s-0"])
    assert all(0 <= s <= 10 for s in scores.values())


def test_full_gpus_from_the_pod_cache_in_both_modes() -> None:
    bound = [pod(f"busy-{i}", None, gpus=4, node_name="h100-0", phase="Running") for i in range(2)]
    finished = pod("done", "prefill", gpus=8, node_name="l40s-0", phase="Succeeded")
    cache = cached(*bound, finished)
    svc = service(cache=cache)
    for args in (by_names(pod("p", "prefill")), full(pod("p", "prefill"))):
        out = svc.filter(args)
        assert out.result.FailedNodes == {
            "h100-0": "conserve: not enough free nvidia.com/gpu for a prefill pod (needs 1)"
        }
        assert out.rejected[NodeFilterReason.INSUFFICIENT_GPU] == 1
    # without any cache, full-node mode reads allocatable alone
    assert service().filter(full(pod("p", "prefill"))).result.FailedNodes == {}


def test_unknown_nodes_in_node_cache_mode() -> None:
    svc = service(cache=cached())
    out = svc.filter(by_names(pod("p", "prefill"), ["h100-0", "ghost"]))
    assert out.result.NodeNames == ["h100-0"]
    assert out.result.FailedNodes == {"ghost": UNKNOWN_NODE_MESSAGE}
    assert out.rejected[NodeFilterReason.UNKNOWN_NODE] == 1
    scores = svc.prioritize(by_names(pod("p", "prefill"), ["h100-0", "ghost"])).to_wire()
    assert [h.Host for h in scores.root] == ["h100-0", "ghost"]
    assert scores.root[1].Score == 0
    # no cache at all: every named node is unknown
    assert service().filter(by_names(pod("p", "prefill"))).result.NodeNames == []


@pytest.mark.parametrize(
    "p",
    [
        pod("plain", None),  # no role label
        pod("other", "prefill", scheduler_name="default-scheduler"),  # another scheduler's pod
        pod("bad-role", "training"),
    ],
)
def test_pass_through(p: dict[str, Any]) -> None:
    svc = service(cache=cached())
    out = svc.filter(by_names(p, [*NAMES, "ghost"]))
    assert out.result.NodeNames == [*NAMES, "ghost"]
    assert not out.result.FailedNodes
    assert not out.rejected
    assert service().filter(full(p)).result.Nodes == NodeList(metadata={}, items=NODES)
    assert {h.Score for h in svc.prioritize(by_names(p)).to_wire().root} == {0}
    assert {h.Score for h in svc.prioritize(full(p)).to_wire().root} == {0}


def test_all_schedulers_when_no_name_configured() -> None:
    svc = ExtenderService(ExtenderSettings(scheduler_names=frozenset()), cached())
    out = svc.filter(by_names(pod("p", "prefill", scheduler_name="default-scheduler")))
    assert sorted(out.result.NodeNames or []) == ["h100-0", "l40s-0"]


def test_prioritize_full_mode_keeps_order_and_scale() -> None:
    scores = service().prioritize(full(pod("d", "decode"))).to_wire()
    assert [h.Host for h in scores.root] == NAMES
    assert all(isinstance(h.Score, int) and 0 <= h.Score <= 10 for h in scores.root)


def test_bind_is_refused_with_an_error() -> None:
    result = service().bind(ExtenderBindingArgs(PodName="p", PodNamespace="ns", Node="h100-0"))
    assert "does not bind" in result.Error


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"{not json", "malformed"),
        (b'{"Pod": 3, "NodeNames": []}', "malformed ExtenderArgs at Pod"),
        (b'{"NodeNames": ["a"]}', "Pod is missing"),
        (b'{"Pod": {}}', "neither Nodes nor NodeNames"),
        (b"[1, 2]", "malformed"),
        ('{"Pod": {}, "NodeNames": ["\udc80"]}'.encode("utf-8", "surrogatepass"), "malformed"),
    ],
)
def test_parse_args_rejects_malformed(body: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        parse_args(body)


def test_malformed_embedded_objects_never_raise() -> None:
    weird_pod = {
        "metadata": {"labels": {"conserve.dev/role": "prefill"}},
        "spec": {"containers": "nope", "schedulerName": "conserve-scheduler"},
    }
    weird_nodes: list[dict[str, Any]] = [
        {"metadata": None},
        {"status": {"allocatable": {"nvidia.com/gpu": "lots"}}},
        {},
    ]
    svc = service()
    out = svc.filter(full(weird_pod, weird_nodes))
    assert out.result.Nodes is not None
    assert out.result.Nodes.items == []
    svc.prioritize(full(weird_pod, weird_nodes))
    assert pod_gpu_request({"spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": True}}}]}}) == 0


def test_pod_demand_reads_requests_limits_and_init_containers() -> None:
    p = pod("p", "decode", gpus=2, model="llama-3-70b")
    p["spec"]["initContainers"] = [{"name": "warm", "resources": {"limits": {"nvidia.com/gpu": "4"}}}]
    demand = pod_demand(p)
    assert (demand.gpus, demand.model, demand.role and demand.role.value) == (4, "llama-3-70b", "decode")


def test_priorities_fast_encoding_equals_the_wire_model() -> None:
    result = Priorities(["a", 'we"ird\\name', "ünï"], [0, 10, 7])
    assert result.to_json_bytes() == result.to_wire().to_json_bytes()
    assert json.loads(result.to_json_bytes()) == [
        {"Host": "a", "Score": 0},
        {"Host": 'we"ird\\name', "Score": 10},
        {"Host": "ünï", "Score": 7},
    ]


def test_node_classes_follow_changes_in_the_cache() -> None:
    # h200-0 and h200-1 share a class; filling h200-0 moves it to another class, whose answer must not leak back.
    cache = ClusterCache()
    cache.replace_nodes([node("h200-0", "H200"), node("h200-1", "H200")])
    cache.replace_pods([])
    svc = service(cache=cache)
    assert sorted(svc.filter(by_names(pod("d", "decode"), ["h200-0", "h200-1"])).result.NodeNames or []) == [
        "h200-0",
        "h200-1",
    ]
    cache.apply_pod("ADDED", pod("big", "decode", gpus=8, node_name="h200-0", phase="Running"))
    out = svc.filter(by_names(pod("d", "decode"), ["h200-1", "h200-0"]))
    assert out.result.NodeNames == ["h200-1"]
    assert set(out.result.FailedNodes or {}) == {"h200-0"}
    cache.apply_pod("DELETED", pod("big", "decode", gpus=8, node_name="h200-0"))
    cache.apply_pod("ADDED", pod("big2", "decode", gpus=8, node_name="h200-1", phase="Running"))
    out = svc.filter(by_names(pod("d", "decode"), ["h200-0", "h200-1"]))
    assert out.result.NodeNames == ["h200-0"]
    assert set(out.result.FailedNodes or {}) == {"h200-1"}
    priorities = svc.prioritize(by_names(pod("d", "decode"), ["h200-0", "h200-1"]))
    scores = dict(zip(priorities.hosts, priorities.scores, strict=True))
    assert scores["h200-0"] > scores["h200-1"]  # all 8 GPUs free against none
