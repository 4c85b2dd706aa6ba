"""Run policies over fleets and workloads, compare ConServe with the best per-turn baseline and, separately,
with the paper's baseline (per-turn prediction).

"Best baseline" is chosen per metric, on the same fleet, workload and load: the lowest p95 TTFET, the highest
tokens per joule, the lowest p95 last-turn TBT among the baselines (so each ratio is against the strongest
baseline for that metric). The baselines run with the shared P/D decider (ConServe's), so the comparison is of
placement, admission and lifecycle; each is compared again with its own P/D rule (`<name>@native`, "vs own P/D
rules"), and `conserve.sim.attribution` splits ConServe's difference between the two. Every policy has the same
information (`conserve.sim.engine`). Targets (a benchmark, not a test):

- p95 TTFET at least 50% lower than the best baseline on at least one real trace at a realistic load, and
  never worse on any;
- tokens per joule at least 10% higher than the best baseline;
- 25% higher with tier mapping at equal watts: ConServe on the tiered fleet against the best baseline on the
  homogeneous fleet of the same total TDP (the default file's fleets have the same GPU count and TDP). The
  tiered-over-homogeneous gain of ConServe itself is shown too (22%, the paper's figure).
- p95 last-turn TBT no worse than the best baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from conserve.core.slo import SloClass
from conserve.progress import progress_bar
from conserve.sim.attribution import Attribution, attribute
from conserve.sim.conversations import Workload
from conserve.sim.engine import SimResult, simulate
from conserve.sim.fleet import Fleet, FleetFile
from conserve.sim.goodput import Knee, knees
from conserve.sim.metrics import (
    SLO_TBT_S,
    SLO_TTFET_AGENTIC_S,
    SLO_TTFET_CHAT_S,
    RunMetrics,
    compute_metrics,
    ttfet_values,
)
from conserve.sim.policies import BASELINES, CONSERVE_VARIANTS, NATIVE, ConServe, make_policy

TARGET_TTFET_REDUCTION = 0.50
TARGET_TOKENS_PER_J_GAIN = 0.10
TARGET_TIERED_TOKENS_PER_J_GAIN = 0.25
TARGET_TIER_GAIN = 0.22
#: The paper's baseline, compared with separately from the best baseline.
PAPER_BASELINE = "per-turn-prediction"
#: What `conserve bench` runs by default: ConServe's default profile, every baseline with the shared P/D decider and
#: each with its own P/D rule (the attribution's ablation), and ConServe with its old P/D rule (the other ConServe
#: variants on request, `--policy`).
DEFAULT_POLICIES = (ConServe.name, "conserve@decoder", *BASELINES, *NATIVE)


@dataclass(slots=True)
class Run:
    metrics: RunMetrics
    ttfet_s: list[float]
    prefill_j_per_token: float
    decode_j_per_token: float


@dataclass(slots=True)
class Comparison:
    workload: str
    fleet: str
    metric: str
    conserve: float
    best_baseline: str
    baseline: float
    ratio: float  # the figure the target is stated in (reduction or gain)
    target: float
    met: bool
    policy: str = ConServe.name  # which conversation-level variant

    def line(self) -> str:
        verdict = "MET" if self.met else "missed"
        head = f"{self.workload:14s} {self.fleet:14s} {self.policy:13s} {self.metric:40s}"
        if math.isnan(self.ratio):
            return f"{head} n/a"
        return (
            f"{head} {self.conserve:9.4g} vs {self.baseline:9.4g} {self.best_baseline:34s} {self.ratio:+7.1%} "
            f"(target {self.target:+.1%}: {verdict})"
        )


@dataclass(slots=True)
class BenchResult:
    runs: list[Run] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    attributions: list[Attribution] = field(default_factory=list)
    knees: list[Knee] = field(default_factory=list)  # per policy, where several loads ran (`conserve.sim.goodput`)


def slo_ttfet_for(workload: str) -> float:
    return SLO_TTFET_AGENTIC_S if workload.split("@")[0] == "agentic" else SLO_TTFET_CHAT_S


def run_one(
    fleet: Fleet,
    workload: Workload,
    policy_name: str,
    *,
    idle_timeout_s: float | None,
    progress: Callable[[int], None] | None = None,
    slo_ttfet_s: float | None = None,
    declare_slo: bool = False,
) -> tuple[Run, SimResult]:
    """One policy's run. `declare_slo`: every policy is told the SLO (ConServe's pool declares it, so admission
    bounds the queue wait by it; the flow-control gateway's request TTL is its TTFET target)."""
    policy = make_policy(policy_name)
    slo = slo_ttfet_s if slo_ttfet_s is not None else slo_ttfet_for(workload.name)
    if declare_slo:
        policy.set_slo(SloClass("", 0, slo, SLO_TBT_S))
    # Every policy gets the same idle timeout (and the same end signals, host tier and prefill-side caches).
    result = simulate(fleet, workload, policy, idle_timeout_s=idle_timeout_s, progress=progress)
    metrics = compute_metrics(result, slo_ttfet_s=slo, slo_tbt_s=SLO_TBT_S)
    tokens = max(metrics.output_tokens, 1)
    return Run(
        metrics, ttfet_values(result), metrics.prefill_energy_j / tokens, metrics.decode_energy_j / tokens
    ), result


def _comparison(
    w: str, fleet: str, variant: str, metric: str, cs: float, base: RunMetrics, value: float, gain: float, target: float
) -> Comparison:
    return Comparison(w, fleet, metric, cs, base.policy, value, gain, target, gain >= target, variant)


def compare(runs: Sequence[Run]) -> list[Comparison]:
    """Per workload (and load) and fleet: each ConServe variant against the best baseline of each metric and,
    separately, against the paper's baseline (per-turn prediction)."""
    out: list[Comparison] = []
    by_key = {(r.metrics.workload, r.metrics.fleet, r.metrics.policy): r.metrics for r in runs}
    scenarios = list(dict.fromkeys((r.metrics.workload, r.metrics.fleet) for r in runs))
    for w, fleet in scenarios:
        bases = [m for (ww, ff, p), m in by_key.items() if ww == w and ff == fleet and p in BASELINES]
        natives = [m for (ww, ff, p), m in by_key.items() if ww == w and ff == fleet and p in NATIVE]
        paper = by_key.get((w, fleet, PAPER_BASELINE))
        for variant in CONSERVE_VARIANTS:
            cs = by_key.get((w, fleet, variant))
            if cs is None or not bases:
                continue
            groups = (("best", bases), ("native", natives), ("paper", [paper] if paper is not None else []))
            for label, group in groups:
                if not group:
                    continue
                best = min(group, key=lambda m: m.ttfet_p95_s)
                reduction = 1.0 - cs.ttfet_p95_s / best.ttfet_p95_s if best.ttfet_p95_s > 0 else math.nan
                suffix = {"best": "", "native": ", vs own P/D rules", "paper": ", vs paper"}[label]
                out.append(
                    _comparison(
                        w,
                        fleet,
                        variant,
                        f"p95 TTFET s (reduction{suffix})",
                        cs.ttfet_p95_s,
                        best,
                        best.ttfet_p95_s,
                        reduction,
                        TARGET_TTFET_REDUCTION,
                    )
                )
                best = max(group, key=lambda m: m.tokens_per_j)
                gain = cs.tokens_per_j / best.tokens_per_j - 1.0
                target = TARGET_TOKENS_PER_J_GAIN
                out.append(
                    _comparison(
                        w,
                        fleet,
                        variant,
                        f"tokens per J (gain{suffix})",
                        cs.tokens_per_j,
                        best,
                        best.tokens_per_j,
                        gain,
                        target,
                    )
                )
                tbt = [m for m in group if not math.isnan(m.last_turn_tbt_p95_s)]
                if tbt and not math.isnan(cs.last_turn_tbt_p95_s):
                    best = min(tbt, key=lambda m: m.last_turn_tbt_p95_s)
                    worse = cs.last_turn_tbt_p95_s / best.last_turn_tbt_p95_s - 1.0
                    out.append(
                        Comparison(
                            w,
                            fleet,
                            f"p95 last-turn TBT s (change{suffix})",
                            cs.last_turn_tbt_p95_s,
                            best.policy,
                            best.last_turn_tbt_p95_s,
                            worse,
                            0.0,
                            worse <= 0.0,
                            variant,
                        )
                    )
    out.extend(_tier_comparisons(by_key))
    return out


def _tier_comparisons(by_key: dict[tuple[str, str, str], RunMetrics]) -> list[Comparison]:
    """Tier mapping: ConServe on the tiered fleet against ConServe and against the best baseline on the
    homogeneous fleet (the default file's fleets have the same GPU count and the same TDP)."""
    out: list[Comparison] = []
    for w in dict.fromkeys(k[0] for k in by_key):
        for variant in CONSERVE_VARIANTS:
            tiered, flat = by_key.get((w, "tiered", variant)), by_key.get((w, "homogeneous", variant))
            if tiered is None or flat is None:
                continue
            gain = tiered.tokens_per_j / flat.tokens_per_j - 1.0
            out.append(
                Comparison(
                    w,
                    "tiered/homog",
                    "tokens per J, tier mapping gain",
                    tiered.tokens_per_j,
                    f"{variant} (homogeneous)",
                    flat.tokens_per_j,
                    gain,
                    TARGET_TIER_GAIN,
                    gain >= TARGET_TIER_GAIN,
                    variant,
                )
            )
            flat_bases = [m for (ww, ff, p), m in by_key.items() if ww == w and ff == "homogeneous" and p in BASELINES]
            if flat_bases:
                best = max(flat_bases, key=lambda m: m.tokens_per_j)
                gain = tiered.tokens_per_j / best.tokens_per_j - 1.0
                out.append(
                    Comparison(
                        w,
                        "tiered/homog",
                        "tokens per J vs homog. best",
                        tiered.tokens_per_j,
                        f"{best.policy} (homogeneous)",
                        best.tokens_per_j,
                        gain,
                        TARGET_TIERED_TOKENS_PER_J_GAIN,
                        gain >= TARGET_TIERED_TOKENS_PER_J_GAIN,
                        variant,
                    )
                )
    return out


def bench(
    workloads: Sequence[Workload],
    fleet_file: FleetFile,
    *,
    policies: Sequence[str] = DEFAULT_POLICIES,
    tier_modes: Sequence[bool] = (False, True),
    fleets: Sequence[Fleet] | None = None,
    idle_timeout_s: float | None = None,
    show_progress: bool = True,
    declare_slo: bool = False,
) -> BenchResult:
    """Every policy on every workload and fleet (`fleets`, else the file's fleet in each tier mode); with
    `declare_slo`, every policy is told the workload's SLO (`run_one`)."""
    chosen = list(fleets) if fleets is not None else [fleet_file.build(tiered=t) for t in tier_modes]
    total = sum(w.turns for w in workloads) * len(policies) * len(chosen)
    result = BenchResult()
    with progress_bar(total, unit="turn", enabled=show_progress, leave=False, smoothing=0.05) as bar:
        for workload in workloads:
            for fleet in chosen:
                for name in policies:
                    bar.set_description(f"{workload.name} {fleet.name} {name}", refresh=False)
                    run, _ = run_one(
                        fleet,
                        workload,
                        name,
                        idle_timeout_s=idle_timeout_s,
                        progress=_progress(bar),
                        declare_slo=declare_slo,
                    )
                    result.runs.append(run)
    result.comparisons = compare(result.runs)
    result.attributions = attribute([r.metrics for r in result.runs])
    result.knees = knees([r.metrics for r in result.runs])
    return result


def _progress(bar: tqdm[Any]) -> Callable[[int], None]:
    def advance(n: int) -> None:
        bar.update(n)

    return advance
