"""Failures that heal: decoders unready past their pool's grace lose their conversations (re-placed, or queued
again: never failed for it), and conversations follow their decoder's server to a new address.

The rule of the grace is `core.healing.UnreadyDecoders` (pure); the pool handler (decoderpool.resync) feeds it at
every pod or node change, and the sweep loop asks it every `--idle-sweep-interval` which decoders are now due.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from conserve.controller.engine import Engine
from conserve.controller.state import ConvRecord, PoolRuntime

log = logging.getLogger("conserve.operator")


async def lose_unready_past_grace(engine: Engine) -> None:
    """Every pool's decoders unready for longer than its `decoderLostGraceSeconds`: their conversations move."""
    for pool in list(engine.world.pools.values()):
        async with pool.lock:
            due = pool.unready.due(engine.clock.now(), pool.lost_grace_s) if pool.spec is not None else []
        if due:
            message = f"decoders not ready for over {pool.lost_grace_s:g} s: {', '.join(due)}"
            log.info("pool %s: %s", pool.key, message)
            engine.post_pool_event(pool, "DecoderLost", message, warning=True)
            await engine.decoders_lost(pool, due)
            await engine.drain(pool)


async def follow_endpoints(engine: Engine, pool: PoolRuntime, decoders: Iterable[str]) -> None:
    """Decoders whose server answers at another address (restarted on a new port, a new pod IP): their
    conversations' status.decoder follows, with a new placementGeneration (the KV did not survive the restart:
    the router sends the whole context to the new address)."""
    changed: list[ConvRecord] = []
    async with pool.lock:
        for name in decoders:
            info = pool.decoders.get(name)
            if info is None:
                continue
            for key in pool.scheduler.conversations_on(name):
                record = engine.world.convs.get(key)
                if record is None or not record.placed or record.status.decoder is None:
                    continue
                if record.status.decoder.endpoint != info.endpoint:
                    record.status.decoder = info.endpoint_model()
                    record.status.placement_generation += 1
                    record.dirty = True
                    changed.append(record)
    if changed:
        log.info("pool %s: %d conversations follow their decoders' new endpoints", pool.key, len(changed))
    await asyncio.gather(*(engine.write_status(r) for r in changed))
