"""Command-line options the subcommands share (argparse only: imported while `conserve --help` builds every
subcommand's parser)."""

from __future__ import annotations

import argparse
import math


def seconds(text: str) -> float:
    """argparse type of a duration or an interval in seconds: a finite number, not negative."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (finite, >= 0)")
    return value


def add_seconds_option(parser: argparse.ArgumentParser, flag: str, default: float, help: str) -> None:
    """An option of `seconds`, its default stated at the end of its help."""
    parser.add_argument(flag, type=seconds, default=default, metavar="SECONDS", help=f"{help} (default {default:g})")
