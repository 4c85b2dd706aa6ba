"""Placement policies: ConServe (conversation level) and the per-turn baselines.

**ConServe** runs the operator's own scheduler (`conserve.core.scheduler.PoolScheduler`, the object the
operator's engine calls): reservation sizing, placement, queue order, outgrowth, prefill choice and the KV
lifecycle are the core's (see operator/conserve/core/README.md). The first turn is prefilled on the prefill
server the scheduler picks and its KV moves once to the decoder; the conversation is pinned there: later turns'
new tokens are prefilled on the decoder itself and nothing moves. Between turns its KV is idle (reclaimable),
then offloaded to the decoder's host memory, then dropped, as `conserve.core.lifecycle` rules; the pin
outlives residency. It is released when the client marks it completed after its last turn, or when it stays
idle past the idle timeout (the simulator's idle checks). A conversation that no decoder can hold, even by
reclaiming idle KV, waits in the scheduler's queue.

**Per-turn baselines** are in `conserve.sim.baselines`; this module's `POLICIES` names them all.

**KV lifecycle** (`conserve.core.lifecycle`): ConServe's idle pinned conversations go to their decoder's host
memory (or are dropped) when room is needed or after the resident TTL; `conserve-no-offload` is ConServe with
the lifecycle off (idle KV stays resident until release: the behaviour before it). The per-turn baselines get
the same host tier for their prefix caches (GPU evictions spill there, LRU), as vLLM's CPU offloading would give
them: apples to apples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from conserve.core.decisions import ConversationRequest, Decision, Reason, Verdict
from conserve.core.lifecycle import LifecycleSettings
from conserve.core.offload import pcie_transfer_time_s
from conserve.core.perf import decode_energy_per_token_j
from conserve.core.placement import DecoderState, PlacementSettings, PlacementWeights
from conserve.core.prefill import PrefillState
from conserve.core.scheduler import PoolScheduler, SchedulerSettings
from conserve.sim.baselines import PER_TURN_BASELINES, PerTurn
from conserve.sim.policy_base import PolicyBase as _Base
from conserve.sim.records import ConvState, LocalRoute, Policy, RemoteRoute, Retain, Route, SimView, TurnRecord

if TYPE_CHECKING:
    pass

#: Reference operating point of the energy prior given to the placement (the extender's node scoring uses the
#: same point): a decode batch of 32 sequences of 2048 tokens.
ENERGY_PRIOR_BATCH = 32
ENERGY_PRIOR_CONTEXT_TOKENS = 2048


class ConServe(_Base):
    """Conversation-level placement: the operator's `PoolScheduler`, driven by the simulator's events.

    Events in: a first turn (admit), a later turn's arrival (turn_started), a turn's end (usage observed), the
    conversation's release, memory pressure the simulator resolved itself (kv_offloaded), and the timers
    (sweep, at most once per simulated second like the operator's sweep). Decisions out are applied to the
    simulated decoders (offload, drop); placement and queue order are the scheduler's own.
    """

    name = "conserve"
    SWEEP_INTERVAL_S = 1.0

    def __init__(self, settings: PlacementSettings | None = None) -> None:
        super().__init__()
        self.placement = settings or PlacementSettings()
        self.scheduler = PoolScheduler(SchedulerSettings(placement=self.placement))
        self._applying = False
        self._last_sweep_s = float("-inf")

    @property
    def settings(self) -> PlacementSettings:
        return self.placement

    def bind(self, sim: SimView) -> None:
        super().bind(sim)
        decoders = [
            DecoderState(
                name=d.name,
                node=d.name,
                tier=d.spec.tier,
                capacity_kv_tokens=d.capacity,
                energy_per_token_j=decode_energy_per_token_j(
                    d.spec.device, sim.model, ENERGY_PRIOR_BATCH, ENERGY_PRIOR_CONTEXT_TOKENS
                ),
            )
            for d in sim.decoders.values()
        ]
        prefills = [PrefillState(p.name, p.spec.tier) for p in sim.prefill.values()]
        host = min((d.host_capacity for d in sim.decoders.values()), default=0)
        lifecycle = LifecycleSettings(
            enabled=self.host_offload,
            host_kv_tokens_per_decoder=host if self.host_offload else 0,
            writeback_s_per_kv_token=pcie_transfer_time_s(sim.model, 1),
        )
        # The simulator owns the idle timeout (its idle checks call `release`): the scheduler's sweep must not
        # release behind its back (the simulated KV would stay pinned).
        self.bind_pool(decoders, prefills, idle_timeout_s=float("inf"), lifecycle=lifecycle)

    def bind_pool(
        self,
        decoders: Sequence[DecoderState],
        prefills: Sequence[PrefillState],
        *,
        idle_timeout_s: float,
        lifecycle: LifecycleSettings,
    ) -> None:
        """The pool as the scheduler sees it (the simulator's fleet, or a test's table)."""
        self.scheduler.configure(
            SchedulerSettings(placement=self.placement, default_idle_timeout_s=idle_timeout_s, lifecycle=lifecycle)
        )
        for d in decoders:
            self.scheduler.decoder_changed(d)
        self.scheduler.set_prefills(prefills)

    # events ----------------------------------------------------------------------------------------------
    def route(self, state: ConvState, record: TurnRecord, now: float) -> Route | None:
        self.sweep(now)
        holding = self.scheduler.ledger.holding(state.key)
        if holding is not None:
            self._apply(self.scheduler.turn_started(state.key, now))
            return LocalRoute(holding[0])
        decisions = self.scheduler.admit(self.request(state, record), now)
        self._apply(decisions)
        placed = next((d for d in decisions if d.placed and d.conversation == state.key), None)
        if placed is None or placed.decoder is None:
            return None
        # The router's early prefill (on by default) starts the first turn on its least-loaded prefill server
        # before the placement arrives, and reports the one it used: the scheduler counts it there.
        if self._sim is None:  # driven without a simulator (the equivalence test): no data plane to report
            return RemoteRoute(placed.prefill or "", placed.decoder, record.input_tokens)
        used = self.least_loaded_prefill(now)
        self.scheduler.prefill_reported(placed.prefill, used)
        return RemoteRoute(used, placed.decoder, record.input_tokens)

    @staticmethod
    def request(state: ConvState, record: TurnRecord) -> ConversationRequest:
        return ConversationRequest(state.key, record.input_tokens, 0, state.turns[0].arrival_s)

    def retain(self, state: ConvState, decoder: str) -> Retain:
        return "pin"

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        live = record.input_tokens + record.output_tokens
        self._apply(self.scheduler.usage_observed(state.key, live, now, turns=record.index + 1))
        if self.scheduler.pending and self._sim is not None:
            self.sim.retry_pending()  # its KV is idle now, so reclaimable: waiting ones may fit (as the operator)

    def release(self, state: ConvState) -> None:
        reason = Reason.COMPLETED if state.finished else Reason.IDLE_TIMEOUT
        self.scheduler.release(state.key, reason)

    def kv_offloaded(self, state: ConvState) -> None:
        if not self._applying:  # the simulator's own memory pressure moved it
            self.scheduler.kv_offloaded(state.key)

    def order_pending(self, states: Sequence[ConvState]) -> list[ConvState]:
        position = {key: i for i, key in enumerate(self.scheduler.queue())}
        return sorted(states, key=lambda s: (position.get(s.key, len(position)), s.key))

    def sweep(self, now: float) -> list[Decision]:
        """The scheduler's timers (resident and host TTLs, idle timeout), at most once per simulated second."""
        if now - self._last_sweep_s < self.SWEEP_INTERVAL_S:
            return []
        self._last_sweep_s = now
        decisions = self.scheduler.sweep(now)
        self._apply(decisions)
        return decisions

    def decoder_lost(self, name: str, now: float) -> list[Decision]:
        """A decoder leaves (the operator: pod deleted or unready); its conversations move or fail."""
        self.scheduler.decoder_removed(name)
        decisions = [*self.scheduler.decoders_lost([name], now), *self.scheduler.drain(now)]
        self._apply(decisions)
        return decisions

    def energy_measured(self, decoder: str, energy_per_token_j: float) -> None:
        self.scheduler.energy_measured(decoder, energy_per_token_j)

    # decisions applied to the simulated decoders -----------------------------------------------------------
    def _apply(self, decisions: Sequence[Decision]) -> None:
        if self._sim is None:
            return
        self._applying = True
        try:
            for d in decisions:
                decoder = self.sim.decoders.get(d.decoder or "")
                if decoder is None:
                    continue
                if d.verdict is Verdict.OFFLOADED and d.conversation in decoder.pinned:
                    if decoder.pinned[d.conversation] <= decoder.host_free_tokens():
                        self.sim.offload(decoder, d.conversation)
                    else:  # a reloading turn's host copy is still there until its prefill starts: no room
                        self.sim.drop_pinned(decoder, d.conversation)
                elif d.verdict is Verdict.DROPPED:
                    decoder.drop_host(d.conversation)
                    if d.conversation in decoder.pinned:
                        self.sim.drop_pinned(decoder, d.conversation)
        finally:
            self._applying = False


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
