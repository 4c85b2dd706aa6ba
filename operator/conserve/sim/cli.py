"""``conserve simulate`` and ``conserve bench``.

Registered in ``conserve.cli.SUBCOMMANDS`` as ``simulate -> conserve.sim.cli_simulate`` and
``bench -> conserve.sim.cli_bench`` (one module per subcommand, each with ``add_parser``); this module holds the
shared options and the two commands.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.sim.policies import BASELINES, CONSERVE_VARIANTS, POLICIES, ConServe
from conserve.sim.workload import TraceError, Workload, load_workload

#: ConServe's idle timeout in the benchmark (seconds): a pinned conversation idle longer than this releases
#: its KV; its next turn is placed again (counted as another KV transfer). It is the product's own default, the
#: DecoderPool's `defaultIdleTimeoutSeconds` (one source of truth), so the benchmark measures what a user gets.
#: Idle pinned KV under GPU pressure goes to host memory first (`core.offload`), which is what makes a long
#: timeout affordable. `--idle-timeout-s 0` turns it off (only a completed conversation releases).
DEFAULT_IDLE_TIMEOUT_S = float(DecoderPoolSpec.model_fields["default_idle_timeout_seconds"].default)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", type=Path, default=None, help="fleet YAML (default: the packaged fleets/default.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic workloads (default 0)")
    p.add_argument("--duration-s", type=float, default=None, help="keep what arrives in the first N seconds")
    p.add_argument("--strict", action="store_true", help="refuse a trace with a malformed line (default: skip it)")
    p.add_argument(
        "--trace-dir",
        type=Path,
        default=None,
        help="folder holding mooncake/ and azure/ traces (default: the traces shipped in the package)",
    )
    p.add_argument(
        "--idle-timeout-s",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help=f"ConServe releases a conversation idle this long (default {DEFAULT_IDLE_TIMEOUT_S:g}; 0: never)",
    )
    p.add_argument(
        "--load-scale",
        type=float,
        default=1.0,
        help="arrivals N times as fast (the same conversations; think and tool times unchanged; default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(spec: str, args: argparse.Namespace) -> Workload:
    workload = load_workload(
        spec,
        seed=args.seed,
        duration_s=args.duration_s,
        strict=args.strict,
        trace_dir=args.trace_dir,
        load_scale=args.load_scale,
    )
    report = workload.report
    if report is not None and report.skipped:
        print(f"{report.path}: skipped {len(report.skipped)} malformed line(s):", file=sys.stderr)
        for line_no, why in report.skipped[:20]:
            print(f"  line {line_no}: {why}", file=sys.stderr)
        if len(report.skipped) > 20:
            print(f"  ... and {len(report.skipped) - 20} more", file=sys.stderr)
    if not workload.conversations:
        window = "" if args.duration_s is None else f" in its first {args.duration_s:g} s"
        raise TraceError(f"workload {workload.name} has no conversation{window}: nothing to simulate")
    return workload


def _tier_modes(value: str) -> tuple[bool, ...]:
    return {"on": (True,), "off": (False,), "both": (False, True)}[value]


def add_simulate_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("simulate", help="replay a workload over a simulated fleet with one or more policies")
    p.add_argument("--workload", default="mooncake", help="mooncake, azure, agentic, or a trace file path")
    p.add_argument(
        "--policy",
        action="append",
        default=None,
        help=f"policy (repeatable, or 'all'): {', '.join(POLICIES)} (default: conserve)",
    )
    p.add_argument(
        "--tier-mapping",
        choices=("on", "off", "both"),
        default="on",
        help="on: the tiered fleet; off: the homogeneous fleet of the same GPU count; both",
    )
    p.add_argument("--out", type=Path, default=None, help="write CSV, JSON and plots to this folder")
    _common(p)
    p.set_defaults(func=cmd_simulate)


def add_bench_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "bench", help="compare ConServe with every per-turn baseline, with and without tier mapping"
    )
    p.add_argument(
        "--workload",
        action="append",
        default=None,
        help="workload (repeatable): mooncake, azure, agentic or a path (default: mooncake and agentic)",
    )
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/bench-<time>)")
    _common(p)
    p.set_defaults(func=cmd_bench)


def _idle(args: argparse.Namespace) -> float | None:
    value = float(args.idle_timeout_s)
    return value if value > 0 else None


def cmd_simulate(args: argparse.Namespace) -> int:
    from conserve.sim.bench import bench, format_comparisons, format_table, write_results
    from conserve.sim.fleet import FleetError, load_fleet_file

    names = args.policy or [ConServe.name]
    if "all" in names:
        names = list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        print(f"unknown policy {', '.join(unknown)} (known: {', '.join(POLICIES)})", file=sys.stderr)
        return 2
    try:
        fleet_file = load_fleet_file(args.fleet)
        workload = _load(args.workload, args)
    except (TraceError, FleetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    result = bench(
        [workload],
        fleet_file,
        policies=names,
        tier_modes=_tier_modes(args.tier_mapping),
        idle_timeout_s=_idle(args),
        show_progress=not args.no_progress,
    )
    print(format_table(result.runs))
    if result.comparisons:
        print(format_comparisons(result.comparisons))
    print(f"\nsimulated in {time.monotonic() - started:.1f} s")
    if args.out is not None:
        meta = {
            "command": "simulate",
            "workload": args.workload,
            "policies": names,
            "seed": args.seed,
            "fleet": fleet_file.path,
            "idle_timeout_s": _idle(args),
            "duration_s": args.duration_s,
            "load_scale": args.load_scale,
        }
        for path in write_results(result, args.out, meta=meta):
            print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from conserve.sim.bench import bench, format_comparisons, format_table, write_results
    from conserve.sim.fleet import FleetError, load_fleet_file

    specs = args.workload or ["mooncake", "agentic"]
    try:
        fleet_file = load_fleet_file(args.fleet)
        workloads = [_load(spec, args) for spec in specs]
    except (TraceError, FleetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    tiered, flat = fleet_file.build(tiered=True), fleet_file.build(tiered=False)
    print(f"fleet with tier mapping:    {tiered.describe()} ({tiered.gpu_count} GPUs)")
    print(f"fleet without tier mapping: {flat.describe()} ({flat.gpu_count} GPUs)")
    print(f"policies: {', '.join(CONSERVE_VARIANTS)} vs {', '.join(BASELINES)}; ConServe idle timeout: {_idle(args)} s")
    started = time.monotonic()
    result = bench(workloads, fleet_file, idle_timeout_s=_idle(args), show_progress=not args.no_progress)
    elapsed = time.monotonic() - started
    print(format_table(result.runs))
    print(format_comparisons(result.comparisons))
    print(f"\n{len(result.runs)} runs simulated in {elapsed:.1f} s")
    meta = {
        "command": "bench",
        "workloads": specs,
        "seed": args.seed,
        "fleet": fleet_file.path,
        "idle_timeout_s": _idle(args),
        "duration_s": args.duration_s,
        "load_scale": args.load_scale,
        "elapsed_s": elapsed,
    }
    for path in write_results(result, out, meta=meta):
        print(f"wrote {path}")
    return 0
