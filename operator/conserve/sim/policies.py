"""Placement policies: ConServe (conversation level) and the per-turn baselines.

**ConServe** calls the operator's core: `reservation_kv_tokens` sizes a conversation's reservation from its first
turn's input (and the growth of completed conversations), `place` picks the decoder from a `CapacityLedger`
snapshot, the ledger records it. The first turn is prefilled on the least-loaded prefill instance (the compute
tier when tiers are mapped) and its KV moves once to the decoder; the conversation is pinned there: later
turns' new tokens are prefilled on the decoder itself, nothing moves, and its KV stays (not evictable) between
turns until the conversation is released (the engine releases it for every policy alike: after its last turn
when the workload carries an end signal, as the Conversation API's `spec.completed` does, else once it has
been idle for the idle timeout). A conversation that no
decoder can hold waits, in `order_pending` order, until a release frees capacity. Live KV beyond the
reservation is reported to the ledger (`update_live`, `try_extend`), so later placements see it.

**Per-turn baselines** are in `conserve.sim.baselines`; this module's `POLICIES` names them all.

**Host KV tier** (`conserve.core.offload`): ConServe offloads idle pinned conversations to their decoder's host
memory under pressure (a new conversation that no decoder's GPU reservations can take; an offloaded
conversation's next turn that needs its GPU reservation back; a decoder out of memory), least recently active
first; the ledger then counts only resident conversations against GPU capacity. `conserve-no-offload` is
ConServe without the host tier (the behaviour before it). The per-turn baselines get the same host tier for
their prefix caches (GPU evictions spill there, LRU), as vLLM's CPU offloading would give them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from conserve.core.ledger import CapacityLedger
from conserve.core.offload import DecoderOffloadView, choose_offload_victims, plan_placement_offload
from conserve.core.pending import PendingItem, order_pending
from conserve.core.perf import decode_energy_per_token_j
from conserve.core.placement import DecoderState, PlacementRequest, PlacementSettings, PlacementWeights, place
from conserve.core.reservation import HISTORY_LIMIT, GrowthObservation, growth_factor, reservation_for_factor
from conserve.sim.baselines import PER_TURN_BASELINES, PerTurn
from conserve.sim.policy_base import PolicyBase as _Base
from conserve.sim.records import ConvState, LocalRoute, Policy, RemoteRoute, Retain, Route, SimView, TurnRecord

if TYPE_CHECKING:
    from conserve.sim.instances import Decoder

#: Reference operating point of the energy prior given to the placement (the extender's node scoring uses the
#: same point): a decode batch of 32 sequences of 2048 tokens.
ENERGY_PRIOR_BATCH = 32
ENERGY_PRIOR_CONTEXT_TOKENS = 2048


class ConServe(_Base):
    """Conversation-level placement through the operator's core."""

    name = "conserve"

    def __init__(self, settings: PlacementSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or PlacementSettings()
        self.ledger = CapacityLedger()
        self.history: list[GrowthObservation] = []
        self.first_input: dict[str, int] = {}
        self._snapshot: list[DecoderState] | None = None  # the ledger's snapshot, until the ledger changes
        self._factor: float | None = None  # growth_factor(history), until the history changes

    def bind(self, sim: SimView) -> None:
        super().bind(sim)
        for d in sim.decoders.values():
            energy = decode_energy_per_token_j(
                d.spec.device, sim.model, ENERGY_PRIOR_BATCH, ENERGY_PRIOR_CONTEXT_TOKENS
            )
            self.ledger.upsert_decoder(
                DecoderState(
                    name=d.name, node=d.name, tier=d.spec.tier, capacity_kv_tokens=d.capacity, energy_per_token_j=energy
                )
            )
        # The largest reservation any decoder can accept: its capacity less the placement's headroom (a
        # reservation capped at the raw capacity would be refused by `filter_capacity` forever).
        self.max_capacity = max(
            d.capacity - int(d.capacity * self.settings.headroom_fraction) for d in sim.decoders.values()
        )

    def route(self, state: ConvState, record: TurnRecord, now: float) -> Route | None:
        holding = self.ledger.holding(state.key)
        if holding is not None:
            decoder, reserved, _ = holding
            if self.ledger.is_offloaded(state.key):
                self._make_resident(state.key, decoder, max(reserved, record.input_tokens), now)
            if record.input_tokens > reserved:
                self.ledger.try_extend(state.key, record.input_tokens)
            self.ledger.update_live(state.key, record.input_tokens)
            self._snapshot = None
            return LocalRoute(decoder)
        # reservation_kv_tokens(input, history), with the history's growth factor computed once per change.
        if self._factor is None:
            self._factor = growth_factor(self.history)
        reservation = reservation_for_factor(
            record.input_tokens, self._factor, max_decoder_capacity_kv_tokens=self.max_capacity
        )
        if self._snapshot is None:
            self._snapshot = self.ledger.snapshot()
        headroom = self.settings.headroom_fraction
        if all(reservation > d.free_kv_tokens - int(d.capacity_kv_tokens * headroom) for d in self._snapshot):
            # No decoder's GPU reservations can take it: offload idle conversations to host memory if that
            # makes room (`plan_placement_offload`), else wait (what `place` would answer: NoCapacity).
            if not self._offload_to_place(reservation, now):
                return None
            self._snapshot = self.ledger.snapshot()
        decision = place(PlacementRequest(state.key, reservation), self._snapshot, self.settings)
        if decision.decoder is None:
            return None
        self.ledger.reserve(state.key, decision.decoder, reservation, live_kv_tokens=record.input_tokens)
        self._snapshot = None
        self.first_input[state.key] = record.input_tokens
        return RemoteRoute(self.least_loaded_prefill(now), decision.decoder, record.input_tokens)

    def retain(self, state: ConvState, decoder: str) -> Retain:
        return "pin"

    # host offload (the rules are `conserve.core.offload`'s) ------------------------------------------------
    def _gpu_kv(self, key: str, live: int) -> int:
        holding = self.ledger.holding(key)
        return live if holding is None else max(holding[1], holding[2])

    def _offload(self, decoder: Decoder, victims: Sequence[str]) -> None:
        for key in victims:
            self.sim.offload(decoder, key)  # calls kv_offloaded, which marks the ledger

    def _offload_to_place(self, reservation: int, now: float) -> bool:
        if not self.host_offload:
            return False
        views = []
        for name in self.ledger.decoders:
            d = self.sim.decoders.get(name)
            if d is None or d.host_capacity <= 0 or not d.pinned:
                continue
            views.append(
                DecoderOffloadView(
                    name,
                    d.capacity,
                    self.ledger.reserved_on(name),
                    d.host_free_tokens(),
                    tuple(self.sim.idle_candidates(d, self._gpu_kv)),
                )
            )
        plan = plan_placement_offload(views, reservation, self.settings.headroom_fraction, now)
        if plan is None or not plan.victims:
            return False
        self._offload(self.sim.decoders[plan.decoder], plan.victims)
        return True

    def _make_resident(self, key: str, name: str, need: int, now: float) -> None:
        """An offloaded conversation's next turn: its GPU reservation comes back on its own decoder, others'
        idle KV making room when needed (least recently active first)."""
        decoder = self.sim.decoders[name]
        room = decoder.capacity - self.ledger.reserved_on(name)
        if need > room:
            candidates = self.sim.idle_candidates(decoder, self._gpu_kv)
            self._offload(decoder, choose_offload_victims(candidates, need - room, decoder.host_free_tokens(), now))
        self.ledger.set_offloaded(key, False)
        self._snapshot = None

    def kv_offloaded(self, state: ConvState) -> None:
        self.ledger.set_offloaded(state.key, True)
        self._snapshot = None

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        live = record.input_tokens + record.output_tokens
        holding = self.ledger.holding(state.key)
        if holding is not None and live > holding[1]:
            self.ledger.try_extend(state.key, live)
        self.ledger.update_live(state.key, live)
        self._snapshot = None

    def release(self, state: ConvState) -> None:
        holding = self.ledger.holding(state.key)
        if holding is None:
            return
        self.ledger.release(state.key)
        self._snapshot = None
        first = self.first_input.pop(state.key, 0)
        if first > 0 and state.finished:
            self.history.append(GrowthObservation(first, max(holding[2], first)))
            del self.history[:-HISTORY_LIMIT]
            self._factor = None

    def order_pending(self, states: Sequence[ConvState]) -> list[ConvState]:
        by_key = {s.key: s for s in states}
        items = [PendingItem(s.key, 0, s.turns[-1].arrival_s, 0) for s in states]
        return [by_key[i.conversation] for i in order_pending(items)]


class ConServeNoOffload(ConServe):
    """ConServe without the host KV tier: idle pinned KV stays on the GPU (the behaviour before offload)."""

    name = "conserve-no-offload"
    host_offload = False


class ConServePack(ConServe):
    """ConServe with the packing profile a pool can choose (`kv-pack` on, `kv-balance` off): conversations fill
    one decoder before the next, so decode batches are larger and fewer weight reads are spent per token."""

    name = "conserve-pack"

    def __init__(self, settings: PlacementSettings | None = None) -> None:
        super().__init__(settings or PlacementSettings(weights=PlacementWeights(kv_balance=0.0, kv_pack=1.0)))


_CONSERVE: tuple[type[ConServe], ...] = (ConServe, ConServePack, ConServeNoOffload)
POLICIES: dict[str, type[ConServe] | type[PerTurn]] = {
    **{p.name: p for p in _CONSERVE},
    **{p.name: p for p in PER_TURN_BASELINES},
}
#: The conversation-level policies (the default profile first) and the per-turn baselines.
CONSERVE_VARIANTS = (ConServe.name, ConServePack.name, ConServeNoOffload.name)
BASELINES = tuple(name for name in POLICIES if name not in CONSERVE_VARIANTS)


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})") from None
