"""Metrics of one simulated run.

- TTFET (time to first effective token): from a conversation's arrival to the first token of its first
  user-visible turn. For chat (Mooncake, Azure) that is the first turn's TTFT; for the agentic workload it comes
  after the tool-call turns (their prefills, decodes and tool latencies). Waiting for a placement counts.
- TTFT per turn: from the turn's arrival to its first token.
- TBT: a turn's mean time between tokens, (done - first token) / (output - 1), over turns with at least two
  output tokens; "last turn" is the last turn of each conversation.
- SLO: a conversation met it when its TTFET is within `slo_ttfet_s`, every later user-visible turn's TTFT too,
  and every turn's TBT within `slo_tbt_s` (the router's per-turn judgement, `conserve.core.slo.turn_met`).
  `slo_attainment` is over every conversation offered (a refused one missed: its client got HTTP 429);
  `admitted_slo_attainment` over those served. Goodput: conversations that met the SLO per second of the run
  (and per GPU, per kJ). Refused conversations (admission, a gateway's request TTL) are counted apart and left
  out of the latency percentiles (`ttfet_p99_s` and the others are the admitted conversations').
- Throughput: output tokens per second over the run (from 0 to the last completion).
- Energy: every instance's idle power over the whole run plus its dynamic energy, plus the data path's energy of
  KV transfers, shared-store traffic, offloads and reloads (`conserve.sim.transfer`); J per output token and
  output tokens per J (the decoders', the prefill instances' and the transfers' shares are reported apart).
- Re-prefilled tokens: tokens prefilled beyond each turn's new tokens (KV the conversation had and lost:
  a turn moved without its prefix, an eviction, a preemption's recompute).
- KV transfers per conversation (prefill-to-decoder moves); decoder KV utilization: time-weighted live KV
  (running plus pinned; the evictable prefix cache excluded) over capacity, all decoders together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from conserve.sim.engine import SimResult
from conserve.sim.records import TurnRecord

#: Default SLOs (conventions of this benchmark, stated rather than sourced): an interactive answer should start
#: within 2 s and stream at 10 tokens/s or faster (TBT <= 100 ms, faster than reading speed); an agent's first
#: visible answer, after its tool calls, within 30 s.
SLO_TTFET_CHAT_S = 2.0
SLO_TTFET_AGENTIC_S = 30.0
SLO_TBT_S = 0.1


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(q / 100.0 * len(ordered)), 1)
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class RunMetrics:
    workload: str
    fleet: str
    policy: str
    conversations: int
    turns: int
    input_tokens: int
    output_tokens: int
    prefill_tokens: int  # tokens computed by prefills (re-prefills and recomputes included)
    reprefilled_tokens: int  # prefilled beyond the turns' new tokens
    ttfet_p50_s: float
    ttfet_p95_s: float
    ttfet_p99_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    tbt_p50_s: float
    tbt_p95_s: float
    tbt_p99_s: float
    last_turn_tbt_p50_s: float
    last_turn_tbt_p95_s: float
    slo_attainment: float
    throughput_tokens_per_s: float
    energy_j: float
    prefill_energy_j: float
    decode_energy_j: float
    transfer_energy_j: float
    j_per_token: float
    tokens_per_j: float
    kv_transfers_per_conversation: float
    transferred_tokens: int
    decoder_kv_utilization: float
    preemptions: int
    pinned_evictions: int
    offloads: int  # idle pinned conversations moved to host memory
    reloads: int  # turns whose KV came back from host memory over PCIe (any policy)
    placement_waits: int
    placement_wait_mean_s: float
    prefill_busy_share: float  # prefill instances' busy time over their time, all together
    horizon_s: float
    pd_rule: str = ""  # which P/D rule placed the prefills (the shared decider, or the policy's own)
    #: Turns prefilled on the prefill pool (the rest on their decoder), first turns and later turns.
    pool_prefill_share: float = math.nan
    first_turn_pool_share: float = math.nan
    later_turn_pool_share: float = math.nan
    refused: int = 0  # conversations turned away before being served (HTTP 429)
    admitted_slo_attainment: float = math.nan
    goodput_per_s: float = 0.0  # conversations that met the SLO, per second of the run
    goodput_per_gpu: float = 0.0  # per second, per GPU of the fleet (prefill and decode)
    goodput_per_kj: float = 0.0  # per kJ of the fleet's energy
    load_scale: float = 1.0  # the workload's arrival rate over the trace's (`conserve bench --sweep-load`)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def compute_metrics(result: SimResult, *, slo_ttfet_s: float, slo_tbt_s: float = SLO_TBT_S) -> RunMetrics:
    ttfet: list[float] = []
    ttft: list[float] = []
    tbt: list[float] = []
    last_tbt: list[float] = []
    met = 0
    served = [s for s in result.conversations if not s.refused]
    for state in served:
        first_visible = state.conv.first_visible_turn
        conv_ttfet = state.turns[first_visible].first_token_s - state.conv.arrival_s
        ttfet.append(conv_ttfet)
        ok = conv_ttfet <= slo_ttfet_s
        for rec in state.turns:
            ttft.append(rec.ttft_s)
            if rec.index > first_visible and rec.user_visible:
                ok = ok and rec.ttft_s <= slo_ttfet_s
            value = rec.tbt_s
            if value is not None:
                tbt.append(value)
                ok = ok and value <= slo_tbt_s
        last = state.turns[-1].tbt_s
        if last is not None:
            last_tbt.append(last)
        met += ok
    records = [r for s in result.conversations for r in s.turns if r.first_token_s >= 0]
    output = sum(r.output_tokens for r in records)
    horizon = max(result.horizon_s, 1e-9)
    prefill_energy = sum(p.dynamic_energy_j + p.spec.device.idle_power_w * horizon for p in result.prefill)
    decode_energy = sum(d.dynamic_energy_j + d.spec.device.idle_power_w * horizon for d in result.decoders)
    energy = prefill_energy + decode_energy + result.transfer_energy_j
    capacity = sum(d.capacity for d in result.decoders)
    n = max(len(result.conversations), 1)
    gpus = result.fleet.gpu_count
    goodput = met / horizon
    return RunMetrics(
        workload=result.workload,
        fleet=result.fleet.name,
        policy=result.policy,
        conversations=len(result.conversations),
        turns=len(records),
        input_tokens=sum(r.input_tokens for r in records),
        output_tokens=output,
        prefill_tokens=sum(r.prefill_tokens for r in records),
        reprefilled_tokens=sum(r.reprefilled_tokens for r in records),
        ttfet_p50_s=percentile(ttfet, 50),
        ttfet_p95_s=percentile(ttfet, 95),
        ttfet_p99_s=percentile(ttfet, 99),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        ttft_p99_s=percentile(ttft, 99),
        tbt_p50_s=percentile(tbt, 50),
        tbt_p95_s=percentile(tbt, 95),
        tbt_p99_s=percentile(tbt, 99),
        last_turn_tbt_p50_s=percentile(last_tbt, 50),
        last_turn_tbt_p95_s=percentile(last_tbt, 95),
        slo_attainment=met / n,
        refused=len(result.conversations) - len(served),
        admitted_slo_attainment=met / len(served) if served else math.nan,
        goodput_per_s=goodput,
        goodput_per_gpu=goodput / max(gpus, 1),
        goodput_per_kj=met / (energy / 1000.0) if energy > 0 else math.nan,
        load_scale=result.load_scale,
        throughput_tokens_per_s=output / horizon,
        energy_j=energy,
        prefill_energy_j=prefill_energy,
        decode_energy_j=decode_energy,
        transfer_energy_j=result.transfer_energy_j,
        j_per_token=energy / max(output, 1),
        tokens_per_j=output / energy if energy > 0 else math.nan,
        kv_transfers_per_conversation=sum(s.kv_transfers for s in served) / max(len(served), 1),
        transferred_tokens=sum(r.transferred_tokens for r in records),
        decoder_kv_utilization=sum(d.kv_token_seconds for d in result.decoders) / (capacity * horizon),
        preemptions=sum(d.preemptions for d in result.decoders),
        pinned_evictions=result.pinned_evictions,
        offloads=result.offloads,
        reloads=result.reloads,
        placement_waits=len(result.pending_waits_s),
        placement_wait_mean_s=sum(result.pending_waits_s) / max(len(result.pending_waits_s), 1),
        prefill_busy_share=sum(p.busy_s for p in result.prefill) / (max(len(result.prefill), 1) * horizon),
        horizon_s=result.horizon_s,
        pd_rule=result.pd_rule,
        pool_prefill_share=_pool_share(records),
        first_turn_pool_share=_pool_share([r for r in records if r.index == 0]),
        later_turn_pool_share=_pool_share([r for r in records if r.index > 0]),
    )


def _pool_share(records: list[TurnRecord]) -> float:
    """Share of the started turns prefilled on a prefill server (not on their decoder)."""
    started = [r for r in records if r.decoder]
    return sum(1 for r in started if r.prefill_instance) / len(started) if started else math.nan


def ttfet_values(result: SimResult) -> list[float]:
    """The served conversations' TTFET (refused ones have none)."""
    served = [s for s in result.conversations if not s.refused]
    return [s.turns[s.conv.first_visible_turn].first_token_s - s.conv.arrival_s for s in served]


def ttft_values(result: SimResult) -> list[float]:
    return [r.ttft_s for s in result.conversations for r in s.turns if r.first_token_s >= 0]
