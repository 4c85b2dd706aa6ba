"""What a pool's scheduler is configured with, and what it answers: the read-only view adapters use.

`PoolScheduler` (core/scheduler.py) owns a pool's state (the decoder table and reservations, the conversations'
records, the queue, the growth and turn-gap histories, the engines' readings) in private attributes, and changes
it only in its event methods (admit, adopt, usage_observed, turn_started, release, kv_offloaded, sweep, ...).
Adapters (the operator's records, status and metrics; the simulator's policy) read it through `SchedulerView`,
its base class here: every answer is a copy, a frozen snapshot or a number, so nothing read can change a
decision. A unit test (tests/unit/test_scheduler_view_boundary.py) fails when an adapter reaches past it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from conserve.core.admission import queue_budget_s
from conserve.core.decisions import ConversationRequest, Reason
from conserve.core.ledger import CapacityLedger
from conserve.core.lifecycle import GapHistory, KvState, LifecycleSettings
from conserve.core.occupancy import ObservedReadings
from conserve.core.pending import order_pending
from conserve.core.placement import DecoderState, PlacementSettings, largest_placeable_kv_tokens
from conserve.core.reservation import GrowthHistory
from conserve.core.residency import ConversationView, DecoderLifecycle, Residency
from conserve.core.slo import SloClass, SloPolicy

DEFAULT_IDLE_TIMEOUT_S = 1800.0


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    placement: PlacementSettings = field(default_factory=PlacementSettings)
    reject_when_full: bool = False  # DecoderPool placement.whenFull: Reject
    default_idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    #: An engine's occupancy reading older than this is ignored (the ledger decides): core/occupancy.py.
    observed_max_age_s: float = 10.0
    #: A lost decoder's conversations that fit nowhere wait in the queue again instead of failing with
    #: `DecoderLost` (the operator and the simulator alike; False only to reproduce the old rule).
    requeue_lost_conversations: bool = True
    #: The longest wait in the queue (the pool's placement.maxQueueWaitSeconds; inf: no limit).
    max_queue_wait_s: float = float("inf")
    #: The pool's SLO (`spec.slo`): queue order across classes and each class's wait budget (core/admission.py).
    slo: SloPolicy | None = None


@dataclass(frozen=True, slots=True)
class Holding:
    """A conversation's hold on a decoder: its reservation and live KV (tokens), and whether that KV is off
    the GPU (offloaded to the decoder's host memory, or dropped)."""

    decoder: str
    reserved_kv_tokens: int
    live_kv_tokens: int
    offloaded: bool = False


@dataclass(frozen=True, slots=True)
class ConversationSnapshot:
    """One conversation as the scheduler holds it, at the moment it was asked."""

    request: ConversationRequest
    holding: Holding | None  # None: not placed (waiting in the queue, or between a release and its end)
    queued: bool  # waits in the queue
    kv_state: KvState
    turns: int
    live_kv_tokens: int
    last_activity_s: float | None
    in_flight: bool  # a turn arrived and has not ended: never idled, offloaded, dropped or timed out
    offloads: int
    reloads: int
    reprefills: int
    remote_prefills: int  # later turns prefilled on the prefill pool
    told_waiting: bool  # a QUEUED decision was handed out for it

    @property
    def key(self) -> str:
        return self.request.key


class SchedulerView:
    """Read-only queries over a pool scheduler's state; `PoolScheduler` sets the state and changes it."""

    _settings: SchedulerSettings
    _ledger: CapacityLedger  # the decoder table (capacity, tier, readiness, J/token) and every reservation
    _conversations: dict[str, ConversationView]
    _pending: dict[str, ConversationRequest]
    _growth: GrowthHistory
    _gaps: GapHistory
    _problem: tuple[Reason, str] | None
    _observed: ObservedReadings
    _kv: Residency
    _snapshot: list[DecoderState] | None  # the placement's decoder states, until the ledger changes
    _requeued_at: dict[str, float]  # conversations queued again after their decoder was lost: when

    # --- the pool --------------------------------------------------------------------------------------------
    @property
    def settings(self) -> SchedulerSettings:
        return self._settings

    @property
    def problem(self) -> tuple[Reason, str] | None:
        """Why the pool cannot place at all (no spec, invalid spec); None when it can."""
        return self._problem

    def decoders(self) -> list[DecoderState]:
        """The decoder table with each decoder's reservations, live KV and pinned conversations as the ledger
        holds them (the engines' readings not folded in), sorted by name."""
        return self._ledger.snapshot()

    def snapshot(self) -> list[DecoderState]:
        """The decoders as placement sees them: the ledger with fresh engine readings folded in."""
        return list(self._placement_states())

    def _placement_states(self) -> list[DecoderState]:
        if self._snapshot is None:
            self._snapshot = self._observed.fold(self._with_active_turns(self._ledger.snapshot()))
        return self._snapshot

    def _with_active_turns(self, states: list[DecoderState]) -> list[DecoderState]:
        """Each decoder's turns in flight: its conversations with a turn started and not ended, or a first turn
        not reported yet."""
        active: dict[str, int] = {}
        for key, view in self._conversations.items():
            if view.in_flight or view.turns == 0:
                held = self._ledger.holding(key)
                if held is not None:
                    active[held[0]] = active.get(held[0], 0) + 1
        if not active:
            return states
        return [replace(s, active_turns=active[s.name]) if s.name in active else s for s in states]

    def totals(self) -> Mapping[str, int]:
        """Capacity and reserved KV tokens over every decoder, and the conversations holding any."""
        return self._ledger.totals()

    # --- conversations ---------------------------------------------------------------------------------------
    def holding(self, key: str) -> Holding | None:
        """The conversation's decoder, reservation and live KV; None when it holds nothing."""
        held = self._ledger.holding(key)
        if held is None:
            return None
        return Holding(held[0], held[1], held[2], self._ledger.is_offloaded(key))

    def holdings(self) -> dict[str, Holding]:
        """Every conversation's hold (conversation key -> holding)."""
        return {
            key: Holding(h.decoder, h.reserved_kv_tokens, h.live_kv_tokens, h.offloaded)
            for key, h in self._ledger.holdings.items()
        }

    def conversation(self, key: str) -> ConversationSnapshot | None:
        """The conversation's record (KV state, turns, lifecycle counts, turn in flight) and its hold; None when
        the scheduler does not know it (never admitted, or released)."""
        view = self._conversations.get(key)
        if view is None:
            return None
        return ConversationSnapshot(
            view.request,
            self.holding(key),
            key in self._pending,
            view.kv_state,
            view.turns,
            view.live_kv_tokens,
            view.last_activity_s,
            view.in_flight,
            view.offloads,
            view.reloads,
            view.reprefills,
            view.remote_prefills,
            view.told_waiting,
        )

    def conversation_keys(self) -> list[str]:
        """Every conversation the scheduler knows (placed or queued), sorted."""
        return sorted(self._conversations)

    def conversations_on(self, decoder: str) -> list[str]:
        """The conversations holding KV on a decoder (pinned to it), sorted."""
        return self._ledger.conversations_on(decoder)

    def queue(self) -> list[str]:
        """The waiting conversations, in the order they get capacity."""
        return [r.key for r in self.queued_requests()]

    def queued_requests(self) -> list[ConversationRequest]:
        """The waiting conversations' requests, in the order they get capacity."""
        return order_pending(self._pending.values(), self._class_priority)

    def slo_class_of(self, request: ConversationRequest) -> SloClass | None:
        """The conversation's SLO class in this pool (None: the pool has no SLO, or the class is unknown)."""
        return self._settings.slo.resolve(request.slo_class) if self._settings.slo is not None else None

    def queue_budget_s(self, request: ConversationRequest) -> float:
        """How long the conversation may wait in the queue (`core.admission.queue_budget_s`)."""
        return queue_budget_s(self.slo_class_of(request), self._settings.max_queue_wait_s)

    def _class_priority(self, request: ConversationRequest) -> int:
        slo_class = self.slo_class_of(request)
        return slo_class.priority if slo_class is not None else 0

    def waiting_since(self, request: ConversationRequest) -> float:
        """When the conversation's current wait in the queue began: its creation, or the loss of its decoder."""
        return max(request.created_at_s, self._requeued_at.get(request.key, request.created_at_s))

    @property
    def pending_count(self) -> int:
        """How many conversations wait in the queue."""
        return len(self._pending)

    # --- KV lifecycle, per decoder ---------------------------------------------------------------------------
    def lifecycle_on(self, decoder: str) -> DecoderLifecycle:
        return self._kv.lifecycle_on(decoder)

    def host_used_on(self, decoder: str) -> int:
        return self._kv.host_used_on(decoder)

    def host_capacity_on(self, decoder: str) -> int:
        """The decoder's host KV tier in tokens (the pool's per-decoder figure, else per GPU x its GPUs)."""
        return self._kv.host_capacity_on(decoder)

    # --- what the pool observed, and the windows derived from it ---------------------------------------------
    @property
    def growth_ratios(self) -> list[float]:
        """The per-turn growth ratios observed, newest last (the pool status keeps them for a restart)."""
        return list(self._growth.ratios)

    @property
    def turn_gaps_s(self) -> list[float]:
        """The gaps between turns observed (seconds), newest last (the pool status keeps them for a restart)."""
        return list(self._gaps.gaps_s)

    def active_window_s(self) -> float:
        """How long after a turn a conversation's KV stays active (not reclaimable)."""
        return self._gaps.active_window_s(self._settings.lifecycle)

    def resident_ttl_s(self) -> float | None:
        """The opt-in resident TTL now; None when the pool set none (offload on pressure only)."""
        return self._gaps.resident_ttl_s(self._settings.lifecycle)

    def host_ttl_s(self) -> float | None:
        """The opt-in host TTL now; None when the pool set none (drop on pressure only)."""
        return self._gaps.host_ttl_s(self._settings.lifecycle)

    # --- sizing ----------------------------------------------------------------------------------------------
    def reservation_for(self, request: ConversationRequest) -> int:
        """The KV tokens a conversation would be reserved if it were placed now (the growth factor observed,
        or its prior)."""
        return self._sizing(request)[0]

    def _sizing(self, request: ConversationRequest) -> tuple[int, int | None]:
        """`GrowthHistory.sizing`, capped at the largest ready decoder's placeable capacity: the reservation, and
        the floor to fall back to while the growth factor is an unconfirmed prior (else None)."""
        headroom = self._settings.placement.headroom_fraction
        caps = [
            largest_placeable_kv_tokens(d.capacity_kv_tokens, headroom)
            for d in self._ledger.decoders.values()
            if d.ready
        ]
        return self._growth.sizing(request.first_input_tokens, request.expected_turns, max(caps, default=None))
