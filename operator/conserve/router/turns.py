"""The router's vocabulary: its configuration, a conversation's state, a turn's request, early prefill, start, result
and error."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conserve.router.auth import ANONYMOUS, Identity
from conserve.router.policy import USAGE_INTERVAL_S, Backend, Mode, Usage


@dataclass(frozen=True, slots=True)
class RouterConfig:
    namespace: str = "default"
    pool: str = "default"
    mode: Mode = Mode.CONVERSATION
    usage_interval_s: float = USAGE_INTERVAL_S
    #: The operator's turn-report endpoint (router.usage_stream), e.g. http://conserve-operator:9102; None:
    #: spec.usage patches every `usage_interval_s` instead. The token's file goes with it.
    usage_endpoint: str | None = None
    usage_token_file: str | None = None
    #: Forget a conversation's router state after this long without a turn (None: its pool's idle timeout,
    #: after which the operator has ended it). Memory only: the operator owns the idle timeout.
    idle_close_s: float | None = None
    #: Upper bound of a first turn's wait for its placement; None: the pool's maxQueueWaitSeconds and a margin
    #: (`policy.placement_wait_s`). Also the wait for a re-placement (`policy.DEFAULT_PLACEMENT_WAIT_S` if None).
    placement_timeout_s: float | None = None
    early_prefill: bool = True
    #: Seconds between scrapes of the servers' /metrics for the P/D decider (0: no scrape; the router's own
    #: requests in flight and observed speeds only).
    scrape_interval_s: float = 1.0
    #: Optional hints copied into every Conversation this router creates.
    idle_timeout_seconds: int | None = None


@dataclass
class ConversationState:
    conversation_id: str
    name: str
    mode: Mode
    started_s: float
    owner: str = ""  # the identity that created it ("" for the anonymous caller of `--auth none`)
    created: asyncio.Task[None] | None = None
    #: Its Conversation ended without a placement (refused, failed or deleted): the next turn replaces the object.
    refused: bool = False
    kv_generation: int | None = None  # placement generation whose decoder holds the KV
    pool: str = ""  # the pool its turns go to
    context_tokens: int = 0  # previous turn's prompt plus output
    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    ttfet_s: float | None = None
    last_turn_s: float = 0.0
    prefill_pod: str | None = None  # who ran the first turn's prefill (reported: the operator's status follows)
    pool_prefills: int = 0  # its turns prefilled on a prefill server (the P/D decider's "pool")
    slo_class: str | None = None  # X-Conserve-Slo-Class of its first turn (its Conversation's spec.sloClass)
    slo_missed_turns: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def usage(self, last_turn_time: str) -> Usage:
        """Its cumulative counters, as reported in `spec.usage`."""
        return Usage(
            self.turns,
            self.input_tokens,
            self.output_tokens,
            last_turn_time,
            self.ttfet_s,
            self.prefill_pod,
            self.pool_prefills,
            self.slo_missed_turns,
        )


@dataclass
class TurnResult:
    conversation_id: str | None
    mode: Mode
    decoder: Backend
    prefill: Backend | None
    generation: int
    prompt_tokens: int
    completion_tokens: int = 0
    ttft_s: float | None = None
    ttfet_s: float | None = None
    text: str = ""
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class TurnStarted:
    """Yielded once the turn's servers are chosen (before its first chunk)."""

    decoder: Backend
    prefill: Backend | None
    generation: int


@dataclass(frozen=True, slots=True)
class TurnRequest:
    kind: str  # "chat" or "completions"
    headers: Mapping[str, str]
    body: dict[str, Any]
    identity: Identity = ANONYMOUS


class TurnError(Exception):
    """A turn that cannot be served: its HTTP status, the message, and for a 429 when to try again (seconds) and
    the operator's reason."""

    def __init__(self, status: int, message: str, *, retry_after_s: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.code = code


@dataclass
class EarlyPrefill:
    """A first turn's prefill, started while the operator places the conversation."""

    backend: Backend
    task: asyncio.Task[dict[str, Any] | None]
    done_s: float | None = None  # when it finished (the placement wait exposed to the user ends there or later)

    def finished(self, now: float) -> None:
        self.done_s = now
