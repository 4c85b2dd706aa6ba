"""Run policies over fleets and workloads, compare ConServe with the best per-turn baseline, write the results.

"Best per-turn baseline" is chosen per metric, on the same fleet and workload: the lowest p95 TTFET, the highest
tokens per joule, the lowest p95 last-turn TBT among the baselines (so each ratio is against the strongest
baseline for that metric). Targets (the paper's headline figures, which the benchmark was asked to check):

- p95 TTFET at least 51% lower than the best baseline (with and without tier mapping);
- tokens per joule at least 7.5% higher than the best baseline without tier mapping;
- at least 22% higher again with tier mapping: ConServe on the tiered fleet over ConServe on the homogeneous
  fleet (the further gain of mapping the phases onto tiers);
- p95 last-turn TBT no worse than the best baseline.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from conserve.progress import progress_bar
from conserve.sim.engine import SimResult, simulate
from conserve.sim.fleet import Fleet, FleetFile
from conserve.sim.metrics import (
    SLO_TBT_S,
    SLO_TTFET_AGENTIC_S,
    SLO_TTFET_CHAT_S,
    RunMetrics,
    compute_metrics,
    ttfet_values,
)
from conserve.sim.policies import BASELINES, CONSERVE_VARIANTS, ConServe, make_policy
from conserve.sim.workload import Workload

TARGET_TTFET_REDUCTION = 0.51
TARGET_TOKENS_PER_J_GAIN = 0.075
TARGET_TIER_GAIN = 0.22


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
        head = f"{self.workload:9s} {self.fleet:12s} {self.policy:13s} {self.metric:30s}"
        if math.isnan(self.ratio):
            return f"{head} n/a"
        return (
            f"{head} {self.conserve:9.4g} vs {self.baseline:9.4g} {self.best_baseline:30s} {self.ratio:+7.1%} "
            f"(target {self.target:+.1%}: {verdict})"
        )


@dataclass(slots=True)
class BenchResult:
    runs: list[Run] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)


def slo_ttfet_for(workload: str) -> float:
    return SLO_TTFET_AGENTIC_S if workload == "agentic" else SLO_TTFET_CHAT_S


def run_one(
    fleet: Fleet,
    workload: Workload,
    policy_name: str,
    *,
    idle_timeout_s: float | None,
    progress: Callable[[int], None] | None = None,
    slo_ttfet_s: float | None = None,
) -> tuple[Run, SimResult]:
    policy = make_policy(policy_name)
    # The idle timeout releases pinned conversations; per-turn policies pin nothing (their cache is evictable).
    timeout = idle_timeout_s if policy_name in CONSERVE_VARIANTS else None
    result = simulate(fleet, workload, policy, idle_timeout_s=timeout, progress=progress)
    slo = slo_ttfet_s if slo_ttfet_s is not None else slo_ttfet_for(workload.name)
    metrics = compute_metrics(result, slo_ttfet_s=slo, slo_tbt_s=SLO_TBT_S)
    tokens = max(metrics.output_tokens, 1)
    return Run(
        metrics, ttfet_values(result), metrics.prefill_energy_j / tokens, metrics.decode_energy_j / tokens
    ), result


def compare(runs: Sequence[Run]) -> list[Comparison]:
    out: list[Comparison] = []
    by_key = {(r.metrics.workload, r.metrics.fleet, r.metrics.policy): r.metrics for r in runs}
    workloads = sorted({r.metrics.workload for r in runs})

    def baselines(w: str, fleet: str) -> list[RunMetrics]:
        return [m for (ww, ff, p), m in by_key.items() if ww == w and ff == fleet and p in BASELINES]

    for w in workloads:
        for variant in CONSERVE_VARIANTS:
            for fleet in ("homogeneous", "tiered"):
                cs = by_key.get((w, fleet, variant))
                bases = baselines(w, fleet)
                if cs is None or not bases:
                    continue
                best = min(bases, key=lambda m: m.ttfet_p95_s)
                reduction = 1.0 - cs.ttfet_p95_s / best.ttfet_p95_s if best.ttfet_p95_s > 0 else math.nan
                out.append(
                    Comparison(
                        w,
                        fleet,
                        "p95 TTFET s (reduction)",
                        cs.ttfet_p95_s,
                        best.policy,
                        best.ttfet_p95_s,
                        reduction,
                        TARGET_TTFET_REDUCTION,
                        reduction >= TARGET_TTFET_REDUCTION,
                        variant,
                    )
                )
                best = max(bases, key=lambda m: m.tokens_per_j)
                gain = cs.tokens_per_j / best.tokens_per_j - 1.0
                out.append(
                    Comparison(
                        w,
                        fleet,
                        "tokens per J (gain)",
                        cs.tokens_per_j,
                        best.policy,
                        best.tokens_per_j,
                        gain,
                        TARGET_TOKENS_PER_J_GAIN,
                        gain >= TARGET_TOKENS_PER_J_GAIN,
                        variant,
                    )
                )
                tbt_bases = [m for m in bases if not math.isnan(m.last_turn_tbt_p95_s)]
                if tbt_bases and not math.isnan(cs.last_turn_tbt_p95_s):
                    best = min(tbt_bases, key=lambda m: m.last_turn_tbt_p95_s)
                    worse = cs.last_turn_tbt_p95_s / best.last_turn_tbt_p95_s - 1.0
                    out.append(
                        Comparison(
                            w,
                            fleet,
                            "p95 last-turn TBT s (change)",
                            cs.last_turn_tbt_p95_s,
                            best.policy,
                            best.last_turn_tbt_p95_s,
                            worse,
                            0.0,
                            worse <= 0.0,
                            variant,
                        )
                    )
            cs_tiered = by_key.get((w, "tiered", variant))
            cs_flat = by_key.get((w, "homogeneous", variant))
            if cs_tiered is None or cs_flat is None:
                continue
            gain = cs_tiered.tokens_per_j / cs_flat.tokens_per_j - 1.0
            out.append(
                Comparison(
                    w,
                    "tiered/homog",
                    "tokens per J, tier mapping gain",
                    cs_tiered.tokens_per_j,
                    f"{variant} (homogeneous)",
                    cs_flat.tokens_per_j,
                    gain,
                    TARGET_TIER_GAIN,
                    gain >= TARGET_TIER_GAIN,
                    variant,
                )
            )
            flat_bases = baselines(w, "homogeneous")
            if flat_bases:
                best = max(flat_bases, key=lambda m: m.tokens_per_j)
                gain = cs_tiered.tokens_per_j / best.tokens_per_j - 1.0
                target = (1 + TARGET_TOKENS_PER_J_GAIN) * (1 + TARGET_TIER_GAIN) - 1
                out.append(
                    Comparison(
                        w,
                        "tiered/homog",
                        "tokens per J vs homog. best",
                        cs_tiered.tokens_per_j,
                        f"{best.policy} (homogeneous)",
                        best.tokens_per_j,
                        gain,
                        target,
                        gain >= target,
                        variant,
                    )
                )
    return out


def bench(
    workloads: Sequence[Workload],
    fleet_file: FleetFile,
    *,
    policies: Sequence[str] = (*CONSERVE_VARIANTS, *BASELINES),
    tier_modes: Sequence[bool] = (False, True),
    idle_timeout_s: float | None = None,
    show_progress: bool = True,
) -> BenchResult:
    total = sum(w.turns for w in workloads) * len(policies) * len(tier_modes)
    result = BenchResult()
    with progress_bar(total, unit="turn", enabled=show_progress, leave=False, smoothing=0.05) as bar:
        for workload in workloads:
            for tiered in tier_modes:
                fleet = fleet_file.build(tiered=tiered)
                for name in policies:
                    bar.set_description(f"{workload.name} {fleet.name} {name}", refresh=False)
                    run, _ = run_one(fleet, workload, name, idle_timeout_s=idle_timeout_s, progress=_progress(bar))
                    result.runs.append(run)
    result.comparisons = compare(result.runs)
    return result


def _progress(bar: tqdm[Any]) -> Callable[[int], None]:
    def advance(n: int) -> None:
        bar.update(n)

    return advance


# --- output ------------------------------------------------------------------------------------------------

#: (title, RunMetrics field, width, format, scale)
TABLE_COLUMNS: tuple[tuple[str, str, int, str, float], ...] = (
    ("policy", "policy", 20, "s", 1.0),
    ("TTFET50", "ttfet_p50_s", 8, ".2f", 1.0),
    ("TTFET95", "ttfet_p95_s", 8, ".2f", 1.0),
    ("TTFET99", "ttfet_p99_s", 8, ".2f", 1.0),
    ("TTFT95", "ttft_p95_s", 7, ".2f", 1.0),
    ("TBT95ms", "tbt_p95_s", 8, ".1f", 1000.0),
    ("lastTBT95", "last_turn_tbt_p95_s", 9, ".1f", 1000.0),
    ("SLO", "slo_attainment", 6, ".1%", 1.0),
    ("tok/s", "throughput_tokens_per_s", 6, ".0f", 1.0),
    ("J/tok", "j_per_token", 6, ".3f", 1.0),
    ("tok/J", "tokens_per_j", 6, ".3f", 1.0),
    ("xfer/conv", "kv_transfers_per_conversation", 9, ".2f", 1.0),
    ("KVutil", "decoder_kv_utilization", 6, ".1%", 1.0),
    ("preempt", "preemptions", 7, "d", 1.0),
    ("offload", "offloads", 7, "d", 1.0),
    ("reload", "reloads", 6, "d", 1.0),
    ("waits", "placement_waits", 6, "d", 1.0),
)


def format_table(runs: Sequence[Run]) -> str:
    lines: list[str] = []
    groups: dict[tuple[str, str], list[RunMetrics]] = {}
    for r in runs:
        groups.setdefault((r.metrics.workload, r.metrics.fleet), []).append(r.metrics)
    for (workload, fleet), ms in groups.items():
        lines.append(
            f"\n== {workload} on the {fleet} fleet ({ms[0].conversations} conversations, {ms[0].turns} turns; "
            "times in s, TBT in ms)"
        )
        lines.append(" ".join(f"{t:<{w}s}" if k == "policy" else f"{t:>{w}s}" for t, k, w, _, _ in TABLE_COLUMNS))
        for m in ms:
            cells = []
            for _, key, width, fmt, scale in TABLE_COLUMNS:
                value = getattr(m, key)
                if fmt == "s":
                    cells.append(f"{value:<{width}s}")
                elif fmt == "d":
                    cells.append(f"{value:>{width}d}")
                else:
                    cells.append(f"{value * scale:>{width}{fmt}}")
            lines.append(" ".join(cells))
    return "\n".join(lines)


def format_comparisons(comparisons: Sequence[Comparison]) -> str:
    return "\n".join(
        ["", "== ConServe vs the best per-turn baseline (same fleet, same workload)"] + [c.line() for c in comparisons]
    )


def write_results(result: BenchResult, out: Path, *, meta: dict[str, object]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = [r.metrics.as_dict() for r in result.runs]
    csv_path = out / "runs.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    written.append(csv_path)
    comp_path = out / "comparison.csv"
    with comp_path.open("w", newline="", encoding="utf-8") as f:
        plain = csv.writer(f)
        plain.writerow(
            ["workload", "fleet", "policy", "metric", "value", "best_baseline", "baseline", "ratio", "target", "met"]
        )
        for c in result.comparisons:
            plain.writerow(
                [
                    c.workload,
                    c.fleet,
                    c.policy,
                    c.metric,
                    c.conserve,
                    c.best_baseline,
                    c.baseline,
                    c.ratio,
                    c.target,
                    c.met,
                ]
            )
    written.append(comp_path)
    json_path = out / "results.json"
    payload = {
        "meta": meta,
        "runs": rows,
        "comparisons": [
            {
                "workload": c.workload,
                "fleet": c.fleet,
                "policy": c.policy,
                "metric": c.metric,
                "conserve": c.conserve,
                "best_baseline": c.best_baseline,
                "baseline": c.baseline,
                "ratio": c.ratio,
                "target": c.target,
                "met": c.met,
            }
            for c in result.comparisons
        ],
    }
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    written.append(json_path)
    written.extend(write_plots(result.runs, out))
    return written


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def write_plots(runs: Sequence[Run], out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError as exc:  # the container image leaves the plotting extra out
        raise SystemExit("conserve bench: PNG plots need matplotlib: pip install 'conserve[bench]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    workloads = sorted({r.metrics.workload for r in runs})
    for w in workloads:
        mine = [r for r in runs if r.metrics.workload == w]
        fleets = [f for f in ("homogeneous", "tiered") if any(r.metrics.fleet == f for r in mine)]
        fig, axes = plt.subplots(1, len(fleets), figsize=(6.5 * len(fleets), 4.5), squeeze=False)
        for ax, fleet in zip(axes[0], fleets, strict=True):
            for r in (r for r in mine if r.metrics.fleet == fleet):
                values = sorted(v for v in r.ttfet_s if v > 0)
                if not values:
                    continue
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(
                    values,
                    ys,
                    where="post",
                    label=r.metrics.policy,
                    linewidth=2.2 if r.metrics.policy == "conserve" else 1.2,
                )
            ax.set_xscale("log")
            ax.set_xlabel("time to first effective token (s, log)")
            ax.set_ylabel("share of conversations")
            ax.set_title(f"{w}: TTFET CDF, {fleet} fleet")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"ttfet_cdf_{w}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(mine)), 4.5))
        labels = [f"{r.metrics.policy}\n{r.metrics.fleet}" for r in mine]
        prefill = [r.prefill_j_per_token for r in mine]
        decode = [r.decode_j_per_token for r in mine]
        xs = list(range(len(mine)))
        ax.bar(xs, decode, label="decoders (idle + dynamic)")
        ax.bar(xs, prefill, bottom=decode, label="prefill instances (idle + dynamic)")
        ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("J per output token")
        ax.set_title(f"{w}: energy per token by policy and fleet (tier mapping)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"energy_per_token_{w}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
