"""Status patch bodies: only the fields the operator owns (energy fields and Kopf's are left to their writers)."""

from __future__ import annotations

from typing import Any

from conserve.controller.state import ConvRecord, PoolRuntime, format_time


def conversation_status_patch(record: ConvRecord) -> dict[str, Any]:
    def endpoint(value: Any) -> dict[str, Any] | None:
        return None if value is None else value.model_dump(mode="json", by_alias=True)

    status = {
        "phase": record.phase.value,
        "decoder": endpoint(record.decoder),
        "prefill": endpoint(record.prefill),
        "reservedKvTokens": record.reserved_kv_tokens,
        "liveKvTokens": record.live_kv_tokens,
        "turnsServed": record.turns,
        "inputTokens": record.input_tokens,
        "outputTokens": record.output_tokens,
        "kvTransfers": record.kv_transfers,
        "placementGeneration": record.placement_generation,
        "placedAt": record.placed_at,
        "completedAt": record.completed_at,
        "lastActivityTime": format_time(record.last_activity_s) if record.last_activity_s else None,
        "timeToFirstEffectiveTokenSeconds": record.ttfet_s,
        "kvState": record.kv_state.value if record.kv_state is not None and record.placed else None,
        "offloads": record.offloads,
        "reloads": record.reloads,
        "reprefills": record.reprefills,
        "conditions": [c.model_dump(mode="json", by_alias=True) for c in record.conditions.values()],
        "observedGeneration": record.generation,
    }
    return {"status": status}


def pool_status_patch(pool: PoolRuntime, pending: int) -> dict[str, Any]:
    """The pool's status: one entry per decoder, totals over ready decoders, conditions Ready and Degraded."""
    snapshot = {d.name: d for d in pool.ledger.snapshot()}
    previous = {d.get("pod"): d for d in (pool.body.get("status") or {}).get("decoders") or [] if isinstance(d, dict)}
    decoders = []
    capacity = reserved = live = conversations = ready = idle = offloaded = dropped = 0
    scheduler = pool.scheduler
    host_capacity = scheduler.settings.lifecycle.host_kv_tokens_per_decoder
    power_total: float | None = None
    energy_total: float | None = None
    for name in sorted(pool.decoders):
        info = pool.decoders[name]
        state = snapshot.get(name)
        energy = pool.energy.get(name)
        old = previous.get(name, {})
        power = energy.power_watts if energy and energy.power_watts is not None else old.get("powerWatts")
        joules = energy.energy_joules if energy and energy.energy_joules is not None else old.get("energyJoules")
        lc = scheduler.lifecycle_on(name)
        idle, offloaded, dropped = idle + lc.idle, offloaded + lc.offloaded, dropped + lc.dropped
        entry: dict[str, Any] = {
            "pod": name,
            "node": info.node,
            "tier": info.tier,
            "gpuProduct": info.gpu_product,
            "ready": info.ready and not info.problem,
            "endpoint": info.endpoint,
            "capacityKvTokens": info.capacity_kv_tokens,
            "reservedKvTokens": state.reserved_kv_tokens if state else 0,
            "liveKvTokens": state.live_kv_tokens if state else 0,
            "conversations": state.pinned_conversations if state else 0,
            "activeConversations": lc.active,
            "idleConversations": lc.idle,
            "idleKvTokens": lc.idle_kv_tokens,
            "offloadedConversations": lc.offloaded,
            "offloadedKvTokens": lc.offloaded_kv_tokens,
            "droppedConversations": lc.dropped,
            "hostCapacityKvTokens": host_capacity,
            "powerWatts": power,
            "energyJoules": joules,
        }
        decoders.append(entry)
        reserved += entry["reservedKvTokens"]
        live += entry["liveKvTokens"]
        conversations += entry["conversations"]
        if entry["ready"]:
            ready += 1
            capacity += info.capacity_kv_tokens
        if power is not None:
            power_total = (power_total or 0.0) + float(power)
        if joules is not None:
            energy_total = (energy_total or 0.0) + float(joules)
    prefills = [
        {
            "pod": p.pod,
            "node": p.node,
            "tier": p.tier,
            "gpuProduct": p.gpu_product,
            "ready": p.ready,
            "endpoint": p.endpoint,
        }
        for p in sorted(pool.prefills.values(), key=lambda p: p.pod)
    ]
    status: dict[str, Any] = {
        "decoders": decoders,
        "prefills": prefills,
        "readyDecoders": ready,
        "capacityKvTokens": capacity,
        "reservedKvTokens": reserved,
        "liveKvTokens": live,
        "conversations": conversations,
        "pendingConversations": pending,
        "idleConversations": idle,
        "offloadedConversations": offloaded,
        "droppedConversations": dropped,
        "observedTurnGapsSeconds": [round(g, 3) for g in scheduler.gaps.gaps_s],
        "activeWindowSeconds": round(scheduler.gaps.active_window_s(scheduler.settings.lifecycle), 3),
        "residentTtlSeconds": round(scheduler.gaps.resident_ttl_s(scheduler.settings.lifecycle), 3),
        "hostTtlSeconds": round(scheduler.gaps.host_ttl_s(scheduler.settings.lifecycle), 3),
        "kvUsage": f"{reserved}/{capacity}",
        "kvBytesPerToken": pool.spec.model.resolved_kv_bytes_per_token() if pool.spec else None,
        "observedGrowthRatios": list(pool.growth_ratios),
        "conditions": pool_conditions(pool, ready),
        "observedGeneration": pool.generation,
    }
    if power_total is not None:
        status["powerWatts"] = round(power_total, 3)
    if energy_total is not None:
        status["energyJoules"] = round(energy_total, 3)
    return {"status": status}


def pool_conditions(pool: PoolRuntime, ready: int) -> list[dict[str, Any]]:
    previous = {c.get("type"): c for c in (pool.body.get("status") or {}).get("conditions") or []}
    problems = [f"{d.pod}: {d.problem}" for d in pool.decoders.values() if d.problem]
    unready = sorted(d.pod for d in pool.decoders.values() if not d.ready)
    if pool.spec is None:
        ready_cond = ("False", "InvalidSpec", pool.spec_error or "invalid spec")
    elif not pool.decoders:
        ready_cond = ("False", "NoDecoder", "no pod matches decoderSelector")
    elif ready == 0:
        ready_cond = ("False", "NoReadyDecoder", f"none of {len(pool.decoders)} decoders is ready")
    else:
        ready_cond = ("True", "DecodersReady", f"{ready}/{len(pool.decoders)} decoders ready")
    if problems:
        degraded = ("True", "DecoderProblem", "; ".join(sorted(problems))[:1000])
    elif unready:
        degraded = ("True", "DecodersNotReady", f"not ready: {', '.join(unready)}"[:1000])
    else:
        degraded = ("False", "AllDecodersReady", "")
    out = []
    for type_, (status, reason, message) in (("Ready", ready_cond), ("Degraded", degraded)):
        old = previous.get(type_) or {}
        moved = old.get("status") != status
        out.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": _now() if moved else old.get("lastTransitionTime", _now()),
                "observedGeneration": pool.generation,
            }
        )
    return out


def _now() -> str:
    import time

    return format_time(time.time())
