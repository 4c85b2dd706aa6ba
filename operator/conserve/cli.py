"""The ``conserve`` command.

Each subcommand lives in its own module that exposes ``add_parser(subparsers) -> None``; it registers its
parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code)
with ``set_defaults(func=...)``. To add one, append ``"name": "conserve.package.module"`` to
``SUBCOMMANDS``. Modules are imported only when their subcommand runs (or for ``--help``), so
``conserve dev`` never imports kopf or aiohttp; keep the heavy imports inside ``func`` where possible.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

# Subcommand name -> module exposing add_parser(subparsers). Teammates: add yours here.
SUBCOMMANDS: dict[str, str] = {
    "dev": "conserve.devcluster.cli",
    "crds": "conserve.api.crdgen",
    "operator": "conserve.controller.cli",
    "extender": "conserve.extender.cli",
    "gpu-sim": "conserve.gpusim.cli",
    "router": "conserve.router.cli",
    "load": "conserve.load.cli",
    "demo": "conserve.load.demo",
    "fake-dcgm": "conserve.gpusim.fakedcgm_cluster",
    "energy": "conserve.controller.energy",
    "simulate": "conserve.sim.cli_simulate",
    "bench": "conserve.sim.cli_bench",
    "perf-model": "conserve.perfmodel.cli",
}


class _SubcommandModule(Protocol):
    def add_parser(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


class _Func(Protocol):
    def __call__(self, args: argparse.Namespace) -> int: ...


def _register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], names: Sequence[str]) -> None:
    for name in names:
        module = cast(_SubcommandModule, importlib.import_module(SUBCOMMANDS[name]))
        module.add_parser(subparsers)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that subcommand's module is imported (the lazy path)."""
    parser = argparse.ArgumentParser(
        prog="conserve", description="ConServe: conversation-level disaggregated LLM serving on Kubernetes."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _register(subparsers, [only] if only else list(SUBCOMMANDS))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in args_list if not a.startswith("-")), None)
    # Import only the module of the subcommand being run; `conserve --help` imports them all to list them.
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(args_list)
    func = cast(_Func, args.func)
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
