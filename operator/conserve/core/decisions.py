"""What the pool scheduler (`conserve.core.scheduler`) takes in and hands out: typed, no strings to compare."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from conserve.core.lifecycle import KvState


class Verdict(enum.StrEnum):
    PLACED = "placed"  # a new conversation got a decoder (and a prefill server)
    REPLACED = "replaced"  # moved off a lost decoder
    QUEUED = "queued"  # waits for capacity (or for its pool)
    FAILED = "failed"  # cannot be served (see the reason)
    RELEASED = "released"  # its hold on the pool ended
    EXTENDED = "extended"  # its reservation grew in place
    OUTGROWN = "outgrown"  # it outgrew its reservation and its decoder has no room: kept pinned
    IDLED = "idled"  # its active window passed: its KV stays on the GPU but is reclaimable
    OFFLOADED = "offloaded"  # its KV moved to its decoder's host memory
    RELOADED = "reloaded"  # its KV came back from host memory for a turn
    DROPPED = "dropped"  # its KV was discarded (host pressure, too large for the host, or the opt-in host TTL)
    REPREFILLED = "reprefilled"  # a turn after a drop: its context was prefilled again
    UNCHANGED = "unchanged"


class PrefillSite(enum.StrEnum):
    """Where a turn's prompt is prefilled: decided per turn outside the scheduler (the P/D decision), told to it."""

    DECODER = "decoder"  # on the pinned decoder itself (append-prefill; nothing moves)
    POOL = "pool"  # on the prefill pool; the new KV moves to the decoder


class Reason(enum.StrEnum):
    """Condition and Event reasons (the strings users see)."""

    PLACED = "Placed"
    REPLACED = "Replaced"
    NO_CAPACITY = "NoCapacity"
    NO_READY_DECODER = "NoReadyDecoder"
    NO_DECODER = "NoDecoder"
    POOL_NOT_FOUND = "PoolNotFound"
    INVALID_POOL = "InvalidPool"
    DECODER_LOST = "DecoderLost"
    QUEUE_WAIT_EXCEEDED = "QueueWaitExceeded"  # waited in the queue past its budget (core.admission)
    SLO_UNATTAINABLE = "SloUnattainable"  # its expected queue wait is past its budget: refused at once
    UNKNOWN_SLO_CLASS = "UnknownSloClass"  # names a class its pool does not declare
    COMPLETED = "Completed"
    DELETED = "Deleted"
    IDLE_TIMEOUT = "IdleTimeout"
    EXTENDED = "Extended"
    DECODER_FULL = "DecoderFull"
    ACTIVE_WINDOW = "ActiveWindow"
    ROOM_NEEDED = "RoomNeeded"
    RESIDENT_TTL = "ResidentTtl"
    HOST_TTL = "HostTtl"
    HOST_FULL = "HostFull"  # a host copy made way for a newer offload
    HOST_TOO_SMALL = "HostTooSmall"  # reclaimed KV larger than the decoder's whole host tier: dropped at once
    TURN = "Turn"


@dataclass(frozen=True, slots=True)
class ConversationRequest:
    """What is known of a conversation when it starts."""

    key: str  # "namespace/name" (the simulator: its conversation id)
    first_input_tokens: int
    priority: int = 0
    created_at_s: float = 0.0
    expected_turns: int | None = None
    idle_timeout_s: float | None = None  # None: the pool's default
    slo_class: str | None = None  # its SLO class (None: the pool's default class, or the pool's own targets)


@dataclass(frozen=True, slots=True)
class Decision:
    conversation: str
    verdict: Verdict
    reason: Reason
    message: str = ""
    decoder: str | None = None
    reserved_kv_tokens: int = 0
    prefill: str | None = None  # set on a placement when the pool has a ready prefill server
    kv_state: KvState | None = None

    @property
    def placed(self) -> bool:
        return self.verdict in (Verdict.PLACED, Verdict.REPLACED)
