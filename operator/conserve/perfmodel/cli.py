"""`conserve perf-model check|fit`: the performance model against measurements."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from conserve.core.perf import CALIBRATED
from conserve.perfmodel.check import report, row_errors
from conserve.perfmodel.measurements import (
    FIT_DATA,
    HELD_OUT_DATA,
    MeasurementError,
    data_path,
    known_shapes,
    load_measurements,
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("perf-model", help="Check or fit the performance model against measurements")
    commands = parser.add_subparsers(dest="perf_command", metavar="ACTION")
    commands.required = True
    check = commands.add_parser(
        "check",
        help="Errors of the model per model / GPU / TP (default: the packaged fit and held-out data)",
        description="CSV columns: model, gpu, tp, batch, prompt_tokens, context_tokens, prefill_ms, decode_step_ms "
        "(either time may be empty); optional power_limit_w, prefill_power_w, mean_power_w (per GPU).",
    )
    check.add_argument("measurements", nargs="*", type=Path, help="measurement CSV files")
    check.add_argument("--shapes", action="append", type=Path, default=[], help="model shapes CSV (repeatable)")
    check.add_argument("--worst", type=int, default=5, help="how many of the worst rows to list")
    check.set_defaults(func=_check)
    fit = commands.add_parser("fit", help="Fit the model's constants to measurements (default: the fit set)")
    fit.add_argument("measurements", nargs="*", type=Path)
    fit.add_argument("--shapes", action="append", type=Path, default=[])
    fit.set_defaults(func=_fit)


def _inputs(args: argparse.Namespace, default: list[Path]) -> list[tuple[str, Path]]:
    paths: list[Path] = args.measurements or default
    return [(str(p) if args.measurements else p.name, p) for p in paths]


def _check(args: argparse.Namespace) -> int:
    try:
        shapes = known_shapes(args.shapes)
        for label, path in _inputs(args, [data_path(FIT_DATA), data_path(HELD_OUT_DATA)]):
            errors = row_errors(load_measurements(path, shapes))
            print(report(errors, worst=args.worst, title=f"== {label}"))
            print()
    except (MeasurementError, OSError) as error:
        print(f"error: {error}")
        return 2
    return 0


def _fit(args: argparse.Namespace) -> int:
    from conserve.perfmodel.fit import fit, loss

    try:
        shapes = known_shapes(args.shapes)
        rows = [r for _, p in _inputs(args, [data_path(FIT_DATA)]) for r in load_measurements(p, shapes)]
    except (MeasurementError, OSError) as error:
        print(f"error: {error}")
        return 2
    fitted = fit(rows)
    print(f"loss: {loss(rows, CALIBRATED):.4f} (current) -> {loss(rows, fitted):.4f} (fitted)")
    for name, value in dataclasses.asdict(fitted).items():
        print(f"    {name}={value:.6g},")
    return 0
