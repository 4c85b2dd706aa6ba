"""Where ConServe's difference from a baseline comes from: the P/D decision, or placement, admission and lifecycle.

Every baseline runs twice in a bench: with the shared P/D decider (ConServe's, the default) and with its own rule
(`<name>@native`). Against a baseline B, per metric:

- total = ConServe - B@native (what a user switching from B as deployed would see);
- P/D decision = B - B@native (the same placement, only where prompts are prefilled changes);
- placement, admission and lifecycle = ConServe - B (the same decider, only the conversation-level scheduler
  differs).

The two parts add up to the total. Attributed against the best baseline by p95 TTFET as deployed (its own rule),
the best with the shared decider, and `sticky-least-loaded` (the outside replay's match for ConServe).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from conserve.sim.metrics import RunMetrics

STICKY = "sticky-least-loaded"
NATIVE_SUFFIX = "@native"
#: (label, RunMetrics field, lower is better) of the attributed metrics.
ATTRIBUTED: tuple[tuple[str, str, bool], ...] = (
    ("p50 TTFET s", "ttfet_p50_s", True),
    ("p95 TTFET s", "ttfet_p95_s", True),
    ("p99 TTFET s", "ttfet_p99_s", True),
    ("p95 last-turn TBT s", "last_turn_tbt_p95_s", True),
    ("tokens per J", "tokens_per_j", False),
)


@dataclass(frozen=True, slots=True)
class Attribution:
    workload: str
    fleet: str
    against: str  # the baseline B
    why: str  # why B was chosen
    metric: str
    conserve: float
    with_decider: float  # B with the shared decider
    native: float  # B with its own P/D rule

    @property
    def total(self) -> float:
        return self.conserve - self.native

    @property
    def pd_part(self) -> float:
        return self.with_decider - self.native

    @property
    def placement_part(self) -> float:
        return self.conserve - self.with_decider

    def as_dict(self) -> dict[str, object]:
        return {
            "workload": self.workload,
            "fleet": self.fleet,
            "against": self.against,
            "why": self.why,
            "metric": self.metric,
            "conserve": self.conserve,
            "with_decider": self.with_decider,
            "native": self.native,
            "total": self.total,
            "pd_part": self.pd_part,
            "placement_part": self.placement_part,
        }


def _against(ms: Sequence[RunMetrics], conserve: str) -> list[tuple[str, str]]:
    """The baselines to attribute against (name, why), each run both ways in this cell."""
    names = {m.policy for m in ms}
    paired = [m for m in ms if m.policy != conserve and f"{m.policy}{NATIVE_SUFFIX}" in names]
    natives = [m for m in ms if m.policy.endswith(NATIVE_SUFFIX) and m.policy.removesuffix(NATIVE_SUFFIX) in names]
    chosen: list[tuple[str, str]] = []
    if natives:
        best = min(natives, key=lambda m: m.ttfet_p95_s)
        chosen.append((best.policy.removesuffix(NATIVE_SUFFIX), "best p95 TTFET with its own P/D rule"))
    if paired:
        best = min(paired, key=lambda m: m.ttfet_p95_s)
        chosen.append((best.policy, "best p95 TTFET with the shared decider"))
    if STICKY in names and f"{STICKY}{NATIVE_SUFFIX}" in names:
        chosen.append((STICKY, "sticky with a least-loaded fallback"))
    unique: dict[str, str] = {}
    for name, why in chosen:
        unique.setdefault(name, why)
    return list(unique.items())


def attribute(runs: Sequence[RunMetrics], conserve: str = "conserve") -> list[Attribution]:
    """Per workload and fleet, ConServe's difference from each chosen baseline, split in two."""
    out: list[Attribution] = []
    cells = list(dict.fromkeys((m.workload, m.fleet) for m in runs))
    for workload, fleet in cells:
        ms = [m for m in runs if (m.workload, m.fleet) == (workload, fleet)]
        by_name = {m.policy: m for m in ms}
        cs = by_name.get(conserve)
        if cs is None:
            continue
        for name, why in _against(ms, conserve):
            shared, own = by_name[name], by_name[f"{name}{NATIVE_SUFFIX}"]
            for label, field, _ in ATTRIBUTED:
                values = (getattr(cs, field), getattr(shared, field), getattr(own, field))
                if any(math.isnan(v) for v in values):
                    continue
                out.append(Attribution(workload, fleet, name, why, label, *values))
    return out
