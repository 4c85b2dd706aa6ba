"""The operator's decisions: place, queue, follow turns, release, move off a lost decoder.

Every decision is made under the pool's asyncio lock on the in-memory ledger (the single writer's view), so a
burst of concurrent creations can never oversubscribe a decoder; the API writes happen after the lock is left
(a decision is reserved first, written second: the ledger is never behind the API server). The handler modules
(conversation.py, decoderpool.py, pods.py) translate watch events into these calls.

Rules (documented in the README of examples/ too):
- Queue: Pending conversations wait in priority order, then age (core.pending). When capacity frees, every
  waiting conversation that now fits is placed, in that order (best-effort FIFO: a small one may pass a large
  one that still does not fit).
- Outgrown reservation: when a turn takes the live context past the reservation, the reservation is extended
  in place to 1.25 x the live context (or, failing that, to the live context) when the decoder has room;
  otherwise the conversation stays pinned (moving KV costs more than it saves), the `Outgrown` condition says
  so, and the decoder takes no new conversation until it drains.
- Decoder lost (pod deleted, unready or terminating): its conversations are re-placed in priority order with a
  reservation of max(reservation, live context), each move counted as one more KV transfer and a new
  placementGeneration; a conversation that fits nowhere is Failed with reason DecoderLost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from conserve import metrics
from conserve.api.conversation import Phase
from conserve.controller.kube import Kube, NotFound, Refused
from conserve.controller.state import (
    FINALIZER,
    ConvRecord,
    PoolRuntime,
    World,
    format_time,
    parse_time,
)
from conserve.controller.status import conversation_status_patch
from conserve.core.gpus import Tier
from conserve.core.ledger import CapacityError
from conserve.core.occupancy import with_observed
from conserve.core.pending import order_pending
from conserve.core.placement import (
    DecoderState,
    PlacementRequest,
    PlacementSettings,
    PlacementWeights,
    TierPolicy,
    largest_placeable_kv_tokens,
    place,
)
from conserve.core.prefill import PrefillState, pick_prefill
from conserve.core.reservation import GrowthObservation, reservation_kv_tokens

log = logging.getLogger("conserve.operator")

PLURAL = "conversations"
EXTEND_FACTOR = 1.25


def observations_from_ratios(ratios: Iterable[float]) -> list[GrowthObservation]:
    """The pool status keeps growth history as ratios (final context / first input); the core wants pairs."""
    scale = 1_000_000
    return [GrowthObservation(scale, max(round(r * scale), 0)) for r in ratios]


class Clock(Protocol):
    def now(self) -> float: ...  # seconds since the epoch
    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True, slots=True)
class EngineConfig:
    write_retries: int = 6
    pool_status_interval_s: float = 0.5
    idle_sweep_interval_s: float = 1.0
    #: A Decoding conversation without a turn for this long (or half its idle timeout) shows phase Idle.
    idle_phase_after_s: float = 60.0
    event_concurrency: int = 8
    #: Post Normal Events (Placed, Released, ...) too; False keeps only Warnings (one write less per placement).
    normal_events: bool = True
    #: An engine's occupancy reading older than this is ignored (a decoder that stopped answering).
    observed_max_age_s: float = 10.0


@dataclass(slots=True)
class Outcome:
    """What a decision changed, to be written after the pool's lock is left."""

    record: ConvRecord
    result: str  # placed, replaced, queued, failed, unchanged
    event_reason: str = ""
    event_message: str = ""
    warning: bool = False


class Engine:
    def __init__(self, kube: Kube, config: EngineConfig | None = None, clock: Clock | None = None) -> None:
        self.kube = kube
        self.config = config or EngineConfig()
        self.clock: Clock = clock or SystemClock()
        self.world = World()
        self._events = asyncio.Semaphore(self.config.event_concurrency)
        self._background: set[asyncio.Task[Any]] = set()
        #: Set when this replica lost its Lease: from then on nothing is written (Kopf takes a moment to stop).
        self.fenced = False
        #: Called with a pool whenever its status should be rewritten (decoderpool.py installs the writer).
        self.on_pool_changed: Callable[[PoolRuntime], None] = lambda pool: pool.status_dirty.set()

    # --- helpers --------------------------------------------------------------------------------------------
    def spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain_background(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _labels(self, pool: PoolRuntime) -> tuple[str, str]:
        return (pool.namespace, pool.name)

    @staticmethod
    def settings(pool: PoolRuntime) -> PlacementSettings:
        assert pool.spec is not None
        p = pool.spec.placement
        w = p.weights
        return PlacementSettings(
            headroom_fraction=p.headroom_fraction,
            tier_policy=TierPolicy(p.tier_policy),
            weights=PlacementWeights(w.kv_balance, w.kv_pack, w.tier, w.energy, w.conversations),
        )

    def reservation_for(self, pool: PoolRuntime, record: ConvRecord) -> int:
        assert pool.spec is not None
        headroom = pool.spec.placement.headroom_fraction
        ready = [d for d in pool.ledger.decoders.values() if d.ready]
        ready_caps = [largest_placeable_kv_tokens(d.capacity_kv_tokens, headroom) for d in ready]
        return reservation_kv_tokens(
            record.spec.first_turn_input_tokens,
            observations_from_ratios(list(pool.growth_ratios)),
            expected_turns=record.spec.expected_turns,
            max_decoder_capacity_kv_tokens=max(ready_caps, default=None),
        )

    def placement_view(self, pool: PoolRuntime) -> list[DecoderState]:
        """The ledger's decoders with the engines' observed occupancy folded in (the larger wins; see
        controller/occupancy.py for why)."""
        if not pool.observed:
            return pool.ledger.snapshot()
        max_age = self.config.observed_max_age_s
        return with_observed(pool.ledger.snapshot(), pool.observed, self.clock.monotonic(), max_age)

    # --- decisions (call under pool.lock) -------------------------------------------------------------------
    def decide(self, pool: PoolRuntime, record: ConvRecord, *, replacing: bool = False) -> Outcome:
        now = self.clock.now()
        if pool.spec is None:
            reason = "InvalidPool" if pool.spec_error else "PoolNotFound"
            message = pool.spec_error or f"DecoderPool {pool.name!r} not found in namespace {pool.namespace}"
            return self._wait_or_fail(pool, record, reason, message, replacing)
        reservation = max(record.reserved_kv_tokens, record.live_kv_tokens) if replacing else 0
        reservation = max(reservation, self.reservation_for(pool, record))
        started = time.perf_counter()
        decision = place(PlacementRequest(record.key, reservation), self.placement_view(pool), self.settings(pool))
        metrics.PLACEMENT_DECISION.labels(*self._labels(pool)).observe(time.perf_counter() - started)
        if decision.decoder is None:
            if decision.reason == "NoCapacity" and pool.spec.placement.when_full == "Reject" and not replacing:
                return self._fail(pool, record, "NoCapacity", decision.message)
            return self._wait_or_fail(pool, record, decision.reason, decision.message, replacing)
        try:
            pool.ledger.reserve(record.key, decision.decoder, reservation, live_kv_tokens=record.live_kv_tokens)
        except CapacityError as exc:  # the filters and the ledger disagree: never oversubscribe
            return self._wait_or_fail(pool, record, "NoCapacity", str(exc), replacing)
        pool.pending.pop(record.key, None)
        info = pool.decoders[decision.decoder]
        record.decoder = info.endpoint_model()
        record.reserved_kv_tokens = reservation
        record.placement_generation += 1
        record.kv_transfers += 1
        if not replacing:
            record.prefill = self._pick_prefill(pool)
            record.phase = Phase.PREFILLING
            record.placed_at = format_time(now)
            record.last_activity_s = record.last_activity_s or now
        record.dirty = True
        reason = "Replaced" if replacing else "Placed"
        message = f"{decision.message}; {reservation} KV tokens reserved"
        record.set_condition("Placed", "True", reason, message, now)
        metrics.KV_TRANSFERS.labels(*self._labels(pool)).inc()
        return Outcome(record, "replaced" if replacing else "placed", reason, message)

    def _pick_prefill(self, pool: PoolRuntime) -> Any:
        states = [
            PrefillState(p.pod, Tier(p.tier) if p.tier else None, p.ready, pool.prefill_assigned.get(p.pod, 0))
            for p in pool.prefills.values()
        ]
        name = pick_prefill(states)
        if name is None:
            return None
        pool.prefill_assigned[name] = pool.prefill_assigned.get(name, 0) + 1
        return pool.prefills[name].endpoint_model()

    def _wait_or_fail(
        self, pool: PoolRuntime, record: ConvRecord, reason: str, message: str, replacing: bool
    ) -> Outcome:
        if replacing:
            return self._fail(pool, record, "DecoderLost", f"its decoder was lost and {message}")
        pool.pending[record.key] = record.pending_item()
        record.phase = Phase.PENDING
        changed = record.set_condition("Placed", "False", reason, message, self.clock.now())
        if not changed:
            return Outcome(record, "unchanged")
        record.dirty = True
        return Outcome(record, "queued", reason, message)

    def _fail(self, pool: PoolRuntime, record: ConvRecord, reason: str, message: str) -> Outcome:
        pool.pending.pop(record.key, None)
        pool.ledger.release(record.key)
        record.phase = Phase.FAILED
        record.decoder = None
        record.reserved_kv_tokens = 0
        record.completed_at = format_time(self.clock.now())
        record.set_condition("Placed", "False", reason, message, self.clock.now())
        record.dirty = True
        return Outcome(record, "failed", reason, message, warning=True)

    # --- flows ----------------------------------------------------------------------------------------------
    async def admit(self, record: ConvRecord) -> None:
        """A conversation not placed yet: try it now (the queue's order only matters when capacity frees)."""
        pool = self.world.pool_of(record)
        async with pool.lock:
            if record.placed or record.terminal:
                return
            outcome = self.decide(pool, record)
        await self.commit([outcome], pool)

    async def drain(self, pool: PoolRuntime) -> None:
        """Place the waiting conversations that fit now, in queue order."""
        outcomes: list[Outcome] = []
        async with pool.lock:
            if not pool.pending:
                return
            best_free = self._best_free(pool)
            for item in order_pending(pool.pending.values()):
                record = self.world.convs.get(item.conversation)
                if record is None or record.placed or record.terminal:
                    pool.pending.pop(item.conversation, None)
                    continue
                # Cheap skip: nothing can hold it (avoids scoring every decoder for every waiting conversation).
                # Only for conversations already told they wait (a new one still gets its Pending status).
                if (
                    pool.spec is not None
                    and best_free is not None
                    and "Placed" in record.conditions
                    and self.reservation_for(pool, record) > best_free
                ):
                    continue
                outcome = self.decide(pool, record)
                if outcome.result != "unchanged":
                    outcomes.append(outcome)
                if outcome.result == "placed":
                    best_free = self._best_free(pool)
        await self.commit(outcomes, pool)

    def _best_free(self, pool: PoolRuntime) -> int | None:
        if pool.spec is None:
            return None
        headroom = pool.spec.placement.headroom_fraction
        frees = [d.free_kv_tokens - int(d.capacity_kv_tokens * headroom) for d in self.placement_view(pool) if d.ready]
        return max(frees, default=0)

    async def release(self, record: ConvRecord, reason: str, message: str, *, write: bool = True) -> None:
        """End a conversation's hold on capacity (exactly once: the ledger says whether it held anything)."""
        pool = self.world.pool_of(record)
        async with pool.lock:
            pool.pending.pop(record.key, None)
            held = pool.ledger.release(record.key)
            if not record.terminal:
                now = self.clock.now()
                record.phase = Phase.COMPLETED
                record.completed_at = format_time(now)
                record.set_condition("Ended", "True", reason, message, now)
                record.dirty = True
            if held:
                metrics.RELEASES.labels(*self._labels(pool), reason).inc()
                if record.turns > 0:
                    pool.growth_ratios.append(
                        round(max(record.live_kv_tokens, 1) / record.spec.first_turn_input_tokens, 4)
                    )
        if write:
            await self.write_status(record)
        if held:
            self.post_event(record, "Released", f"{message}; capacity released")
            await self.remove_finalizer(record)
            self.on_pool_changed(pool)
            await self.drain(pool)
        elif record.has_finalizer:
            await self.remove_finalizer(record)

    async def decoders_lost(self, pool: PoolRuntime, pods: Iterable[str]) -> None:
        """Move every conversation of the lost decoders to another decoder, or fail it."""
        outcomes: list[Outcome] = []
        async with pool.lock:
            orphans: list[ConvRecord] = []
            for pod in pods:
                for key in pool.ledger.conversations_on(pod):
                    pool.ledger.release(key)
                    record = self.world.convs.get(key)
                    if record is not None:
                        metrics.RELEASES.labels(*self._labels(pool), "DecoderLost").inc()
                        orphans.append(record)
            for record in sorted(orphans, key=lambda r: (-r.spec.priority, r.created_at_s, r.key)):
                outcomes.append(self.decide(pool, record, replacing=True))
        await self.commit(outcomes, pool)
        for outcome in outcomes:
            if outcome.result == "failed":
                await self.remove_finalizer(outcome.record)

    def apply_usage(self, pool: PoolRuntime, record: ConvRecord) -> bool:
        """Follow a turn report (spec.usage: cumulative counters). Call under pool.lock; True when changed."""
        usage = record.spec.usage
        if (usage.turns, usage.input_tokens, usage.output_tokens) == (
            record.turns,
            record.input_tokens,
            record.output_tokens,
        ) and usage.time_to_first_effective_token_seconds == record.ttfet_s:
            return False
        now = self.clock.now()
        record.turns, record.input_tokens, record.output_tokens = usage.turns, usage.input_tokens, usage.output_tokens
        record.ttfet_s = usage.time_to_first_effective_token_seconds
        record.live_kv_tokens = usage.input_tokens + usage.output_tokens
        record.last_activity_s = parse_time(usage.last_turn_time) or now
        if record.turns > 0 and record.phase in (Phase.PREFILLING, Phase.IDLE):
            record.phase = Phase.DECODING
        record.dirty = True
        if not record.placed:
            return True
        if record.live_kv_tokens > record.reserved_kv_tokens:
            target = math.ceil(record.live_kv_tokens * EXTEND_FACTOR)
            if pool.ledger.try_extend(record.key, target) or pool.ledger.try_extend(record.key, record.live_kv_tokens):
                held = pool.ledger.holding(record.key)
                record.reserved_kv_tokens = held[1] if held else record.reserved_kv_tokens
                metrics.OUTGROWN.labels(*self._labels(pool), "extended").inc()
                if "Outgrown" in record.conditions:
                    record.set_condition("Outgrown", "False", "Extended", "reservation extended in place", now)
            else:
                metrics.OUTGROWN.labels(*self._labels(pool), "pinned").inc()
                if record.set_condition(
                    "Outgrown",
                    "True",
                    "DecoderFull",
                    f"live context {record.live_kv_tokens} exceeds the reservation {record.reserved_kv_tokens} "
                    "and the decoder has no room to extend it; kept pinned",
                    now,
                ):
                    self.post_event(record, "Outgrown", record.conditions["Outgrown"].message, warning=True)
        pool.ledger.update_live(record.key, record.live_kv_tokens)
        return True

    async def sweep_idle(self) -> None:
        """Release conversations idle past their timeout; show phase Idle before that."""
        now = self.clock.now()
        to_release: list[tuple[ConvRecord, int]] = []
        to_write: list[ConvRecord] = []
        for record in list(self.world.convs.values()):
            if not record.placed or record.last_activity_s is None:
                continue
            pool = self.world.pool_of(record)
            default = pool.spec.default_idle_timeout_seconds if pool.spec is not None else 1800
            timeout = record.spec.idle_timeout_seconds or default
            idle_for = now - record.last_activity_s
            if idle_for >= timeout:
                to_release.append((record, timeout))
            elif record.phase is Phase.DECODING and idle_for >= min(self.config.idle_phase_after_s, timeout / 2):
                record.phase = Phase.IDLE
                record.dirty = True
                to_write.append(record)
        for record, timeout in to_release:
            await self.release(record, "IdleTimeout", f"no turn for {timeout}s")
        await asyncio.gather(*(self.write_status(r) for r in to_write))

    # --- writes ---------------------------------------------------------------------------------------------
    async def commit(self, outcomes: list[Outcome], pool: PoolRuntime) -> None:
        if not outcomes:
            return
        await asyncio.gather(*(self._commit_one(o, pool) for o in outcomes))
        metrics.QUEUE_LENGTH.labels(*self._labels(pool)).set(len(pool.pending))
        self.on_pool_changed(pool)

    async def _commit_one(self, outcome: Outcome, pool: PoolRuntime) -> None:
        record = outcome.record
        if outcome.result == "unchanged":
            return
        # One write per placement: no finalizer (a delete is released from the watch, or by the rebuild on start).
        await self.write_status(record)
        metrics.PLACEMENTS.labels(*self._labels(pool), outcome.result).inc()
        if outcome.result in ("placed", "replaced"):
            latency = self.clock.monotonic() - record.first_seen_monotonic
            log.debug("placement of %s written %.1f ms after it was seen", record.key, latency * 1000)
            metrics.PLACEMENT_LATENCY.labels(*self._labels(pool)).observe(latency)
        if outcome.event_reason:
            self.post_event(record, outcome.event_reason, outcome.event_message, warning=outcome.warning)

    async def write_status(self, record: ConvRecord) -> None:
        """Write the record's status (only the fields the operator owns). Writes of one record are serialized
        and coalesced: each writes the latest decision."""
        async with record.write_lock:
            if not record.dirty:
                return
            record.dirty = False
            patch = conversation_status_patch(record)
            ok = await self._retry(lambda: self.kube.patch_status(PLURAL, record.namespace, record.name, patch))
            if not ok:
                record.dirty = True
                metrics.STATUS_WRITE_ERRORS.labels("Conversation").inc()

    async def remove_finalizer(self, record: ConvRecord) -> None:
        """Remove the finalizer earlier versions added (this one adds none: one write per placement)."""
        if not record.has_finalizer:
            return
        record.has_finalizer = False
        record.finalizers = [f for f in record.finalizers if f != FINALIZER]
        await self._patch_finalizers(record, record.finalizers)

    async def _patch_finalizers(self, record: ConvRecord, finalizers: list[str]) -> None:
        # A merge patch replaces the list; other finalizers seen on the object are kept in it.
        patch = {"metadata": {"finalizers": finalizers or None}}
        await self._retry(lambda: self.kube.patch_object(PLURAL, record.namespace, record.name, patch))

    async def _retry(self, call: Callable[[], Awaitable[Any]]) -> bool:
        delay = 0.05
        for attempt in range(self.config.write_retries):
            if self.fenced:
                return False
            try:
                await call()
                return True
            except (NotFound, Refused) as exc:
                log.debug("write refused: %s", exc)
                return True  # gone or refused: nothing to retry; the watch tells us what happened
            except Exception as exc:  # network, 5xx, 429: retry with back-off
                if attempt == self.config.write_retries - 1:
                    log.warning("write failed after %d attempts: %s", attempt + 1, exc)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return False

    def post_event(self, record: ConvRecord, reason: str, message: str, *, warning: bool = False) -> None:
        if not warning and not self.config.normal_events:
            return
        obj = {
            "apiVersion": "conserve.dev/v1alpha1",
            "kind": "Conversation",
            "metadata": {"name": record.name, "namespace": record.namespace, "uid": record.uid},
        }
        self.spawn(self._post(obj, reason, message, warning))

    def post_pool_event(self, pool: PoolRuntime, reason: str, message: str, *, warning: bool = False) -> None:
        if not warning and not self.config.normal_events:
            return
        obj = {
            "apiVersion": "conserve.dev/v1alpha1",
            "kind": "DecoderPool",
            "metadata": {
                "name": pool.name,
                "namespace": pool.namespace,
                "uid": pool.body.get("metadata", {}).get("uid", ""),
            },
        }
        self.spawn(self._post(obj, reason, message, warning))

    async def _post(self, obj: dict[str, Any], reason: str, message: str, warning: bool) -> None:
        if self.fenced:
            return
        async with self._events:
            # Transient failures (timeouts, 429, 5xx under load) are retried like status writes; a refusal (403
            # into a terminating namespace, say) is not. `_retry` never raises: an Event never fails a decision.
            await self._retry(lambda: self.kube.post_event(obj, reason, message, warning=warning))
