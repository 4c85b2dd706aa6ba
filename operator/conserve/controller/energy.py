"""The operator's energy loop: GPU readings in; decoder, pool and conversation energy out.

Every `interval_s`:
1. read every GPU through an `EnergyReader` (dcgm-exporter endpoints found by a Service or a pod selector, or
   given as URLs; NVML; a fake) and turn each GPU's counter into an interval (`conserve.core.energy.gpu_interval`:
   resets, wraps and missing samples never give negative or double-counted energy);
2. map each GPU to the serving pods that use it, from the exporter's `pod`/`namespace` labels (dcgm-exporter's
   Kubernetes mapping; the fake exporter sets them too); a GPU shared by several serving pods is split evenly;
   a GPU no serving pod uses is counted on its node only;
3. know each pod's pool and role, and each conversation's work and KV, from an `EnergyState`: in the operator
   its own World (the pools' decoders and prefills with their KV capacity, the conversations' records), which
   its watches keep current, so the loop lists nothing; in `conserve energy` alone, a list of the DecoderPools
   and Conversations each cycle;
4. attribute each pod's interval among its conversations (`attribute_interval`): decode pods by tokens processed
   in the interval (input + output reported since the last cycle) and idle by KV held (max of reservation and
   live context); prefill pods by the first turn's input tokens, once, in the cycle that sees the first turn;
   work on a pod whose GPU gave no interval this cycle (a missed scrape) waits for the next interval, which
   spans the gap; work before a pod's first reading (a baseline only) is not counted: its energy is unknown;
5. write: Conversation status `energyJoules` and `energyPerTokenJoules` (J per output token) by merge patch of
   those two fields only, a cycle's writes in one flush with bounded concurrency; per-decoder power and energy
   and J per output token through the `EnergyState` (in the operator: `World.set_decoder_energy`, which the pool
   status writer and placement read; standalone: a read-modify-write of decoders[] guarded by
   resourceVersion); Prometheus metrics.
Cumulative figures start from what status already holds, so an operator restart neither loses nor repeats them.
Measured J per token per tier (and per GPU product and role) is kept over a decaying window: a decoder without
its own measurement yet gets its tier's, which is what the placement energy scorer sees.

The parts: `energy_state` (what a cycle reads and where figures go; the operator's World), `energy_standalone`
(the same by listing, for `conserve energy`), `energy_accountant` (the cycle), `energy_metrics` (Prometheus);
the readers and their options are `conserve.energy`'s. This module starts the loop, in the operator or alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from prometheus_client import start_http_server

from conserve.controller.energy_accountant import EnergyAccountant
from conserve.controller.energy_metrics import PrometheusEnergyMetrics
from conserve.controller.energy_standalone import ListedEnergyState
from conserve.controller.energy_state import ConversationEnergyWriter, OperatorEnergyState, StatusWriter
from conserve.controller.state import World
from conserve.energy.options import EnergyOptions, add_arguments
from conserve.energy.reader import EnergyReader
from conserve.metrics import REGISTRY

__all__ = ["EnergyOptions", "add_arguments", "add_parser", "start_in_operator"]


def _build_reader(options: EnergyOptions, api_client: Any | None) -> EnergyReader:
    # Here, not at the top: this module builds `conserve energy`'s parser (and `conserve --help` imports it),
    # which must not load the readers' libraries (aiohttp, the Kubernetes client).
    from conserve.energy.sources import build_reader  # noqa: PLC0415 loaded when the loop starts, see above

    return build_reader(options, api_client)


def start_in_operator(
    world: World, kube: StatusWriter, options: EnergyOptions, api_client: Any | None
) -> tuple[EnergyAccountant, asyncio.Task[None]]:
    """For the operator's startup: the loop as a task, reading the operator's World (no lists), writing decoder
    figures into it (the pool status writer and placement read them) and conversation energy by merge patch of
    its two fields."""
    reader = _build_reader(options, api_client)
    accountant = EnergyAccountant(
        reader, OperatorEnergyState(world), ConversationEnergyWriter(kube), metrics=PrometheusEnergyMetrics()
    )
    return accountant, asyncio.create_task(accountant.run_forever(options.interval_s), name="conserve-energy")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "energy", help="run the energy loop alone (GPU readings -> pool and conversation status, metrics)"
    )
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--namespace", default=None, help="only this namespace (default: all)")
    parser.add_argument("--metrics-port", type=int, default=8081, help="serve /metrics here (0: do not serve)")
    add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from conserve.controller.kube import KubeClient  # noqa: PLC0415 the Kubernetes client: as `_build_reader`

    kube = KubeClient.from_kubeconfig(args.kubeconfig)
    options = EnergyOptions.from_args(args)
    try:
        reader = _build_reader(options, kube.api_client)
    except ValueError as exc:
        raise SystemExit(f"conserve energy: {exc}") from exc
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=REGISTRY)
    state = ListedEnergyState(kube, [args.namespace] if args.namespace else None)
    accountant = EnergyAccountant(reader, state, ConversationEnergyWriter(kube), metrics=PrometheusEnergyMetrics())
    try:
        await accountant.run_forever(options.interval_s)
    finally:
        await reader.close()
        kube.close()
    return 0
