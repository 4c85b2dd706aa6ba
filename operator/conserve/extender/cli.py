"""`conserve extender`: run the kube-scheduler extender.

    conserve extender --port 8888 [--host 127.0.0.1] [--tier-policy strict|preferred]
        [--weights tier=1,free-gpus=0.5,energy=0.5,spread=0.25] [--no-node-cache-capable]
        [--kubeconfig PATH] [--scheduler-name conserve-scheduler] [--max-body-bytes N]

With a cluster (in-cluster config, --kubeconfig or the default kubeconfig) it keeps a watch cache of nodes
(nodeCacheCapable mode) and of pods (free GPUs in both modes). `--no-kube` runs without one: only full-node mode
works then, and free GPUs are read from allocatable alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conserve.core.node_scoring import NodeScoringSettings, NodeWeights
from conserve.core.placement import TierPolicy
from conserve.extender.cache import ClusterCache, KubeWatcher
from conserve.extender.metrics import ExtenderMetrics
from conserve.extender.service import DEFAULT_MAX_BODY_BYTES, ExtenderService, ExtenderSettings

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)


def parse_weights(text: str) -> NodeWeights:
    """`tier=1,free-gpus=0.5,...` -> NodeWeights (unnamed weights keep their defaults)."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"weight {part!r} is not name=value")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight {name.strip()} is not a number: {value!r}") from None
    try:
        return NodeWeights.from_mapping(values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "extender",
        help="run the kube-scheduler extender (prefill on compute-tier GPUs, decode on bandwidth-tier GPUs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8888, help="port to listen on (default 8888)")
    parser.add_argument(
        "--tier-policy",
        choices=[p.value for p in TierPolicy],
        default=TierPolicy.STRICT.value,
        help="strict: prefill only on compute tier, decode only on bandwidth tier; preferred: tier fit scores "
        "higher, other tiers allowed (default strict)",
    )
    parser.add_argument(
        "--weights",
        type=parse_weights,
        default=NodeWeights(),
        help="scorer weights, name=value comma-separated: tier, free-gpus, energy, spread "
        "(default tier=1,free-gpus=0.5,energy=0.5,spread=0.25)",
    )
    parser.add_argument(
        "--node-cache-capable",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep a watch cache of nodes so the scheduler may send NodeNames only (default on); full Nodes "
        "requests are always accepted",
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig for the watch cache (default: in-cluster)")
    parser.add_argument("--no-kube", action="store_true", help="no watch cache at all (full-node mode only)")
    parser.add_argument(
        "--scheduler-name",
        action="append",
        default=None,
        help="act only on pods of this scheduler (repeatable; default conserve-scheduler; '*' for all)",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="request body limit (default 64 MiB)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.set_defaults(func=run)


@dataclass
class Extender:
    """A configured extender: the service, its cache and watcher (None without a cluster), its metrics."""

    service: ExtenderService
    cache: ClusterCache | None
    watcher: KubeWatcher | None
    metrics: ExtenderMetrics

    def ready(self) -> bool:
        return self.cache is None or (self.cache.nodes_synced.is_set() and self.cache.pods_synced.is_set())

    def cache_sizes(self) -> tuple[int, int]:
        return (self.cache.node_count, self.cache.pod_count) if self.cache is not None else (0, 0)

    def app(self, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> web.Application:
        from conserve.extender.server import ExtenderApp

        return ExtenderApp(
            self.service,
            metrics=self.metrics,
            max_body_bytes=max_body_bytes,
            ready=self.ready,
            cache_sizes=self.cache_sizes,
        ).build()


def build_extender(
    settings: ExtenderSettings,
    *,
    kubeconfig: str | None = None,
    use_cluster: bool = True,
    node_cache: bool = True,
) -> Extender:
    """Wire the extender: a watch cache when `use_cluster` (started here), the service, its metrics."""
    cache = ClusterCache() if use_cluster else None
    watcher = None
    if cache is not None:
        watcher = KubeWatcher(cache, kubeconfig=kubeconfig, watch_nodes=node_cache)
        watcher.start()
    return Extender(ExtenderService(settings, cache), cache, watcher, ExtenderMetrics())


def settings_from_args(args: argparse.Namespace) -> ExtenderSettings:
    names = args.scheduler_name or ["conserve-scheduler"]
    return ExtenderSettings(
        scoring=NodeScoringSettings(tier_policy=TierPolicy(args.tier_policy), weights=args.weights),
        scheduler_names=frozenset() if "*" in names else frozenset(names),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    extender = build_extender(
        settings, kubeconfig=args.kubeconfig, use_cluster=not args.no_kube, node_cache=args.node_cache_capable
    )
    return asyncio.run(_serve(extender, args.host, args.port, args.max_body_bytes))


async def _freeze_when_synced(extender: Extender) -> None:
    """Once the watch cache holds the cluster, move it out of the garbage collector's sight (`gc.freeze`): a full
    collection would otherwise walk every cached node and pod in the middle of a scheduler call."""
    while not extender.ready():
        await asyncio.sleep(0.5)
    gc.collect()
    gc.freeze()
    log.info("extender ready: %d nodes, %d pods cached", *extender.cache_sizes())


async def _serve(extender: Extender, host: str, port: int, max_body_bytes: int) -> int:
    from conserve.extender.server import start_site

    runner = await start_site(extender.app(max_body_bytes), host, port)
    log.info("conserve extender listening on http://%s:%d", host, port)
    freeze = asyncio.create_task(_freeze_when_synced(extender))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        freeze.cancel()
        await runner.cleanup()
        if extender.watcher is not None:
            extender.watcher.stop()
    return 0
