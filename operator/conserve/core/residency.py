"""Where a pool's conversations' KV is (GPU, host memory, nowhere) and the moves between (`core.lifecycle`'s
states). Part of the pool scheduler (`core.scheduler`): it shares the scheduler's ledger and conversation
records and tells it when GPU occupancy changed (`on_change`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from conserve.core.decisions import ConversationRequest, Decision, PrefillSite, Reason, Verdict
from conserve.core.ledger import CapacityLedger
from conserve.core.lifecycle import GapHistory, KvState, LifecycleSettings, Resident, plan_reclaim


@dataclass(slots=True)
class ConversationView:
    """The scheduler's record of one conversation (its reservation and decoder are in the ledger)."""

    request: ConversationRequest
    last_activity_s: float | None = None
    turns: int = 0
    live_kv_tokens: int = 0
    kv_state: KvState = KvState.ACTIVE
    offloads: int = 0
    reloads: int = 0
    reprefills: int = 0
    told_waiting: bool = False  # a QUEUED decision was handed out (drain may skip it cheaply from then on)
    waiting_why: str = ""  # why it waits (the last QUEUED decision's reason and message)
    #: A turn arrived and has not ended (queued or running): never idled, offloaded, dropped or timed out.
    in_flight: bool = False
    remote_prefills: int = 0  # later turns prefilled on the prefill pool (PrefillSite.POOL)


@dataclass(frozen=True, slots=True)
class DecoderLifecycle:
    """A decoder's conversations per KV state, with their live KV tokens (for status and metrics)."""

    active: int = 0
    idle: int = 0
    idle_kv_tokens: int = 0
    offloaded: int = 0
    offloaded_kv_tokens: int = 0
    dropped: int = 0


class Residency:
    def __init__(
        self,
        ledger: CapacityLedger,
        conversations: dict[str, ConversationView],
        settings: LifecycleSettings,
        on_change: Callable[[], None],
    ) -> None:
        self.ledger = ledger
        self.conversations = conversations
        self.settings = settings
        self.on_change = on_change

    def make_resident(
        self, view: ConversationView, decoder: str, need: int, now_s: float, site: PrefillSite = PrefillSite.DECODER
    ) -> list[Decision]:
        key = view.request.key
        out: list[Decision] = []
        capacity = self.ledger.decoders[decoder].capacity_kv_tokens if decoder in self.ledger.decoders else 0
        short = need - (capacity - self.ledger.reserved_on(decoder))
        if short > 0:
            out.extend(self.reclaim_on(decoder, short, now_s, exclude=key))
        if view.kv_state is KvState.OFFLOADED:
            view.reloads += 1
            verdict, message = Verdict.RELOADED, "KV reloaded from host memory for a turn"
        else:
            view.reprefills += 1
            where = "on its decoder" if site is PrefillSite.DECODER else "on the prefill pool"
            verdict, message = Verdict.REPREFILLED, f"KV was dropped: the turn prefilled the context again {where}"
        self.ledger.set_offloaded(key, False)
        out.append(Decision(key, verdict, Reason.TURN, message, decoder, kv_state=KvState.ACTIVE))
        return out

    def residents(self, decoder: str, state: KvState, exclude: str = "") -> list[Resident]:
        out = []
        for key in self.ledger.conversations_on(decoder):
            view = self.conversations.get(key)
            if view is None or view.kv_state is not state or key == exclude or view.in_flight:
                continue
            held = self.ledger.holding(key)
            assert held is not None
            out.append(Resident(key, max(held[1], held[2]), max(held[2], 1), view.last_activity_s or 0.0))
        return out

    def reclaimable_on(self, decoder: str) -> int:
        if not self.settings.enabled:
            return 0
        return sum(r.gpu_kv_tokens for r in self.residents(decoder, KvState.IDLE))

    def lifecycle_on(self, decoder: str) -> DecoderLifecycle:
        counts = {state: 0 for state in KvState}
        tokens = {state: 0 for state in KvState}
        for key in self.ledger.conversations_on(decoder):
            view = self.conversations.get(key)
            held = self.ledger.holding(key)
            if view is None or held is None:
                continue
            counts[view.kv_state] += 1
            tokens[view.kv_state] += held[2]
        return DecoderLifecycle(
            counts[KvState.ACTIVE],
            counts[KvState.IDLE],
            tokens[KvState.IDLE],
            counts[KvState.OFFLOADED],
            tokens[KvState.OFFLOADED],
            counts[KvState.DROPPED],
        )

    def host_capacity_on(self, decoder: str) -> int:
        """The decoder's host KV tier: the pool's per-decoder figure, else per GPU x its GPUs."""
        declared = self.settings.host_kv_tokens_per_decoder
        if declared is not None:
            return declared
        state = self.ledger.decoders.get(decoder)
        return self.settings.host_kv_tokens_per_gpu * (state.gpu_count if state is not None else 1)

    def host_used_on(self, decoder: str) -> int:
        return sum(r.host_kv_tokens for r in self.residents(decoder, KvState.OFFLOADED))

    def reclaim_on(self, decoder: str, need: int, now_s: float, exclude: str = "") -> list[Decision]:
        lc = self.settings
        if not lc.enabled:
            return []
        plan = plan_reclaim(
            self.residents(decoder, KvState.IDLE, exclude),
            self.residents(decoder, KvState.OFFLOADED, exclude),
            need,
            self.host_capacity_on(decoder),
            self.host_used_on(decoder),
            now_s,
            lc.writeback_s_per_kv_token,
        )
        if plan is None:
            return []
        return self.apply_reclaim(decoder, plan.offload, plan.drop, Reason.ROOM_NEEDED)

    def apply_reclaim(
        self, decoder: str, offload: Sequence[str], drop: Sequence[str], reason: Reason
    ) -> list[Decision]:
        out: list[Decision] = []
        for key in drop:  # host room first: drops come before the offloads they make room for
            view = self.conversations[key]
            why = self._drop_reason(view, reason)
            view.kv_state = KvState.DROPPED
            self.ledger.set_offloaded(key, True)
            out.append(
                Decision(
                    key,
                    Verdict.DROPPED,
                    why,
                    "KV discarded; the next turn prefills it again",
                    decoder,
                    kv_state=KvState.DROPPED,
                )
            )
        for key in offload:
            view = self.conversations[key]
            view.kv_state = KvState.OFFLOADED
            view.offloads += 1
            self.ledger.set_offloaded(key, True)
            out.append(
                Decision(
                    key,
                    Verdict.OFFLOADED,
                    reason,
                    "KV moved to the decoder's host memory",
                    decoder,
                    kv_state=KvState.OFFLOADED,
                )
            )
        self.on_change()
        return out

    @staticmethod
    def _drop_reason(view: ConversationView, reason: Reason) -> Reason:
        """What happened: a timer's own reason; under pressure a host copy made way for a newer offload
        (HostFull), and resident KV that no host could hold went at once (HostTooSmall)."""
        if reason not in (Reason.ROOM_NEEDED, Reason.RESIDENT_TTL):
            return reason
        return Reason.HOST_FULL if view.kv_state is KvState.OFFLOADED else Reason.HOST_TOO_SMALL

    def offload_one(self, decoder: str, view: ConversationView, now_s: float) -> list[Decision]:
        held = self.ledger.holding(view.request.key)
        assert held is not None
        me = Resident(view.request.key, max(held[1], held[2]), max(held[2], 1), view.last_activity_s or 0.0)
        plan = plan_reclaim(
            [me],
            self.residents(decoder, KvState.OFFLOADED),
            1,
            self.host_capacity_on(decoder),
            self.host_used_on(decoder),
            now_s,
            self.settings.writeback_s_per_kv_token,
        )
        if plan is None or (not plan.offload and not plan.drop):
            return []
        return self.apply_reclaim(decoder, plan.offload, plan.drop, Reason.RESIDENT_TTL)

    def timers(
        self, view: ConversationView, decoder: str, idle_for: float, now_s: float, gaps: GapHistory
    ) -> list[Decision]:
        """The sweep's lifecycle timers for one conversation with no turn in flight, `idle_for` seconds after
        its last activity: idle after the active window; the pool's opt-in resident and host TTLs."""
        lc = self.settings
        key = view.request.key
        out: list[Decision] = []
        if view.kv_state is KvState.ACTIVE and view.turns > 0 and idle_for >= gaps.active_window_s(lc):
            view.kv_state = KvState.IDLE  # a turn reported, none since for the active window
            self.on_change()
            message = "no turn for the active window"
            out.append(Decision(key, Verdict.IDLED, Reason.ACTIVE_WINDOW, message, decoder, kv_state=KvState.IDLE))
        resident_ttl = gaps.resident_ttl_s(lc)
        host_ttl = gaps.host_ttl_s(lc)
        if resident_ttl is not None and view.kv_state is KvState.IDLE and idle_for >= resident_ttl:
            out.extend(self.offload_one(decoder, view, now_s))
        elif (
            resident_ttl is not None
            and host_ttl is not None
            and view.kv_state is KvState.OFFLOADED
            and idle_for >= resident_ttl + host_ttl
        ):
            out.extend(self.apply_reclaim(decoder, (), (key,), Reason.HOST_TTL))
        return out
