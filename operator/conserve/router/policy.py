"""The router's decisions, as pure functions of what it knows (no HTTP, no Kubernetes, no clock).

- Which conversation a request belongs to: the `X-Conversation-Id` header; else the OpenAI `user` field, else
  `metadata.conversation_id` in the body. No id: a one-turn request, routed like the per-turn baseline.
- Where a turn goes (`plan_turn`):
  - conversation mode (ConServe): every turn goes to the decoder the operator pinned; where its prompt is prefilled
    is the P/D decider's choice for that turn (`conserve.core.pd.decide`, with the live signals of
    conserve.router.signals): on the prefill server it names, whose KV the decoder then pulls (one KV transfer), or
    on the decoder itself (the new tokens when it holds the conversation's KV, else the whole prompt).
  - per-turn mode (the baselines): every turn is placed on its own: the least-loaded prefill server prefills the
    whole context and the least-loaded decoder pulls the KV. One transfer per turn.
- Least loaded: fewest requests in flight from this router, then fewest tokens in flight, then the name.
- Turn reports: `UsageBatcher` coalesces the cumulative counters of `spec.usage` so each conversation is patched
  at most once per interval.
- A turn whose conversation gets no decoder (`not_placed`): a busy pool (the operator refused the conversation
  after its queue wait, or at once with `whenFull: Reject`; or the router's own wait, the pool's
  `maxQueueWaitSeconds` and a margin, ended while it still waits for capacity) is HTTP 429 with `Retry-After`;
  anything else (no such pool, an invalid one, no word from the operator) is a fault, HTTP 503.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conserve.core.decisions import PrefillSite, Reason
from conserve.core.pd import PdChoice

CONVERSATION_HEADER = "X-Conversation-Id"
#: "true" on a conversation's last turn: the router marks it completed after the turn.
END_HEADER = "X-Conversation-End"
#: "false" on a turn whose output the user does not see (an agent's tool call); TTFET waits for a visible one.
EFFECTIVE_HEADER = "X-Conserve-Effective"
#: Overrides the router's routing mode for this request ("conversation" or "per-turn").
MODE_HEADER = "X-Conserve-Routing"
#: Names the DecoderPool (default: the router's --pool).
POOL_HEADER = "X-Conserve-Pool"
#: Names the conversation's SLO class (the pool's spec.slo.classes), on its first turn: its Conversation's sloClass.
SLO_CLASS_HEADER = "X-Conserve-Slo-Class"
#: Response headers: which decoder and prefill server served the turn, where its prompt was prefilled ("pool" or
#: "decoder"), and the placement generation followed.
DECODER_RESPONSE_HEADER = "X-Conserve-Decoder"
PREFILL_RESPONSE_HEADER = "X-Conserve-Prefill"
PREFILL_SITE_RESPONSE_HEADER = "X-Conserve-Prefill-Site"
GENERATION_RESPONSE_HEADER = "X-Conserve-Placement-Generation"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Mode(enum.StrEnum):
    CONVERSATION = "conversation"
    PER_TURN = "per-turn"


def parse_mode(value: str | None, default: Mode) -> Mode:
    if not value:
        return default
    try:
        return Mode(value.strip().lower())
    except ValueError:
        return default


def header_flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return default


def conversation_id_of(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    value = headers.get(CONVERSATION_HEADER)
    if value and value.strip():
        return value.strip()
    user = body.get("user")
    if isinstance(user, str) and user.strip():
        return user.strip()
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping):
        cid = metadata.get("conversation_id")
        if isinstance(cid, str) and cid.strip():
            return cid.strip()
    return None


_NAME_BAD = re.compile(r"[^a-z0-9-]+")


def conversation_object_name(conversation_id: str, prefix: str = "r", *, scope: str = "") -> str:
    """A DNS-1123 name for the Conversation object: a readable slug plus a hash (ids may be any string); a `scope`
    (the identity that owns it, `conserve.router.auth.owned_name`) is hashed in too."""
    hashed = f"{scope}\0{conversation_id}" if scope else conversation_id
    digest = hashlib.sha256(hashed.encode()).hexdigest()[:10]
    slug = _NAME_BAD.sub("-", conversation_id.lower()).strip("-")[:40].strip("-")
    return f"{prefix}-{slug}-{digest}" if slug else f"{prefix}-{digest}"


@dataclass(frozen=True, slots=True)
class Backend:
    """A prefill or decode server: its pod name and host:port."""

    name: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class Placement:
    """What the operator decided for a conversation (from its status)."""

    generation: int
    decoder: Backend
    prefill: Backend | None = None


@dataclass
class LoadBook:
    """Requests and tokens this router has in flight per endpoint (the baselines' least-load signal)."""

    requests: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def start(self, endpoint: str, tokens: int) -> None:
        self.requests[endpoint] = self.requests.get(endpoint, 0) + 1
        self.tokens[endpoint] = self.tokens.get(endpoint, 0) + tokens

    def finish(self, endpoint: str, tokens: int) -> None:
        self.requests[endpoint] = max(self.requests.get(endpoint, 0) - 1, 0)
        self.tokens[endpoint] = max(self.tokens.get(endpoint, 0) - tokens, 0)


def least_loaded(candidates: Iterable[Backend], book: LoadBook) -> Backend | None:
    ranked = sorted(
        (b for b in candidates if b.endpoint),
        key=lambda b: (book.requests.get(b.endpoint, 0), book.tokens.get(b.endpoint, 0), b.name),
    )
    return ranked[0] if ranked else None


@dataclass(frozen=True, slots=True)
class TurnPlan:
    decoder: Backend
    #: Prefill server for this turn, or None: the decoder prefills (new tokens only, or everything).
    prefill: Backend | None
    #: The placement generation this plan follows (0 in per-turn mode).
    generation: int = 0

    @property
    def kv_transfer(self) -> bool:
        return self.prefill is not None

    @property
    def site(self) -> PrefillSite:
        return PrefillSite.POOL if self.prefill is not None else PrefillSite.DECODER


class NoBackend(Exception):
    """No decoder (or no placement) to send the turn to."""


def plan_turn(
    *,
    mode: Mode,
    placement: Placement | None,
    prefills: Sequence[Backend],
    decoders: Sequence[Backend],
    book: LoadBook,
    choice: PdChoice | None = None,
) -> TurnPlan:
    """Where this turn goes. Per-turn mode: the least-loaded decoder and prefill server. Conversation mode: the
    placement's decoder, and the prefill server the decider chose (`choice`; none, or one no longer ready: the
    decoder prefills)."""
    if mode is Mode.PER_TURN:
        decoder = least_loaded(decoders, book)
        if decoder is None:
            raise NoBackend("no ready decoder in the pool")
        return TurnPlan(decoder, least_loaded(prefills, book), 0)
    if placement is None:
        raise NoBackend("conversation not placed")
    server = choice.server if choice is not None and choice.on_pool else None
    return TurnPlan(placement.decoder, backend_named(prefills, server), placement.generation)


def backend_named(backends: Iterable[Backend], name: str | None) -> Backend | None:
    """The server called `name` (with an endpoint) among `backends`."""
    return next((b for b in backends if name is not None and b.name == name and b.endpoint), None)


def new_input_tokens(prompt_tokens: int, previous_context_tokens: int) -> int:
    """A turn's new input: its prompt minus the context the conversation already had (prompt + output)."""
    return max(prompt_tokens - previous_context_tokens, 0) if previous_context_tokens else prompt_tokens


# ---- turn reports ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Cumulative counters, as `spec.usage` holds them."""

    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    last_turn_time: str | None = None
    ttfet_s: float | None = None
    prefill_pod: str | None = None  # the prefill server that actually ran the first turn
    pool_prefills: int = 0  # turns prefilled on a prefill server (the rest on the decoder)
    slo_missed_turns: int = 0  # turns that missed the conversation's SLO (`conserve.router.slo`)

    def as_patch(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "turns": self.turns,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
        }
        if self.last_turn_time is not None:
            usage["lastTurnTime"] = self.last_turn_time
        if self.ttfet_s is not None:
            usage["timeToFirstEffectiveTokenSeconds"] = round(self.ttfet_s, 6)
        if self.prefill_pod:
            usage["prefillPod"] = self.prefill_pod
        if self.pool_prefills:
            usage["poolPrefills"] = self.pool_prefills
        if self.slo_missed_turns:
            usage["sloMissedTurns"] = self.slo_missed_turns
        return {"spec": {"usage": usage}}


@dataclass
class _Pending:
    usage: Usage
    dirty: bool = False
    last_flush_s: float | None = None
    completed: bool = False  # a completion to send (with or after the final usage)
    completed_at_s: float = 0.0


#: Usage patches per conversation at most this often (and one at its end), not one per turn: the operator reads
#: decoders' live KV from the engines' metrics, so usage only feeds idle timeouts, phase Idle and the growth
#: history. Half the operator's default --idle-phase-after (60 s), so a conversation with turns never shows Idle.
USAGE_INTERVAL_S = 30.0


class UsageBatcher:
    """Coalesces usage reports: one patch per conversation per `interval_s` at most, the latest counters win."""

    def __init__(self, interval_s: float, *, periodic: bool = True, completion_hold_s: float = 0.0) -> None:
        self.interval_s = interval_s
        #: False: the turns are streamed to the operator (router.usage_stream); a patch only for a completion the
        #: operator has not acknowledged within `completion_hold_s` (`forget` drops an acknowledged one), and at
        #: the router's stop (`force`).
        self.periodic = periodic
        self.completion_hold_s = completion_hold_s
        self._pending: dict[str, _Pending] = {}

    def record(self, name: str, usage: Usage) -> None:
        entry = self._pending.setdefault(name, _Pending(usage))
        entry.usage = usage
        entry.dirty = True

    def complete(self, name: str, now_s: float = 0.0) -> None:
        entry = self._pending.setdefault(name, _Pending(Usage()))
        entry.completed = True
        entry.completed_at_s = now_s

    def due(self, now_s: float, *, force: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """Patches to send now (merge patches). Completed conversations are flushed at once and forgotten."""
        out: list[tuple[str, dict[str, Any]]] = []
        for name in list(self._pending):
            entry = self._pending[name]
            ready = force or (entry.completed and now_s - entry.completed_at_s >= self.completion_hold_s)
            if self.periodic:
                ready = ready or entry.last_flush_s is None or now_s - entry.last_flush_s >= self.interval_s
            if not ready or not (entry.dirty or entry.completed):
                continue
            patch: dict[str, Any] = entry.usage.as_patch() if entry.dirty else {"spec": {}}
            if entry.completed:
                patch["spec"]["completed"] = True
                del self._pending[name]
            else:
                entry.dirty = False
                entry.last_flush_s = now_s
            out.append((name, patch))
        return out

    def forget(self, name: str) -> None:
        self._pending.pop(name, None)

    def __len__(self) -> int:
        return len(self._pending)


# ---- a conversation not placed --------------------------------------------------------------------------------

#: The router's wait for a first placement when it knows nothing of the pool (and the bound of `--placement-timeout`
#: before pools declared `placement.maxQueueWaitSeconds`).
DEFAULT_PLACEMENT_WAIT_S = 120.0
#: The router waits this much longer than the pool's limit, so that the operator's refusal (its periodic sweep, a
#: status write and the watch event) reaches the client rather than the router's own timeout.
PLACEMENT_WAIT_MARGIN_S = 5.0
#: Retry-After bounds (seconds).
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 30
#: Failed with these reasons: the operator refused the conversation because the pool was full (429).
REFUSED = frozenset({Reason.QUEUE_WAIT_EXCEEDED.value, Reason.SLO_UNATTAINABLE.value, Reason.NO_CAPACITY.value})
#: Still waiting for these reasons when the router's wait ends: a pool busy or short of decoders, whose capacity
#: comes back (429); the operator refuses these at the pool's limit too. Others (PoolNotFound, InvalidPool) are faults.
BUSY = frozenset({Reason.NO_CAPACITY.value, Reason.NO_READY_DECODER.value, Reason.NO_DECODER.value})


def placement_wait_s(timeout_flag_s: float | None, pool_max_wait_s: float | None) -> float:
    """How long a first turn waits for its placement: the pool's `maxQueueWaitSeconds` plus a margin, at most
    the router's `--placement-timeout` when given; that flag (else `DEFAULT_PLACEMENT_WAIT_S`) for a pool the router
    has not seen."""
    if pool_max_wait_s is None:
        return timeout_flag_s if timeout_flag_s is not None else DEFAULT_PLACEMENT_WAIT_S
    wait = pool_max_wait_s + PLACEMENT_WAIT_MARGIN_S
    return min(wait, timeout_flag_s) if timeout_flag_s is not None else wait


def retry_after_s(pool_max_wait_s: float | None) -> int:
    """When a refused client should try again: a quarter of the pool's queue limit, 1 to 30 s. Room comes back
    when another conversation ends, which nothing known at this point predicts (chats mostly end by idle timeout);
    a retry queues again and may wait up to the limit itself, so the hint only keeps retries from hammering."""
    limit = pool_max_wait_s if pool_max_wait_s is not None else DEFAULT_PLACEMENT_WAIT_S
    return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, math.ceil(limit / 4)))


@dataclass(frozen=True, slots=True)
class NotPlaced:
    """The answer to a turn whose conversation got no decoder."""

    status: int  # 429: the pool is busy, come back later; 503: a fault
    message: str
    reason: str  # the operator's condition reason ("" when it gave none)
    retry_after_s: int | None = None


def not_placed(
    conversation_id: str,
    pool: str,
    *,
    failed: bool,
    reason: str | None,
    detail: str,
    waited_s: float,
    pool_max_wait_s: float | None,
) -> NotPlaced:
    """A first turn without a placement. `failed`: the Conversation is Failed (or gone), `reason` and `detail` its
    condition's; else the router's wait of `waited_s` ended with the conversation waiting (`reason`: its Placed
    condition's, None when the operator has not written one)."""
    why = f"{reason}: {detail}" if reason and detail else reason or detail or "no word from the operator"
    if failed and reason in REFUSED:
        retry = retry_after_s(pool_max_wait_s)
        if reason in (Reason.QUEUE_WAIT_EXCEEDED.value, Reason.SLO_UNATTAINABLE.value):
            return NotPlaced(429, f"conversation {conversation_id} {detail}", reason, retry)
        return NotPlaced(429, f"conversation {conversation_id} refused by pool {pool} ({why})", reason, retry)
    if failed and reason == Reason.UNKNOWN_SLO_CLASS.value:  # the client's mistake (X-Conserve-Slo-Class)
        return NotPlaced(400, f"conversation {conversation_id} not placed ({why})", reason)
    if failed:
        return NotPlaced(503, f"conversation {conversation_id} not placed ({why})", reason or "")
    if reason in BUSY:
        message = f"conversation {conversation_id} waited {waited_s:.0f} s in the queue of pool {pool} ({why})"
        return NotPlaced(429, message, reason, retry_after_s(pool_max_wait_s))
    return NotPlaced(503, f"conversation {conversation_id} not placed after {waited_s:.0f} s ({why})", reason or "")
