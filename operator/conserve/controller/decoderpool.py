"""DecoderPool handler and the pool status writer.

A pool's spec picks its decoders (pods.py); any change re-syncs them, moves conversations off decoders that
left, and drains the queue. The status (per-decoder entries, totals, conditions Ready and Degraded, growth
history, observedGeneration) is written by one writer task per pool, at most every `pool_status_interval_s`:
a burst of placements costs one pool write, not one per conversation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from pydantic import ValidationError

from conserve import metrics
from conserve.api.decoderpool import PLURAL as PLURAL  # re-exported (startup, registry)
from conserve.api.decoderpool import DecoderPoolSpec, DecoderPoolStatus
from conserve.api.scheduling import scheduler_settings
from conserve.controller import healing, pods, slo
from conserve.controller.engine import Engine
from conserve.controller.kube import NotFound
from conserve.controller.state import NodeInfo, PoolRuntime, World, key_of
from conserve.controller.status import pool_status, pool_status_patch_of
from conserve.core.lifecycle import KvState

log = logging.getLogger("conserve.operator")


def load_spec(pool: PoolRuntime, body: dict[str, Any]) -> None:
    """Read a pool object into its runtime (spec, generation, growth history on first sight)."""
    first_sight = not pool.body
    pool.body = body
    pool.generation = int(body.get("metadata", {}).get("generation") or 0)
    try:
        pool.spec = DecoderPoolSpec.model_validate(body.get("spec") or {})
        pool.spec_error = ""
        # The operator queues a lost decoder's conversations again: no conversation fails for a lost decoder.
        pool.scheduler.configure(scheduler_settings(pool.spec))
    except ValidationError as exc:
        pool.spec = None
        pool.spec_error = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())[:1000]
    if first_sight:
        status = DecoderPoolStatus.model_validate(body.get("status") or {})
        pool.scheduler.restore_history(status.observed_growth_ratios, status.observed_turn_gaps_seconds)
        slo.restore(pool, status)


async def resync(engine: Engine, pool: PoolRuntime, pod: str | None = None) -> None:
    """Re-derive the pool's decoders (or one pod's); follow moved endpoints; move conversations off decoders gone
    (deleted, terminating, taken by an older pool) at once and off decoders unready past the pool's grace; place
    waiting ones if room grew."""
    async with pool.lock:
        endpoints = {name: d.endpoint for name, d in pool.decoders.items()}
        shared = set(pool.overlapping)
        if pod is None:
            gone, _unready, grew = pods.sync_pool(engine.world, pool)
        else:
            gone, _unready, grew = pods.sync_pod(engine.world, pool, pod)
        moved = sorted(
            name
            for name, d in pool.decoders.items()
            if endpoints.get(name) and d.endpoint and d.endpoint != endpoints[name]
        )
        now = engine.clock.now()
        pool.unready.observe({name: d.ready for name, d in pool.decoders.items()}, now)
        leaving = sorted(n for n, d in pool.decoders.items() if d.leaving and n not in pool.unready.lost)
        pool.unready.mark_lost(leaving)
        lost = sorted({*gone, *leaving, *pool.unready.due(now, pool.lost_grace_s)})
    if moved:
        await healing.follow_endpoints(engine, pool, moved)
    taken = sorted(set(pool.overlapping) - shared)
    if taken:
        held = ", ".join(f"{name} (pool {pool.overlapping[name]})" for name in taken)
        message = f"decoders selected by an older pool of the namespace, booked there and not here: {held}"
        log.warning("pool %s: %s", pool.key, message)
        engine.post_pool_event(pool, "OverlappingPool", message[:1000], warning=True)
    if lost:
        log.info("pool %s lost decoders %s", pool.key, lost)
        engine.post_pool_event(pool, "DecoderLost", f"decoders gone or not ready: {', '.join(lost)}", warning=True)
        await engine.decoders_lost(pool, lost)
    engine.on_pool_changed(pool)
    if grew or lost:
        await engine.drain(pool)


async def resync_neighbours(engine: Engine, pool: PoolRuntime) -> None:
    """The namespace's other pools, after this one's selector or existence changed: which pool holds a shared
    decoder may have changed with it."""
    for other in list(engine.world.pools.values()):
        if other is not pool and other.namespace == pool.namespace and other.spec is not None:
            await resync(engine, other)


async def on_event(engine: Engine, event_type: str | None, body: dict[str, Any]) -> None:
    meta = body.get("metadata", {})
    pool = engine.world.pool(meta.get("namespace", ""), meta.get("name", ""))
    if event_type == "DELETED":
        pool.spec = None
        pool.spec_error = ""
        pool.body = {}
        async with pool.lock:
            pods.sync_pool(engine.world, pool)
        metrics.forget_pool(pool.namespace, pool.name)
        await resync_neighbours(engine, pool)
        return
    old_generation = pool.generation if pool.body else None
    had_spec = pool.spec is not None
    load_spec(pool, body)
    if old_generation == pool.generation and had_spec == (pool.spec is not None):
        return  # a status write of ours (or the energy loop's) came back: nothing to re-derive
    if pool.spec is None:
        engine.post_pool_event(pool, "InvalidSpec", pool.spec_error, warning=True)
    await resync(engine, pool)
    await resync_neighbours(engine, pool)
    await engine.drain(pool)


def export_metrics(pool: PoolRuntime, status: DecoderPoolStatus) -> None:
    """The pool's gauges, from the status about to be written."""
    labels = (pool.namespace, pool.name)
    metrics.CAPACITY_KV.labels(*labels).set(status.capacity_kv_tokens)
    metrics.RESERVED_KV.labels(*labels).set(status.reserved_kv_tokens)
    metrics.LIVE_KV.labels(*labels).set(status.live_kv_tokens)
    metrics.READY_DECODERS.labels(*labels).set(status.ready_decoders)
    metrics.PINNED_CONVERSATIONS.labels(*labels).set(status.conversations)
    metrics.QUEUE_LENGTH.labels(*labels).set(status.pending_conversations)
    by_state = (
        (KvState.IDLE, status.idle_conversations, sum(d.idle_kv_tokens for d in status.decoders)),
        (KvState.OFFLOADED, status.offloaded_conversations, sum(d.offloaded_kv_tokens for d in status.decoders)),
    )
    for state, conversations, tokens in by_state:
        metrics.KV_STATE_CONVERSATIONS.labels(*labels, state.value).set(conversations)
        metrics.KV_STATE_TOKENS.labels(*labels, state.value).set(tokens)
    metrics.KV_STATE_CONVERSATIONS.labels(*labels, KvState.DROPPED.value).set(status.dropped_conversations)


async def write_pool_status(engine: Engine, pool: PoolRuntime) -> bool:
    """Write the pool's status; False when it was not written (the writer tries again later, backing off)."""
    if not pool.body or engine.fenced:
        return True
    status = pool_status(pool, pool.scheduler.pending_count)
    export_metrics(pool, status)
    try:
        await engine.kube.patch_status(PLURAL, pool.namespace, pool.name, pool_status_patch_of(status))
    except NotFound:
        return True
    except Exception as exc:  # noqa: BLE001 a refusal, network, 5xx, 429: logged once; written again later
        metrics.STATUS_WRITE_ERRORS.labels("DecoderPool").inc()
        message = str(exc)[:500]
        # Once per distinct failure, no traceback: a refused status is refused again at every tick.
        if pool.status_error != message:
            log.warning("pool %s status not written (retried with back-off): %s", pool.key, message)
        pool.status_error = message
        pool.status_dirty.set()
        return False
    if pool.status_error:
        log.info("pool %s status written again", pool.key)
        pool.status_error = ""
    return True


#: A big pool's status is big (about 300 bytes per decoder), and every write goes to every watcher: a pool is
#: written at most every max(pool_status_interval_s, decoders x this) seconds (1,000 decoders: every 2 s).
SECONDS_PER_DECODER = 0.002
#: A pool whose status write failed is tried again after twice the last wait, up to this long.
MAX_RETRY_INTERVAL_S = 30.0


def _forget(writing: dict[str, asyncio.Task[bool]], key: str, _task: asyncio.Task[bool]) -> None:
    writing.pop(key, None)


async def status_writer(engine: Engine) -> None:
    """One loop for every pool: write the pools marked dirty, each at most once per its interval. Each write runs
    on its own: a slow or refused pool delays no other pool, and a failing one is retried with back-off."""
    tick = engine.config.pool_status_interval_s
    last_write: dict[str, float] = {}
    backoff: dict[str, float] = {}
    writing: dict[str, asyncio.Task[bool]] = {}

    async def write(pool: PoolRuntime) -> bool:
        ok = await write_pool_status(engine, pool)
        if ok:
            backoff.pop(pool.key, None)
        else:
            backoff[pool.key] = min(max(backoff.get(pool.key, tick) * 2, tick), MAX_RETRY_INTERVAL_S)
        return ok

    try:
        while True:
            await asyncio.sleep(tick)
            now = engine.clock.monotonic()
            for pool in list(engine.world.pools.values()):
                if pool.key in writing:
                    continue
                interval = max(tick, len(pool.decoders) * SECONDS_PER_DECODER, backoff.get(pool.key, 0.0))
                if pool.status_dirty.is_set() and now - last_write.get(pool.key, 0.0) >= interval:
                    pool.status_dirty.clear()
                    last_write[pool.key] = now
                    writing[pool.key] = asyncio.create_task(write(pool))
                    writing[pool.key].add_done_callback(functools.partial(_forget, writing, pool.key))
    finally:
        for task in writing.values():
            task.cancel()


# --- watch handlers of pods and nodes (here, not in pods.py: they resync pools, and pods.py stays a leaf) ------


async def on_pod_event(engine: Engine, event_type: str | None, body: dict[str, Any]) -> None:
    world: World = engine.world
    meta = body.get("metadata", {})
    key = key_of(meta.get("namespace", ""), meta.get("name", ""))
    old = world.pods.get(key)
    if event_type == "DELETED":
        world.pods.pop(key, None)
        new = None
    else:
        new = pods.pod_info(body)
        if old is not None and old == new:
            return
        world.pods[key] = new
    label_sets = [p.labels for p in (old, new) if p is not None]
    namespace = meta.get("namespace", "")
    for pool in pods.pools_selecting(world, namespace, *label_sets):
        await resync(engine, pool, pod=meta.get("name", ""))


async def on_node_event(engine: Engine, event_type: str | None, body: dict[str, Any]) -> None:
    world: World = engine.world
    meta = body.get("metadata", {})
    name = meta.get("name", "")
    old = world.nodes.get(name)
    if event_type == "DELETED":
        world.nodes.pop(name, None)
    else:
        node = NodeInfo.from_labels(name, meta.get("labels") or {})
        if old is not None and old.labels == node.labels:
            return
        world.nodes[name] = node
    affected: dict[str, PoolRuntime] = {}
    for pod in pods.pods_on_node(world, name):
        for pool in pods.pools_selecting(world, pod.namespace, pod.labels):
            affected[pool.key] = pool
    for pool in affected.values():
        await resync(engine, pool)
