"""Pure pieces of the load generator: slicing a workload, percentiles, the per-mode summary and its table.

Where each turn's prompt was prefilled comes from the router's `X-Conserve-Prefill-Site` answer (`pool`: a prefill
server, its KV moved to the decoder; `decoder`: the decoder itself), the simulator's from its turn records; the
table counts them for first and later turns.

Times in a summary are modelled seconds: what the load generator measured in real time, times the speed-up (the
GPU simulators run with `--time-scale 1/speedup`, so their modelled time maps back exactly; the control plane's
own latency is stretched by the speed-up too, which counts against the conversation-level mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from conserve.sim.conversations import Conversation, Turn, Workload


def slice_workload(workload: Workload, start_s: float, duration_s: float | None, limit: int | None = None) -> Workload:
    """Conversations that start in [start_s, start_s + duration_s), shifted to start at 0; of their turns, those
    stamped before the end of the window (a one-hour trace is cut the same way at its end)."""
    end = math.inf if duration_s is None else start_s + duration_s
    kept: list[Conversation] = []
    for c in workload.conversations:
        if not start_s <= c.arrival_s < end:
            continue
        turns = tuple(
            Turn(
                t.input_tokens,
                t.new_tokens,
                t.output_tokens,
                None if t.not_before_s is None else t.not_before_s - start_s,
                t.think_s,
                t.user_visible,
            )
            for t in c.turns
            if t.not_before_s is None or t.not_before_s < end
        )
        kept.append(Conversation(c.key, c.arrival_s - start_s, turns))
        if limit is not None and len(kept) >= limit:
            break
    return Workload(f"{workload.name}[{start_s:g}s+{duration_s if duration_s is not None else 'all'}]", tuple(kept))


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: `buckets` are (upper bound, cumulative count), +Inf last; linear
    interpolation inside the bucket (the highest finite bound when the rank falls in +Inf). None: no samples."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = buckets[-1][1] * q / 100.0
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class TurnOutcome:
    index: int
    ok: bool
    ttft_s: float | None = None  # modelled seconds
    tbt_s: float | None = None  # mean time between tokens of the turn, modelled seconds
    output_tokens: int = 0
    decoder: str = ""
    generation: str = ""
    error: str = ""
    prefill_site: str = ""  # "pool" or "decoder" ("": not known)


@dataclass
class ConversationOutcome:
    key: str
    turns: list[TurnOutcome] = field(default_factory=list)
    ttfet_s: float | None = None  # modelled seconds

    @property
    def decoders(self) -> list[str]:
        return [t.decoder for t in self.turns if t.ok]


@dataclass(frozen=True, slots=True)
class Summary:
    label: str
    conversations: int
    turns: int
    failed_turns: int
    ttfet_p50_s: float | None
    ttfet_p95_s: float | None
    ttfet_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tbt_mean_s: float | None
    tbt_p95_s: float | None
    output_tokens: int
    kv_transfers: float | None = None
    energy_j: float | None = None
    #: Conversations whose turns went to more than one decoder (moves after a decoder loss included).
    moved_conversations: int = 0
    #: Turns served, by where their prompt was prefilled: first turns and later ones, on the pool or the decoder.
    pool_first: int = 0
    decoder_first: int = 0
    pool_later: int = 0
    decoder_later: int = 0

    @property
    def energy_per_token_j(self) -> float | None:
        if self.energy_j is None or self.output_tokens == 0:
            return None
        return self.energy_j / self.output_tokens


def summarize(
    label: str,
    outcomes: Sequence[ConversationOutcome],
    *,
    kv_transfers: float | None = None,
    energy_j: float | None = None,
) -> Summary:
    ttfet = [o.ttfet_s for o in outcomes if o.ttfet_s is not None]
    turns = [t for o in outcomes for t in o.turns]
    ttft = [t.ttft_s for t in turns if t.ttft_s is not None]
    tbt = [t.tbt_s for t in turns if t.tbt_s is not None]

    def sited(site: str, first: bool) -> int:
        return sum(1 for t in turns if t.ok and t.prefill_site == site and (t.index == 0) == first)

    return Summary(
        label=label,
        conversations=len(outcomes),
        turns=len(turns),
        failed_turns=sum(1 for t in turns if not t.ok),
        ttfet_p50_s=percentile(ttfet, 50),
        ttfet_p95_s=percentile(ttfet, 95),
        ttfet_p99_s=percentile(ttfet, 99),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        tbt_mean_s=sum(tbt) / len(tbt) if tbt else None,
        tbt_p95_s=percentile(tbt, 95),
        output_tokens=sum(t.output_tokens for t in turns if t.ok),
        kv_transfers=kv_transfers,
        energy_j=energy_j,
        moved_conversations=sum(1 for o in outcomes if len(set(o.decoders)) > 1),
        pool_first=sited("pool", True),
        decoder_first=sited("decoder", True),
        pool_later=sited("pool", False),
        decoder_later=sited("decoder", False),
    )


def _fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def prefill_sites(pool: int, decoder: int) -> str:
    """Turns prefilled on the pool / on the decoder, and the pool's share ("-" when none is known)."""
    if pool + decoder == 0:
        return "-"
    return f"{pool}/{decoder} ({pool / (pool + decoder):.0%} pool)"


def format_table(summaries: Sequence[Summary]) -> str:
    """A fixed-width table, one column per summary."""
    rows: list[tuple[str, list[str]]] = [
        ("conversations", [str(s.conversations) for s in summaries]),
        ("turns (failed)", [f"{s.turns} ({s.failed_turns})" for s in summaries]),
        ("TTFET p50 s", [_fmt(s.ttfet_p50_s) for s in summaries]),
        ("TTFET p95 s", [_fmt(s.ttfet_p95_s) for s in summaries]),
        ("TTFET p99 s", [_fmt(s.ttfet_p99_s) for s in summaries]),
        ("TTFT p50 s", [_fmt(s.ttft_p50_s) for s in summaries]),
        ("TTFT p95 s", [_fmt(s.ttft_p95_s) for s in summaries]),
        ("TBT mean ms", [_fmt(None if s.tbt_mean_s is None else s.tbt_mean_s * 1e3, digits=1) for s in summaries]),
        ("TBT p95 ms", [_fmt(None if s.tbt_p95_s is None else s.tbt_p95_s * 1e3, digits=1) for s in summaries]),
        ("output tokens", [str(s.output_tokens) for s in summaries]),
        ("KV transfers", [_fmt(s.kv_transfers, digits=0) for s in summaries]),
        ("conversations moved", [str(s.moved_conversations) for s in summaries]),
        ("energy J", [_fmt(s.energy_j, digits=0) for s in summaries]),
        ("J per output token", [_fmt(s.energy_per_token_j, digits=3) for s in summaries]),
        ("prefill pool/decoder, first turns", [prefill_sites(s.pool_first, s.decoder_first) for s in summaries]),
        ("prefill pool/decoder, later turns", [prefill_sites(s.pool_later, s.decoder_later) for s in summaries]),
    ]
    width = max(14, *(len(s.label) for s in summaries), *(len(v) for _, values in rows for v in values))
    names = max(22, *(len(name) for name, _ in rows))
    head = f"{'':<{names}}" + "".join(f"{s.label:>{width + 2}}" for s in summaries)
    lines = [head] + [f"{name:<{names}}" + "".join(f"{v:>{width + 2}}" for v in values) for name, values in rows]
    return "\n".join(lines)
