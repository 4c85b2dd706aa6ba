"""Energy of moving KV: prefill-to-decoder transfers, shared-store reads and writes, host offload and reload.

The GPUs' own power while they wait for a transfer is already in the engine's accounting (idle power for the
whole run); this adds what the data path draws on top while the bytes move, as active power times the
transfer time (`conserve.core.perf.kv_transfer_time_s`, `conserve.core.offload.pcie_transfer_time_s`):

- NIC_ACTIVE_POWER_W = 25 W per end, two ends per transfer: a 400 Gb/s RDMA adapter (NVIDIA ConnectX-7
  product briefs give a maximum of about 25 W) at full rate. The same figure is used for the TCP link (a
  100 Gb/s NIC draws less, so this overstates TCP slightly) and for NVLink (whose switch power per port is of
  the same order). A modelling constant, stated rather than measured.
- PCIE_ACTIVE_POWER_W = 15 W per offload or reload: host DRAM and the PCIe root complex during a 50 GB/s copy
  (DDR5 draws a few watts per DIMM under full bandwidth, several DIMMs are involved). A modelling constant.

Every policy pays these the same way; they are small next to GPU power (hundreds of watts per GPU), which is
why they only decide comparisons between policies that move very different amounts of KV.
"""

from __future__ import annotations

from conserve.core.llm import ModelShape
from conserve.core.offload import pcie_transfer_time_s
from conserve.core.perf import Link, kv_transfer_time_s

NIC_ACTIVE_POWER_W = 25.0
NIC_ENDS_PER_TRANSFER = 2
PCIE_ACTIVE_POWER_W = 15.0


def link_transfer_energy_j(model: ModelShape, tokens: int, link: Link) -> float:
    """Energy the NICs at both ends draw while `tokens` of KV cross the link."""
    return NIC_ACTIVE_POWER_W * NIC_ENDS_PER_TRANSFER * kv_transfer_time_s(model, tokens, link)


def pcie_transfer_energy_j(model: ModelShape, tokens: int) -> float:
    """Energy of the host path while `tokens` of KV move between GPU and host memory."""
    return PCIE_ACTIVE_POWER_W * pcie_transfer_time_s(model, tokens)
