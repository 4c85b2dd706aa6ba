"""The Kopf handlers, registered on a registry of their own around one Engine (no module-level singletons)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import kopf

from conserve.api.common import GROUP, VERSION
from conserve.controller import conversation, decoderpool, startup
from conserve.controller.engine import Engine

log = logging.getLogger("conserve.operator")


def build_registry(
    engine: Engine, namespaces: Sequence[str] | None, energy_options: Any | None = None
) -> kopf.OperatorRegistry:
    """`energy_options` (controller.energy.EnergyOptions) starts the energy loop beside the operator."""
    registry = kopf.OperatorRegistry()
    loops: list[asyncio.Task[Any]] = []

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def on_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        startup.configure(settings)
        await startup.rebuild(engine, namespaces)
        loops.append(asyncio.create_task(decoderpool.status_writer(engine)))
        loops.append(asyncio.create_task(_idle_loop(engine)))
        if energy_options is not None and energy_options.source != "none":
            from conserve.controller import energy

            api_client = getattr(engine.kube, "api_client", None)
            _accountant, task = energy.start_in_operator(
                engine.world, engine.kube, energy_options, api_client, namespaces
            )
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
        await conversation.on_event(engine, event.get("type"), dict(event["object"]))

    @kopf.on.event(GROUP, VERSION, decoderpool.PLURAL, registry=registry)
    async def on_pool(event: kopf.RawEvent, **_: Any) -> None:
        await decoderpool.on_event(engine, event.get("type"), dict(event["object"]))

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def on_pod(event: kopf.RawEvent, **_: Any) -> None:
        await decoderpool.on_pod_event(engine, event.get("type"), dict(event["object"]))

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def on_node(event: kopf.RawEvent, **_: Any) -> None:
        await decoderpool.on_node_event(engine, event.get("type"), dict(event["object"]))

    return registry


TRIM_EVERY_S = 30.0


async def _idle_loop(engine: Engine) -> None:
    last_trim = engine.clock.monotonic()
    while True:
        await asyncio.sleep(engine.config.idle_sweep_interval_s)
        try:
            await engine.sweep_idle()
        except Exception:  # a bad sweep must not end the loop
            log.exception("idle sweep failed")
        if engine.clock.monotonic() - last_trim >= TRIM_EVERY_S:
            last_trim = engine.clock.monotonic()
            startup.release_free_memory(collect=False)  # no full GC here: it would pause placements
