"""``conserve simulate`` and ``conserve bench``.

Registered in ``conserve.cli.SUBCOMMANDS`` as ``simulate -> conserve.sim.cli_simulate`` and
``bench -> conserve.sim.cli_bench`` (one module per subcommand, each with ``add_parser``); this module holds the
shared options and the two commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime
from pathlib import Path

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.sim.fleet import Fleet
from conserve.sim.policies import POLICIES, ConServe
from conserve.sim.workload import TraceError, Workload, load_workload

#: The idle timeout in the benchmark (seconds), the same for every policy: a conversation idle longer than this
#: is released and its KV dropped everywhere; its next turn starts again. It is the product's own default, the
#: DecoderPool's `defaultIdleTimeoutSeconds` (one source of truth), so the benchmark measures what a user gets.
#: For traces without an end-of-conversation signal (Mooncake, Azure) it is the only way a conversation ends.
#: Idle pinned KV under GPU pressure goes to host memory first (`core.lifecycle`). `--idle-timeout-s 0` turns it
#: off (only an end signal releases).
DEFAULT_IDLE_TIMEOUT_S = float(DecoderPoolSpec.model_fields["default_idle_timeout_seconds"].default)


#: What `conserve bench` replays unless `--duration-s` says otherwise: the first 20 minutes of each workload,
#: so the default run (ten policies, two fleets, two workloads) takes a few minutes on two cores.
BENCH_DEFAULT_DURATION_S = 1200.0


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
        help=f"every policy releases a conversation idle this long (default {DEFAULT_IDLE_TIMEOUT_S:g}; 0: never)",
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


def _load_at(spec: str, args: argparse.Namespace, load: float, *, name_load: bool) -> Workload:
    """The workload at one load factor of a sweep; with `name_load`, named `<workload>@<load>x`."""
    args.load_scale = load
    workload = _load(spec, args)
    return dataclasses.replace(workload, name=f"{workload.name}@{load:g}x") if name_load else workload


def _policy_names(chosen: list[str] | None, default: list[str]) -> list[str] | None:
    """The policies `--policy` names (`all`: every one); None, after saying which, when one is unknown."""
    names = chosen or default
    if "all" in names:
        names = list(POLICIES)
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        print(f"unknown policy {', '.join(unknown)} (known: {', '.join(POLICIES)})", file=sys.stderr)
        return None
    return names


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
    p.add_argument(
        "--policy",
        action="append",
        default=None,
        help="policy (repeatable, or 'all'; default: conserve and every baseline)",
    )
    p.add_argument(
        "--sweep-load",
        default=None,
        metavar="LOADS",
        help="run every workload at these load factors, e.g. 0.5,1,1.5,2 (replaces --load-scale), with the SLO "
        "declared to every policy: SLO attainment, goodput and each policy's knee (report.md, goodput_*.png)",
    )
    p.add_argument(
        "--sweep-fleets",
        action="store_true",
        help="tiered and homogeneous fleets plus decode tiers H20, A100, H200 vs H100 at equal GPU count and TDP",
    )
    _common(p)
    p.set_defaults(func=cmd_bench)


def _idle(args: argparse.Namespace) -> float | None:
    value = float(args.idle_timeout_s)
    return value if value > 0 else None


def _fleet_settings(fleet: Fleet) -> str:
    return (
        f"host KV {fleet.host_kv_bytes_per_gpu / 1e9:g} GB/GPU, chunk {fleet.chunk_tokens} tokens, "
        f"prefill prefix cache {'on' if fleet.prefill_prefix_cache else 'off'}, "
        f"shared KV store {fleet.shared_kv_store_bytes / 1e9:g} GB"
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from conserve.sim.bench import bench
    from conserve.sim.fleet import FleetError, load_fleet_file
    from conserve.sim.output import format_comparisons, format_table, write_results

    names = _policy_names(args.policy, [ConServe.name])
    if names is None:
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
            "signals": {workload.name: workload.signals.as_dict()},
            "fleet_settings": _fleet_settings(fleet_file.build(tiered=True)),
        }
        for path in write_results(result, args.out, meta=meta):
            print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from conserve.sim.bench import DEFAULT_POLICIES, bench
    from conserve.sim.fleet import FleetError, load_fleet_file
    from conserve.sim.output import format_comparisons, format_table, write_results
    from conserve.sim.sweeps import parse_loads, sweep_fleets

    specs = args.workload or ["mooncake", "agentic"]
    if args.duration_s is None:
        args.duration_s = BENCH_DEFAULT_DURATION_S
    names = _policy_names(args.policy, list(DEFAULT_POLICIES))
    if names is None:
        return 2
    try:
        loads = parse_loads(args.sweep_load) if args.sweep_load else (float(args.load_scale),)
        fleet_file = load_fleet_file(args.fleet)
        workloads = [_load_at(spec, args, load, name_load=bool(args.sweep_load)) for spec in specs for load in loads]
    except (TraceError, FleetError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    fleets = sweep_fleets(fleet_file) if args.sweep_fleets else [fleet_file.build(tiered=t) for t in (False, True)]
    for fleet in fleets:
        print(f"fleet {fleet.name + ':':24s} {fleet.describe()} ({fleet.gpu_count} GPUs)")
    print(f"policies: {', '.join(names)}; idle timeout (every policy): {_idle(args)} s")
    signals = {w.name: w.signals.as_dict() for w in workloads}
    for name, sig in signals.items():
        print(f"signals of {name}: end of conversation {'yes' if sig['end_of_conversation'] else 'no'}")
    started = time.monotonic()
    result = bench(
        workloads,
        fleet_file,
        policies=names,
        fleets=fleets,
        idle_timeout_s=_idle(args),
        show_progress=not args.no_progress,
        declare_slo=bool(args.sweep_load),
    )
    elapsed = time.monotonic() - started
    print(format_table(result.runs))
    print(format_comparisons(result.comparisons))
    print(f"\n{len(result.runs)} runs simulated in {elapsed:.1f} s")
    meta = {
        "command": "bench",
        "workloads": specs,
        "loads": list(loads),
        "policies": names,
        "fleets": [f.name for f in fleets],
        "seed": args.seed,
        "fleet": fleet_file.path,
        "fleet_settings": _fleet_settings(fleets[0]),
        "idle_timeout_s": _idle(args),
        "duration_s": args.duration_s,
        "signals": signals,
        "slo_declared": bool(args.sweep_load),
        "elapsed_s": elapsed,
    }
    for path in write_results(result, out, meta=meta):
        print(f"wrote {path}")
    return 0
