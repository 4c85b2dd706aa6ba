"""`conserve gpu-sim`: one simulated vLLM server, or (`conserve gpu-sim pods`) the pod runner."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from conserve.core.perf import LINKS

TIME_SCALE_HELP = (
    "real seconds per modelled second: 0.1 runs ten times faster than the modelled GPU (pair it with the load "
    "generator's --speedup 10)"
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "gpu-sim",
        help="a simulated vLLM server paced by the performance model, or the pod runner",
        description="Behaves like a vLLM prefill or decode server on the given GPU (OpenAI endpoints, SSE, "
        "vllm: metrics, modelled power). `conserve gpu-sim pods` runs one per serving pod on KWOK nodes.",
    )
    _common(p)
    p.add_argument("--role", choices=["prefill", "decode", "both"], default="decode")
    p.add_argument("--gpu", default="H200", help="GPU product (catalog name or GFD product string)")
    p.add_argument("--gpu-count", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="", help="name reported in the X-Conserve-Server header")
    p.add_argument("--kv-capacity-tokens", type=int, default=None, help="override the derived KV capacity")
    p.set_defaults(func=_run_server)
    sub = p.add_subparsers(dest="gpusim_command", metavar="pods")
    pods = sub.add_parser("pods", help="run a simulator for every conserve.dev/role pod on a KWOK node")
    _common(pods)
    pods.add_argument("--kubeconfig", default=None)
    pods.add_argument("--namespace", default=None, help="watch one namespace (default: all)")
    pods.add_argument("--any-node", action="store_true", help="also serve pods on non-KWOK nodes")
    pods.set_defaults(func=_run_pods)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--time-scale", type=float, default=1.0, help=TIME_SCALE_HELP)
    p.add_argument("--memory-fraction", type=float, default=0.9, help="like vLLM's gpu_memory_utilization")
    p.add_argument("--link", choices=sorted(LINKS), default="rdma", help="KV transfer link to model")
    p.add_argument("--stream-interval", type=int, default=1, help="decode steps per streamed chunk (first: at once)")
    p.add_argument("--log-level", default="INFO")


def _run_server(args: argparse.Namespace) -> int:
    from conserve.gpusim.engine import Role
    from conserve.gpusim.server import GpuSimConfig, GpuSimServer

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = GpuSimConfig(
        role=Role(args.role),
        gpu=args.gpu,
        gpu_count=args.gpu_count,
        model=args.model,
        host=args.host,
        port=args.port,
        time_scale=args.time_scale,
        memory_fraction=args.memory_fraction,
        link=args.link,
        name=args.name,
        stream_interval=args.stream_interval,
        kv_capacity_tokens=args.kv_capacity_tokens,
    )

    async def main() -> None:
        server = GpuSimServer(config)
        port = await server.start()
        logging.getLogger(__name__).info(
            "gpu-sim %s on %s (KV %d tokens) at %s:%d",
            config.role,
            config.gpu,
            server.engine.kv_capacity_tokens,
            config.host,
            port,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def _run_pods(args: argparse.Namespace) -> int:
    from conserve.gpusim.engine import Role
    from conserve.gpusim.pods import PodRunner
    from conserve.gpusim.server import GpuSimConfig
    from conserve.kube import new_api_client

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = GpuSimConfig(
        role=Role.DECODE,
        model=args.model,
        time_scale=args.time_scale,
        memory_fraction=args.memory_fraction,
        link=args.link,
        stream_interval=args.stream_interval,
    )
    api = new_api_client(args.kubeconfig)

    async def main() -> None:
        await PodRunner(api_client=api, namespace=args.namespace, base=base, any_node=args.any_node).run()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
