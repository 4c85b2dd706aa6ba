"""The operator's decisions, made by each pool's scheduler (`conserve.core.scheduler`), and their writes.

Every decision is made under the pool's asyncio lock by the pool's `PoolScheduler` (the same object the
simulator runs), so a burst of concurrent creations can never oversubscribe a decoder; the API writes happen
after the lock is left (a decision is reserved first, written second: the scheduler is never behind the API
server). This module turns the scheduler's typed decisions into records, then into writes (status patches,
Events, metrics; retries and fencing are writer.py's). The handler modules (conversation.py, decoderpool.py) turn
watch events into these calls. The rules themselves (queue order, outgrowth, decoder loss, KV lifecycle) are
the core's: see operator/conserve/core/README.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from conserve import metrics
from conserve.api.conversation import Endpoint, Phase
from conserve.api.usage_wire import behind_status
from conserve.controller import slo
from conserve.controller.kube import Kube
from conserve.controller.state import ConvRecord, PoolRuntime, World, format_time, parse_time
from conserve.controller.writer import Writer, WriterConfig
from conserve.core.decisions import Decision, PrefillSite, Reason, Verdict

log = logging.getLogger("conserve.operator")

_LIFECYCLE = (Verdict.IDLED, Verdict.OFFLOADED, Verdict.RELOADED, Verdict.DROPPED, Verdict.REPREFILLED)


class Clock(Protocol):
    def now(self) -> float: ...  # seconds since the epoch
    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True, slots=True)
class EngineConfig(WriterConfig):
    pool_status_interval_s: float = 0.5
    idle_sweep_interval_s: float = 1.0
    #: A Decoding conversation without a turn for this long (or half its idle timeout) shows phase Idle.
    idle_phase_after_s: float = 60.0


@dataclass(slots=True)
class Outcome:
    """What a decision changed, to be written after the pool's lock is left."""

    record: ConvRecord
    result: Verdict
    event_reason: str = ""
    event_message: str = ""
    warning: bool = False


class Engine(Writer):
    """The decisions of every pool this replica leads; the writes they need are the `Writer`'s."""

    def __init__(self, kube: Kube, config: EngineConfig | None = None, clock: Clock | None = None) -> None:
        self.config = config or EngineConfig()
        super().__init__(kube, self.config)
        self.clock: Clock = clock or SystemClock()
        self.world = World()
        #: Called with a pool whenever its status should be rewritten (decoderpool.py installs the writer).
        self.on_pool_changed: Callable[[PoolRuntime], None] = lambda pool: pool.status_dirty.set()

    def _labels(self, pool: PoolRuntime) -> tuple[str, str]:
        return (pool.namespace, pool.name)

    # --- decisions to records (call under pool.lock) ----------------------------------------------------------
    def apply(self, pool: PoolRuntime, decisions: Iterable[Decision]) -> list[Outcome]:
        """Fold the scheduler's decisions into the records; the outcomes say what to write."""
        out: list[Outcome] = []
        for decision in decisions:
            record = self.world.convs.get(decision.conversation)
            if record is None:
                continue
            outcome = self._apply_one(pool, record, decision)
            if outcome is not None:
                out.append(outcome)
        return out

    def _apply_one(self, pool: PoolRuntime, record: ConvRecord, d: Decision) -> Outcome | None:
        now = self.clock.now()
        if d.placed:
            return self._apply_placement(pool, record, d, now)
        if d.verdict is Verdict.QUEUED:
            record.status.phase = Phase.PENDING
            requeued = self._unpin(record)  # its decoder was lost: it waits for room again
            if not record.set_condition("Placed", "False", d.reason.value, d.message, now) and not requeued:
                return Outcome(record, Verdict.UNCHANGED)
            record.dirty = True
            return Outcome(record, Verdict.QUEUED, d.reason.value, d.message)
        if d.verdict is Verdict.FAILED:
            slo.conversation_refused(pool, record, d.reason, now)
            record.status.phase = Phase.FAILED
            record.status.decoder = None
            record.status.reserved_kv_tokens = 0
            record.kv_state = None
            record.status.completed_at = format_time(now)
            record.set_condition("Placed", "False", d.reason.value, d.message, now)
            record.dirty = True
            return Outcome(record, Verdict.FAILED, d.reason.value, d.message, warning=True)
        if d.verdict in (Verdict.EXTENDED, Verdict.OUTGROWN):
            self._apply_outgrowth(pool, record, d, now)
            return None
        if d.verdict in _LIFECYCLE:
            view = pool.scheduler.conversation(record.key)
            record.kv_state = d.kv_state
            if view is not None:
                status = record.status
                status.offloads, status.reloads, status.reprefills = view.offloads, view.reloads, view.reprefills
            metrics.KV_LIFECYCLE.labels(*self._labels(pool), d.verdict.value, d.reason.value).inc()
            record.dirty = True
            return Outcome(record, d.verdict)
        return None

    @staticmethod
    def _unpin(record: ConvRecord) -> bool:
        """Clear a queued conversation's decoder (the router then waits for its next placement); whether it had one."""
        if record.status.decoder is None:
            return False
        record.status.decoder = None
        record.status.reserved_kv_tokens = 0
        record.kv_state = None
        return True

    def _apply_placement(self, pool: PoolRuntime, record: ConvRecord, d: Decision, now: float) -> Outcome:
        """Placed or re-placed: the decoder (and, on a first placement, the prefill server) in the record."""
        assert d.decoder is not None
        record.status.decoder = pool.decoders[d.decoder].endpoint_model()
        record.status.reserved_kv_tokens = d.reserved_kv_tokens
        record.status.placement_generation += 1
        record.status.kv_transfers += 1
        record.kv_state = d.kv_state
        if d.verdict is not Verdict.REPLACED:
            record.status.prefill = pool.prefills[d.prefill].endpoint_model() if d.prefill in pool.prefills else None
            record.status.phase = Phase.PREFILLING
            record.status.placed_at = format_time(now)
            record.last_activity_s = record.last_activity_s or now
        record.dirty = True
        record.set_condition("Placed", "True", d.reason.value, d.message, now)
        metrics.KV_TRANSFERS.labels(*self._labels(pool)).inc()
        return Outcome(record, d.verdict, d.reason.value, d.message)

    def _apply_outgrowth(self, pool: PoolRuntime, record: ConvRecord, d: Decision, now: float) -> None:
        """A reservation extended in place (condition Outgrown cleared), or outgrown and kept pinned (set)."""
        if d.verdict is Verdict.EXTENDED:
            record.status.reserved_kv_tokens = d.reserved_kv_tokens
            metrics.OUTGROWN.labels(*self._labels(pool), "extended").inc()
            if "Outgrown" in record.conditions:
                record.set_condition("Outgrown", "False", d.reason.value, d.message, now)
        else:
            metrics.OUTGROWN.labels(*self._labels(pool), "pinned").inc()
            if record.set_condition("Outgrown", "True", d.reason.value, d.message, now):
                self.post_event(record, "Outgrown", d.message, warning=True)
        record.dirty = True

    # --- flows ----------------------------------------------------------------------------------------------
    async def admit(self, record: ConvRecord) -> None:
        """A conversation not placed yet: try it now (the queue's order only matters when capacity frees)."""
        pool = self.world.pool_of(record)
        async with pool.lock:
            if record.placed or record.terminal:
                return
            self._sync_problem(pool)
            started = time.perf_counter()
            decisions = pool.scheduler.admit(record.request(), self.clock.now())
            metrics.PLACEMENT_DECISION.labels(*self._labels(pool)).observe(time.perf_counter() - started)
            outcomes = self.apply(pool, decisions)
        await self.commit(outcomes, pool)

    def _sync_problem(self, pool: PoolRuntime) -> None:
        if pool.spec is None:
            reason = Reason.INVALID_POOL if pool.spec_error else Reason.POOL_NOT_FOUND
            message = pool.spec_error or f"DecoderPool {pool.name!r} not found in namespace {pool.namespace}"
            pool.scheduler.set_problem(reason, message)

    async def drain(self, pool: PoolRuntime) -> None:
        """Place the waiting conversations that fit now, in queue order (after an adapter-side change the
        scheduler cannot see as an event: a decoder added or grown, a pool spec fixed, an engine reading)."""
        async with pool.lock:
            if not pool.scheduler.pending_count:
                return
            self._sync_problem(pool)
            outcomes = [
                o for o in self.apply(pool, pool.scheduler.drain(self.clock.now())) if o.result is not Verdict.UNCHANGED
            ]
        await self.commit(outcomes, pool)

    async def release(self, record: ConvRecord, reason: str, message: str, *, write: bool = True) -> None:
        """End a conversation's hold on capacity (exactly once: the scheduler says whether it held anything);
        the scheduler places waiting conversations in the room freed, in the same step."""
        pool = self.world.pool_of(record)
        async with pool.lock:
            decisions = pool.scheduler.release(record.key, Reason(reason), message, now_s=self.clock.now())
            held = bool(decisions) and decisions[0].verdict is Verdict.RELEASED
            self._ended(pool, record, reason, message, held)
            outcomes = self.apply(pool, decisions[1:] if held else decisions)
        await self._after_release(pool, record, message, held, write)
        await self.commit(outcomes, pool)

    def _ended(self, pool: PoolRuntime, record: ConvRecord, reason: str, message: str, held: bool) -> None:
        if not record.terminal:
            now = self.clock.now()
            slo.conversation_ended(pool, record, now)
            record.status.phase = Phase.COMPLETED
            record.status.completed_at = format_time(now)
            record.set_condition("Ended", "True", reason, message, now)
            record.dirty = True
        if held:
            metrics.RELEASES.labels(*self._labels(pool), reason).inc()

    async def _after_release(
        self, pool: PoolRuntime, record: ConvRecord, message: str, held: bool, write: bool
    ) -> None:
        if write:
            await self.write_status(record)
        if held:
            self.post_event(record, "Released", f"{message}; capacity released")
            await self.remove_finalizer(record)
            self.on_pool_changed(pool)
        elif record.has_finalizer:
            await self.remove_finalizer(record)

    async def decoders_lost(self, pool: PoolRuntime, pods: Iterable[str]) -> None:
        """Move every conversation of the lost decoders to another decoder, or fail it."""
        async with pool.lock:
            lost = list(pods)
            for pod in lost:
                for _ in pool.scheduler.conversations_on(pod):
                    metrics.RELEASES.labels(*self._labels(pool), "DecoderLost").inc()
            self._sync_problem(pool)
            outcomes = self.apply(pool, pool.scheduler.decoders_lost(lost, self.clock.now()))
        await self.commit(outcomes, pool)
        for outcome in outcomes:
            if outcome.result is Verdict.FAILED:
                await self.remove_finalizer(outcome.record)

    def apply_usage(self, pool: PoolRuntime, record: ConvRecord) -> tuple[bool, list[Outcome]]:
        """Follow a turn report (spec.usage: cumulative counters). Call under pool.lock. Returns whether it
        changed, and what the scheduler's decisions changed for other conversations (KV moved to make room,
        waiting ones placed in the room the turn's end freed): the caller commits them after the lock."""
        usage, status = record.spec.usage, record.status
        if behind_status(usage, status):  # the status checkpointed streamed reports this spec never saw
            return False, []
        if (
            usage.turns,
            usage.input_tokens,
            usage.output_tokens,
            usage.time_to_first_effective_token_seconds,
            usage.pool_prefills,
            usage.slo_missed_turns,
        ) == (
            status.turns_served,
            status.input_tokens,
            status.output_tokens,
            status.time_to_first_effective_token_seconds,
            status.pool_prefills,
            status.slo_missed_turns,
        ):
            return False, []
        now = self.clock.now()
        status.turns_served, status.input_tokens, status.output_tokens = (
            usage.turns,
            usage.input_tokens,
            usage.output_tokens,
        )
        status.time_to_first_effective_token_seconds = usage.time_to_first_effective_token_seconds
        status.pool_prefills = min(usage.pool_prefills, usage.turns)
        status.decoder_prefills = usage.turns - status.pool_prefills
        status.slo_missed_turns = usage.slo_missed_turns
        status.slo_class = slo.class_of(pool, record)
        status.live_kv_tokens = usage.input_tokens + usage.output_tokens
        record.last_activity_s = parse_time(usage.last_turn_time) or now
        if status.turns_served > 0 and status.phase in (Phase.PREFILLING, Phase.IDLE):
            status.phase = Phase.DECODING
        record.dirty = True
        self._follow_prefill(pool, record)
        decisions = pool.scheduler.usage_observed(
            record.key, status.live_kv_tokens, record.last_activity_s, turns=status.turns_served
        )
        outcomes = self.apply(pool, decisions)
        view = pool.scheduler.conversation(record.key)
        if record.placed and view is not None:  # after the decisions: a reload ends with the turn, idle
            record.kv_state = view.kv_state
        return True, [o for o in outcomes if o.record is not record]

    async def turn_started(self, record: ConvRecord, prefill_site: PrefillSite = PrefillSite.DECODER) -> None:
        """A turn of a placed conversation arrived: it is in flight until its report (never idled, offloaded,
        dropped or timed out meanwhile), and KV offloaded or dropped comes back to its decoder, others' idle KV
        making room (`PoolScheduler.turn_started`). Not wired yet: nothing in the watch path calls it (the router
        reports a turn at its end, in spec.usage); the simulator's ConServe makes this call at every later
        turn's arrival, and the equivalence test (tests/unit/test_scheduler_equivalence.py) drives it here."""
        pool = self.world.pool_of(record)
        async with pool.lock:
            if not record.placed:
                return
            outcomes = self.apply(pool, pool.scheduler.turn_started(record.key, self.clock.now(), prefill_site))
            self._follow_kv_state(pool, record)
        await self.commit(outcomes, pool)
        await self.write_status(record)

    async def kv_offloaded(self, record: ConvRecord) -> None:
        """The data plane moved a conversation's KV to its decoder's host memory on its own (memory pressure):
        its GPU room is free, so waiting conversations may be placed (`PoolScheduler.kv_offloaded`). Not wired
        yet: no engine reports its own offloads to the operator; the simulator's ConServe makes this call, and
        the equivalence test drives it here."""
        pool = self.world.pool_of(record)
        async with pool.lock:
            if not record.placed:
                return
            outcomes = self.apply(pool, pool.scheduler.kv_offloaded(record.key, self.clock.now()))
            self._follow_kv_state(pool, record)
        await self.commit(outcomes, pool)
        await self.write_status(record)

    def _follow_kv_state(self, pool: PoolRuntime, record: ConvRecord) -> None:
        """The record's KV state and lifecycle counts as the scheduler holds them (a change the scheduler made
        without a decision of its own: a turn's arrival, an offload the data plane made). Call under pool.lock."""
        view = pool.scheduler.conversation(record.key)
        if view is None:
            return
        status = record.status
        now = (view.kv_state, view.offloads, view.reloads, view.reprefills)
        if now != (record.kv_state, status.offloads, status.reloads, status.reprefills):
            record.kv_state = view.kv_state
            status.offloads, status.reloads, status.reprefills = view.offloads, view.reloads, view.reprefills
            record.dirty = True

    def _follow_prefill(self, pool: PoolRuntime, record: ConvRecord) -> None:
        """The router reports the prefill server that ran the first turn (its early prefill may start before the
        placement names one): status.prefill follows it, so energy attribution charges the server that worked."""
        used = record.spec.usage.prefill_pod
        if not used or (record.status.prefill is not None and record.status.prefill.pod == used):
            return
        chosen = record.status.prefill.pod if record.status.prefill is not None else None
        info = pool.prefills.get(used)
        record.status.prefill = info.endpoint_model() if info is not None else Endpoint(pod=used)
        pool.scheduler.prefill_reported(chosen, used)

    async def sweep_idle(self) -> None:
        """Each pool's timers (idle timeout, active window, opt-in TTLs) and the placements of waiting
        conversations in the room they freed; phase Idle shown before the timeout."""
        now = self.clock.now()
        for pool in list(self.world.pools.values()):
            async with pool.lock:
                decisions = pool.scheduler.sweep(now)
                released = [d for d in decisions if d.verdict is Verdict.RELEASED]
                outcomes = self.apply(pool, [d for d in decisions if d.verdict is not Verdict.RELEASED])
                ended: list[tuple[ConvRecord, str]] = []
                for d in released:
                    record = self.world.convs.get(d.conversation)
                    if record is not None:
                        self._ended(pool, record, d.reason.value, d.message, True)
                        ended.append((record, d.message))
            for record, message in ended:
                await self._after_release(pool, record, message, True, True)
            # The sweep's drain placed what fits in the room it freed; then what waited past its budget was
            # refused (QueueWaitExceeded): its client is told to come back (the router: HTTP 429).
            await self.commit(outcomes, pool)
            for outcome in outcomes:
                if outcome.result is Verdict.FAILED:
                    await self.remove_finalizer(outcome.record)
        to_write: list[ConvRecord] = []
        for record in list(self.world.convs.values()):
            if record.status.phase is not Phase.DECODING or record.last_activity_s is None:
                continue
            pool = self.world.pool_of(record)
            default = pool.spec.default_idle_timeout_seconds if pool.spec is not None else 1800
            timeout = record.spec.idle_timeout_seconds or default
            if now - record.last_activity_s >= min(self.config.idle_phase_after_s, timeout / 2):
                record.status.phase = Phase.IDLE
                record.dirty = True
                to_write.append(record)
        await asyncio.gather(*(self.write_status(r) for r in to_write))

    # --- writes ---------------------------------------------------------------------------------------------
    async def commit(self, outcomes: list[Outcome], pool: PoolRuntime) -> None:
        if not outcomes:
            return
        await asyncio.gather(*(self._commit_one(o, pool) for o in outcomes))
        metrics.QUEUE_LENGTH.labels(*self._labels(pool)).set(pool.scheduler.pending_count)
        self.on_pool_changed(pool)

    async def _commit_one(self, outcome: Outcome, pool: PoolRuntime) -> None:
        record = outcome.record
        if outcome.result is Verdict.UNCHANGED:
            return
        placed = outcome.result in (Verdict.PLACED, Verdict.REPLACED)
        # One write per placement: no finalizer (a delete is released from the watch, or by the rebuild on start).
        await self.write_status(record)
        if outcome.result in _LIFECYCLE:
            return
        metrics.PLACEMENTS.labels(*self._labels(pool), outcome.result.value).inc()
        if placed:
            latency = self.clock.monotonic() - record.first_seen_monotonic
            log.debug("placement of %s written %.1f ms after it was seen", record.key, latency * 1000)
            metrics.PLACEMENT_LATENCY.labels(*self._labels(pool)).observe(latency)
        if outcome.event_reason:
            self.post_event(record, outcome.event_reason, outcome.event_message, warning=outcome.warning)
