"""`conserve perf-model check|fit`: the performance model (one engine profile) against measurements."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from conserve.core.engine_profiles import PROFILE_NAMES, lookup_profile
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
        help="Errors of the model per model / GPU / TP (default: the packaged fit and held-out data, each with "
        "the engine profile it describes)",
        description="CSV columns: model, gpu, tp, batch, prompt_tokens, context_tokens, prefill_ms, decode_step_ms "
        "(either time may be empty); optional power_limit_w, prefill_power_w, mean_power_w (per GPU), dtype "
        "(bf16, fp16 or fp8). Every measured column is scored: mean power from the decode run when the row has "
        "no prefill time.",
    )
    check.add_argument("measurements", nargs="*", type=Path, help="measurement CSV files")
    check.add_argument("--shapes", action="append", type=Path, default=[], help="model shapes CSV (repeatable)")
    check.add_argument("--worst", type=int, default=5, help="how many of the worst rows to list")
    check.add_argument(
        "--profile", choices=PROFILE_NAMES, help="engine profile (default: the packaged file's, else the default)"
    )
    check.set_defaults(func=_check)
    fit = commands.add_parser(
        "fit",
        help="Fit an engine profile's constants to measurements (default: the packaged fit set of that profile)",
        description="Starts from the same point every time (conserve.perfmodel.fit.START); prints the fitted "
        "constants to paste into core/engine_profiles.py.",
    )
    fit.add_argument("measurements", nargs="*", type=Path)
    fit.add_argument("--shapes", action="append", type=Path, default=[])
    fit.add_argument("--profile", choices=PROFILE_NAMES, default="tensorrt-llm", help="the profile to fit")
    fit.add_argument(
        "--fields", choices=("time", "power", "all"), default="time", help="which constants to fit (default time)"
    )
    fit.set_defaults(func=_fit)


def _packaged_for(profile: str) -> list[Path]:
    """The packaged fit sets measured on the profile's engine (a CUDA-graph profile: the CUDA-graph data)."""
    source = lookup_profile(profile).source
    return [data_path(name) for name in FIT_DATA if name == source]


def _check(args: argparse.Namespace) -> int:
    try:
        shapes = known_shapes(args.shapes)
        if args.measurements:
            inputs = [(str(p), p, args.profile) for p in args.measurements]
        else:
            packaged = {**FIT_DATA, **HELD_OUT_DATA}
            inputs = [(name, data_path(name), args.profile or profile) for name, profile in packaged.items()]
        for label, path, profile in inputs:
            chosen = lookup_profile(profile)
            errors = row_errors(load_measurements(path, shapes), chosen.params)
            print(report(errors, worst=args.worst, title=f"== {label} (engine profile {chosen.name})"))
            print()
    except (MeasurementError, OSError) as error:
        print(f"error: {error}")
        return 2
    return 0


def _fit(args: argparse.Namespace) -> int:
    from conserve.perfmodel.fit import fit as fit_params
    from conserve.perfmodel.fit import loss

    profile = lookup_profile(args.profile)
    try:
        shapes = known_shapes(args.shapes)
        paths: list[Path] = args.measurements or _packaged_for(profile.name)
        rows = [r for p in paths for r in load_measurements(p, shapes)]
    except (MeasurementError, OSError) as error:
        print(f"error: {error}")
        return 2
    fitted = fit_params(rows, profile.params, args.fields)
    print(f"profile {profile.name}, fields {args.fields}, {len(rows)} rows from {', '.join(p.name for p in paths)}")
    print(f"loss: {loss(rows, profile.params):.4f} (current) -> {loss(rows, fitted):.4f} (fitted)")
    for name, value in dataclasses.asdict(fitted).items():
        print(f"    {name}={value:.6g},")
    return 0
