"""DecoderPool handler and the pool status writer.

A pool's spec picks its decoders (pods.py); any change re-syncs them, moves conversations off decoders that
left, and drains the queue. The status (per-decoder entries, totals, conditions Ready and Degraded, growth
history, observedGeneration) is written by one writer task per pool, at most every `pool_status_interval_s`:
a burst of placements costs one pool write, not one per conversation.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from conserve import metrics
from conserve.api.decoderpool import DecoderPoolSpec, DecoderPoolStatus
from conserve.controller import pods
from conserve.controller.engine import Engine
from conserve.controller.kube import NotFound
from conserve.controller.state import PoolRuntime
from conserve.controller.status import pool_status_patch

# Pod and node events resync pools too: the resync lives beside them (pods.py), so neither module imports the other.
resync = pods.resync

log = logging.getLogger("conserve.operator")
PLURAL = "decoderpools"


def load_spec(pool: PoolRuntime, body: dict[str, Any]) -> None:
    """Read a pool object into its runtime (spec, generation, growth history on first sight)."""
    first_sight = not pool.body
    pool.body = body
    pool.generation = int(body.get("metadata", {}).get("generation") or 0)
    try:
        pool.spec = DecoderPoolSpec.model_validate(body.get("spec") or {})
        pool.spec_error = ""
    except ValidationError as exc:
        pool.spec = None
        pool.spec_error = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())[:1000]
    if first_sight:
        status = DecoderPoolStatus.model_validate(body.get("status") or {})
        pool.growth_ratios.extend(status.observed_growth_ratios)


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
        return
    old_generation = pool.generation if pool.body else None
    had_spec = pool.spec is not None
    load_spec(pool, body)
    if old_generation == pool.generation and had_spec == (pool.spec is not None):
        return  # a status write of ours (or the energy loop's) came back: nothing to re-derive
    if pool.spec is None:
        engine.post_pool_event(pool, "InvalidSpec", pool.spec_error, warning=True)
    await resync(engine, pool)
    await engine.drain(pool)


async def write_pool_status(engine: Engine, pool: PoolRuntime) -> None:
    if not pool.body or engine.fenced:
        return
    patch = pool_status_patch(pool, len(pool.pending))
    status = patch["status"]
    labels = (pool.namespace, pool.name)
    metrics.CAPACITY_KV.labels(*labels).set(status["capacityKvTokens"])
    metrics.RESERVED_KV.labels(*labels).set(status["reservedKvTokens"])
    metrics.LIVE_KV.labels(*labels).set(status["liveKvTokens"])
    metrics.READY_DECODERS.labels(*labels).set(status["readyDecoders"])
    metrics.PINNED_CONVERSATIONS.labels(*labels).set(status["conversations"])
    metrics.QUEUE_LENGTH.labels(*labels).set(len(pool.pending))
    try:
        await engine.kube.patch_status(PLURAL, pool.namespace, pool.name, patch)
    except NotFound:
        return
    except Exception as exc:
        metrics.STATUS_WRITE_ERRORS.labels("DecoderPool").inc()
        log.warning("pool %s status not written: %s", pool.key, exc)
        pool.status_dirty.set()


#: A big pool's status is big (about 300 bytes per decoder), and every write goes to every watcher: a pool is
#: written at most every max(pool_status_interval_s, decoders x this) seconds (1,000 decoders: every 2 s).
SECONDS_PER_DECODER = 0.002


async def status_writer(engine: Engine) -> None:
    """One loop for every pool: write the pools marked dirty, each at most once per its interval."""
    tick = engine.config.pool_status_interval_s
    last_write: dict[str, float] = {}
    while True:
        await asyncio.sleep(tick)
        now = engine.clock.monotonic()
        due = []
        for pool in list(engine.world.pools.values()):
            interval = max(tick, len(pool.decoders) * SECONDS_PER_DECODER)
            if pool.status_dirty.is_set() and now - last_write.get(pool.key, 0.0) >= interval:
                pool.status_dirty.clear()
                last_write[pool.key] = now
                due.append(pool)
        await asyncio.gather(*(write_pool_status(engine, p) for p in due))
