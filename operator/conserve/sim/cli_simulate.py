"""``conserve simulate``: see `conserve.sim.cli`."""

from __future__ import annotations

import argparse

from conserve.sim.cli import add_simulate_parser


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_simulate_parser(subparsers)
