"""A Conversation status the operator did not write: how to tell, and what the ledger takes instead.

The operator's ledger is rebuilt from the API server on start, and the status is where its decisions live; but
anyone allowed to write `conversations/status` can write there too. So the status is checked against what the
operator can tell for itself before it is believed: the spec (the client's and the data plane's), the clock, and
its own recent writes while it runs. Pure: callers bring the facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from conserve.core.decisions import Reason

#: The reasons the operator fails a conversation with (condition Placed=False): a queue wait past its budget, an
#: expected wait past it (SLO), a class its pool does not declare, a full pool with `whenFull: Reject`, and a lost
#: decoder (earlier versions).
FAILURE_REASONS = frozenset(
    r.value
    for r in (
        Reason.QUEUE_WAIT_EXCEEDED,
        Reason.SLO_UNATTAINABLE,
        Reason.UNKNOWN_SLO_CLASS,
        Reason.NO_CAPACITY,
        Reason.DECODER_LOST,
    )
)


@dataclass(frozen=True, slots=True)
class AdoptedFacts:
    """What the operator knows of a conversation besides its status."""

    phase: str
    spec_completed: bool
    deleting: bool
    #: Seconds since its latest turn (spec.usage.lastTurnTime), else since its creation.
    idle_for_s: float
    idle_timeout_s: float
    #: Condition type -> (status, reason) as the status gives them.
    conditions: Mapping[str, tuple[str, str]]


def forged_end(facts: AdoptedFacts) -> str | None:
    """Why the status's end (phase Completed or Failed) cannot be the operator's decision; None when it may be.

    The operator completes a conversation when its client says so (spec.completed), when it is deleted, or after
    its idle timeout; it fails one only with a Placed=False condition naming one of `FAILURE_REASONS`."""
    if facts.phase == "Completed":
        if facts.spec_completed or facts.deleting or facts.idle_for_s >= facts.idle_timeout_s:
            return None
        return (
            f"status.phase Completed, but spec.completed is false and its last turn was {facts.idle_for_s:.0f} s ago, "
            f"within its idle timeout of {facts.idle_timeout_s:g} s"
        )
    if facts.phase == "Failed":
        placed = facts.conditions.get("Placed")
        if placed is not None and placed[0] == "False" and placed[1] in FAILURE_REASONS:
            return None
        return "status.phase Failed without a Placed=False condition giving the operator's reason"
    return None


def reservation_floor(first_turn_input_tokens: int, live_kv_tokens: int) -> int:
    """The least a placed conversation holds: the operator never reserves less than its first turn's input, nor
    less than its live context (a reservation it outgrew counts as the live context)."""
    return max(first_turn_input_tokens, live_kv_tokens, 1)


StatusPrint = tuple[str, str, str, int, int]


def status_print(
    phase: str, decoder: str | None, endpoint: str | None, reserved_kv_tokens: int, generation: int
) -> StatusPrint:
    """The fields of a Conversation status that carry the operator's decision (phase, decoder and its address,
    reservation, placement generation): equal prints, same decision."""
    return (phase, decoder or "", endpoint or "", reserved_kv_tokens, generation)


def foreign(seen: StatusPrint, current: StatusPrint, written: tuple[StatusPrint, ...]) -> bool:
    """Whether a status seen on the object was written by someone else: it is neither the operator's current
    decision nor one it wrote lately (a late echo of its own earlier write is not foreign)."""
    return seen != current and seen not in written
