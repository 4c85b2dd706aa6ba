"""The offline simulator's figures for the same slice and the same fleet, in the load generator's summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from conserve.core.gpus import lookup_product
from conserve.load.report import Summary, percentile
from conserve.sim.conversations import Workload
from conserve.sim.engine import all_records, simulate
from conserve.sim.fleet import build_fleet
from conserve.sim.policies import make_policy

#: The per-turn baseline the router's per-turn mode corresponds to (least-loaded prefill and decoder).
PER_TURN_POLICY = "least-loaded"


def fleet_raw(servers: Sequence[Mapping[str, Any]], model: str = "llama-3-8b") -> dict[str, Any]:
    """A fleet description (conserve.sim.fleet format) from gpu-sim /conserve/stats answers."""
    groups: dict[str, dict[str, int]] = {"prefill": {}, "decode": {}}
    for s in servers:
        spec = lookup_product(str(s.get("gpu", "")))
        if spec is None:
            continue
        role = "prefill" if s.get("role") == "prefill" else "decode"
        groups[role][spec.product] = groups[role].get(spec.product, 0) + 1
    return {
        "model": model,
        "tiered": {
            role: [{"gpu": g, "count": n, "tp": 1} for g, n in sorted(by.items())] for role, by in groups.items()
        },
    }


def simulate_summaries(workload: Workload, raw_fleet: dict[str, Any]) -> list[Summary]:
    fleet = build_fleet(raw_fleet, tiered=True, source="<router servers>")
    out = []
    for policy in ("conserve", PER_TURN_POLICY):
        result = simulate(fleet, workload, make_policy(policy))
        ttfet = []
        for state in result.conversations:
            visible = next((r for r in state.turns if r.user_visible), None)
            if visible is not None and visible.first_token_s >= 0:
                ttfet.append(visible.first_token_s - state.conv.arrival_s)
        records = list(all_records(result))
        ttft = [r.ttft_s for r in records if r.first_token_s >= 0]
        tbt = [t for r in records if (t := r.tbt_s) is not None]
        energy = sum(i.dynamic_energy_j + i.spec.device.idle_power_w * result.horizon_s for i in result.prefill)
        energy += sum(d.dynamic_energy_j + d.spec.device.idle_power_w * result.horizon_s for d in result.decoders)
        out.append(
            Summary(
                label=f"sim:{policy}",
                conversations=len(result.conversations),
                turns=len(records),
                failed_turns=0,
                ttfet_p50_s=percentile(ttfet, 50),
                ttfet_p95_s=percentile(ttfet, 95),
                ttfet_p99_s=percentile(ttfet, 99),
                ttft_p50_s=percentile(ttft, 50),
                ttft_p95_s=percentile(ttft, 95),
                tbt_mean_s=sum(tbt) / len(tbt) if tbt else None,
                tbt_p95_s=percentile(tbt, 95),
                output_tokens=sum(r.output_tokens for r in records),
                kv_transfers=float(sum(s.kv_transfers for s in result.conversations)),
                energy_j=energy,
                moved_conversations=sum(1 for s in result.conversations if len({r.decoder for r in s.turns}) > 1),
            )
        )
    return out
