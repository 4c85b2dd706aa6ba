"""Start of a run: Kopf settings, then the ledger rebuilt from the API server before any decision.

Kopf runs startup handlers before it starts watching, so no placement can happen on a partial ledger: every
placed conversation's reservation is adopted (even over capacity: the API server holds the truth), the waiting
ones are queued, decoders that left while no operator ran have their conversations moved, then the queues drain.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import time
from collections.abc import Callable, Sequence

import kopf
from pydantic import ValidationError

from conserve.api.conversation import ConversationSpec
from conserve.controller import conversation, decoderpool, pods
from conserve.controller.engine import Engine
from conserve.controller.state import ConvRecord, NodeInfo, PoolRuntime, key_of

log = logging.getLogger("conserve.operator")


def configure(settings: kopf.OperatorSettings) -> None:
    # Kopf's own per-handler Events would double ours at every watch event: post only its warnings and errors.
    settings.posting.level = logging.WARNING
    # Silent watch stalls: ask the server to end each watch, and give up on a stream that says nothing.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    # An API-server outage outlasting Kopf's retries (about a minute) would end the watches: retry for about ten
    # minutes, the last every 30 s, so an operator lives through a restart or an outage of its API server.
    settings.networking.error_backoffs = (1, 1, 2, 3, 5, 8, 13, 21, *[30] * 18)
    # Resources and namespaces are fixed at start: no CRD/namespace scanning (and no RBAC for it).
    settings.scanning.disabled = True
    # Each object's worker lives on this long after its last event: 10,000 conversations created in a burst
    # would otherwise keep 10,000 idle tasks (and their last bodies) for Kopf's default 5 s.
    settings.queueing.idle_timeout = 1.0
    # Level-triggered on.event handlers keep no progress; keep Kopf's markers off status regardless.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.conserve.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.conserve.dev")


#: A filter on pools: (namespace, pool) -> whether this replica decides for it (sharding; None: every pool).
Owns = Callable[[str, str], bool]


async def rebuild(engine: Engine, namespaces: Sequence[str] | None, owns: Owns | None = None) -> None:
    """Nodes and pods, then the pools this replica decides for and their conversations."""
    kube = engine.kube
    world = engine.world
    for node in await kube.list_nodes():
        meta = node.get("metadata", {})
        world.nodes[meta["name"]] = NodeInfo.from_labels(meta["name"], meta.get("labels") or {})
    for scope in _scopes(namespaces):
        for pod in await kube.list_pods(scope):
            info = pods.pod_info(pod)
            world.pods[key_of(info.namespace, info.name)] = info
    await rebuild_pools(engine, namespaces, owns)


async def rebuild_pools(engine: Engine, namespaces: Sequence[str] | None, owns: Owns | None = None) -> None:
    """The ledger of the pools `owns` accepts, from the API server: every placed conversation adopted (even over
    capacity), the waiting ones queued, holdings on decoders that left moved; then the queues drain. Nodes and
    pods must be known already (the watches keep them)."""
    started = time.monotonic()
    owns = owns or _every_pool
    scopes = _scopes(namespaces)
    loaded = await _load_pools(engine, scopes, owns)
    seen, placed, waiting = await _load_conversations(engine, scopes, owns)
    log.info(
        "ledger rebuilt: %d pools, %d decoders, %d conversations (%d placed, %d pending) in %.2fs",
        len(loaded),
        sum(len(p.decoders) for p in loaded),
        seen,
        placed,
        waiting,
        time.monotonic() - started,
    )
    release_free_memory()
    for pool in [p for p in engine.world.pools.values() if owns(p.namespace, p.name)]:
        # Unready decoders keep their conversations for the pool's grace, counted from now (the sweep moves them
        # past it); decoders gone or leaving lose them at once.
        pool.unready.observe({name: d.ready for name, d in pool.decoders.items()}, engine.clock.now())
        lost = sorted({key[1] for key in _holdings_off_decoders(pool)})
        pool.unready.mark_lost(lost)
        if lost:
            await engine.decoders_lost(pool, lost)
        engine.on_pool_changed(pool)
        await engine.drain(pool)


def _every_pool(_namespace: str, _pool: str) -> bool:
    return True


async def _load_pools(engine: Engine, scopes: list[str | None], owns: Owns) -> list[PoolRuntime]:
    """The pools `owns` accepts, with their specs and decoders."""
    loaded: list[PoolRuntime] = []
    for scope in scopes:
        for body in await engine.kube.list_objects(decoderpool.PLURAL, scope):
            meta = body["metadata"]
            if owns(meta["namespace"], meta["name"]):
                pool = engine.world.pool(meta["namespace"], meta["name"])
                decoderpool.load_spec(pool, body)
                loaded.append(pool)
    for pool in loaded:
        pods.sync_pool(engine.world, pool)
    return loaded


async def _load_conversations(engine: Engine, scopes: list[str | None], owns: Owns) -> tuple[int, int, int]:
    """The conversations of the pools `owns` accepts: placed ones adopted, waiting ones queued. Returns how many
    were seen, placed and waiting."""
    placed = waiting = seen = 0
    repaired: list[ConvRecord] = []
    for scope in scopes:
        for body in await engine.kube.list_objects(conversation.PLURAL, scope):
            try:
                spec = ConversationSpec.model_validate(body.get("spec") or {})
            except ValidationError:
                continue
            if not owns(body["metadata"]["namespace"], spec.pool):
                continue
            record = conversation.record_from_body(
                body, spec, now_s=engine.clock.now(), monotonic=engine.clock.monotonic()
            )
            engine.world.convs[record.key] = record
            seen += 1
            if conversation.audit(engine, record, body):
                repaired.append(record)
            if record.placed:
                conversation.adopt(engine, record)
                placed += 1
            elif not record.terminal and not body["metadata"].get("deletionTimestamp"):
                conversation.adopt(engine, record)
                waiting += 1
    for record in repaired:  # before the watches start: the data plane reads the repaired status
        await engine.write_status(record)
    return seen, placed, waiting


def forget_pools(engine: Engine, owned_elsewhere: Owns) -> int:
    """Drop the pools (and their conversations) another replica now decides for; returns how many pools."""
    world = engine.world
    gone = [key for key, p in world.pools.items() if owned_elsewhere(p.namespace, p.name)]
    for key in gone:
        world.pools.pop(key)
    for key, record in list(world.convs.items()):
        if owned_elsewhere(record.namespace, record.spec.pool):
            world.convs.pop(key)
    return len(gone)


def _scopes(namespaces: Sequence[str] | None) -> list[str | None]:
    return list(namespaces) if namespaces else [None]


def release_free_memory(collect: bool = True) -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise: RSS would stay at the peak of the rebuild's
    lists, or of a burst, for the process's life). A no-op where malloc_trim does not exist."""
    if collect:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _holdings_off_decoders(pool: PoolRuntime) -> list[tuple[str, str]]:
    """(conversation, decoder) of holdings on decoders that are gone or leaving (terminating, finished), or not
    ready in a pool without a grace."""
    out = []
    for key, holding in pool.scheduler.holdings().items():
        decoder = pool.decoders.get(holding.decoder)
        if decoder is None or decoder.leaving or (not decoder.ready and pool.lost_grace_s <= 0):
            out.append((key, holding.decoder))
    return out
