"""The offline simulator's figures for the same slice and the same fleet, in the load generator's summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from conserve.core.gpus import lookup_product
from conserve.load.report import ConversationOutcome, Summary, TurnOutcome, summarize
from conserve.sim.conversations import Workload
from conserve.sim.engine import simulate
from conserve.sim.fleet import build_fleet
from conserve.sim.policies import make_policy
from conserve.sim.records import ConvState

#: The per-turn baseline the router's per-turn mode corresponds to (least-loaded prefill and decoder), with its own
#: P/D rule as the router's per-turn mode runs it (not the shared decider), shown as `sim:least-loaded`.
PER_TURN_POLICY = "least-loaded@native"


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
        energy = sum(i.dynamic_energy_j + i.spec.device.idle_power_w * result.horizon_s for i in result.prefill)
        energy += sum(d.dynamic_energy_j + d.spec.device.idle_power_w * result.horizon_s for d in result.decoders)
        out.append(
            summarize(
                f"sim:{policy.removesuffix('@native')}",
                [_outcome(state) for state in result.conversations],
                kv_transfers=float(sum(s.kv_transfers for s in result.conversations)),
                energy_j=energy,
            )
        )
    return out


def _outcome(state: ConvState) -> ConversationOutcome:
    """A simulated conversation as the load generator would have measured it (every turn succeeds)."""
    turns = [
        TurnOutcome(
            r.index,
            ok=True,
            ttft_s=r.ttft_s if r.first_token_s >= 0 else None,
            tbt_s=r.tbt_s,
            output_tokens=r.output_tokens,
            decoder=r.decoder,
            prefill_site=("pool" if r.prefill_instance else "decoder") if r.decoder else "",
        )
        for r in state.turns
    ]
    visible = next((r for r in state.turns if r.user_visible), None)
    ttfet = visible.first_token_s - state.conv.arrival_s if visible is not None and visible.first_token_s >= 0 else None
    return ConversationOutcome(state.key, turns, ttfet)
