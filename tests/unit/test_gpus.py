"""GPU catalog, tier classification and node labels (table-driven)."""

from __future__ import annotations

import pytest

from conserve.core.gpus import CATALOG, ROLE_TIER, Role, Tier, classify_tier, lookup_product, node_gpu_from_labels
from conserve.core.llm import MODELS, kv_capacity_tokens, lookup_model


@pytest.mark.parametrize(
    ("product", "tier"),
    [
        ("H100", Tier.COMPUTE),
        ("L40S", Tier.COMPUTE),
        ("L4", Tier.COMPUTE),
        ("B200", Tier.COMPUTE),
        ("H200", Tier.BANDWIDTH),
        ("A100", Tier.BANDWIDTH),
        ("H20", Tier.BANDWIDTH),
    ],
)
def test_tiers(product: str, tier: Tier) -> None:
    assert classify_tier(CATALOG[product]) is tier
    assert CATALOG[product].tier is tier


@pytest.mark.parametrize(
    ("label", "key"),
    [
        ("NVIDIA-H100-80GB-HBM3", "H100"),
        ("NVIDIA-H100-PCIe", "H100-PCIE"),
        ("NVIDIA-H200", "H200"),
        ("NVIDIA-H20", "H20"),
        ("NVIDIA-A100-SXM4-80GB", "A100"),
        ("NVIDIA-L40S", "L40S"),
        ("NVIDIA-L4", "L4"),
        ("h200", "H200"),
    ],
)
def test_lookup_product(label: str, key: str) -> None:
    spec = lookup_product(label)
    assert spec is not None
    assert spec.product == key


def test_unknown_product() -> None:
    assert lookup_product("Tesla-T4") is None


@pytest.mark.parametrize(
    ("labels", "tier", "source"),
    [
        ({"nvidia.com/gpu.product": "NVIDIA-H200", "nvidia.com/gpu.count": "8"}, Tier.BANDWIDTH, "catalog"),
        ({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, Tier.COMPUTE, "catalog"),
        (
            {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "conserve.dev/tier": "bandwidth"},
            Tier.BANDWIDTH,
            "override",
        ),
        (
            {"nvidia.com/gpu.product": "Mystery-X", "nvidia.com/gpu.memory": str(141 * 1024)},
            Tier.BANDWIDTH,
            "memory-rule",
        ),
        ({"nvidia.com/gpu.product": "Mystery-Y", "nvidia.com/gpu.memory": str(24 * 1024)}, Tier.COMPUTE, "memory-rule"),
        ({}, None, "none"),
    ],
)
def test_node_labels(labels: dict[str, str], tier: Tier | None, source: str) -> None:
    node = node_gpu_from_labels(labels)
    assert node.tier is tier
    assert node.tier_source == source


def test_role_tiers() -> None:
    assert ROLE_TIER[Role.PREFILL] is Tier.COMPUTE
    assert ROLE_TIER[Role.DECODE] is Tier.BANDWIDTH


def test_kv_capacity_by_hand() -> None:
    model = MODELS["llama-3-8b"]
    # H200: 141e9 x 0.9 - 16.06e9 bytes of weights, over 128 KiB per token.
    expected = int((141e9 * 0.9 - 8.03e9 * 2) // (128 * 1024))
    assert kv_capacity_tokens(gpu_memory_bytes=141e9, gpu_count=1, model=model, memory_fraction=0.9) == expected
    # 70B does not fit one 80 GB GPU, it does on two
    big = MODELS["llama-3-70b"]
    assert kv_capacity_tokens(gpu_memory_bytes=80e9, gpu_count=1, model=big, memory_fraction=0.9) == 0
    assert kv_capacity_tokens(gpu_memory_bytes=80e9, gpu_count=2, model=big, memory_fraction=0.9) > 0


@pytest.mark.parametrize("name", ["meta-llama/Meta-Llama-3-8B", "llama-3-70b", "Qwen/Qwen2.5-7B", "qwen2.5-32b"])
def test_lookup_model(name: str) -> None:
    assert lookup_model(name) is not None
