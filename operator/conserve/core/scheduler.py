"""One pool's scheduler: every decision about its conversations, in one pure object (no I/O, no clock).

The operator (controller/engine.py) and the simulator's ConServe policy (sim/policies.py) drive this same
class: events in (a conversation created, a turn started or reported, a conversation released, a decoder lost,
KV moved by the engine, energy measured, a sweep at time `now_s`), typed `Decision`s out. The caller applies the
decisions (the operator writes status and Events; the simulator moves simulated KV and starts the turns of
conversations placed from the queue). Time is always passed in.

One loop: every event that can free room (a release, a turn's end, a sweep, an engine's offload, a decoder
lost) ends with `drain` here, and its placements come back in the same list of decisions; the queue exists only
here. One owner of the idle timeout: the sweep releases a conversation with no turn for its idle timeout (never
one with a turn in flight); its next turn, if one comes, starts it afresh: admitted again with its whole
context as its first input, prefilled again, sized by the live context.

Where each rule lives (see core/README.md): reservation sizing `core.reservation`; placement filters and
scorers `core.placement`; queue order `core.pending`; prefill choice `core.prefill`; KV lifecycle states and
TTLs `core.lifecycle`, applied by `core.residency`; capacity bookkeeping `core.ledger`; what adapters may read
(the read-only view, and the settings) `core.view`; the flow between them here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

from conserve.core.admission import DepartureRate, expected_wait_s, refusal_message
from conserve.core.decisions import ConversationRequest, Decision, PrefillSite, Reason, Verdict
from conserve.core.ledger import CapacityError, CapacityLedger
from conserve.core.lifecycle import GapHistory, KvState
from conserve.core.occupancy import ObservedOccupancy, ObservedReadings
from conserve.core.pending import overdue_by_budget
from conserve.core.placement import DecoderState, PlacementDecision, PlacementRequest, place
from conserve.core.prefill import PrefillCounts, PrefillState
from conserve.core.reservation import GrowthHistory
from conserve.core.residency import ConversationView, Residency
from conserve.core.view import DEFAULT_IDLE_TIMEOUT_S, SchedulerSettings, SchedulerView

__all__ = ["DEFAULT_IDLE_TIMEOUT_S", "PoolScheduler", "SchedulerSettings"]


class PoolScheduler(SchedulerView):
    """A pool's decisions. Its state is private: read it through the `SchedulerView` queries (core/view.py),
    change it through the event methods below."""

    def __init__(self, settings: SchedulerSettings | None = None) -> None:
        self._settings = settings or SchedulerSettings()
        #: The decoder table (capacity, tier, readiness, measured J/token) and every reservation: one place.
        self._ledger = CapacityLedger()
        self._conversations: dict[str, ConversationView] = {}
        self._pending: dict[str, ConversationRequest] = {}
        self._growth = GrowthHistory()
        self._gaps = GapHistory()
        self._prefills = PrefillCounts()
        #: Why the pool cannot place at all (no spec, invalid spec); None when it can.
        self._problem: tuple[Reason, str] | None = None
        self._snapshot: list[DecoderState] | None = None  # the ledger's snapshot, until the ledger changes
        #: The decoders' engines' own KV readings (the paper's observed occupancy), folded into placement.
        self._observed = ObservedReadings()
        self._measured_j: dict[str, float] = {}  # decoders' measured J/token (over the modelled prior)
        self._departures = DepartureRate()  # conversations leaving: the early refusal's estimate of a wait
        #: Conversations queued again after their decoder was lost: when (their queue wait counts from there).
        self._requeued_at: dict[str, float] = {}
        self._kv = Residency(self._ledger, self._conversations, self._settings.lifecycle, self._changed)

    # --- configuration and the decoder table -------------------------------------------------------------
    def configure(self, settings: SchedulerSettings) -> None:
        self._settings = settings
        self._kv.settings = settings.lifecycle
        self._problem = None
        self._changed()

    def set_problem(self, reason: Reason, message: str) -> None:
        self._problem = (reason, message)

    def restore_history(self, growth_ratios: Iterable[float], turn_gaps_s: Iterable[float]) -> None:
        """The growth ratios and turn gaps observed before a restart (the pool's status), oldest first."""
        for ratio in growth_ratios:
            self._growth.record(ratio)
        self._gaps.extend(turn_gaps_s)

    def decoder_changed(self, state: DecoderState) -> None:
        """Add or refresh a decoder; its J/token is a prior (or unknown) until one is measured, which is kept
        over the new view's; an unknown one keeps the last known."""
        measured = self._measured_j.get(state.name)
        old = self._ledger.decoders.get(state.name)
        if measured is not None:
            state = replace(state, energy_per_token_j=measured)
        elif state.energy_per_token_j is None and old is not None and old.energy_per_token_j is not None:
            state = replace(state, energy_per_token_j=old.energy_per_token_j)
        self._ledger.upsert_decoder(state)
        self._changed()

    def decoder_removed(self, name: str) -> None:
        """Forget a decoder; its conversations keep their holdings until `decoders_lost` moves them."""
        self._ledger.decoders.pop(name, None)
        self._measured_j.pop(name, None)
        self._changed()

    def energy_measured(self, decoder: str, energy_per_token_j: float | None) -> None:
        """A measured J/token (decode) for a decoder: the energy scorer uses it from the next decision on."""
        old = self._ledger.decoders.get(decoder)
        if energy_per_token_j is not None:
            self._measured_j[decoder] = energy_per_token_j
        if old is not None and energy_per_token_j is not None and old.energy_per_token_j != energy_per_token_j:
            self._ledger.upsert_decoder(replace(old, energy_per_token_j=energy_per_token_j))
            self._changed()

    def set_prefills(self, prefills: Sequence[PrefillState]) -> None:
        """The pool's prefill servers (each one's count of first turns is kept across refreshes)."""
        self._prefills.refresh(prefills)

    def _changed(self) -> None:
        self._snapshot = None

    def occupancy_observed(self, decoder: str, reading: ObservedOccupancy) -> None:
        """A decoder's engine reported its KV use (`at_s` in this scheduler's clock); placement counts the larger
        of it and the ledger's live KV until the reading is `observed_max_age_s` old (the sweep drops it)."""
        self._observed.latest[decoder] = reading
        self._changed()

    # --- conversations -----------------------------------------------------------------------------------
    def adopt(
        self,
        request: ConversationRequest,
        decoder: str | None,
        reserved_kv_tokens: int,
        live_kv_tokens: int,
        *,
        last_activity_s: float | None,
        turns: int = 0,
        kv_state: KvState = KvState.ACTIVE,
        counts: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        """A conversation as the API server holds it (rebuild on start): placed ones keep their reservation,
        even over capacity (the truth lives in the API server); others wait in the queue."""
        view = ConversationView(request, last_activity_s, turns, live_kv_tokens, kv_state, *counts)
        self._conversations[request.key] = view
        if decoder is None:
            self._pending[request.key] = request
            return
        self._ledger.adopt(request.key, decoder, reserved_kv_tokens, live_kv_tokens)
        if kv_state in (KvState.OFFLOADED, KvState.DROPPED):
            self._ledger.set_offloaded(request.key, True)
        self._changed()

    def admit(self, request: ConversationRequest, now_s: float) -> list[Decision]:
        """A conversation not placed yet: place it now, or queue (or fail) it. Reclaims idle KV if needed."""
        view = self._conversations.get(request.key)
        if view is None:
            view = self._conversations[request.key] = ConversationView(request)
        else:
            view.request = request
        if self._ledger.holding(request.key) is not None:
            return []
        if request.slo_class is not None and self.slo_class_of(request) is None:
            declared = (
                ", ".join(self._settings.slo.class_names()) if self._settings.slo else "none: the pool has no SLO"
            )
            message = f"spec.sloClass {request.slo_class!r} is not a class of its pool (classes: {declared})"
            return [self._fail(view, Reason.UNKNOWN_SLO_CLASS, message)]
        return self._decide(view, now_s, replacing=False)

    def _decide(
        self, view: ConversationView, now_s: float, *, replacing: bool, held_kv_tokens: int = 0
    ) -> list[Decision]:
        """Place a conversation (reclaiming idle KV if nothing fits), else queue or fail it. `replacing`: its
        decoder was lost, so it is re-placed with max(reservation, live, `held_kv_tokens`) or fails."""
        request = view.request
        key = request.key
        if self._problem is not None:
            return [self._wait_or_fail(view, self._problem[0], self._problem[1], replacing, now_s)]
        reservation, floor = self._sizing(request)
        if replacing or key in self._requeued_at:  # its KV moves once more: room for all it holds
            reservation = max(reservation, view.live_kv_tokens, held_kv_tokens)
            floor = None
        decision = self._place(key, reservation)
        if decision.decoder is None and decision.reason == "NoCapacity" and floor is not None:
            reservation = floor  # the prior does not fit and nothing confirmed it: the live context does
            decision = self._place(key, reservation)
        reclaimed: list[Decision] = []
        if decision.decoder is None and decision.reason == "NoCapacity":
            reclaimed = self._reclaim_for_placement(reservation, now_s)
            if reclaimed:
                decision = self._place(key, reservation)
        if decision.decoder is None:
            reason = Reason(decision.reason)
            if reason is Reason.NO_CAPACITY and self._settings.reject_when_full and not replacing:
                return [*reclaimed, self._fail(view, reason, decision.message)]
            return [*reclaimed, self._wait_or_fail(view, reason, decision.message, replacing, now_s)]
        try:
            self._ledger.reserve(key, decision.decoder, reservation, live_kv_tokens=view.live_kv_tokens)
        except CapacityError as exc:  # the filters and the ledger disagree: never oversubscribe
            return [*reclaimed, self._wait_or_fail(view, Reason.NO_CAPACITY, str(exc), replacing, now_s)]
        self._changed()
        self._pending.pop(key, None)
        self._requeued_at.pop(key, None)
        view.kv_state = KvState.ACTIVE  # a replaced one's KV moves (prefilled again or transferred) too
        prefill = None if replacing else self._prefills.pick()
        if not replacing and view.last_activity_s is None:
            view.last_activity_s = now_s
        verdict, reason = (Verdict.REPLACED, Reason.REPLACED) if replacing else (Verdict.PLACED, Reason.PLACED)
        message = f"{decision.message}; {reservation} KV tokens reserved"
        return [
            *reclaimed,
            Decision(key, verdict, reason, message, decision.decoder, reservation, prefill, KvState.ACTIVE),
        ]

    def _place(self, key: str, reservation: int) -> PlacementDecision:
        return place(PlacementRequest(key, reservation), self._placement_states(), self._settings.placement)

    def prefill_reported(self, chosen: str | None, used: str) -> None:
        """The data plane ran a first turn on another prefill server than the one chosen: count it there."""
        self._prefills.moved(chosen, used)

    def _wait_or_fail(
        self, view: ConversationView, reason: Reason, message: str, replacing: bool, now_s: float
    ) -> Decision:
        """Queue it; or fail it: on its first wait for capacity, in a pool with an SLO, its expected wait is past its
        budget (`core.admission`). One whose decoder was lost is queued again, never failed for it: the loss is no
        fault of the conversation (its wait counts from the loss, `waiting_since`)."""
        request = view.request
        if replacing and not self._settings.requeue_lost_conversations:
            return self._fail(view, Reason.DECODER_LOST, f"its decoder was lost and {message}")
        if replacing or request.key in self._requeued_at:
            message = f"its decoder was lost and {message}; waiting for room"
        elif reason is Reason.NO_CAPACITY and not view.told_waiting and self._settings.slo is not None:
            rank = self._class_priority(request)
            ahead = sum(1 for r in self._pending.values() if r.key != request.key and self._class_priority(r) >= rank)
            estimate = expected_wait_s(ahead, self._departures.per_s(now_s))
            budget = self.queue_budget_s(request)
            if estimate is not None and estimate > budget:
                why = f"{ahead} ahead of it; {reason.value}: {message}"
                return self._fail(view, Reason.SLO_UNATTAINABLE, refusal_message(budget, None, estimate, why))
        self._pending[request.key] = request
        view.told_waiting = True
        view.waiting_why = f"{reason.value}: {message}"
        return Decision(request.key, Verdict.QUEUED, reason, message)

    def expire_queue(self, now_s: float) -> list[Decision]:
        """Refuse the waiting conversations whose wait (since their creation, or the loss of their decoder) reached
        their budget (`QueueWaitExceeded`): their clients are told to come back rather than being admitted too
        late."""
        since = {r.key: self.waiting_since(r) for r in self._pending.values()}
        out: list[Decision] = []
        for key in overdue_by_budget(since, now_s, lambda k: self.queue_budget_s(self._pending[k])):
            view = self._conversations.get(key)
            if view is None:
                self._pending.pop(key, None)
                continue
            budget = self.queue_budget_s(view.request)
            message = refusal_message(budget, now_s - since[key], None, view.waiting_why)
            out.append(self._fail(view, Reason.QUEUE_WAIT_EXCEEDED, message))
        return out

    def _fail(self, view: ConversationView, reason: Reason, message: str) -> Decision:
        key = view.request.key
        self._pending.pop(key, None)
        self._requeued_at.pop(key, None)
        self._ledger.release(key)
        self._conversations.pop(key, None)
        self._changed()
        return Decision(key, Verdict.FAILED, reason, message)

    def drain(self, now_s: float) -> list[Decision]:
        """Place the waiting conversations that fit now, in queue order (a small one may pass a large one)."""
        out: list[Decision] = []
        best = self._best_room()
        for request in self.queued_requests():
            view = self._conversations.get(request.key)
            if view is None:
                self._pending.pop(request.key, None)
                continue
            if view.told_waiting and self._problem is None and self._smallest_ask(view.request) > best:
                continue  # cheap skip: nothing can hold it, even by reclaiming idle KV
            decisions = self._decide(view, now_s, replacing=False)
            out.extend(decisions)
            if any(d.placed for d in decisions):
                best = self._best_room()
        return out

    def _smallest_ask(self, request: ConversationRequest) -> int:
        wanted, floor = self._sizing(request)
        return wanted if floor is None else floor

    def _drain_if_waiting(self, now_s: float) -> list[Decision]:
        return self.drain(now_s) if self._pending else []

    def _best_room(self) -> int:
        """The largest reservation any ready decoder could take now, idle KV reclaimed included."""
        headroom = self._settings.placement.headroom_fraction
        best = 0
        for d in self._placement_states():
            if d.ready:
                room = d.free_kv_tokens - int(d.capacity_kv_tokens * headroom) + self._kv.reclaimable_on(d.name)
                best = max(best, room)
        return best

    def usage_observed(
        self, key: str, live_kv_tokens: int, now_s: float, *, turns: int | None = None, turn_ended: bool = True
    ) -> list[Decision]:
        """A turn's report (the operator: spec.usage after a turn; the simulator: a turn's end).

        An offloaded or dropped conversation's KV is back on its decoder (reloaded, or prefilled again); a
        reservation the live context outgrew is extended in place when the decoder has room; the growth seen so
        far sizes the next reservations. A turn's end can free room (its KV becomes reclaimable): the queue is
        drained."""
        view = self._conversations.get(key)
        if view is None:
            return []
        out: list[Decision] = []
        if turns is not None and turns > view.turns and view.turns > 0 and view.last_activity_s is not None:
            self._gaps.observe(now_s - view.last_activity_s)  # turn end to turn end, as the operator sees it
        if turns is not None and turns > view.turns:  # the turn's growth, observed (sizes the next reservations)
            self._growth.observe_turn(view.live_kv_tokens or view.request.first_input_tokens, live_kv_tokens)
        if turns is not None:
            view.turns = max(view.turns, turns)
        view.live_kv_tokens = live_kv_tokens
        if turn_ended:
            view.in_flight = False
            self._changed()  # one turn fewer running on its decoder (the load scorer)
        holding = self._ledger.holding(key)
        if holding is None:
            view.last_activity_s = now_s
            return out
        decoder, reserved, _ = holding
        if view.kv_state in (KvState.OFFLOADED, KvState.DROPPED):
            out.extend(self._kv.make_resident(view, decoder, max(reserved, live_kv_tokens), now_s))
        view.last_activity_s = now_s
        # A turn just ended: the next one may come soon (active window), then its KV is idle (reclaimable).
        window = self.active_window_s()
        idle = turn_ended and window <= 0 and not view.in_flight
        view.kv_state = KvState.IDLE if idle else KvState.ACTIVE
        grown = self._grow(view, decoder, reserved, live_kv_tokens)
        if grown is not None:
            out.append(grown)
        self._ledger.update_live(key, live_kv_tokens)
        self._changed()
        if turn_ended:
            out.extend(self._drain_if_waiting(now_s))
        return out

    def _grow(self, view: ConversationView, decoder: str, reserved: int, live_kv_tokens: int) -> Decision | None:
        """Grow the reservation in place to the live context times the growth factor (room for the next turn)
        when the decoder has room, else to the live context; a live context past the reservation with no room
        to grow is kept pinned (OUTGROWN)."""
        key = view.request.key
        factor, _ = self._growth.factor(view.request.expected_turns)
        target = math.ceil(live_kv_tokens * factor)
        if target > reserved and (
            self._ledger.try_extend(key, target)
            or (live_kv_tokens > reserved and self._ledger.try_extend(key, live_kv_tokens))
        ):
            held = self._ledger.holding(key)
            extended = held[1] if held else reserved
            message = f"reservation grown in place to {extended} KV tokens"
            return Decision(key, Verdict.EXTENDED, Reason.EXTENDED, message, decoder, extended, kv_state=view.kv_state)
        if live_kv_tokens <= reserved:
            return None
        message = (
            f"live context {live_kv_tokens} exceeds the reservation {reserved} and the decoder has "
            "no room to extend it; kept pinned"
        )
        return Decision(key, Verdict.OUTGROWN, Reason.DECODER_FULL, message, decoder, reserved, kv_state=view.kv_state)

    def turn_started(self, key: str, now_s: float, prefill_site: PrefillSite = PrefillSite.DECODER) -> list[Decision]:
        """A turn of a pinned conversation arrives (the simulator knows; the operator learns at its report),
        prefilled where the P/D decision said: it is in flight (never idled, offloaded, dropped or timed out
        until it ends), and KV offloaded or dropped comes back to its decoder, others' idle KV making room."""
        view = self._conversations.get(key)
        holding = self._ledger.holding(key)
        if view is None or holding is None:
            return []
        out: list[Decision] = []
        view.in_flight = True
        if prefill_site is PrefillSite.POOL and view.turns > 0:
            view.remote_prefills += 1
        if view.kv_state in (KvState.OFFLOADED, KvState.DROPPED):
            need = max(holding[1], view.live_kv_tokens)
            out = self._kv.make_resident(view, holding[0], need, now_s, prefill_site)
        view.kv_state = KvState.ACTIVE
        self._changed()
        return out

    def kv_offloaded(self, key: str, now_s: float) -> list[Decision]:
        """The data plane moved a conversation's KV to host memory on its own (the simulator's memory
        pressure): its GPU room is free, so the queue is drained."""
        view = self._conversations.get(key)
        if view is None or not self._ledger.set_offloaded(key, True):
            return []
        view.kv_state = KvState.OFFLOADED
        view.offloads += 1
        self._changed()
        return self._drain_if_waiting(now_s)

    def release(self, key: str, reason: Reason, message: str = "", now_s: float | None = None) -> list[Decision]:
        """End a conversation's hold (completed, deleted, idle timeout): RELEASED first, then the placements of
        the waiting conversations that fit in the room it freed (when `now_s` is given). Empty when it held
        nothing (idempotent)."""
        self._pending.pop(key, None)
        self._requeued_at.pop(key, None)
        self._conversations.pop(key, None)
        holding = self._ledger.holding(key)
        if holding is None:
            return []
        self._ledger.release(key)
        self._changed()
        if now_s is not None:
            self._departures.departed(now_s)
        released = Decision(key, Verdict.RELEASED, reason, message, holding[0], holding[1])
        return [released, *(self._drain_if_waiting(now_s) if now_s is not None else [])]

    def decoders_lost(self, names: Iterable[str], now_s: float) -> list[Decision]:
        """Move every conversation of the lost decoders elsewhere (priority, then age), or queue it again (its
        queue wait counting from now): a lost decoder never fails a conversation."""
        orphans: list[ConversationView] = []
        for name in names:
            for key in self._ledger.conversations_on(name):
                view = self._conversations.get(key)
                if view is not None:
                    orphans.append(view)
        order = sorted(orphans, key=lambda v: (-v.request.priority, v.request.created_at_s, v.request.key))
        held = {v.request.key: self._ledger.holding(v.request.key) for v in order}
        for view in order:
            self._ledger.release(view.request.key)
        self._changed()
        out: list[Decision] = []
        for view in order:
            h = held[view.request.key]
            out.extend(self._decide(view, now_s, replacing=True, held_kv_tokens=h[1] if h else 0))
        self._requeued_at.update({d.conversation: now_s for d in out if d.verdict is Verdict.QUEUED})
        return [*out, *self._drain_if_waiting(now_s)]

    def _reclaim_for_placement(self, reservation: int, now_s: float) -> list[Decision]:
        """No decoder's reservations can take a new conversation: reclaim idle KV on the decoder the pool's
        scorers pick when each decoder's idle (reclaimable) KV counts as free. Picking the one nearest to fitting
        instead would pick the decoder reclaimed last, again and again: every new conversation, and its decoding,
        would pile onto it while the others' idle KV stayed put."""
        if not self._settings.lifecycle.enabled:
            return []
        headroom = self._settings.placement.headroom_fraction
        states = {d.name: d for d in self._placement_states() if d.ready}
        idle = {name: self._kv.reclaimable_on(name) for name in states}
        relaxed = [
            replace(
                d,
                reserved_kv_tokens=max(d.reserved_kv_tokens - idle[d.name], 0),
                live_kv_tokens=max(d.live_kv_tokens - idle[d.name], 0),
            )
            for d in states.values()
            if idle[d.name] > 0
        ]
        chosen = place(PlacementRequest("", reservation), relaxed, self._settings.placement).decoder
        if chosen is None:
            return []
        d = states[chosen]
        need = reservation - (d.free_kv_tokens - int(d.capacity_kv_tokens * headroom))
        return self._kv.reclaim_on(chosen, need, now_s) if 0 < need <= idle[chosen] else []

    def sweep(self, now_s: float) -> list[Decision]:
        """Timers: release past the idle timeout; idle after the active window; the pool's opt-in resident and
        host TTLs. Never a conversation with a turn in flight. Conversations in key order (deterministic); the
        queue is drained when anything changed."""
        if self._observed.expire(now_s, self._settings.observed_max_age_s):
            self._changed()
        out: list[Decision] = []
        for key in sorted(self._conversations):
            view = self._conversations[key]
            holding = self._ledger.holding(key)
            if holding is None or view.last_activity_s is None or view.in_flight:
                continue
            idle_for = now_s - view.last_activity_s
            timeout = view.request.idle_timeout_s or self._settings.default_idle_timeout_s
            if idle_for >= timeout:
                out.extend(self.release(key, Reason.IDLE_TIMEOUT, f"no turn for {timeout:g}s"))
                self._departures.departed(now_s)
                continue
            if self._settings.lifecycle.enabled:
                out.extend(self._kv.timers(view, holding[0], idle_for, now_s, self._gaps))
        if out:
            out.extend(self._drain_if_waiting(now_s))
        if self._pending:  # after the drain: only what still cannot be placed is refused
            out.extend(self.expire_queue(now_s))
        return out
