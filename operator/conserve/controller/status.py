"""Status patch bodies: dumps of the api models (by alias) holding only the fields the operator owns (energy fields
and Kopf's are left to their writers)."""

from __future__ import annotations

import time
from typing import Any

from conserve.api.common import Condition, ConditionStatus, status_patch
from conserve.api.conversation import OPERATOR_STATUS_FIELDS as CONVERSATION_FIELDS
from conserve.api.decoderpool import MEASURED_FIELDS, DecoderPoolStatus, DecoderStatus, PrefillStatus
from conserve.api.decoderpool import OPERATOR_STATUS_FIELDS as POOL_FIELDS
from conserve.controller.slo import pool_slo_status
from conserve.controller.state import ConvRecord, PoolRuntime, format_time


def conversation_status_patch(record: ConvRecord) -> dict[str, Any]:
    return status_patch(record.written_status(), CONVERSATION_FIELDS)


def pool_status_patch(pool: PoolRuntime, pending: int) -> dict[str, Any]:
    return pool_status_patch_of(pool_status(pool, pending))


def pool_status_patch_of(status: DecoderPoolStatus) -> dict[str, Any]:
    measured = {name for name in MEASURED_FIELDS if getattr(status, name) is not None}
    return status_patch(status, POOL_FIELDS | measured)


def previous_status(pool: PoolRuntime) -> DecoderPoolStatus:
    """The pool's status as last seen on its object."""
    return DecoderPoolStatus.model_validate(pool.body.get("status") or {})


def decoder_statuses(pool: PoolRuntime, previous: DecoderPoolStatus) -> list[DecoderStatus]:
    """One entry per decoder; its power and energy are the energy loop's latest, else those written before."""
    snapshot = {d.name: d for d in pool.scheduler.decoders()}
    written = {d.pod: d for d in previous.decoders}
    entries = []
    for name in sorted(pool.decoders):
        info = pool.decoders[name]
        state = snapshot.get(name)
        energy = pool.energy.get(name)
        old = written.get(name)
        power = energy.power_watts if energy and energy.power_watts is not None else None
        joules = energy.energy_joules if energy and energy.energy_joules is not None else None
        if old is not None:
            power = old.power_watts if power is None else power
            joules = old.energy_joules if joules is None else joules
        lc = pool.scheduler.lifecycle_on(name)
        entry = DecoderStatus(
            **info.model_dump(include={"pod", "node", "tier", "gpu_product", "endpoint", "capacity_kv_tokens"}),
            ready=info.serving,
            reserved_kv_tokens=state.reserved_kv_tokens if state else 0,
            live_kv_tokens=state.live_kv_tokens if state else 0,
            conversations=state.pinned_conversations if state else 0,
            active_conversations=lc.active,
            idle_conversations=lc.idle,
            idle_kv_tokens=lc.idle_kv_tokens,
            offloaded_conversations=lc.offloaded,
            offloaded_kv_tokens=lc.offloaded_kv_tokens,
            dropped_conversations=lc.dropped,
            host_capacity_kv_tokens=pool.scheduler.host_capacity_on(name),
            power_watts=power,
            energy_joules=joules,
        )
        entries.append(entry)
    return entries


def _sum(values: list[float | None]) -> float | None:
    """Sum of the figures known, rounded; None when none is."""
    known = [v for v in values if v is not None]
    return round(sum(known), 3) if known else None


def pool_status(pool: PoolRuntime, pending: int) -> DecoderPoolStatus:
    """The pool's status: one entry per decoder, totals over ready decoders, conditions Ready and Degraded."""
    previous = previous_status(pool)
    decoders = decoder_statuses(pool, previous)
    ready = [d for d in decoders if d.ready]
    capacity = sum(d.capacity_kv_tokens for d in ready)
    reserved = sum(d.reserved_kv_tokens for d in decoders)
    scheduler = pool.scheduler
    return DecoderPoolStatus(
        decoders=decoders,
        prefills=[
            PrefillStatus.model_validate(p, from_attributes=True)
            for p in sorted(pool.prefills.values(), key=lambda p: p.pod)
        ],
        ready_decoders=len(ready),
        capacity_kv_tokens=capacity,
        reserved_kv_tokens=reserved,
        live_kv_tokens=sum(d.live_kv_tokens for d in decoders),
        conversations=sum(d.conversations for d in decoders),
        pending_conversations=pending,
        idle_conversations=sum(d.idle_conversations for d in decoders),
        offloaded_conversations=sum(d.offloaded_conversations for d in decoders),
        dropped_conversations=sum(d.dropped_conversations for d in decoders),
        observed_turn_gaps_seconds=[round(g, 3) for g in scheduler.turn_gaps_s],
        active_window_seconds=round(scheduler.active_window_s(), 3),
        resident_ttl_seconds=_rounded(scheduler.resident_ttl_s()),
        host_ttl_seconds=_rounded(scheduler.host_ttl_s()),
        kv_usage=f"{reserved}/{capacity}",
        kv_bytes_per_token=pool.spec.model.resolved_kv_bytes_per_token() if pool.spec else None,
        observed_growth_ratios=scheduler.growth_ratios,
        slo=pool_slo_status(pool, time.time()),
        power_watts=_sum([d.power_watts for d in decoders]),
        energy_joules=_sum([d.energy_joules for d in decoders]),
        conditions=pool_conditions(pool, len(ready), previous),
        observed_generation=pool.generation,
    )


def pool_conditions(pool: PoolRuntime, ready: int, previous: DecoderPoolStatus | None = None) -> list[Condition]:
    written = {c.type: c for c in (previous or previous_status(pool)).conditions}
    problems = [f"{d.pod}: {d.problem}" for d in pool.decoders.values() if d.problem]
    unready = sorted(d.pod for d in pool.decoders.values() if not d.ready)
    ready_cond: tuple[ConditionStatus, str, str]
    if pool.spec is None:
        ready_cond = ("False", "InvalidSpec", pool.spec_error or "invalid spec")
    elif not pool.decoders:
        ready_cond = ("False", "NoDecoder", "no pod matches decoderSelector")
    elif ready == 0:
        ready_cond = ("False", "NoReadyDecoder", f"none of {len(pool.decoders)} decoders is ready")
    else:
        ready_cond = ("True", "DecodersReady", f"{ready}/{len(pool.decoders)} decoders ready")
    degraded: tuple[ConditionStatus, str, str]
    if problems:
        degraded = ("True", "DecoderProblem", "; ".join(sorted(problems))[:1000])
    elif unready:
        degraded = ("True", "DecodersNotReady", f"not ready: {', '.join(unready)}"[:1000])
    else:
        degraded = ("False", "AllDecodersReady", "")
    overlapping: tuple[ConditionStatus, str, str] = ("False", "NoSharedDecoders", "")
    if pool.overlapping:
        shared = ", ".join(f"{pod} (pool {owner})" for pod, owner in sorted(pool.overlapping.items()))
        overlapping = ("True", "DecodersHeldByOlderPool", f"booked by an older pool, not here: {shared}"[:1000])
    now = format_time(time.time())
    out = []
    for type_, (status, reason, message) in (
        ("Ready", ready_cond),
        ("Degraded", degraded),
        ("Overlapping", overlapping),
    ):
        old = written.get(type_)
        kept = old is not None and old.status == status and old.last_transition_time
        out.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=old.last_transition_time if kept and old else now,
                observed_generation=pool.generation,
            )
        )
    return out


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 3) if seconds is not None else None
