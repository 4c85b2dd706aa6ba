"""The KV-lifecycle benchmark: the Mooncake trace with NO end signal for any policy (a chat client cannot say a
conversation ended), ConServe in the operator's default configuration against the per-turn baselines.

ConServe's pins end only by the DecoderPool's default idle timeout (1,800 s); its idle KV follows the default
lifecycle (an active window from observed gaps, then offload and drop on memory pressure only: the resident and
host TTLs are opt-in and unset by default; 125 GB of host memory per GPU). `conserve-no-offload` (the lifecycle
off: what the operator ran before) is shown for reference. One run of each, on the packaged tiered fleet; p95/p99
TTFET and output tokens per joule.

    .venv/bin/python benchmarks/kv_lifecycle_bench.py [--trace-dir DIR] [--duration-s N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.sim.bench import slo_ttfet_for
from conserve.sim.engine import simulate
from conserve.sim.fleet import load_fleet_file
from conserve.sim.metrics import SLO_TBT_S, compute_metrics
from conserve.sim.policies import BASELINES, make_policy
from conserve.sim.workload import load_workload

DEFAULT_IDLE_TIMEOUT_S = float(DecoderPoolSpec.model_fields["default_idle_timeout_seconds"].default)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace-dir", type=Path, default=None)
    p.add_argument("--duration-s", type=float, default=None)
    p.add_argument("--homogeneous", action="store_true", help="the fleet without tier mapping")
    p.add_argument("--policy", action="append", default=None)
    args = p.parse_args()
    workload = load_workload("mooncake", trace_dir=args.trace_dir, duration_s=args.duration_s)
    fleet = load_fleet_file(None).build(tiered=not args.homogeneous)
    names = args.policy or ["conserve", "conserve-no-offload", *BASELINES]
    print(f"{workload.name}: {len(workload.conversations)} conversations, {workload.turns} turns; {fleet.describe()}")
    print("no end signal for any policy; ConServe idle timeout", DEFAULT_IDLE_TIMEOUT_S, "s")
    print(
        f"{'policy':22} {'p50 TTFET s':>12} {'p95 TTFET s':>12} {'p99 TTFET s':>12} {'tokens/J':>9} "
        f"{'offloads':>9} {'reloads':>8} {'wall s':>7}"
    )
    for name in names:
        started = time.monotonic()
        timeout = DEFAULT_IDLE_TIMEOUT_S if name.startswith("conserve") else None
        result = simulate(fleet, workload, make_policy(name), idle_timeout_s=timeout, end_signal=False)
        m = compute_metrics(result, slo_ttfet_s=slo_ttfet_for(workload.name), slo_tbt_s=SLO_TBT_S)
        print(
            f"{name:22} {m.ttfet_p50_s:12.2f} {m.ttfet_p95_s:12.2f} {m.ttfet_p99_s:12.2f} {m.tokens_per_j:9.3f} "
            f"{result.offloads:9d} {result.reloads:8d} {time.monotonic() - started:7.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
