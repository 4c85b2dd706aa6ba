"""Conversation handler: each watch event is reconciled against the operator's record (level-triggered, so a
replayed or missed event is harmless).

The data plane reports turns through `spec.usage` (cumulative counters: turns, inputTokens, outputTokens,
lastTurnTime, timeToFirstEffectiveTokenSeconds); `spec.completed: true` ends the conversation.

Deletion needs no finalizer (one API write per placement, not two): the watch's DELETED event releases the
reservation; a delete that happened while no operator ran is released by the rebuild on start (the object is not
listed, so nothing is adopted); a delete lost in a watch gap (a 410 relist) is found by `release_vanished`, a
periodic list. The finalizer `conserve.dev/release-capacity` that earlier versions added is still removed from
objects that carry it.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from conserve.api.conversation import PLURAL, ConversationSpec, ConversationStatus, Phase
from conserve.api.labels import FINALIZER
from conserve.api.usage_wire import merge_usage
from conserve.controller.engine import Engine
from conserve.controller.state import ConvRecord, key_of, parse_time
from conserve.controller.writer import resource_version
from conserve.core.integrity import AdoptedFacts, StatusPrint, foreign, forged_end, reservation_floor, status_print
from conserve.core.lifecycle import KvState
from conserve.core.view import DEFAULT_IDLE_TIMEOUT_S

log = logging.getLogger("conserve.operator")
__all__ = [
    "PLURAL",
    "adopt",
    "audit",
    "on_event",
    "record_from_body",
    "release_vanished",
    "repair_foreign_status",
    "serve",
]


def record_from_body(body: dict[str, Any], spec: ConversationSpec, *, now_s: float, monotonic: float) -> ConvRecord:
    """A record from an object as the API server has it; its status (written by an earlier run) is adopted, or
    left out when unreadable (`audit` then says so)."""
    meta = body["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    try:
        status = ConversationStatus.model_validate(body.get("status") or {})
    except ValidationError:
        status = ConversationStatus()
    return ConvRecord.adopt(
        status,
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta.get("uid", ""),
        spec=spec,
        created_at_s=parse_time(meta.get("creationTimestamp")) or now_s,
        generation=int(meta.get("generation") or 0),
        finalizers=finalizers,
        has_finalizer=FINALIZER in finalizers,
        first_seen_monotonic=monotonic,
    )


def audit(engine: Engine, record: ConvRecord, body: dict[str, Any]) -> list[str]:
    """Check an adopted status against what the operator can tell for itself (`core.integrity`) before the ledger
    believes it: an end it did not decide is undone, a reservation below the least it reserves is raised, and
    the live context is the data plane's (spec.usage). A repair is written back with a condition
    `StatusRepaired` and a Warning Event. Returns the problems found."""
    status, usage, now = record.status, record.spec.usage, engine.clock.now()
    problems: list[str] = []
    try:
        ConversationStatus.model_validate(body.get("status") or {})
    except ValidationError as exc:
        problems.append(f"status unreadable ({exc.error_count()} errors), rebuilt from the spec")
    pool = engine.world.pool_of(record)
    timeout = record.spec.idle_timeout_seconds or (
        pool.spec.default_idle_timeout_seconds if pool.spec is not None else DEFAULT_IDLE_TIMEOUT_S
    )
    last_turn_s = parse_time(usage.last_turn_time) or record.created_at_s
    facts = AdoptedFacts(
        phase=status.phase.value,
        spec_completed=record.spec.completed,
        deleting=bool(body.get("metadata", {}).get("deletionTimestamp")),
        idle_for_s=max(now - last_turn_s, 0.0),
        idle_timeout_s=float(timeout),
        conditions={t: (c.status, c.reason) for t, c in record.conditions.items()},
    )
    ended = forged_end(facts)
    if ended is not None:
        problems.append(ended)
        status.completed_at = None
        record.conditions.pop("Ended", None)
        placed = status.decoder is not None
        status.phase = (Phase.DECODING if usage.turns else Phase.PREFILLING) if placed else Phase.PENDING
    status.live_kv_tokens = usage.input_tokens + usage.output_tokens
    floor = reservation_floor(record.spec.first_turn_input_tokens, 0)
    if record.placed and status.reserved_kv_tokens < floor:
        problems.append(
            f"status.reservedKvTokens {status.reserved_kv_tokens} is below the first turn's input ({floor})"
        )
        status.reserved_kv_tokens = floor
    if problems:
        message = "; ".join(problems)[:1000] + ": repaired from the spec"
        log.warning("conversation %s: %s", record.key, message)
        record.set_condition("StatusRepaired", "True", "ForeignStatusWrite", message, now)
        record.dirty = True
        engine.post_event(record, "StatusRepaired", message, warning=True)
    return problems


def _seen_print(body: dict[str, Any]) -> StatusPrint | None:
    """The decision a status seen on the object carries; None when nothing was written there yet."""
    status = body.get("status")
    if not isinstance(status, dict) or "phase" not in status:
        return None
    found = status.get("decoder")
    decoder: dict[str, Any] = found if isinstance(found, dict) else {}
    try:
        reserved, generation = int(status.get("reservedKvTokens") or 0), int(status.get("placementGeneration") or 0)
    except (TypeError, ValueError):
        reserved = generation = -1
    return status_print(str(status["phase"]), decoder.get("pod"), decoder.get("endpoint"), reserved, generation)


async def repair_foreign_status(engine: Engine, record: ConvRecord, body: dict[str, Any]) -> bool:
    """A status on the object that this run did not write (nor an older one of its own) is replaced by the
    operator's decision, with a condition `StatusRepaired` and a Warning Event. Returns whether it was."""
    seen = _seen_print(body)
    if seen is None or record.dirty or record.write_lock.locked():
        return False
    if resource_version(body) <= record.written_rv:
        return False  # as old as this run's latest write, or older
    if not foreign(seen, record.decision_print(), tuple(record.written)):
        return False
    message = (
        f"status written by someone else (phase {seen[0]}, decoder {seen[1] or 'none'}, reservedKvTokens "
        f"{seen[3]}) replaced by the operator's decision (phase {record.status.phase.value}, decoder "
        f"{record.status.decoder.pod if record.status.decoder else 'none'}, reservedKvTokens "
        f"{record.status.reserved_kv_tokens})"
    )
    log.warning("conversation %s: %s", record.key, message)
    record.set_condition("StatusRepaired", "True", "ForeignStatusWrite", message, engine.clock.now())
    record.dirty = True
    engine.post_event(record, "StatusRepaired", message, warning=True)
    await engine.write_status(record)
    return True


def adopt(engine: Engine, record: ConvRecord) -> None:
    """Put a conversation back in its pool's scheduler as the API server has it (a rebuild never drops one):
    a placed one keeps its reservation and KV state, a waiting one is queued."""
    scheduler, status = engine.world.pool_of(record).scheduler, record.status
    if record.placed and status.decoder is not None:
        scheduler.adopt(
            record.request(),
            status.decoder.pod,
            status.reserved_kv_tokens,
            status.live_kv_tokens,
            last_activity_s=record.last_activity_s,
            turns=status.turns_served,
            kv_state=record.kv_state or KvState.ACTIVE,
            counts=(status.offloads, status.reloads, status.reprefills),
        )
    elif not record.terminal:
        scheduler.adopt(
            record.request(),
            None,
            0,
            status.live_kv_tokens,
            last_activity_s=record.last_activity_s,
            turns=status.turns_served,
        )


async def on_event(engine: Engine, event_type: str | None, body: dict[str, Any]) -> None:
    meta = body.get("metadata", {})
    key = key_of(meta.get("namespace", ""), meta.get("name", ""))
    if event_type == "DELETED":
        gone = engine.world.convs.pop(key, None)
        if gone is not None and not gone.terminal:
            await engine.release(gone, "Deleted", "the conversation was deleted", write=False)
        return
    try:
        spec = ConversationSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:  # the schema refuses these; an old object may still hold one
        log.warning("conversation %s has an invalid spec: %s", key, exc)
        return
    known = engine.world.convs.get(key)
    record = _refresh(engine, key, event_type, body, spec)
    if record is known and not meta.get("deletionTimestamp"):
        await repair_foreign_status(engine, record, body)
    if meta.get("deletionTimestamp"):
        if not record.terminal:
            await engine.release(record, "Deleted", "the conversation was deleted", write=False)
        await engine.remove_finalizer(record)
    elif record.terminal:
        await engine.remove_finalizer(record)  # left over when a run stopped between release and this
    elif spec.completed:
        await _follow_final_usage(engine, record)
        await engine.release(record, Phase.COMPLETED, "the client marked the conversation completed")
    else:
        await _serve(engine, record)


def _refresh(
    engine: Engine, key: str, event_type: str | None, body: dict[str, Any], spec: ConversationSpec
) -> ConvRecord:
    """The operator's record of the object: created (and adopted) on first sight or when the object was
    recreated under the same name, else brought up to date with its spec and metadata."""
    meta = body.get("metadata", {})
    record = engine.world.convs.get(key)
    if record is None or record.uid != meta.get("uid", record.uid):
        record = record_from_body(body, spec, now_s=engine.clock.now(), monotonic=engine.clock.monotonic())
        engine.world.convs[key] = record
        audit(engine, record, body)
        adopt(engine, record)
        log.debug("seen %s (%s)", key, event_type)
    else:
        # Reports streamed to this operator (usage_intake) are newer than the spec's checkpoint: kept.
        usage = merge_usage(record.spec.usage, spec.usage)
        record.spec = spec if usage is spec.usage else spec.model_copy(update={"usage": usage})
        record.generation = int(meta.get("generation") or record.generation)
        record.finalizers = list(meta.get("finalizers") or [])
        record.has_finalizer = FINALIZER in record.finalizers
    return record


async def _follow_final_usage(engine: Engine, record: ConvRecord) -> None:
    """The router sends a conversation's last usage with its completion, in one patch: the status's counters and
    the pool's growth history follow it before the release (it was dropped: single-turn conversations showed no
    turn served)."""
    if not record.placed:
        return
    pool = engine.world.pool_of(record)
    async with pool.lock:
        _, others = engine.apply_usage(pool, record)
    await engine.commit(others, pool)


async def _serve(engine: Engine, record: ConvRecord) -> None:
    """A live conversation's reported usage: applied to a placed one (a turn's end makes its KV idle, so
    reclaimable: waiting ones may fit); a waiting one counts it and is admitted."""
    pool = engine.world.pool_of(record)
    if not record.placed:
        async with pool.lock:
            _, others = engine.apply_usage(pool, record)  # a turn reported before placement is still counted
        await engine.commit(others, pool)
        await engine.admit(record)
        return
    async with pool.lock:
        changed, others = engine.apply_usage(pool, record)
    if changed:
        engine.on_pool_changed(pool)
        await engine.write_status(record)
    await engine.commit(others, pool)


serve = _serve  # a streamed report (usage_intake) of a conversation not placed yet


async def release_vanished(engine: Engine, scopes: list[str | None]) -> int:
    """Release conversations the operator holds that the API server no longer has (a delete missed in a watch
    gap). Only records first seen before the list started count: a newer one may be missing from it by timing.
    Returns how many were released."""
    started = engine.clock.monotonic()
    listed: set[str] = set()
    for scope in scopes:
        for body in await engine.kube.list_objects(PLURAL, scope):
            meta = body.get("metadata", {})
            listed.add(key_of(meta.get("namespace", ""), meta.get("name", "")))
    gone = [r for key, r in list(engine.world.convs.items()) if key not in listed and r.first_seen_monotonic < started]
    for record in gone:
        engine.world.convs.pop(record.key, None)
        if not record.terminal:
            log.info("conversation %s is gone from the API server: releasing it", record.key)
            await engine.release(record, "Deleted", "the conversation was deleted", write=False)
    return len(gone)
