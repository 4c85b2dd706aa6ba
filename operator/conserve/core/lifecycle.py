"""The KV lifecycle of a pinned conversation: states, settings and the TTLs derived from observed gaps.

A pinned conversation's KV is in one of four states (`KvState`):
- **active**: a turn is in flight or expected soon: from placement until its first turn is reported, and for
  the active window after each turn (in the simulator also from a turn's arrival to its end). Its reservation
  counts against the decoder's GPU capacity and is never evicted.
- **idle** (resident): its KV is still on the decoder's GPU, but evictable: placement and admission count it
  as reclaimable room. It is offloaded when room is needed (memory pressure), never on a timer by default.
- **offloaded**: its KV sits in the decoder node's host memory (vLLM's OffloadingConnector, LMCache's CPU
  backend): no GPU capacity, host capacity of its live size. Its next turn reloads it over PCIe.
- **dropped**: its KV is gone (the host needed room for a newer offload, or it never fit the host); its next
  turn is prefilled again.
A conversation with a turn in flight (arrived, queued or running) is never idled, offloaded or dropped.
The pin (decoder affinity) outlives residency: the next turn always goes back to its decoder; only the
conversation's release (completed, deleted, idle past its idle timeout) ends the pin.

Offload and drop happen on memory pressure only (a placement or a reload that needs GPU room, a host that
needs room for a newer offload). Timers cost a reload on every next turn that comes after them and free memory
nobody asked for: on the agentic bench, offloads on the resident TTL at 31% KV use were all timer-driven and
lost TTFET and tokens per J (issue 23). A pool can still opt into timers (`maxResidentTtlSeconds`,
`maxHostTtlSeconds`); unset, there are none.

Windows and TTLs: observe, do not predict. The active window is the 10th percentile of the inter-turn gaps
observed in the pool (a tenth of next turns, tool loops and quick replies, come back before their KV becomes
evictable); an opted-in resident TTL is the median of the gaps (half of next turns find their KV still on the
GPU), an opted-in host TTL the 90th percentile; each bounded by the pool's limit. Until MIN_GAP_OBSERVATIONS
gaps are seen, the limits themselves are used.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from conserve.core.reservation import quantile

ACTIVE_WINDOW_QUANTILE = 0.1
RESIDENT_TTL_QUANTILE = 0.5
HOST_TTL_QUANTILE = 0.9
MIN_GAP_OBSERVATIONS = 10
GAP_HISTORY_LIMIT = 256
#: Upper bounds when the pool sets none (the DecoderPool defaults use the same numbers).
DEFAULT_MAX_ACTIVE_WINDOW_S = 10.0


class KvState(enum.StrEnum):
    ACTIVE = "Active"
    IDLE = "Idle"
    OFFLOADED = "Offloaded"
    DROPPED = "Dropped"


@dataclass(frozen=True, slots=True)
class LifecycleSettings:
    enabled: bool = True
    #: Host KV tokens per decoder GPU: a decoder of n GPUs holds n times this in its node's host memory
    #: (0: no host tier: reclaimed KV is dropped instead of offloaded) ...
    host_kv_tokens_per_gpu: int = 0
    #: ... unless the pool declares one figure per decoder.
    host_kv_tokens_per_decoder: int | None = None
    max_active_window_s: float = DEFAULT_MAX_ACTIVE_WINDOW_S
    #: Opt-in timers (None: offload and drop on memory pressure only).
    max_resident_ttl_s: float | None = None
    max_host_ttl_s: float | None = None
    #: Seconds to write one KV token back to host memory (its host copy is complete this long after its turn).
    writeback_s_per_kv_token: float = 0.0


@dataclass(slots=True)
class GapHistory:
    """Observed gaps between a conversation's turns (seconds), newest last, bounded."""

    gaps_s: deque[float] = field(default_factory=lambda: deque(maxlen=GAP_HISTORY_LIMIT))
    _sorted: list[float] | None = None

    def observe(self, gap_s: float) -> None:
        if gap_s >= 0:
            self.gaps_s.append(gap_s)
            self._sorted = None

    def extend(self, gaps: Iterable[float]) -> None:
        for gap in gaps:
            self.observe(gap)

    def _quantile(self, q: float) -> float | None:
        if len(self.gaps_s) < MIN_GAP_OBSERVATIONS:
            return None
        if self._sorted is None:
            self._sorted = sorted(self.gaps_s)
        return quantile(self._sorted, q)

    def active_window_s(self, settings: LifecycleSettings) -> float:
        observed = self._quantile(ACTIVE_WINDOW_QUANTILE)
        return settings.max_active_window_s if observed is None else min(observed, settings.max_active_window_s)

    def resident_ttl_s(self, settings: LifecycleSettings) -> float | None:
        """None when the pool set no resident TTL (pressure only)."""
        return self._bounded(RESIDENT_TTL_QUANTILE, settings.max_resident_ttl_s)

    def host_ttl_s(self, settings: LifecycleSettings) -> float | None:
        """None when the pool set no host TTL (pressure only)."""
        return self._bounded(HOST_TTL_QUANTILE, settings.max_host_ttl_s)

    def _bounded(self, q: float, limit_s: float | None) -> float | None:
        if limit_s is None:
            return None
        observed = self._quantile(q)
        return limit_s if observed is None else min(observed, limit_s)


@dataclass(frozen=True, slots=True)
class Resident:
    """An idle conversation resident on a decoder's GPU: a reclaim candidate."""

    conversation: str
    gpu_kv_tokens: int  # GPU capacity it frees
    host_kv_tokens: int  # host capacity it takes when offloaded (its live size)
    last_active_s: float


@dataclass(frozen=True, slots=True)
class ReclaimPlan:
    """GPU room made on one decoder: idle conversations offloaded, and host copies dropped to fit them (or idle
    conversations dropped outright when the host cannot hold them)."""

    offload: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    freed_kv_tokens: int = 0


def plan_reclaim(
    idle: Sequence[Resident],
    offloaded: Sequence[Resident],
    need_kv_tokens: int,
    host_capacity_kv_tokens: int,
    host_used_kv_tokens: int,
    now_s: float,
    writeback_s_per_kv_token: float = 0.0,
) -> ReclaimPlan | None:
    """Free `need_kv_tokens` of GPU KV on one decoder from its idle conversations, least recently active first.

    Each victim goes to host memory when it fits there (the oldest host copies are dropped to make host room);
    otherwise it is dropped. Victims whose write-back is not done are not reclaimable yet. All or nothing:
    None when the idle conversations together cannot free enough (reclaiming some would only cost reloads)."""
    if need_kv_tokens <= 0:
        return ReclaimPlan()
    # Only conversations whose write-back to host memory is done can go (vLLM and LMCache write KV to the CPU
    # asynchronously once a request finishes).
    idle = [c for c in idle if c.last_active_s + c.host_kv_tokens * writeback_s_per_kv_token <= now_s]
    if sum(c.gpu_kv_tokens for c in idle) < need_kv_tokens:
        return None
    host_queue = sorted(offloaded, key=lambda c: (c.last_active_s, c.conversation))
    host_used = host_used_kv_tokens
    offload: list[str] = []
    drop: list[str] = []
    freed = 0
    for c in sorted(idle, key=lambda c: (c.last_active_s, c.conversation)):
        if freed >= need_kv_tokens:
            break
        freed += c.gpu_kv_tokens
        if c.host_kv_tokens > host_capacity_kv_tokens:
            drop.append(c.conversation)
            continue
        while host_used + c.host_kv_tokens > host_capacity_kv_tokens and host_queue:
            oldest = host_queue.pop(0)
            if oldest.conversation in offload:  # offloaded by this plan, then pushed out by a later victim
                offload.remove(oldest.conversation)
            drop.append(oldest.conversation)
            host_used -= oldest.host_kv_tokens
        offload.append(c.conversation)
        host_used += c.host_kv_tokens
        host_queue.append(c)  # now the newest host copy
    return ReclaimPlan(tuple(offload), tuple(drop), freed)
