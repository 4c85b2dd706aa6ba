"""GPU catalog and tier classification.

Figures are public vendor datasheet values (dense bf16 tensor TFLOP/s without sparsity, HBM/GDDR bandwidth,
memory, board power):
- H100 SXM5 80GB: NVIDIA H100 Tensor Core GPU datasheet (989 TFLOP/s, 3.35 TB/s, 80 GB, 700 W).
- H200 SXM 141GB: NVIDIA H200 datasheet (989 TFLOP/s, 4.8 TB/s, 141 GB, 700 W).
- A100 SXM4 80GB: NVIDIA A100 datasheet (312 TFLOP/s, 2.039 TB/s, 80 GB, 400 W).
- L40S: NVIDIA L40S datasheet (362 TFLOP/s, 864 GB/s, 48 GB, 350 W).
- H20: NVIDIA H20 product brief (148 TFLOP/s, 4.0 TB/s, 96 GB, 400 W).
- L4: NVIDIA L4 datasheet (121 TFLOP/s, 300 GB/s, 24 GB, 72 W).
- B200: NVIDIA DGX B200 / HGX B200 datasheet, per GPU (2250 TFLOP/s, 8 TB/s, 180 GB, 1000 W).
- A10G / A10: NVIDIA A10 datasheet (125 TFLOP/s, 600 GB/s, 24 GB, 150 W).
- H100 PCIe 80GB: NVIDIA H100 datasheet, PCIe form factor (756 TFLOP/s, 2.0 TB/s, 80 GB, 350 W).
Tensor-parallel link, per GPU and per direction (the same datasheets): NVLink 4 on H100 SXM, H200 and H20
900 GB/s bidirectional (450 GB/s each way); NVLink 3 on A100 SXM 600 GB/s (300); NVLink 5 on B200 1.8 TB/s (900);
the PCIe parts (H100 PCIe: Gen5 x16, 64 GB/s each way; L40S, L4, A10: Gen4 x16, 32 GB/s each way).
Idle power is about 10-15% of TDP on data-centre parts (measured idle draw reported by nvidia-smi on idle
H100/A100 boards is 60-90 W); we use 0.1 x TDP, documented here as a modelling constant.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

TERA = 1e12
GIB = 1024**3
GB = 1e9


class Tier(enum.StrEnum):
    """Which phase a GPU class is built for."""

    COMPUTE = "compute"  # high FLOP per byte of bandwidth: prefill
    BANDWIDTH = "bandwidth"  # high bandwidth per FLOP and per watt: decode


class Role(enum.StrEnum):
    """Which phase a pod serves."""

    PREFILL = "prefill"
    DECODE = "decode"


#: The tier a role wants.
ROLE_TIER: Mapping[Role, Tier] = {Role.PREFILL: Tier.COMPUTE, Role.DECODE: Tier.BANDWIDTH}

#: Node labels NVIDIA GPU Feature Discovery sets, and ours.
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
LABEL_GPU_MEMORY_MIB = "nvidia.com/gpu.memory"
LABEL_GPU_COUNT = "nvidia.com/gpu.count"
LABEL_TIER_OVERRIDE = "conserve.dev/tier"
RESOURCE_GPU = "nvidia.com/gpu"

IDLE_POWER_FRACTION_OF_TDP = 0.10


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Public figures of one GPU product."""

    product: str
    bf16_flops_per_s: float
    memory_bandwidth_bytes_per_s: float
    memory_bytes: float
    tdp_w: float
    tp_link: str = "nvlink"  # the link between the GPUs of one node: "nvlink" or "pcie"
    tp_link_bytes_per_s: float = 450e9  # per GPU, per direction

    @property
    def idle_power_w(self) -> float:
        return self.tdp_w * IDLE_POWER_FRACTION_OF_TDP

    @property
    def flop_per_byte(self) -> float:
        return self.bf16_flops_per_s / self.memory_bandwidth_bytes_per_s

    @property
    def tier(self) -> Tier:
        return classify_tier(self)


#: Ridge point in FLOP per byte that separates the tiers: 250 sits between the H100 (the reference prefill part)
#: and the H200 (the reference decode part).
TIER_RIDGE_FLOP_PER_BYTE = 250.0


def classify_tier(spec: GpuSpec) -> Tier:
    """Compute tier when the arithmetic intensity at the roofline ridge is at or above TIER_RIDGE_FLOP_PER_BYTE,
    else bandwidth tier.

    L40S (419 FLOP/B), L4 (403, although a small part) and H100 SXM (989e12 / 3.35e12 = 295) are compute; H200
    (206), A100 (153) and H20 (37) are bandwidth.
    """
    return Tier.COMPUTE if spec.flop_per_byte >= TIER_RIDGE_FLOP_PER_BYTE else Tier.BANDWIDTH


def _spec(
    product: str, tflops: float, tbps: float, mem_gb: float, tdp_w: float, link: str, link_gbps: float
) -> GpuSpec:
    return GpuSpec(product, tflops * TERA, tbps * TERA, mem_gb * GB, tdp_w, link, link_gbps * GB)


#: Canonical catalog, keyed by a short name.
CATALOG: Mapping[str, GpuSpec] = {
    "H100": _spec("H100", 989, 3.35, 80, 700, "nvlink", 450),
    "H100-PCIE": _spec("H100-PCIE", 756, 2.0, 80, 350, "pcie", 64),
    "H200": _spec("H200", 989, 4.8, 141, 700, "nvlink", 450),
    "A100": _spec("A100", 312, 2.039, 80, 400, "nvlink", 300),
    "L40S": _spec("L40S", 362, 0.864, 48, 350, "pcie", 32),
    "H20": _spec("H20", 148, 4.0, 96, 400, "nvlink", 450),
    "L4": _spec("L4", 121, 0.30, 24, 72, "pcie", 32),
    "B200": _spec("B200", 2250, 8.0, 180, 1000, "nvlink", 900),
    "A10": _spec("A10", 125, 0.6, 24, 150, "pcie", 32),
}

# GFD product strings look like "NVIDIA-H100-80GB-HBM3", "NVIDIA-H200", "NVIDIA-A100-SXM4-80GB", "NVIDIA-L40S",
# "NVIDIA-H20", "Tesla-T4". Match the most specific key first.
_PRODUCT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("H100-PCIE", "H100-PCIE"),
    ("H100", "H100"),
    ("H200", "H200"),
    ("H20", "H20"),
    ("A100", "A100"),
    ("L40S", "L40S"),
    ("L4", "L4"),
    ("B200", "B200"),
    ("A10", "A10"),
)


def lookup_product(product: str) -> GpuSpec | None:
    """Map a GFD product label (or a catalog short name) to the catalog, or None when unknown."""
    normalized = product.strip().upper().replace(" ", "-").replace("_", "-")
    if normalized in CATALOG:
        return CATALOG[normalized]
    tokens = set(normalized.split("-"))
    for pattern, key in _PRODUCT_PATTERNS:
        if "-" in pattern:
            if pattern in normalized:
                return CATALOG[key]
        elif pattern in tokens:
            return CATALOG[key]
    return None


@dataclass(frozen=True, slots=True)
class NodeGpu:
    """What a node offers, as read from its labels."""

    product: str
    spec: GpuSpec | None
    tier: Tier | None
    gpu_count: int
    memory_bytes_per_gpu: float
    tier_source: str  # "override", "catalog", "memory-rule" or "none"


def node_gpu_from_labels(labels: Mapping[str, str]) -> NodeGpu:
    """Derive a node's GPU class from GFD labels.

    Rule, in order: an explicit `conserve.dev/tier` label wins; a known product takes its catalog tier; an
    unknown product with `nvidia.com/gpu.memory` of 90 GiB or more counts as bandwidth tier (large-memory parts
    are built for decode-heavy serving), below that as compute tier; a node with no GPU labels has no tier.
    """
    product = labels.get(LABEL_GPU_PRODUCT, "")
    count = _parse_int(labels.get(LABEL_GPU_COUNT), default=0)
    memory_mib = _parse_int(labels.get(LABEL_GPU_MEMORY_MIB), default=0)
    spec = lookup_product(product) if product else None
    memory_bytes = memory_mib * 1024 * 1024 if memory_mib > 0 else (spec.memory_bytes if spec else 0.0)
    override = labels.get(LABEL_TIER_OVERRIDE, "").strip().lower()
    if override in (Tier.COMPUTE.value, Tier.BANDWIDTH.value):
        return NodeGpu(product, spec, Tier(override), count, memory_bytes, "override")
    if spec is not None:
        return NodeGpu(product, spec, spec.tier, count, memory_bytes, "catalog")
    if product or memory_mib > 0:
        tier = Tier.BANDWIDTH if memory_bytes >= 90 * GIB else Tier.COMPUTE
        return NodeGpu(product, None, tier, count, memory_bytes, "memory-rule")
    return NodeGpu("", None, None, count, 0.0, "none")


def _parse_int(value: str | None, *, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value.strip())
    except ValueError:
        return default
