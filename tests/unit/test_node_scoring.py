"""The pure node filters and scorers (conserve.core.node_scoring): every filter reason, the scorers, the scale."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conserve.core.gpus import CATALOG, NodeGpu, Role, Tier, node_gpu_from_labels
from conserve.core.node_scoring import (
    GpuNode,
    NodeFilterReason,
    NodeScoringSettings,
    NodeWeights,
    OperatingPoint,
    PodDemand,
    energy_per_token_j,
    filter_node,
    filter_nodes,
    score_nodes,
    to_extender_score,
)
from conserve.core.placement import TierPolicy

pytestmark = pytest.mark.unit

STRICT = NodeScoringSettings(tier_policy=TierPolicy.STRICT)
PREFERRED = NodeScoringSettings(tier_policy=TierPolicy.PREFERRED)


def gpu(product: str) -> NodeGpu:
    return node_gpu_from_labels({"nvidia.com/gpu.product": product, "nvidia.com/gpu.count": "8"})


H100 = gpu("NVIDIA-H100-80GB-HBM3")
L40S = gpu("NVIDIA-L40S")
H200 = gpu("NVIDIA-H200")
A100 = gpu("NVIDIA-A100-SXM4-80GB")
H20 = gpu("NVIDIA-H20")
NO_GPU = node_gpu_from_labels({})


def n(name: str, g: NodeGpu, alloc: int = 8, used: int = 0, prefill: int = 0, decode: int = 0) -> GpuNode:
    return GpuNode(name, g, alloc, used, prefill, decode)


PREFILL = PodDemand(Role.PREFILL, gpus=1)
DECODE = PodDemand(Role.DECODE, gpus=1)
PLAIN = PodDemand(None, gpus=1)


def test_catalog_tiers_are_what_the_extender_relies_on() -> None:
    assert (H100.tier, L40S.tier) == (Tier.COMPUTE, Tier.COMPUTE)
    assert (H200.tier, A100.tier, H20.tier) == (Tier.BANDWIDTH, Tier.BANDWIDTH, Tier.BANDWIDTH)
    assert NO_GPU.tier is None


@pytest.mark.parametrize(
    ("pod", "node", "settings", "reason"),
    [
        # strict: role to tier
        (PREFILL, n("h100", H100), STRICT, None),
        (PREFILL, n("l40s", L40S), STRICT, None),
        (PREFILL, n("h200", H200), STRICT, NodeFilterReason.TIER_MISMATCH),
        (PREFILL, n("h20", H20), STRICT, NodeFilterReason.TIER_MISMATCH),
        (DECODE, n("h200", H200), STRICT, None),
        (DECODE, n("a100", A100), STRICT, None),
        (DECODE, n("h20", H20), STRICT, None),
        (DECODE, n("h100", H100), STRICT, NodeFilterReason.TIER_MISMATCH),
        (PREFILL, n("cpu", NO_GPU), STRICT, NodeFilterReason.NO_GPU_TIER),
        (DECODE, n("cpu", NO_GPU), STRICT, NodeFilterReason.NO_GPU_TIER),
        # preferred: any tier; GPUs still needed
        (PREFILL, n("h200", H200), PREFERRED, None),
        (DECODE, n("h100", H100), PREFERRED, None),
        (PREFILL, n("cpu", NO_GPU, alloc=0), PREFERRED, NodeFilterReason.INSUFFICIENT_GPU),
        # free GPUs
        (PREFILL, n("full", H100, alloc=8, used=8), STRICT, NodeFilterReason.INSUFFICIENT_GPU),
        (PodDemand(Role.DECODE, gpus=4), n("h200", H200, alloc=8, used=5), STRICT, NodeFilterReason.INSUFFICIENT_GPU),
        (PodDemand(Role.DECODE, gpus=4), n("h200", H200, alloc=8, used=4), STRICT, None),
        # a role pod asking for no GPU still needs one
        (PodDemand(Role.PREFILL, gpus=0), n("full", H100, alloc=8, used=8), STRICT, NodeFilterReason.INSUFFICIENT_GPU),
        # tier is checked first
        (PREFILL, n("full-h200", H200, alloc=8, used=8), STRICT, NodeFilterReason.TIER_MISMATCH),
        # pods without a role pass everything
        (PLAIN, n("full", H100, alloc=8, used=8), STRICT, None),
        (PLAIN, n("cpu", NO_GPU, alloc=0), STRICT, None),
    ],
)
def test_filter_reasons(
    pod: PodDemand, node: GpuNode, settings: NodeScoringSettings, reason: NodeFilterReason | None
) -> None:
    rejection = filter_node(pod, node, settings)
    assert (rejection.reason if rejection else None) == reason


def test_rejection_messages_are_node_independent_and_say_why() -> None:
    a = filter_node(PREFILL, n("h200-a", H200), STRICT)
    b = filter_node(PREFILL, n("h200-b", H200), STRICT)
    assert a is not None
    assert b is not None
    assert a.message == b.message  # the scheduler aggregates identical messages: "4 conserve: ..."
    assert "prefill pod needs a compute-tier GPU node" in a.message
    assert "bandwidth tier" in a.message
    assert not a.resolvable
    full = filter_node(DECODE, n("h200", H200, used=8), STRICT)
    assert full is not None
    assert full.resolvable
    assert "nvidia.com/gpu" in full.message


def test_filter_nodes_keeps_input_order_and_memoises_equal_nodes() -> None:
    nodes = [n("b", H100), n("a", H200), n("c", H100, used=8), n("d", H100)]
    fits, rejected = filter_nodes(PREFILL, nodes, STRICT)
    assert [x.name for x in fits] == ["b", "d"]
    assert {k: v.reason for k, v in rejected.items()} == {
        "a": NodeFilterReason.TIER_MISMATCH,
        "c": NodeFilterReason.INSUFFICIENT_GPU,
    }


def test_tier_fit_scores_higher_under_preferred() -> None:
    nodes = [n("h100", H100), n("h200", H200), n("cpu", NO_GPU)]
    prefill = score_nodes(PREFILL, nodes, PREFERRED)
    decode = score_nodes(DECODE, nodes, PREFERRED)
    assert prefill["h100"] > prefill["h200"]
    assert decode["h200"] > decode["h100"]
    only_tier = NodeScoringSettings(TierPolicy.PREFERRED, NodeWeights(tier=1, free_gpus=0, energy=0, spread=0))
    assert score_nodes(PREFILL, nodes, only_tier) == {"h100": 1.0, "h200": 0.0, "cpu": 0.5}


def test_free_gpus_scorer_prefers_least_allocated() -> None:
    settings = NodeScoringSettings(weights=NodeWeights(tier=0, free_gpus=1, energy=0, spread=0))
    scores = score_nodes(DECODE, [n("empty", H200), n("half", H200, used=4), n("last", H200, used=7)], settings)
    assert scores == {"empty": 7 / 8, "half": 3 / 8, "last": 0.0}


def test_energy_scorer_prefers_the_gpu_with_fewer_joules_per_token_for_the_role() -> None:
    settings = NodeScoringSettings(weights=NodeWeights(tier=0, free_gpus=0, energy=1, spread=0))
    point = OperatingPoint()
    decode_j = {k: energy_per_token_j(CATALOG[k], Role.DECODE, "llama-3-8b", 1, point) for k in ("H200", "A100", "H20")}
    best = min(decode_j, key=lambda k: decode_j[k])
    nodes = [n("h200", H200), n("a100", A100), n("h20", H20)]
    scores = score_nodes(DECODE, nodes, settings)
    assert scores[best.lower()] == 1.0
    for key, joules in decode_j.items():
        assert math.isclose(scores[key.lower()], decode_j[best] / joules)
    # prefill: the H100 is cheaper per token than the L40S (higher FLOP/s per watt)
    prefill = score_nodes(PREFILL, [n("h100", H100), n("l40s", L40S)], settings)
    assert prefill["h100"] == 1.0 > prefill["l40s"]
    # unknown GPU: neutral
    unknown = node_gpu_from_labels({"nvidia.com/gpu.product": "NVIDIA-X9000", "nvidia.com/gpu.memory": "98304"})
    assert score_nodes(DECODE, [n("x", unknown), n("h200", H200)], settings)["x"] == 0.5


def test_energy_depends_on_the_model_label() -> None:
    point = OperatingPoint()
    small = energy_per_token_j(CATALOG["H200"], Role.DECODE, "llama-3-8b", 1, point)
    large = energy_per_token_j(CATALOG["H200"], Role.DECODE, "llama-3-70b", 1, point)
    unknown = energy_per_token_j(CATALOG["H200"], Role.DECODE, "not-a-model", 1, point)
    assert large > small
    assert unknown == small


def test_spread_scorer_counts_pods_of_the_same_role() -> None:
    settings = NodeScoringSettings(weights=NodeWeights(tier=0, free_gpus=0, energy=0, spread=1))
    nodes = [n("a", H200, decode=0, prefill=5), n("b", H200, decode=1), n("c", H200, decode=3)]
    assert score_nodes(DECODE, nodes, settings) == {"a": 1.0, "b": 0.75, "c": 0.25}
    assert score_nodes(PREFILL, nodes, settings) == {"a": 1 - 5 / 6, "b": 1.0, "c": 1.0}


def test_pods_without_role_and_zero_weights_score_zero() -> None:
    nodes = [n("a", H100), n("b", H200)]
    assert score_nodes(PLAIN, nodes, STRICT) == {"a": 0.0, "b": 0.0}
    zero = NodeScoringSettings(weights=NodeWeights(0, 0, 0, 0))
    assert score_nodes(PREFILL, nodes, zero) == {"a": 0.0, "b": 0.0}


def test_weights_from_mapping() -> None:
    assert NodeWeights.from_mapping({"tier": 2.0}) == NodeWeights(tier=2.0)
    with pytest.raises(ValueError, match="unknown weight"):
        NodeWeights.from_mapping({"colour": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        NodeWeights.from_mapping({"tier": -1.0})
    with pytest.raises(ValueError, match="finite"):
        NodeWeights.from_mapping({"tier": float("nan")})


@pytest.mark.parametrize(
    ("score", "expected"), [(0.0, 0), (1.0, 10), (0.5, 5), (0.44, 4), (0.45, 5), (-3, 0), (7, 10), (math.nan, 0)]
)
def test_extender_scale(score: float, expected: int) -> None:
    assert to_extender_score(score) == expected


_products = st.sampled_from([H100, L40S, H200, A100, H20, NO_GPU])


@given(
    nodes=st.lists(
        st.tuples(_products, st.integers(0, 8), st.integers(0, 10), st.integers(0, 5), st.integers(0, 5)),
        min_size=1,
        max_size=20,
    ),
    role=st.sampled_from([Role.PREFILL, Role.DECODE, None]),
    policy=st.sampled_from(list(TierPolicy)),
    gpus=st.integers(0, 8),
)
def test_scores_in_unit_interval_and_filter_is_consistent(
    nodes: list[tuple[NodeGpu, int, int, int, int]], role: Role | None, policy: TierPolicy, gpus: int
) -> None:
    gpu_nodes = [GpuNode(f"n{i}", g, a, u, p, d) for i, (g, a, u, p, d) in enumerate(nodes)]
    demand = PodDemand(role, gpus)
    settings = NodeScoringSettings(tier_policy=policy)
    fits, rejected = filter_nodes(demand, gpu_nodes, settings)
    assert len(fits) + len(rejected) == len(gpu_nodes)
    for node in fits:  # memoised result equals the direct one
        assert filter_node(demand, node, settings) is None
        if role is not None:
            assert node.free_gpus >= demand.needed_gpus
    scores = score_nodes(demand, gpu_nodes, settings)
    assert set(scores) == {x.name for x in gpu_nodes}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert all(0 <= to_extender_score(s) <= 10 for s in scores.values())
