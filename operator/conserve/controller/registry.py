"""The Kopf handlers, registered on a registry of their own around one Engine (no module-level singletons)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import kopf

from conserve.api.common import GROUP, VERSION
from conserve.controller import conversation, decoderpool, energy, healing, startup
from conserve.controller.engine import Engine
from conserve.controller.shards import Sharding

log = logging.getLogger("conserve.operator")


def build_registry(  # noqa: C901 one handler per resource
    engine: Engine,
    namespaces: Sequence[str] | None,
    energy_options: Any | None = None,
    *,
    sharding: Sharding | None = None,
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
    vanished_sweep_interval_s: float = 300.0,
) -> kopf.OperatorRegistry:
    """`energy_options` (controller.energy.EnergyOptions) starts the energy loop beside the operator;
    `sharding` makes this replica decide only for the pools of the shards it holds; `background` are loops to
    run while the operator runs (the Event aggregator's flush)."""
    registry = kopf.OperatorRegistry()
    loops: list[asyncio.Task[Any]] = []
    shard_set = sharding.shard_set if sharding is not None else None

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def on_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        startup.configure(settings)
        if sharding is None:
            await startup.rebuild(engine, namespaces)
        else:  # nodes and pods now; each shard's pools when its Lease is acquired
            await startup.rebuild(engine, namespaces, owns=lambda _ns, _pool: False)
            loops.append(asyncio.create_task(sharding.start(engine, namespaces)))
        loops.extend(asyncio.create_task(loop()) for loop in background)
        if vanished_sweep_interval_s > 0:
            loops.append(asyncio.create_task(_vanished_loop(engine, namespaces, vanished_sweep_interval_s)))
        loops.append(asyncio.create_task(decoderpool.status_writer(engine)))
        loops.append(asyncio.create_task(_idle_loop(engine)))
        if energy_options is not None and energy_options.source != "none":
            api_client = getattr(engine.kube, "api_client", None)
            _accountant, task = energy.start_in_operator(engine.world, engine.kube, energy_options, api_client)
            loops.append(task)

    @kopf.on.cleanup(registry=registry)
    async def on_cleanup(**_: Any) -> None:
        for task in loops:
            task.cancel()
        # Owed pool status writes go out before we stop.
        await asyncio.gather(
            *(decoderpool.write_pool_status(engine, p) for p in engine.world.pools.values() if p.status_dirty.is_set()),
            return_exceptions=True,
        )

    @kopf.on.event(GROUP, VERSION, conversation.PLURAL, registry=registry)
    async def on_conversation(event: kopf.RawEvent, **_: Any) -> None:
        body: dict[str, Any] = dict(event["object"])
        if shard_set is not None:
            pool = str((body.get("spec") or {}).get("pool", ""))
            if not await shard_set.wait_owned(body.get("metadata", {}).get("namespace", ""), pool):
                return  # another replica decides for this pool
        await conversation.on_event(engine, event.get("type"), body)

    @kopf.on.event(GROUP, VERSION, decoderpool.PLURAL, registry=registry)
    async def on_pool(event: kopf.RawEvent, **_: Any) -> None:
        body: dict[str, Any] = dict(event["object"])
        meta = body.get("metadata", {})
        if shard_set is not None and not await shard_set.wait_owned(meta.get("namespace", ""), meta.get("name", "")):
            return
        await decoderpool.on_event(engine, event.get("type"), body)

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def on_pod(event: kopf.RawEvent, **_: Any) -> None:
        await decoderpool.on_pod_event(engine, event.get("type"), dict(event["object"]))

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def on_node(event: kopf.RawEvent, **_: Any) -> None:
        await decoderpool.on_node_event(engine, event.get("type"), dict(event["object"]))

    return registry


TRIM_EVERY_S = 30.0


async def _vanished_loop(engine: Engine, namespaces: Sequence[str] | None, interval_s: float) -> None:
    """Now and then, release what the API server no longer has (a delete missed in a watch gap: no finalizer
    holds the object until we see it)."""
    scopes: list[str | None] = list(namespaces) if namespaces else [None]
    while True:
        await asyncio.sleep(interval_s)
        try:
            await conversation.release_vanished(engine, scopes)
        except Exception as exc:  # noqa: BLE001 the sweep runs again
            log.warning("sweep for deleted conversations failed: %s", exc)


async def _idle_loop(engine: Engine) -> None:
    last_trim = engine.clock.monotonic()
    while True:
        await asyncio.sleep(engine.config.idle_sweep_interval_s)
        try:
            await healing.lose_unready_past_grace(engine)
            await engine.sweep_idle()
        except Exception:  # a bad sweep must not end the loop
            log.exception("idle sweep failed")
        if engine.clock.monotonic() - last_trim >= TRIM_EVERY_S:
            last_trim = engine.clock.monotonic()
            startup.release_free_memory(collect=False)  # no full GC here: it would pause placements
