"""The benchmark's report: `report.md` and PNG plots per run of `conserve bench` / `conserve simulate`.

Per workload (at each load) and fleet: every policy's p50/p95/p99 TTFET, p95 last-turn TBT, tokens per joule,
KV transfers and re-prefilled tokens; ConServe against the best baseline and, separately, against the paper's
baseline (per-turn prediction); and the facts behind each win or loss (re-prefilled tokens, prefill busy share,
placement waits, offloads, reloads, preemptions), so a reader can see why, not only who.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conserve.sim.attribution import Attribution
from conserve.sim.bench import PAPER_BASELINE, BenchResult, Run
from conserve.sim.goodput import goodput_plots, goodput_section
from conserve.sim.metrics import RunMetrics
from conserve.sim.policies import BASELINES, ConServe

#: (column title, RunMetrics field, format, scale) of the report's per-scenario tables.
REPORT_COLUMNS: tuple[tuple[str, str, str, float], ...] = (
    ("TTFET p50 s", "ttfet_p50_s", ".2f", 1.0),
    ("TTFET p95 s", "ttfet_p95_s", ".2f", 1.0),
    ("TTFET p99 s", "ttfet_p99_s", ".2f", 1.0),
    ("last-turn TBT p95 ms", "last_turn_tbt_p95_s", ".1f", 1000.0),
    ("tokens/J", "tokens_per_j", ".3f", 1.0),
    ("KV transfers/conv", "kv_transfers_per_conversation", ".2f", 1.0),
    ("re-prefilled M tokens", "reprefilled_tokens", ".2f", 1e-6),
    ("prefill busy", "prefill_busy_share", ".0%", 1.0),
    ("placement waits", "placement_waits", "d", 1.0),
    ("offloads", "offloads", "d", 1.0),
    ("reloads", "reloads", "d", 1.0),
    ("preemptions", "preemptions", "d", 1.0),
    ("prefilled on the pool: first / later turns", "", "pool", 1.0),
    ("P/D rule", "pd_rule", "s", 1.0),
)


def _cell(value: Any, fmt: str, scale: float) -> str:
    if fmt in ("d", "s"):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value * scale:{fmt}}"


def _change(ours: float, theirs: float) -> str:
    if theirs == 0 or math.isnan(ours) or math.isnan(theirs):
        return "n/a"
    return f"{ours / theirs - 1.0:+.1%}"


def _pool_shares(m: RunMetrics) -> str:
    return f"{_cell(m.first_turn_pool_share, '.0%', 1.0)} / {_cell(m.later_turn_pool_share, '.0%', 1.0)}"


def attribution_section(attributions: Sequence[Attribution], workload: str, fleet: str) -> list[str]:
    """ConServe's difference from each chosen baseline, split between the P/D decision and the rest."""
    rows = [a for a in attributions if (a.workload, a.fleet) == (workload, fleet)]
    if not rows:
        return []
    lines = [
        "**Attribution** (`conserve.sim.attribution`): against baseline B, total = ConServe - B with its own P/D rule;"
        " P/D decision = B with the shared decider - B with its own rule; placement, admission and lifecycle = "
        "ConServe - B with the shared decider. Lower is better except tokens per J.",
        "",
        "| against (why) | metric | ConServe | B, shared decider | B, own rule | total | P/D decision | "
        "placement, admission, lifecycle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in rows:
        scale, fmt = (1000.0, ".1f") if "TBT" in a.metric else (1.0, ".3f" if "per J" in a.metric else ".2f")
        unit = a.metric.replace(" s", " ms") if "TBT" in a.metric else a.metric
        values = [a.conserve, a.with_decider, a.native, a.total, a.pd_part, a.placement_part]
        cells = " | ".join(f"{v * scale:+{fmt}}" if i >= 3 else f"{v * scale:{fmt}}" for i, v in enumerate(values))
        lines.append(f"| {a.against} ({a.why}) | {unit} | {cells} |")
    lines.append("")
    return lines


def _scenarios(runs: Sequence[Run]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r.metrics.workload, r.metrics.fleet) for r in runs))


def why(cs: RunMetrics, other: RunMetrics) -> list[str]:
    """The measured differences that explain a TTFET or energy gap between ConServe and another policy."""
    ttfet = _change(cs.ttfet_p95_s, other.ttfet_p95_s)
    energy = _change(cs.tokens_per_j, other.tokens_per_j)
    facts = [
        f"p95 TTFET {cs.ttfet_p95_s:.2f} s vs {other.ttfet_p95_s:.2f} s ({ttfet}), "
        f"tokens/J {cs.tokens_per_j:.3f} vs {other.tokens_per_j:.3f} ({energy})."
    ]
    facts.append(
        f"Re-prefilled tokens {cs.reprefilled_tokens / 1e6:.2f} M vs {other.reprefilled_tokens / 1e6:.2f} M; "
        f"prefill instances busy {cs.prefill_busy_share:.0%} vs {other.prefill_busy_share:.0%}; KV transfers per "
        f"conversation {cs.kv_transfers_per_conversation:.2f} vs {other.kv_transfers_per_conversation:.2f}."
    )
    if cs.placement_waits:
        facts.append(
            f"ConServe made {cs.placement_waits} conversations wait for a reservation (mean "
            f"{cs.placement_wait_mean_s:.2f} s): admission control trades their first-token time for others'."
        )
    if cs.offloads or cs.reloads or other.reloads:
        facts.append(
            f"Host KV tier: ConServe {cs.offloads} offloads, {cs.reloads} reloads; {other.policy} {other.reloads} "
            "reloads (a reload stalls the turn's prefill by the PCIe copy)."
        )
    if cs.preemptions or other.preemptions:
        facts.append(f"Preemptions (recompute): ConServe {cs.preemptions}, {other.policy} {other.preemptions}.")
    facts.append(
        f"Decoder KV utilization {cs.decoder_kv_utilization:.0%} vs {other.decoder_kv_utilization:.0%} "
        "(ConServe counts pinned idle KV, which waits for the conversation's next turn or its release)."
    )
    return facts


def scenario_section(runs: Sequence[Run], workload: str, fleet: str) -> list[str]:
    ms = [r.metrics for r in runs if r.metrics.workload == workload and r.metrics.fleet == fleet]
    lines = [f"### {workload} on the {fleet} fleet ({ms[0].conversations} conversations, {ms[0].turns} turns)", ""]
    lines.append("| policy | " + " | ".join(t for t, _, _, _ in REPORT_COLUMNS) + " |")
    lines.append("|---" * (len(REPORT_COLUMNS) + 1) + "|")
    for m in ms:
        cells = [
            _pool_shares(m) if fmt == "pool" else _cell(getattr(m, key), fmt, scale)
            for _, key, fmt, scale in REPORT_COLUMNS
        ]
        lines.append(f"| {m.policy} | " + " | ".join(cells) + " |")
    lines.append("")
    cs = next((m for m in ms if m.policy == ConServe.name), None)
    bases = [m for m in ms if m.policy in BASELINES]
    if cs is None or not bases:
        return lines
    best = min(bases, key=lambda m: m.ttfet_p95_s)
    greenest = max(bases, key=lambda m: m.tokens_per_j)
    paper = next((m for m in bases if m.policy == PAPER_BASELINE), None)
    for title, other in (
        (f"ConServe vs the best baseline by p95 TTFET ({best.policy})", best),
        (f"ConServe vs the best baseline by tokens/J ({greenest.policy})", greenest),
        ("ConServe vs the paper's baseline (per-turn-prediction)", paper),
    ):
        if other is None:
            continue
        verdict = "wins" if cs.ttfet_p95_s < other.ttfet_p95_s else "loses"
        energy = "wins" if cs.tokens_per_j > other.tokens_per_j else "loses"
        lines.append(f"**{title}**: ConServe {verdict} on p95 TTFET and {energy} on tokens/J.")
        lines.extend(f"- {fact}" for fact in why(cs, other))
        lines.append("")
    return lines


def write_report(result: BenchResult, out: Path, *, meta: dict[str, object]) -> Path:
    lines = ["# ConServe benchmark report", ""]
    lines.append("Generated by `conserve " + str(meta.get("command", "bench")) + "`; every figure is from this run.")
    lines.append("")
    lines.append("## What every policy knows")
    lines.append("")
    signals = meta.get("signals")
    if isinstance(signals, dict):
        lines.append("| workload | end-of-conversation signal |")
        lines.append("|---|---|")
        for name, sig in signals.items():
            flag = sig.get("end_of_conversation") if isinstance(sig, dict) else sig
            lines.append(f"| {name} | {'yes' if flag else 'no (idle timeout only)'} |")
        lines.append("")
    lines.append(
        f"Idle timeout for every policy: {meta.get('idle_timeout_s')} s. Host KV tier, prefill prefix cache and "
        f"shared KV store: the fleet file's settings, the same for every policy ({meta.get('fleet_settings', '')})."
    )
    lines.append("")
    lines.append("## Targets (issue 14; true figures, MET or missed)")
    lines.append("")
    lines.append("```")
    lines.extend(c.line() for c in result.comparisons)
    lines.append("```")
    lines.append("")
    lines.append("## Per workload, load and fleet")
    lines.append("")
    if result.knees:
        lines.extend(goodput_section([r.metrics for r in result.runs], result.knees, ConServe.name, BASELINES))
    for workload, fleet in _scenarios(result.runs):
        lines.extend(scenario_section(result.runs, workload, fleet))
        lines.extend(attribution_section(result.attributions, workload, fleet))
    lines.append("Plots: `ttfet_cdf_<workload>.png`, `summary_<workload>.png`, `energy_per_token_<workload>.png`, and")
    lines.append("`load_sweep_<workload>.png` and `goodput_<workload>_<fleet>.png` when several loads ran.")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # the container image leaves the plotting extra out
        raise SystemExit("conserve bench: PNG plots need matplotlib: pip install 'conserve[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(runs: Sequence[Run], out: Path) -> list[Path]:
    plt = _pyplot()
    written: list[Path] = []
    for w in dict.fromkeys(r.metrics.workload for r in runs):
        mine = [r for r in runs if r.metrics.workload == w]
        fleets = list(dict.fromkeys(r.metrics.fleet for r in mine))
        fig, axes = plt.subplots(1, len(fleets), figsize=(6.5 * len(fleets), 4.5), squeeze=False)
        for ax, fleet in zip(axes[0], fleets, strict=True):
            for r in (r for r in mine if r.metrics.fleet == fleet):
                values = sorted(v for v in r.ttfet_s if v > 0)
                if not values:
                    continue
                ys = [(i + 1) / len(values) for i in range(len(values))]
                bold = r.metrics.policy == ConServe.name
                ax.step(values, ys, where="post", label=r.metrics.policy, linewidth=2.2 if bold else 1.0)
            ax.set(
                xscale="log",
                xlabel="time to first effective token (s, log)",
                ylabel="share of conversations",
                title=f"{w}: TTFET CDF, {fleet} fleet",
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        written.append(_save(plt, fig, out / f"ttfet_cdf_{w}.png"))

        fig, axes = plt.subplots(2, len(fleets), figsize=(6.5 * len(fleets), 8), squeeze=False)
        for col, fleet in enumerate(fleets):
            ms = [r.metrics for r in mine if r.metrics.fleet == fleet]
            names = [m.policy for m in ms]
            colors = ["tab:red" if n == ConServe.name else "tab:gray" for n in names]
            for row, (key, label) in enumerate((("ttfet_p95_s", "p95 TTFET (s)"), ("tokens_per_j", "tokens per J"))):
                ax = axes[row][col]
                ax.bar(range(len(ms)), [getattr(m, key) for m in ms], color=colors)
                ax.set_xticks(range(len(ms)), names, rotation=60, ha="right", fontsize=7)
                ax.set(ylabel=label, title=f"{w}, {fleet} fleet: {label}")
                ax.grid(True, axis="y", alpha=0.3)
        written.append(_save(plt, fig, out / f"summary_{w}.png"))

        fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(mine)), 4.5))
        labels = [f"{r.metrics.policy}\n{r.metrics.fleet}" for r in mine]
        decode = [r.decode_j_per_token for r in mine]
        prefill = [r.prefill_j_per_token for r in mine]
        moves = [r.metrics.transfer_energy_j / max(r.metrics.output_tokens, 1) for r in mine]
        xs = list(range(len(mine)))
        ax.bar(xs, decode, label="decoders (idle + dynamic)")
        ax.bar(xs, prefill, bottom=decode, label="prefill instances (idle + dynamic)")
        ax.bar(xs, moves, bottom=[a + b for a, b in zip(decode, prefill, strict=True)], label="KV moves (NIC, PCIe)")
        ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=6)
        ax.set(ylabel="J per output token", title=f"{w}: energy per token by policy and fleet")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        written.append(_save(plt, fig, out / f"energy_per_token_{w}.png"))
    written.extend(_load_sweep_plots(plt, runs, out))
    written.extend(goodput_plots(plt, [r.metrics for r in runs], out, ConServe.name))
    return written


def _load_sweep_plots(plt: Any, runs: Sequence[Run], out: Path) -> list[Path]:
    """p95 TTFET against load for ConServe, the best baseline at each load and per-turn prediction."""
    written: list[Path] = []
    by_base: dict[tuple[str, str], dict[float, list[RunMetrics]]] = {}
    for r in runs:
        base, _, load = r.metrics.workload.partition("@")
        scale = float(load.rstrip("x")) if load else 1.0
        by_base.setdefault((base, r.metrics.fleet), {}).setdefault(scale, []).append(r.metrics)
    for (base, fleet), loads in by_base.items():
        if len(loads) < 2:
            continue
        xs = sorted(loads)
        series: dict[str, list[float]] = {ConServe.name: [], "best baseline": [], PAPER_BASELINE: []}
        for x in xs:
            ms = {m.policy: m for m in loads[x]}
            bases = [m for m in loads[x] if m.policy in BASELINES]
            series[ConServe.name].append(ms[ConServe.name].ttfet_p95_s if ConServe.name in ms else math.nan)
            series["best baseline"].append(min((m.ttfet_p95_s for m in bases), default=math.nan))
            series[PAPER_BASELINE].append(ms[PAPER_BASELINE].ttfet_p95_s if PAPER_BASELINE in ms else math.nan)
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, ys in series.items():
            ax.plot(xs, ys, marker="o", label=name)
        ax.set(
            xlabel="load (x the trace's arrival rate)",
            ylabel="p95 TTFET (s)",
            yscale="log",
            title=f"{base}, {fleet} fleet: p95 TTFET against load",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out / f"load_sweep_{base}_{fleet}.png"))
    return written


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
