"""Run the operator: leader election, metrics endpoint, then Kopf with our registry until stopped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import kopf
from prometheus_client import start_http_server

from conserve import metrics
from conserve.controller.engine import Engine, EngineConfig
from conserve.controller.events import AggregatingKube
from conserve.controller.kube import Kube, KubeClient
from conserve.controller.leader import LeaderElector, LeaseTiming
from conserve.controller.occupancy import OccupancyScraper, engine_decoders, engine_hook
from conserve.controller.registry import build_registry
from conserve.controller.shards import ShardFencedKube, Sharding, ShardSet
from conserve.controller.state import key_of
from conserve.controller.usage_intake import Checkpoints, UsageIntake, read_token, serve_loop

log = logging.getLogger("conserve.operator")


@dataclass(frozen=True)
class OperatorOptions:
    namespaces: list[str] | None = None
    metrics_port: int = 9100
    health_port: int = 0
    leader_elect: bool = True
    lease_name: str = "conserve-operator"
    lease_namespace: str = "default"
    identity: str = "conserve-operator"
    pool_status_interval_s: float = 0.5
    idle_sweep_interval_s: float = 1.0
    idle_phase_after_s: float = 60.0
    api_threads: int = 64
    lease_duration_s: float = 15.0
    energy: Any | None = None  # controller.energy.EnergyOptions
    normal_events: bool = True
    #: Seconds over which Normal Events of one namespace, kind and reason are aggregated (0: each posted).
    event_window_s: float = 10.0
    #: >1: shard pools over this many Leases (`<lease_name>-shard-<i>`), several replicas each leading some.
    shards: int = 1
    vanished_sweep_interval_s: float = 300.0
    #: Seconds between scrapes of the decoders' engine metrics (observed KV occupancy); 0: off.
    occupancy_interval_s: float = 2.0
    #: The turn-report endpoint (controller/usage_intake.py): its port (0: off) and the shared token's file.
    usage_port: int = 0
    usage_token_file: str | None = None
    checkpoint_interval_s: float = 300.0


async def run_operator(options: OperatorOptions) -> int:  # noqa: C901 the wiring of options, one branch each
    client = KubeClient.from_kubeconfig(threads=options.api_threads, instance=options.identity)
    kube: Kube = client
    background: list[Callable[[], Coroutine[Any, Any, None]]] = []
    if options.normal_events and options.event_window_s > 0:
        aggregating = AggregatingKube(kube, options.event_window_s)
        kube = aggregating
        background.append(aggregating.run)
    sharding: Sharding | None = None
    engine_ref: list[Engine] = []
    if options.leader_elect and options.shards > 1:
        sharding = Sharding(
            client.api_client,
            options.lease_namespace,
            options.lease_name,
            options.identity,
            ShardSet(options.shards),
            options.lease_duration_s,
        )

        def pool_of(namespace: str, name: str) -> str | None:
            record = engine_ref[0].world.convs.get(key_of(namespace, name)) if engine_ref else None
            return record.spec.pool if record is not None else None

        kube = ShardFencedKube(kube, sharding.shard_set, pool_of)
    stop = asyncio.Event()
    elector: LeaderElector | None = None
    lost = asyncio.Event()
    metrics.OPERATOR_SHARDS.set(options.shards if sharding is not None else 1)
    if sharding is not None:
        shard_set = sharding.shard_set
        metrics.OPERATOR_LEADING_SHARDS.set_function(lambda: len(shard_set.held))
    else:  # a standby says so while it waits for the Lease; without leader election it leads at once
        metrics.OPERATOR_LEADING_SHARDS.set(0 if options.leader_elect else 1)
    if options.metrics_port:
        start_http_server(options.metrics_port, registry=metrics.REGISTRY)
    try:
        if options.leader_elect and sharding is None:
            elector = LeaderElector(
                client.api_client,
                options.lease_namespace,
                options.lease_name,
                options.identity,
                LeaseTiming.for_duration(options.lease_duration_s),
            )
            await elector.acquire()
            metrics.OPERATOR_LEADING_SHARDS.set(1)
            hold = asyncio.create_task(elector.hold(lost))
        engine = Engine(
            kube,
            EngineConfig(
                pool_status_interval_s=options.pool_status_interval_s,
                idle_sweep_interval_s=options.idle_sweep_interval_s,
                idle_phase_after_s=options.idle_phase_after_s,
                normal_events=options.normal_events,
            ),
        )
        engine_ref.append(engine)
        if options.occupancy_interval_s > 0:
            scraper = OccupancyScraper(
                engine_decoders(engine), engine_hook(engine), interval_s=options.occupancy_interval_s
            )
            background.append(scraper.run)
        if options.usage_port:
            background.append(_usage_endpoint(engine, options))
        if elector is not None:
            lost_watch = asyncio.create_task(_fence(lost, stop, engine))
        registry = build_registry(
            engine,
            options.namespaces,
            options.energy,
            sharding=sharding,
            background=background,
            vanished_sweep_interval_s=options.vanished_sweep_interval_s,
        )
        await kopf.operator(
            registry=registry,
            standalone=True,  # leader election is ours (leader.py, shards.py); no KopfPeering objects
            clusterwide=options.namespaces is None,
            namespaces=options.namespaces or (),
            stop_flag=stop,
            liveness_endpoint=f"http://0.0.0.0:{options.health_port}/healthz" if options.health_port else None,
        )
        if elector is not None:
            hold.cancel()
            lost_watch.cancel()
            if not lost.is_set():
                await asyncio.to_thread(elector.release)
        if sharding is not None and sharding.leases is not None:
            await asyncio.to_thread(sharding.leases.release_all)
        return 1 if lost.is_set() else 0
    finally:
        client.close()


def _usage_endpoint(engine: Engine, options: OperatorOptions) -> Callable[[], Coroutine[Any, Any, None]]:
    if not options.usage_token_file:
        raise ValueError("--usage-port needs --usage-token-file (the reports are authenticated)")
    intake = UsageIntake(engine, Checkpoints(options.checkpoint_interval_s))
    return serve_loop(intake, options.usage_port, read_token(options.usage_token_file))


async def _fence(lost: asyncio.Event, stop: asyncio.Event, engine: Engine) -> None:
    """Leadership lost: no more writes at once, then stop Kopf (the process exits 1 and restarts as a standby)."""
    await lost.wait()
    metrics.OPERATOR_LEADING_SHARDS.set(0)
    engine.fenced = True
    stop.set()
