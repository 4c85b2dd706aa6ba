"""The Conversation custom resource (conserve.dev/v1alpha1, short name `conv`).

One chat or agent session. The client states what is known when it starts (the pool and the first turn's input
length); the operator pins it to one decoder and reports where in status. The data plane (the router, or a
person with kubectl) reports usage through `spec.usage`: cumulative counters, so a report is idempotent and
can be batched or retried:

    kubectl patch conv chat-1 --type merge -p '{"spec":{"usage":{"turns":2,"inputTokens":1900,"outputTokens":410}}}'

`spec.completed: true` ends a conversation (its reservation is released once).
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import ConfigDict, Field, JsonValue

from conserve.api.common import CamelModel, Condition, NonNegativeInt, ServingPod, StatusModel, cel
from conserve.api.slo import CLASS_NAME_PATTERN

KIND = "Conversation"
PLURAL = "conversations"
SHORT_NAME = "conv"

MAX_INPUT_TOKENS = 10_000_000
#: Bounds of the cumulative usage counters: sums over every conversation of a pool stay far inside int64.
MAX_USAGE_TOKENS = 100_000_000_000
MAX_TURNS = 100_000_000
#: RFC 3339 times (e.g. 2026-12-06T10:20:08.123456+00:00 is 32 characters).
MAX_TIME_LENGTH = 64


class Phase(enum.StrEnum):
    PENDING = "Pending"  # waiting for a decoder (see the Placed condition's reason)
    PREFILLING = "Prefilling"  # placed; the first turn is being prefilled on the compute tier
    DECODING = "Decoding"  # turns are being served on the pinned decoder
    IDLE = "Idle"  # placed, no turn for a while; still holds its reservation until its idle timeout
    COMPLETED = "Completed"  # ended; reservation released
    FAILED = "Failed"  # cannot be served (see conditions)


TERMINAL_PHASES = frozenset({Phase.COMPLETED, Phase.FAILED})


# Usage counters are cumulative: a report is idempotent, and a lower value is a bug or a stale retry.
_CUMULATIVE = cel("self >= oldSelf", "is cumulative and cannot decrease")
DATE_TIME: dict[str, JsonValue] = {"format": "date-time"}
MAX_TTFET_SECONDS = 366 * 24 * 3600


class ConversationUsage(CamelModel):
    """Cumulative usage reported by the data plane. Counters only grow; a lower value is refused."""

    turns: NonNegativeInt = Field(0, le=MAX_TURNS, description="Turns served so far.", json_schema_extra=_CUMULATIVE)
    input_tokens: NonNegativeInt = Field(
        0,
        le=MAX_USAGE_TOKENS,
        description="Sum of every turn's new input tokens (the first included).",
        json_schema_extra=_CUMULATIVE,
    )
    output_tokens: NonNegativeInt = Field(
        0, le=MAX_USAGE_TOKENS, description="Sum of every turn's output tokens.", json_schema_extra=_CUMULATIVE
    )
    last_turn_time: str | None = Field(
        None, max_length=MAX_TIME_LENGTH, description="RFC 3339 time of the latest turn.", json_schema_extra=DATE_TIME
    )
    time_to_first_effective_token_seconds: float | None = Field(
        None,
        ge=0,
        le=MAX_TTFET_SECONDS,
        description="Measured by the data plane: start of the conversation to first visible output.",
    )
    pool_prefills: NonNegativeInt = Field(
        0,
        le=MAX_TURNS,
        description="Turns whose prompt was prefilled on a prefill server (its KV then moved to the decoder), as the "
        "P/D decider chose per turn; the other turns were prefilled on the decoder itself.",
        json_schema_extra=_CUMULATIVE,
    )
    slo_missed_turns: NonNegativeInt = Field(
        0,
        le=MAX_TURNS,
        description="Turns that missed the conversation's SLO (its pool's spec.slo, its class's targets), as the data "
        "plane measured them: a turn's first visible token later than the TTFET target after its arrival, or its "
        "tokens further apart than the TBT target on average.",
        json_schema_extra=_CUMULATIVE,
    )
    prefill_pod: str | None = Field(
        None,
        max_length=253,
        description="The prefill server that ran the first turn, as the data plane used it (its early prefill may "
        "start before placement). status.prefill follows it, and so does the attribution of prefill energy.",
    )


class ConversationSpec(CamelModel):
    pool: str = Field(
        min_length=1,
        max_length=253,
        description="Name of the DecoderPool in this namespace.",
        json_schema_extra=cel("self == oldSelf", "is immutable"),
    )
    first_turn_input_tokens: int = Field(
        ge=1,
        le=MAX_INPUT_TOKENS,
        description="Input length of the first turn in tokens; drives the reservation.",
        json_schema_extra=cel("self == oldSelf", "is immutable"),
    )
    expected_turns: int | None = Field(None, ge=1, le=100_000, description="Hint: turns the client expects.")
    first_effective_token_slo_seconds: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="Hint, not enforced: the client's own target time to first effective token (the pool's "
        "spec.slo, through sloClass, is what admission and attainment use).",
    )
    slo_class: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=CLASS_NAME_PATTERN,
        description="The pool's SLO class (spec.slo.classes) this conversation belongs to: its queue priority and "
        "targets (default: the pool's defaultClass). A class the pool does not declare fails the conversation "
        "(reason UnknownSloClass).",
        json_schema_extra=cel("self == oldSelf", "is immutable"),
    )
    priority: int = Field(
        0, ge=-1000, le=1000, description="Higher is placed first when capacity is short (within its SLO class)."
    )
    idle_timeout_seconds: int | None = Field(
        None, ge=1, le=7 * 24 * 3600, description="Release after this long without a turn (default: the pool's)."
    )
    completed: bool = Field(
        False,
        description="Set by the client when the conversation has ended; its reservation is then released.",
        json_schema_extra=cel("self || !oldSelf", "cannot be unset once true"),
    )
    usage: ConversationUsage = Field(default_factory=ConversationUsage)


#: Bounds of the status the operator writes (a status written by anyone else is held to them too).
MAX_ENDPOINT_LENGTH = 300
StatusTokens = Annotated[int, Field(ge=0, le=MAX_USAGE_TOKENS * 100)]
StatusCount = Annotated[int, Field(ge=0, le=MAX_TURNS * 100)]
StatusTime = Annotated[str | None, Field(max_length=MAX_TIME_LENGTH, json_schema_extra=DATE_TIME)]


class Endpoint(ServingPod):
    endpoint: str = Field("", max_length=MAX_ENDPOINT_LENGTH)  # host:port the data plane sends to


class ConversationStatus(StatusModel):
    # Not frozen: the operator's record of a conversation holds one and updates it as it decides.
    model_config = ConfigDict(frozen=False)

    phase: Phase = Phase.PENDING
    decoder: Endpoint | None = None
    prefill: Endpoint | None = None
    reserved_kv_tokens: StatusTokens = 0
    live_kv_tokens: StatusTokens = 0
    turns_served: StatusCount = 0
    input_tokens: StatusTokens = 0
    output_tokens: StatusTokens = 0
    kv_transfers: StatusCount = 0
    #: Bumped on every (re)placement so the data plane knows to follow a move.
    placement_generation: StatusCount = 0
    placed_at: StatusTime = None
    completed_at: StatusTime = None
    #: Latest turn (or placement): the idle timeout counts from here.
    last_activity_time: StatusTime = None
    energy_joules: float | None = None
    energy_per_token_joules: float | None = None
    time_to_first_effective_token_seconds: float | None = None
    #: KV lifecycle on the pinned decoder: Active, Idle (resident, evictable), Offloaded (host memory), Dropped.
    kv_state: str | None = Field(None, max_length=32)
    offloads: StatusCount = 0
    reloads: StatusCount = 0
    reprefills: StatusCount = 0
    #: Where the served turns were prefilled (the P/D decider's choices, as the data plane reports them).
    pool_prefills: StatusCount = 0
    decoder_prefills: StatusCount = 0
    #: Its SLO class ("" for the pool's own targets; None: the pool has no SLO) and the turns that missed it.
    slo_class: str | None = Field(None, max_length=63)
    slo_missed_turns: StatusCount = 0
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


#: The status fields the operator writes: all but the energy loop's (energyJoules, energyPerTokenJoules).
OPERATOR_STATUS_FIELDS = frozenset(ConversationStatus.model_fields) - {"energy_joules", "energy_per_token_joules"}
