"""Goodput past the knee: `conserve bench --sweep-load`'s SLO attainment and goodput curves, and each policy's knee.

Per workload, fleet and policy over the loads run: SLO attainment (`RunMetrics.slo_attainment`, over every
conversation offered: a refused one missed), goodput (conversations that met the SLO per second, per GPU, per kJ),
p99 TTFET of the admitted conversations and refusals. A policy's **knee** is the highest load at which its
attainment is at least `ATTAINMENT_TARGET` (None: it missed at every load run). `ATTAINMENT_TARGET` is a convention
of this benchmark, the 90% attainment SLO-serving evaluations (DistServe and its successors) state goodput at;
it is the same for every policy and no default is tuned to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from conserve.sim.metrics import RunMetrics

ATTAINMENT_TARGET = 0.90


@dataclass(frozen=True, slots=True)
class Knee:
    workload: str  # the base workload (without its `@<load>x`)
    fleet: str
    policy: str
    knee_load: float | None  # highest load with attainment >= target; None: none
    target: float
    loads: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def base_workload(name: str) -> str:
    return name.partition("@")[0]


def curves(runs: Sequence[RunMetrics]) -> dict[tuple[str, str], dict[str, list[RunMetrics]]]:
    """(base workload, fleet) -> policy -> its runs by load, ascending."""
    out: dict[tuple[str, str], dict[str, list[RunMetrics]]] = {}
    for m in runs:
        out.setdefault((base_workload(m.workload), m.fleet), {}).setdefault(m.policy, []).append(m)
    for policies in out.values():
        for ms in policies.values():
            ms.sort(key=lambda m: m.load_scale)
    return out


def knees(runs: Sequence[RunMetrics], target: float = ATTAINMENT_TARGET) -> list[Knee]:
    """Every policy's knee per workload and fleet (only where several loads ran)."""
    out: list[Knee] = []
    for (workload, fleet), policies in curves(runs).items():
        for policy, ms in policies.items():
            loads = tuple(m.load_scale for m in ms)
            if len(set(loads)) < 2:
                continue
            good = [m.load_scale for m in ms if m.slo_attainment >= target]
            out.append(Knee(workload, fleet, policy, max(good) if good else None, target, loads))
    return out


def goodput_section(
    runs: Sequence[RunMetrics], found: Sequence[Knee], conserve: str, baselines: Sequence[str]
) -> list[str]:
    """The report's section: per workload and fleet, each policy's attainment and goodput at every load, its knee,
    and ConServe's goodput against the best baseline's at each load."""
    lines = ["## Goodput past the knee (`--sweep-load`)", ""]
    lines.append(
        f"A conversation met the SLO when its TTFET, every later visible turn's TTFT and every turn's TBT were within "
        f"the targets; attainment counts refused conversations as missed. Knee: the highest load with attainment >= "
        f"{ATTAINMENT_TARGET:.0%}. Goodput: conversations that met the SLO per second (per GPU, per kJ)."
    )
    lines.append("")
    knee_of = {(k.workload, k.fleet, k.policy): k.knee_load for k in found}
    for (workload, fleet), policies in curves(runs).items():
        loads = sorted({m.load_scale for ms in policies.values() for m in ms})
        if len(loads) < 2:
            continue
        lines.append(f"### {workload}, {fleet} fleet")
        lines.append("")
        head = " | ".join(f"{x:g}x attain / goodput/s / refused" for x in loads)
        lines.append(f"| policy | knee | {head} |")
        lines.append("|---|---|" + "---|" * len(loads))
        for policy, ms in policies.items():
            by_load = {m.load_scale: m for m in ms}
            cells = [
                f"{by_load[x].slo_attainment:.1%} / {by_load[x].goodput_per_s:.3f} / {by_load[x].refused}"
                if x in by_load
                else "-"
                for x in loads
            ]
            knee = knee_of.get((workload, fleet, policy))
            lines.append(f"| {policy} | {'none' if knee is None else f'{knee:g}x'} | {' | '.join(cells)} |")
        lines.append("")
        for x in loads:
            at = {m.policy: m for ms in policies.values() for m in ms if m.load_scale == x}
            cs = at.get(conserve)
            bases = [m for p, m in at.items() if p in baselines]
            if cs is None or not bases:
                continue
            best = max(bases, key=lambda m: m.goodput_per_s)
            ratio = cs.goodput_per_s / best.goodput_per_s if best.goodput_per_s > 0 else math.nan
            lines.append(
                f"- {x:g}x: ConServe {cs.goodput_per_s:.3f} conv/s ({cs.slo_attainment:.1%} attained, {cs.refused} "
                f"refused, admitted p99 TTFET {cs.ttfet_p99_s:.2f} s) vs best baseline {best.policy} "
                f"{best.goodput_per_s:.3f} ({best.slo_attainment:.1%}, {best.refused} refused, p99 "
                f"{best.ttfet_p99_s:.2f} s): x{ratio:.2f}"
            )
        lines.append("")
    return lines


def goodput_plots(plt: Any, runs: Sequence[RunMetrics], out: Path, conserve: str) -> list[Path]:
    """Goodput and attainment against load, every policy, per workload and fleet."""
    written: list[Path] = []
    for (workload, fleet), policies in curves(runs).items():
        if len({m.load_scale for ms in policies.values() for m in ms}) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for policy, ms in policies.items():
            if policy.endswith("@native"):
                continue
            xs = [m.load_scale for m in ms]
            width = 2.4 if policy == conserve else 1.0
            axes[0].plot(xs, [m.goodput_per_s for m in ms], marker="o", label=policy, linewidth=width)
            axes[1].plot(xs, [m.slo_attainment for m in ms], marker="o", label=policy, linewidth=width)
        axes[0].set(xlabel="load (x the trace's arrival rate)", ylabel="goodput (conversations/s meeting the SLO)")
        axes[1].set(xlabel="load (x the trace's arrival rate)", ylabel="SLO attainment (refused = missed)")
        axes[1].axhline(ATTAINMENT_TARGET, color="black", linestyle=":", linewidth=1)
        for ax in axes:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            ax.set_title(f"{workload}, {fleet} fleet")
        fig.tight_layout()
        path = out / f"goodput_{workload}_{fleet}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
