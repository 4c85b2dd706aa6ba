"""Placement policies: ConServe (conversation level) and the per-turn baselines.

**ConServe** runs the operator's own scheduler (`conserve.core.scheduler.PoolScheduler`, the object the operator's
engine calls) with the settings `conserve.api.scheduling` derives from the DecoderPool spec a user would write:
reservation sizing, placement, queue order, outgrowth, the KV lifecycle and the idle timeout are the core's (see
operator/conserve/core/README.md). Where each turn is prefilled is the P/D decider's (`conserve.core.pd`, the pool's
`prefillDecider`): a first turn as the router decides it before its placement (`decide_before_placement`: on the
pool at once, unless the likely decoder would prefill it sooner, then for the decoder placed), later turns for their
pinned decoder; the scheduler is told each turn's site. A conversation that no decoder can hold, even by reclaiming
idle KV, waits in the scheduler's queue; the scheduler's drain places it when room frees, and its waiting first turn
then starts (`SimView.start_placed`). It is released when the client marks it completed after its last turn, or by
the scheduler's sweep (every simulated second, as in the operator) once idle past the idle timeout
(`SimView.release_conversation`); a later turn starts it afresh.

**Per-turn baselines** are in `conserve.sim.baselines`, and llm-d's flow control (a gateway queue in front of its
router) in `conserve.sim.flowcontrol`; this module's `POLICIES` names them all.

**KV lifecycle** (`conserve.core.lifecycle`): ConServe's idle pinned conversations go to their decoder's host
memory (or are dropped) when room is needed, never on a timer (the pool's opt-in TTLs are left unset); the pin
outlives residency. `conserve-no-offload` is ConServe with the lifecycle off (idle KV stays resident until
release: the behaviour before it). The per-turn baselines get the same host tier for their prefix caches (GPU
evictions spill there, LRU), as vLLM's CPU offloading would give them: apples to apples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.api.scheduling import decoder_energy_prior_j, pd_settings, scheduler_settings
from conserve.core.decisions import ConversationRequest, Decision, PrefillSite, Reason, Verdict
from conserve.core.llm import ModelShape, lookup_model
from conserve.core.pd import PdRule
from conserve.core.placement import DecoderState, PlacementSettings, PlacementWeights
from conserve.core.prefill import PrefillState
from conserve.core.scheduler import PoolScheduler, SchedulerSettings
from conserve.sim.baselines import NATIVE_BASELINES, PER_TURN_BASELINES, PerTurn, with_native_rule
from conserve.sim.flowcontrol import LlmdFlowControl
from conserve.sim.pd import decide_turn, first_turn_before_placement, fleet_pd_settings, route_for
from conserve.sim.policy_base import PolicyBase as _Base
from conserve.sim.records import ConvState, Policy, RemoteRoute, Retain, Route, SimView, TurnRecord


class ConServe(_Base):
    """Conversation-level placement: the operator's `PoolScheduler`, driven by the simulator's events.

    Events in: a first turn (admit), a later turn's arrival (turn_started), a turn's end (usage observed), the
    conversation's release, memory pressure the simulator resolved itself (kv_offloaded), and the timers
    (sweep, every simulated second like the operator's). Decisions out are applied to the simulated decoders
    (offload, drop), placements from the scheduler's queue start their waiting first turn, and releases on the
    idle timeout (the scheduler owns it, as in the operator) end the conversation in the data plane. The
    settings come from a DecoderPool spec through `api.scheduling`, the operator's own derivation.
    """

    name = "conserve"
    owns_idle_timeout = True
    sweep_interval_s: float | None = 1.0

    #: The pool's `prefillDecider.rule` (None: the product's default).
    pd_rule_override: PdRule | None = None

    def __init__(self, settings: PlacementSettings | None = None, *, pd_rule: PdRule | None = None) -> None:
        super().__init__()
        self.placement = settings or PlacementSettings()
        self.pd_rule_override = pd_rule or self.pd_rule_override
        self.scheduler = PoolScheduler(SchedulerSettings(placement=self.placement))
        self._applying = False

    @property
    def settings(self) -> PlacementSettings:
        return self.placement

    def pool_spec(
        self, model: ModelShape, idle_timeout_s: float | None, engine_profile: str | None = None
    ) -> DecoderPoolSpec:
        """The DecoderPool a user would write for this fleet (the product's defaults otherwise)."""
        spec: dict[str, object] = {
            "model": {"name": model.name},
            "decoderSelector": {"matchLabels": {"conserve.dev/role": "decode"}},
            "kvLifecycle": {"enabled": self.host_offload},
        }
        if engine_profile is not None:
            spec["engineProfile"] = engine_profile
        if self.pd_rule_override is not None:
            spec["prefillDecider"] = {"rule": self.pd_rule_override.value.capitalize()}
        if lookup_model(model.name) is None:
            spec["model"] = {"name": model.name, "kvBytesPerToken": model.kv_bytes_per_token}
        if idle_timeout_s is not None and idle_timeout_s >= 1:
            spec["defaultIdleTimeoutSeconds"] = round(idle_timeout_s)
        if self.slo is not None:
            spec["slo"] = {"ttfetSeconds": self.slo.ttfet_s, "tbtSeconds": self.slo.tbt_s}
        return DecoderPoolSpec.model_validate(spec)

    def bind(self, sim: SimView, idle_timeout_s: float | None = None) -> None:
        super().bind(sim)
        pool = self.pool_spec(sim.model, idle_timeout_s, sim.fleet.engine_profile.name)
        settings = scheduler_settings(pool, host_kv_bytes_per_gpu=sim.host_kv_bytes_per_gpu)
        if idle_timeout_s is None or idle_timeout_s <= 0:  # the bench's "never": release on the end signal only
            settings = replace(settings, default_idle_timeout_s=float("inf"))
        settings = replace(settings, placement=self.placement)
        self.pd = fleet_pd_settings(sim, pd_settings(pool))
        decoders = [
            DecoderState(
                name=d.name,
                node=d.name,
                tier=d.spec.tier,
                capacity_kv_tokens=d.capacity,
                gpu_count=d.spec.tp,
                energy_per_token_j=decoder_energy_prior_j(d.spec.device, sim.model),
            )
            for d in sim.decoders.values()
        ]
        self.bind_pool(decoders, [PrefillState(p.name, p.spec.tier) for p in sim.prefill.values()], settings)

    def bind_pool(
        self, decoders: Sequence[DecoderState], prefills: Sequence[PrefillState], settings: SchedulerSettings
    ) -> None:
        """The pool as the scheduler sees it (the simulator's fleet, or a test's table)."""
        self.scheduler.configure(settings)
        for d in decoders:
            self.scheduler.decoder_changed(d)
        self.scheduler.set_prefills(prefills)

    # events ----------------------------------------------------------------------------------------------
    def route(self, state: ConvState, record: TurnRecord, now: float) -> Route | None:
        holding = self.scheduler.holding(state.key)
        if holding is not None:
            route, site = self._decided(state, record, holding.decoder, now)
            self._apply(self.scheduler.turn_started(state.key, now, site))
            return route
        decisions = self.scheduler.admit(self.request(state, record), now)
        placed = next((d for d in decisions if d.placed and d.conversation == state.key), None)
        self._apply([d for d in decisions if d is not placed])
        if placed is None or placed.decoder is None:
            return None  # waits in the scheduler's queue; a later event's drain starts it (`_apply`)
        if self._sim is None:  # driven without a simulator: no data plane to report
            return RemoteRoute(placed.prefill or "", placed.decoder, record.input_tokens)
        return self._first_turn(placed, state, record, now)

    def _decided(self, state: ConvState, record: TurnRecord, decoder: str, now: float) -> tuple[Route, PrefillSite]:
        """The turn's route on its decoder, where the P/D decider puts its prefill."""
        choice = decide_turn(self.sim, self.pd, state, record, decoder, now)
        return route_for(choice, record, decoder), choice.site

    def _first_turn(self, placed: Decision, state: ConvState, record: TurnRecord, now: float) -> Route:
        # As the router does (`core.pd.decide_before_placement`): a prefill on the pool starts before the placement
        # names the decoder, unless the likely decoder would prefill it sooner; then it is decided for the decoder
        # placed. On the pool, the server used is reported and counted there.
        assert placed.decoder is not None
        early = first_turn_before_placement(self.sim, self.pd, state, record, now)
        if early is not None:
            route = route_for(early, record, placed.decoder)
        else:
            route, _ = self._decided(state, record, placed.decoder, now)
        if isinstance(route, RemoteRoute):
            self.scheduler.prefill_reported(placed.prefill, route.prefill)
        return route

    @staticmethod
    def request(state: ConvState, record: TurnRecord) -> ConversationRequest:
        return ConversationRequest(state.key, record.input_tokens, 0, record.arrival_s)  # its wait starts now

    def retain(self, state: ConvState, decoder: str) -> Retain:
        return "pin"

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        live = record.input_tokens + record.output_tokens
        self._apply(self.scheduler.usage_observed(state.key, live, now, turns=record.index + 1))

    def release(self, state: ConvState, now: float) -> None:
        reason = Reason.COMPLETED if state.finished else Reason.IDLE_TIMEOUT
        self._apply(self.scheduler.release(state.key, reason, now_s=now))

    def kv_offloaded(self, state: ConvState) -> None:
        if not self._applying:  # the simulator's own memory pressure moved it
            self._apply(self.scheduler.kv_offloaded(state.key, self.sim.now))

    def sweep(self, now: float) -> list[Decision]:
        """The scheduler's timers (idle timeout, active window, opt-in TTLs); the simulator calls it every
        `sweep_interval_s`, as the operator's sweep loop runs."""
        decisions = self.scheduler.sweep(now)
        self._apply(decisions)
        return decisions

    def decoder_lost(self, name: str, now: float) -> list[Decision]:
        """A decoder leaves (the operator: pod deleted or unready); its conversations move or fail."""
        self.scheduler.decoder_removed(name)
        decisions = self.scheduler.decoders_lost([name], now)
        self._apply(decisions)
        return decisions

    def energy_measured(self, decoder: str, energy_per_token_j: float) -> None:
        self.scheduler.energy_measured(decoder, energy_per_token_j)

    # decisions applied to the simulated decoders -----------------------------------------------------------
    def _apply(self, decisions: Sequence[Decision]) -> None:
        if self._sim is None:
            return
        started: list[Decision] = []
        refused: list[Decision] = []
        released: list[str] = []
        self._applying = True
        try:
            for d in decisions:
                if d.verdict is Verdict.PLACED:
                    started.append(d)
                elif d.verdict is Verdict.FAILED:  # refused before its placement: its client is turned away
                    refused.append(d)
                elif d.verdict is Verdict.RELEASED and d.reason is Reason.IDLE_TIMEOUT:
                    released.append(d.conversation)
                else:
                    self._apply_kv(d)
        finally:
            self._applying = False
        for key in released:  # the scheduler's idle timeout: the data plane drops its KV everywhere
            self.sim.release_conversation(key)
        for d in refused:
            self.sim.refuse(d.conversation, d.reason.value)
        for d in started:  # placed from the queue: the waiting first turn starts
            waiting = self.sim.waiting_turn(d.conversation)
            if waiting is not None:
                self.sim.start_placed(d.conversation, self._first_turn(d, *waiting, self.sim.now))

    def _apply_kv(self, d: Decision) -> None:
        decoder = self.sim.decoders.get(d.decoder or "")
        if decoder is None:
            return
        if d.verdict is Verdict.OFFLOADED and d.conversation in decoder.pinned:
            if decoder.pinned[d.conversation] <= decoder.host_free_tokens():
                self.sim.offload(decoder, d.conversation)
            else:  # a reloading turn's host copy is still there until its prefill starts: no room
                self.sim.drop_pinned(decoder, d.conversation)
        elif d.verdict is Verdict.DROPPED:
            decoder.drop_host(d.conversation)
            if d.conversation in decoder.pinned:
                self.sim.drop_pinned(decoder, d.conversation)


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


class ConServeLaterTurnsOnDecoder(ConServe):
    """ConServe with the P/D rule it had before the decider (`prefillDecider.rule: Decoder`): first turns on the
    pool, later turns on the decoder whatever the load. The ablation of the decider's share of the result."""

    name = "conserve@decoder"
    pd_rule_override = PdRule.DECODER


_CONSERVE: tuple[type[ConServe], ...] = (ConServe, ConServePack, ConServeNoOffload, ConServeLaterTurnsOnDecoder)
#: Every baseline with the shared P/D decider: the per-turn routers, and llm-d's flow control (a gateway queue) in
#: front of its router, the peer that queues too (`conserve.sim.flowcontrol`).
_BASELINES: tuple[type[PerTurn], ...] = (*PER_TURN_BASELINES, LlmdFlowControl)
_NATIVE: tuple[type[PerTurn], ...] = (*NATIVE_BASELINES, with_native_rule(LlmdFlowControl))
POLICIES: dict[str, type[ConServe] | type[PerTurn]] = {
    **{p.name: p for p in _CONSERVE},
    **{p.name: p for p in _BASELINES},
    **{p.name: p for p in _NATIVE},
}
#: The conversation-level policies (the default profile first) and the per-turn baselines.
CONSERVE_VARIANTS = tuple(p.name for p in _CONSERVE)
#: The baselines with the shared P/D decider (the fair comparison), and each with its own P/D rule (`@native`).
BASELINES = tuple(p.name for p in _BASELINES)
NATIVE = tuple(p.name for p in _NATIVE)


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICIES)})") from None
