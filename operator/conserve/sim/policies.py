"""Placement policies: ConServe (conversation level) and the per-turn baselines.

**ConServe** calls the operator's core: `reservation_kv_tokens` sizes a conversation's reservation from its first
turn's input (and the growth of completed conversations), `place` picks the decoder from a `CapacityLedger`
snapshot, the ledger records it. The first turn is prefilled on the least-loaded prefill instance (the compute
tier when tiers are mapped) and its KV moves once to the decoder; the conversation is pinned there: later
turns' new tokens are prefilled on the decoder itself, nothing moves, and its KV stays (not evictable) between
turns until the conversation is released (the client marks it completed after its last turn, as the
Conversation API's `spec.completed` does, or it stays idle past the idle timeout). A conversation that no
decoder can hold waits, in `order_pending` order, until a release frees capacity. Live KV beyond the
reservation is reported to the ledger (`update_live`, `try_extend`), so later placements see it.

**Per-turn baselines** place every turn on its own and have no capacity model: a turn is admitted wherever it
is sent and waits there for memory. When the chosen decoder still holds the conversation's KV (in its prefix
cache, least recently used eviction), the turn reuses it: only the new tokens are prefilled, on the decoder,
and nothing moves. Otherwise the whole context is prefilled again on a prefill instance and moved to the
decoder: that is the cost a per-turn policy pays when a turn moves.

- `round-robin`: prefill instances and decoders in turn.
- `least-loaded`: the prefill instance with the least queued work, the decoder with the least KV of running
  and waiting sequences relative to its capacity.
- `prefix-aware`: the cache-aware policy of SGLang's router (sgl-router, `cache_aware`): when the decoders are
  balanced (the most and the least loaded differ by at most 32 requests or by a factor of at most 1.0001,
  its default `balance_abs_threshold` and `balance_rel_threshold`), a turn goes to the decoder holding its
  prefix; otherwise, or without a prefix anywhere, to the least-loaded decoder (fewest requests).
- `sticky`: session affinity: the first turn round-robin, every later turn to the same decoder, whatever its
  load or memory (its prefix is reused when still cached).
- `per-turn-prediction`: each turn is placed on the decoder with the most KV left after adding the turn's
  predicted peak (input plus predicted output) to the predicted peaks of what runs and waits there; the
  predicted output is the mean of the outputs observed so far (prior: 256 tokens until 10 are seen).

Prefill instances for the baselines other than round-robin: least queued work first, ties by name.

**Host KV tier** (`conserve.core.offload`): ConServe offloads idle pinned conversations to their decoder's host
memory under pressure (a new conversation that no decoder's GPU reservations can take; an offloaded
conversation's next turn that needs its GPU reservation back; a decoder out of memory), least recently active
first; the ledger then counts only resident conversations against GPU capacity. `conserve-no-offload` is
ConServe without the host tier (the behaviour before it). The per-turn baselines get the same host tier for
their prefix caches (GPU evictions spill there, LRU), as vLLM's CPU offloading would give them: apples to
apples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from conserve.core.ledger import CapacityLedger
from conserve.core.offload import DecoderOffloadView, choose_offload_victims, plan_placement_offload
from conserve.core.pending import PendingItem, order_pending
from conserve.core.perf import decode_energy_per_token_j
from conserve.core.placement import DecoderState, PlacementRequest, PlacementSettings, PlacementWeights, place
from conserve.core.reservation import HISTORY_LIMIT, GrowthObservation, growth_factor, reservation_for_factor
from conserve.sim.engine import ConvState, LocalRoute, RemoteRoute, Route, TurnRecord

if TYPE_CHECKING:
    from conserve.sim.engine import Decoder, Simulator

Retain = Literal["pin", "cache"]

#: Reference operating point of the energy prior given to the placement (the extender's node scoring uses the
#: same point): a decode batch of 32 sequences of 2048 tokens.
ENERGY_PRIOR_BATCH = 32
ENERGY_PRIOR_CONTEXT_TOKENS = 2048


class Policy(Protocol):
    name: str

    def bind(self, sim: Simulator) -> None: ...

    def route(self, state: ConvState, record: TurnRecord, now: float) -> Route | None: ...

    def retain(self, state: ConvState, decoder: str) -> Retain: ...

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None: ...

    def release(self, state: ConvState) -> None: ...

    def kv_offloaded(self, state: ConvState) -> None: ...

    def order_pending(self, states: Sequence[ConvState]) -> list[ConvState]: ...


class _Base:
    name = "base"
    #: Whether this policy's decoders get the fleet's host KV tier.
    host_offload = True

    def __init__(self) -> None:
        self._sim: Simulator | None = None

    @property
    def sim(self) -> Simulator:
        assert self._sim is not None, "policy not bound to a simulator"
        return self._sim

    def bind(self, sim: Simulator) -> None:
        self._sim = sim

    def least_loaded_prefill(self, now: float) -> str:
        return min(self.sim.prefill.values(), key=lambda p: (p.load_s(now), p.name)).name

    def retain(self, state: ConvState, decoder: str) -> Retain:
        return "cache"

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        return None

    def release(self, state: ConvState) -> None:
        return None

    def kv_offloaded(self, state: ConvState) -> None:
        return None

    def order_pending(self, states: Sequence[ConvState]) -> list[ConvState]:
        return list(states)


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

    def bind(self, sim: Simulator) -> None:
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


class _PerTurn(_Base):
    """A per-turn policy: pick a decoder, reuse its cached prefix if it has one, else prefill and move all."""

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        raise NotImplementedError

    def pick_prefill(self, now: float) -> str:
        return self.least_loaded_prefill(now)

    def route(self, state: ConvState, record: TurnRecord, now: float) -> Route | None:
        name = self.pick_decoder(state, record, now)
        decoder = self.sim.decoders[name]
        if record.index > 0 and record.new_tokens < record.input_tokens and decoder.holds(state.key):
            return LocalRoute(name)
        return RemoteRoute(self.pick_prefill(now), name, record.input_tokens)

    def decoders(self) -> list[Decoder]:
        return list(self.sim.decoders.values())


class RoundRobin(_PerTurn):
    name = "round-robin"

    def __init__(self) -> None:
        super().__init__()
        self._next_decoder = 0
        self._next_prefill = 0

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        names = list(self.sim.decoders)
        name = names[self._next_decoder % len(names)]
        self._next_decoder += 1
        return name

    def pick_prefill(self, now: float) -> str:
        names = list(self.sim.prefill)
        name = names[self._next_prefill % len(names)]
        self._next_prefill += 1
        return name


class LeastLoaded(_PerTurn):
    name = "least-loaded"

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        return min(self.decoders(), key=lambda d: (d.load_tokens() / d.capacity, d.name)).name


class PrefixAware(_PerTurn):
    name = "prefix-aware"
    #: sgl-router defaults (cache_aware policy).
    BALANCE_ABS_THRESHOLD = 32
    BALANCE_REL_THRESHOLD = 1.0001

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        decoders = self.decoders()
        loads = {d.name: d.active_sequences() for d in decoders}
        least = min(decoders, key=lambda d: (loads[d.name], d.name)).name
        most, fewest = max(loads.values()), min(loads.values())
        imbalanced = most - fewest > self.BALANCE_ABS_THRESHOLD and most > fewest * self.BALANCE_REL_THRESHOLD
        if imbalanced:
            return least
        holders = [d for d in decoders if d.holds(state.key)]
        if holders:
            return min(holders, key=lambda d: (loads[d.name], d.name)).name
        return least


class Sticky(_PerTurn):
    name = "sticky"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0
        self.home: dict[str, str] = {}

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        home = self.home.get(state.key)
        if home is None:
            names = list(self.sim.decoders)
            home = names[self._next % len(names)]
            self._next += 1
            self.home[state.key] = home
        return home

    def release(self, state: ConvState) -> None:
        self.home.pop(state.key, None)


class PerTurnPrediction(_PerTurn):
    name = "per-turn-prediction"
    PRIOR_OUTPUT_TOKENS = 256
    MIN_OBSERVATIONS = 10

    def __init__(self) -> None:
        super().__init__()
        self.outputs_seen = 0
        self.outputs_sum = 0

    def predicted_output(self) -> float:
        if self.outputs_seen < self.MIN_OBSERVATIONS:
            return float(self.PRIOR_OUTPUT_TOKENS)
        return self.outputs_sum / self.outputs_seen

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        predicted = self.predicted_output()

        def peak(decoder: Decoder) -> float:
            running = sum(s.context + max(predicted - s.record.generated_tokens, 0.0) for s in decoder.running)
            waiting = sum(s.context + predicted for s in decoder.join_queue)
            local = sum(j.seq.context + predicted for j in decoder.local_queue)
            return running + waiting + local + record.input_tokens + predicted

        return min(self.decoders(), key=lambda d: (-(d.capacity - peak(d)) / d.capacity, d.name)).name

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        self.outputs_seen += 1
        self.outputs_sum += record.output_tokens


POLICIES: dict[str, type[ConServe] | type[_PerTurn]] = {
    p.name: p
    for p in (
        ConServe,
        ConServePack,
        ConServeNoOffload,
        RoundRobin,
        LeastLoaded,
        PrefixAware,
        Sticky,
        PerTurnPrediction,
    )
}
#: The conversation-level policies (the default profile first) and the per-turn baselines.
CONSERVE_VARIANTS = (ConServe.name, ConServePack.name, ConServeNoOffload.name)
BASELINES = tuple(name for name in POLICIES if name not in CONSERVE_VARIANTS)


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})") from None
