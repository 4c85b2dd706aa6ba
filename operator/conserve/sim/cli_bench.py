"""``conserve bench``: see `conserve.sim.cli`."""

from __future__ import annotations

import argparse

from conserve.sim.cli import add_bench_parser


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_bench_parser(subparsers)
