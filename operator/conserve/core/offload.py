"""Idle KV offload to the pinned decoder's host memory: host tier sizes, PCIe costs and the engine-side rules
(pure, no I/O, no clock).

A pinned conversation idle between turns keeps its pin (same decoder, no network KV transfer). Under GPU KV
pressure its KV moves to the decoder node's host DRAM over PCIe, as vLLM's CPU KV offloading
(`OffloadingConnector`, `--kv-offloading-size`) and LMCache's local CPU backend do; its next turn reloads it
over PCIe before prefilling its new tokens on the decoder.

Who uses what: the scheduler's KV lifecycle (`conserve.core.lifecycle.plan_reclaim`, applied by
`core.residency`, the same in the operator and the simulator) takes its sizes and costs from here
(`HOST_KV_BYTES_PER_GPU`, `PCIE_GEN5_X16_BYTES_PER_S`, through `conserve.api.scheduling`). The simulated engine
uses `choose_offload_victims` for its own memory running out (`conserve.sim.engine`). `plan_placement_offload`
is the earlier placement-time rule, kept and tested but called by no adapter: the scheduler's placement-time
reclaim is `plan_reclaim`, which also drops the oldest host copies to make host room.

Decisions:
- **When**: on pressure only, never on an idle timer (the scheduler's default too: its timers are opt-in, see
  `conserve.core.lifecycle`): offloading is free while memory is plentiful only if it is never needed, and
  every offload costs a reload on the next turn. Pressure is (a) a new conversation that no decoder's GPU
  reservations can take, (b) an offloaded conversation's next turn that needs its GPU reservation back,
  (c) a decoder whose memory runs out while sequences grow or join (the simulator's last resorts, before
  drop-and-recompute).
- **Which**: idle conversations only (no turn in progress), least recently active first, only those whose
  host copy is complete (`ready_s`: the write-back after the turn took `pcie_transfer_time_s`; vLLM and
  LMCache write KV to the CPU asynchronously once a request finishes), only while the host has room. A
  conversation that does not fit the host is skipped; when no set of idle conversations frees enough, the
  answer is "none" and the caller falls back to what it did without offload (wait, or drop and recompute).
- **What counts as GPU-resident capacity**: the reservations (larger of reserved and live) of conversations
  not offloaded; offloaded ones hold host capacity, `kv_tokens` of them, their live size.
- **Reload**: on the conversation's next turn, on the same decoder, host to GPU over PCIe
  (`pcie_transfer_time_s`), before the new tokens are prefilled; the reload time is charged to that turn.

Constants (documented, not tuned):
- PCIe Gen5 x16 (H100/H200 SXM host link): 64 GB/s per direction theoretical (PCI-SIG, 32 GT/s x 16 lanes,
  128b/130b); about 50 GB/s is what host-device copies of pinned memory typically achieve (NVIDIA
  `bandwidthTest` / nvbandwidth results on H100 servers are reported at 50-55 GB/s). We take 50 GB/s.
- Host DRAM: a DGX H100 / DGX H200 has 2 TB of system memory for 8 GPUs, 250 GB per GPU. Half of it
  (125 GB per GPU) is given to KV offload; the rest stays for the OS, the serving process, pinned staging
  buffers and model loading. LMCache's and vLLM's CPU offload sizes are operator-chosen; this is our choice.
  A decoder of n GPUs gets n times it, in the operator and the simulator alike, unless the pool declares
  `kvLifecycle.hostKvTokensPerDecoder`.
- PCIe transfer energy (DMA engines, host memory power) is not modelled here (the simulator counts its host
  path: `conserve.sim.transfer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conserve.core.llm import ModelShape

PCIE_GEN5_X16_THEORETICAL_BYTES_PER_S = 64e9
PCIE_GEN5_X16_BYTES_PER_S = 50e9
HOST_DRAM_BYTES_PER_SERVER = 2e12
GPUS_PER_SERVER = 8
HOST_KV_FRACTION = 0.5
HOST_KV_BYTES_PER_GPU = HOST_DRAM_BYTES_PER_SERVER / GPUS_PER_SERVER * HOST_KV_FRACTION


def host_kv_capacity_tokens(
    model: ModelShape, gpu_count: int, host_kv_bytes_per_gpu: float = HOST_KV_BYTES_PER_GPU
) -> int:
    """KV tokens a decoder of `gpu_count` GPUs can keep in its node's host memory: its GPUs' count times one
    GPU's share in whole tokens, as the pool's scheduler sizes it (`api.scheduling`: host KV tokens per GPU)."""
    if host_kv_bytes_per_gpu <= 0:
        return 0
    return int(host_kv_bytes_per_gpu // model.kv_bytes_per_token) * max(gpu_count, 1)


def pcie_transfer_time_s(
    model: ModelShape, tokens: int, bandwidth_bytes_per_s: float = PCIE_GEN5_X16_BYTES_PER_S
) -> float:
    """Seconds to copy `tokens` of KV between GPU and host memory (one direction)."""
    if tokens <= 0:
        return 0.0
    return model.kv_bytes_per_token * tokens / bandwidth_bytes_per_s


@dataclass(frozen=True, slots=True)
class IdleKv:
    """An idle conversation resident on a decoder's GPU: an offload candidate."""

    conversation: str
    gpu_kv_tokens: int  # GPU capacity freed by offloading it (the ledger: larger of reserved and live)
    host_kv_tokens: int  # host capacity it takes (its live KV)
    last_active_s: float  # when its last turn ended
    ready_s: float = 0.0  # when its host copy is complete (last_active_s + write-back time)


def choose_offload_victims(
    candidates: Sequence[IdleKv], need_kv_tokens: int, host_free_kv_tokens: int, now_s: float
) -> tuple[str, ...]:
    """Idle conversations to offload, least recently active first, to free `need_kv_tokens` of GPU capacity.

    Only ready candidates (`ready_s <= now_s`) that fit the host's free room are taken. All or nothing: the
    empty tuple when `need_kv_tokens <= 0` or when no choice frees enough (offloading some would only cost
    reloads).
    """
    if need_kv_tokens <= 0:
        return ()
    chosen: list[str] = []
    freed = 0
    host_left = host_free_kv_tokens
    for c in sorted(candidates, key=lambda c: (c.last_active_s, c.conversation)):
        if c.ready_s > now_s or c.host_kv_tokens > host_left:
            continue
        chosen.append(c.conversation)
        freed += c.gpu_kv_tokens
        host_left -= c.host_kv_tokens
        if freed >= need_kv_tokens:
            return tuple(chosen)
    return ()


@dataclass(frozen=True, slots=True)
class DecoderOffloadView:
    """A decoder as the placement-time offload rule sees it."""

    name: str
    capacity_kv_tokens: int
    resident_reserved_kv_tokens: int  # GPU reservations of resident (not offloaded) conversations
    host_free_kv_tokens: int
    idle: tuple[IdleKv, ...]
    ready: bool = True


@dataclass(frozen=True, slots=True)
class OffloadPlan:
    decoder: str
    victims: tuple[str, ...]
    freed_kv_tokens: int


def plan_placement_offload(
    decoders: Sequence[DecoderOffloadView], reservation_kv_tokens: int, headroom_fraction: float, now_s: float
) -> OffloadPlan | None:
    """Make room for a new conversation's reservation by offloading idle conversations of one decoder.

    Called only when no decoder can take the reservation as it is. Per decoder, the missing room is
    reservation - (capacity - headroom - resident reservations); the decoder whose plan offloads the fewest
    GPU KV tokens wins (least disruption), ties by name. None when no decoder can make room.
    """
    best: OffloadPlan | None = None
    for d in decoders:
        if not d.ready:
            continue
        room = d.capacity_kv_tokens - int(d.capacity_kv_tokens * headroom_fraction) - d.resident_reserved_kv_tokens
        need = reservation_kv_tokens - room
        if need <= 0:
            return OffloadPlan(d.name, (), 0)
        victims = choose_offload_victims(d.idle, need, d.host_free_kv_tokens, now_s)
        if not victims:
            continue
        picked = set(victims)
        freed = sum(c.gpu_kv_tokens for c in d.idle if c.conversation in picked)
        if best is None or (freed, d.name) < (best.freed_kv_tokens, best.decoder):
            best = OffloadPlan(d.name, victims, freed)
    return best
