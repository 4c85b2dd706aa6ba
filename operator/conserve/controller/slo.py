"""A pool's SLO attainment and refusals, as the operator counts them (status.slo and the conserve_slo_* metrics).

The router judges every turn against the conversation's class (`conserve.core.slo.turn_met`) and reports the turns
that missed in `spec.usage.sloMissedTurns`; a conversation that ends (completed, deleted, idle timeout) with turns
served counts as met when none missed. Refusals before placement (`conserve.core.admission`) count per class and
reason. Cumulative counts are written to the pool's status and restored from it after a restart; the recent window
(attainment, goodput) starts afresh.
"""

from __future__ import annotations

from conserve import metrics
from conserve.api.decoderpool import DecoderPoolStatus
from conserve.api.slo import PoolSloStatus, SloClassStatus
from conserve.controller.state import ConvRecord, PoolRuntime
from conserve.core.decisions import Reason
from conserve.core.slo import NO_CLASS, AttainmentWindow

#: Reasons that refuse a conversation before its placement (counted as refusals, not as failures).
REFUSALS = frozenset(
    {Reason.QUEUE_WAIT_EXCEEDED, Reason.SLO_UNATTAINABLE, Reason.UNKNOWN_SLO_CLASS, Reason.NO_CAPACITY}
)


def class_of(pool: PoolRuntime, record: ConvRecord) -> str | None:
    """The conversation's class in its pool ("" for the pool's own targets); None: the pool has no SLO, or the
    class is unknown."""
    slo = pool.scheduler.settings.slo
    if slo is None:
        return None
    resolved = slo.resolve(record.spec.slo_class)
    return resolved.name if resolved is not None else None


def window_of(pool: PoolRuntime) -> AttainmentWindow:
    if pool.slo_window is None:
        pool.slo_window = AttainmentWindow()
    return pool.slo_window


def restore(pool: PoolRuntime, status: DecoderPoolStatus) -> None:
    """The cumulative counts a previous operator wrote (on first sight of the pool)."""
    if status.slo is None:
        return
    window = window_of(pool)
    for c in status.slo.classes:
        window.restore(c.name, c.ended_conversations, c.met_conversations, c.refused_conversations)


def conversation_ended(pool: PoolRuntime, record: ConvRecord, now_s: float) -> None:
    """Count an ended conversation that was served (a pool with an SLO): met when no turn missed."""
    name = class_of(pool, record)
    if name is None or record.status.turns_served == 0:
        return
    met = record.spec.usage.slo_missed_turns == 0
    window_of(pool).ended(name, met, now_s)
    labels = (pool.namespace, pool.name, name)
    metrics.SLO_CONVERSATIONS.labels(*labels, "met" if met else "missed").inc()


def conversation_refused(pool: PoolRuntime, record: ConvRecord, reason: Reason, now_s: float) -> None:
    """Count a conversation refused before its placement."""
    if reason not in REFUSALS:
        return
    name = class_of(pool, record)
    label = name if name is not None else (record.spec.slo_class or NO_CLASS)
    metrics.ADMISSION_REFUSALS.labels(pool.namespace, pool.name, label, reason.value).inc()
    if name is not None or reason is Reason.UNKNOWN_SLO_CLASS:
        window_of(pool).refused(label, now_s)


def pool_slo_status(pool: PoolRuntime, now_s: float) -> PoolSloStatus | None:
    """status.slo of a pool with an SLO (and its gauges); None without one."""
    slo = pool.scheduler.settings.slo
    if slo is None:
        return None
    window = window_of(pool)
    names = list(slo.classes) or [NO_CLASS]
    if slo.default_class is None and slo.classes:
        names.append(NO_CLASS)  # a conversation that names no class gets the pool's own targets
    classes = []
    for f in window.figures(now_s, names):
        classes.append(
            SloClassStatus(
                name=f.name,
                ended_conversations=f.ended,
                met_conversations=f.met,
                refused_conversations=f.refused,
                attainment=None if f.attainment is None else round(f.attainment, 4),
                goodput_per_second=round(f.goodput_per_s, 4),
            )
        )
        labels = (pool.namespace, pool.name, f.name)
        if f.attainment is not None:
            metrics.SLO_ATTAINMENT.labels(*labels).set(f.attainment)
    metrics.SLO_TARGET_ATTAINMENT.labels(pool.namespace, pool.name).set(slo.attainment_target)
    attainment, goodput = window.overall(now_s)
    return PoolSloStatus(
        target_attainment=slo.attainment_target,
        attainment=None if attainment is None else round(attainment, 4),
        goodput_per_second=round(goodput, 4),
        window_seconds=window.window_s,
        classes=classes,
    )
