"""Conversation placement: filters, then weighted scorers in [0, 1], then a deterministic picker.

The decision is a pure function of its inputs: the request (known when the conversation starts: the first
turn's input length turned into a KV reservation) and a snapshot of the pool's decoders (KV occupancy and
capacity). The operator and the simulator call this same function.

Plugins follow one contract: a filter says why a decoder is unfit (or None), a scorer returns a value in
[0, 1] and does no I/O. Weights are explicit in `PlacementWeights`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from conserve.core.gpus import Tier


@dataclass(frozen=True, slots=True)
class DecoderState:
    """One decoder as the placement sees it."""

    name: str
    node: str = ""
    tier: Tier | None = None
    ready: bool = True
    capacity_kv_tokens: int = 0
    reserved_kv_tokens: int = 0
    live_kv_tokens: int = 0
    pinned_conversations: int = 0
    #: Joules per output token for decode on this decoder, measured from the fleet or modelled; None: unknown.
    energy_per_token_j: float | None = None
    gpu_count: int = 1  # GPUs of the decoder (tensor parallel): its host KV tier scales with them
    #: Turns running there now: the scheduler's turns in flight, or the engine's running requests, the larger.
    active_turns: int = 0

    @property
    def free_kv_tokens(self) -> int:
        return self.capacity_kv_tokens - max(self.reserved_kv_tokens, self.live_kv_tokens)


class TierPolicy(enum.StrEnum):
    STRICT = "strict"  # decoders must be on the bandwidth tier
    PREFERRED = "preferred"  # bandwidth tier scores higher, others still allowed


@dataclass(frozen=True, slots=True)
class PlacementWeights:
    """Weights of the scorers; zero turns a scorer off."""

    kv_balance: float = 1.0  # prefer the decoder left with the most free KV (spreads load, shorter batches)
    kv_pack: float = 0.0  # prefer the tightest fit (packs, frees whole decoders)
    tier: float = 1.0  # prefer bandwidth-tier decoders
    energy: float = 0.5  # prefer low joules per token
    conversations: float = 0.25  # prefer fewer pinned conversations (spreads decode batches)
    #: prefer fewer turns running now: decode batches, and with them the time between tokens, stay even (pinned
    #: idle conversations hold KV but do not decode, so free KV alone can pile the active ones on one decoder)
    load: float = 1.0

    def as_dict(self) -> dict[str, float]:
        return {
            "kv-balance": self.kv_balance,
            "kv-pack": self.kv_pack,
            "tier": self.tier,
            "energy": self.energy,
            "conversations": self.conversations,
            "load": self.load,
        }


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    #: Share of each decoder's capacity kept free for growth of already pinned conversations.
    headroom_fraction: float = 0.05
    tier_policy: TierPolicy = TierPolicy.PREFERRED
    weights: PlacementWeights = field(default_factory=PlacementWeights)


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    conversation: str  # "namespace/name"
    reservation_kv_tokens: int


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    decoder: str | None
    reason: str  # "Placed", "NoCapacity", "NoReadyDecoder", "NoDecoder"
    message: str
    scores: Mapping[str, float] = field(default_factory=dict)  # total score of every feasible decoder
    rejected: Mapping[str, str] = field(default_factory=dict)  # decoder -> why it was filtered out

    @property
    def placed(self) -> bool:
        return self.decoder is not None


# --- filters -----------------------------------------------------------------------------------------------

Filter = Callable[[PlacementRequest, DecoderState, PlacementSettings], str | None]


def filter_ready(_: PlacementRequest, decoder: DecoderState, __: PlacementSettings) -> str | None:
    return None if decoder.ready else "not ready"


def filter_tier(_: PlacementRequest, decoder: DecoderState, settings: PlacementSettings) -> str | None:
    if settings.tier_policy is TierPolicy.STRICT and decoder.tier is not Tier.BANDWIDTH:
        return f"tier {decoder.tier.value if decoder.tier else 'unknown'} is not bandwidth (strict tier policy)"
    return None


def filter_capacity(request: PlacementRequest, decoder: DecoderState, settings: PlacementSettings) -> str | None:
    headroom = int(decoder.capacity_kv_tokens * settings.headroom_fraction)
    available = decoder.free_kv_tokens - headroom
    if request.reservation_kv_tokens > available:
        return f"needs {request.reservation_kv_tokens} KV tokens, {max(available, 0)} free after headroom"
    return None


def largest_placeable_kv_tokens(capacity_kv_tokens: int, headroom_fraction: float) -> int:
    """The largest reservation `filter_capacity` accepts on an empty decoder of this capacity.

    Callers cap reservations with it: a reservation capped at the raw capacity could never pass the headroom.
    """
    return max(capacity_kv_tokens - int(capacity_kv_tokens * headroom_fraction), 0)


FILTERS: Sequence[tuple[str, Filter]] = (
    ("ready", filter_ready),
    ("tier", filter_tier),
    ("capacity", filter_capacity),
)


# --- scorers (each in [0, 1], no I/O) -----------------------------------------------------------------------

Scorer = Callable[[PlacementRequest, DecoderState, Sequence[DecoderState]], float]


class FeasibleSet(tuple[DecoderState, ...]):
    """The feasible decoders with the aggregates the relative scorers need, computed once per decision rather
    than once per decoder (which made a decision quadratic in the pool's size: 1,000 decoders, 10^6 steps)."""

    max_pinned: int
    min_energy_per_token_j: float | None

    def __new__(cls, decoders: Sequence[DecoderState]) -> FeasibleSet:
        self = super().__new__(cls, decoders)
        self.max_pinned = max((d.pinned_conversations for d in decoders), default=0)
        self.min_energy_per_token_j = _lowest_energy(decoders)
        return self


def _lowest_energy(decoders: Sequence[DecoderState]) -> float | None:
    known = [d.energy_per_token_j for d in decoders if d.energy_per_token_j is not None and d.energy_per_token_j > 0]
    return min(known) if known else None


def _min_energy(feasible: Sequence[DecoderState]) -> float | None:
    if isinstance(feasible, FeasibleSet):
        return feasible.min_energy_per_token_j
    return _lowest_energy(feasible)


def _max_pinned(feasible: Sequence[DecoderState]) -> int:
    if isinstance(feasible, FeasibleSet):
        return feasible.max_pinned
    return max((d.pinned_conversations for d in feasible), default=0)


def _free_after_fraction(request: PlacementRequest, decoder: DecoderState) -> float:
    if decoder.capacity_kv_tokens <= 0:
        return 0.0
    free_after = decoder.free_kv_tokens - request.reservation_kv_tokens
    return min(max(free_after / decoder.capacity_kv_tokens, 0.0), 1.0)


def score_kv_balance(request: PlacementRequest, decoder: DecoderState, _: Sequence[DecoderState]) -> float:
    return _free_after_fraction(request, decoder)


def score_kv_pack(request: PlacementRequest, decoder: DecoderState, _: Sequence[DecoderState]) -> float:
    return 1.0 - _free_after_fraction(request, decoder)


def score_tier(_: PlacementRequest, decoder: DecoderState, __: Sequence[DecoderState]) -> float:
    if decoder.tier is Tier.BANDWIDTH:
        return 1.0
    return 0.5 if decoder.tier is None else 0.0


def score_energy(_: PlacementRequest, decoder: DecoderState, feasible: Sequence[DecoderState]) -> float:
    best = _min_energy(feasible)
    if decoder.energy_per_token_j is None or decoder.energy_per_token_j <= 0 or best is None:
        return 0.5
    return best / decoder.energy_per_token_j


def score_conversations(_: PlacementRequest, decoder: DecoderState, feasible: Sequence[DecoderState]) -> float:
    most = _max_pinned(feasible)
    if most <= 0:
        return 1.0
    return 1.0 - decoder.pinned_conversations / (most + 1)


def score_load(_: PlacementRequest, decoder: DecoderState, feasible: Sequence[DecoderState]) -> float:
    busiest = max((d.active_turns for d in feasible), default=0)
    return 1.0 - decoder.active_turns / (busiest + 1)


SCORERS: Mapping[str, Scorer] = {
    "kv-balance": score_kv_balance,
    "kv-pack": score_kv_pack,
    "tier": score_tier,
    "energy": score_energy,
    "conversations": score_conversations,
    "load": score_load,
}


def score_decoders(
    request: PlacementRequest, feasible: Sequence[DecoderState], weights: PlacementWeights
) -> dict[str, float]:
    """Weighted mean of the scorers for each feasible decoder, in [0, 1]."""
    weight_by_name = {name: w for name, w in weights.as_dict().items() if w > 0}
    total_weight = sum(weight_by_name.values())
    feasible = feasible if isinstance(feasible, FeasibleSet) else FeasibleSet(feasible)
    scores: dict[str, float] = {}
    for decoder in feasible:
        if total_weight <= 0:
            scores[decoder.name] = 0.0
            continue
        weighted = sum(w * SCORERS[name](request, decoder, feasible) for name, w in weight_by_name.items())
        scores[decoder.name] = weighted / total_weight
    return scores


def place(
    request: PlacementRequest, decoders: Sequence[DecoderState], settings: PlacementSettings
) -> PlacementDecision:
    """Pick the decoder for a conversation, or say why none fits. Ties go to the smallest name."""
    if not decoders:
        return PlacementDecision(None, "NoDecoder", "the pool has no decoder")
    rejected: dict[str, str] = {}
    feasible: list[DecoderState] = []
    for decoder in decoders:
        reason = next((why for _, check in FILTERS if (why := check(request, decoder, settings)) is not None), None)
        if reason is None:
            feasible.append(decoder)
        else:
            rejected[decoder.name] = reason
    if not feasible:
        if all(not d.ready for d in decoders):
            return PlacementDecision(None, "NoReadyDecoder", "no decoder of the pool is ready", rejected=rejected)
        return PlacementDecision(
            None,
            "NoCapacity",
            f"no decoder can hold {request.reservation_kv_tokens} KV tokens ({len(decoders)} decoders)",
            rejected=rejected,
        )
    scores = score_decoders(request, feasible, settings.weights)
    best = min(feasible, key=lambda d: (-round(scores[d.name], 12), d.name))
    return PlacementDecision(
        best.name,
        "Placed",
        f"placed on {best.name} (score {scores[best.name]:.3f}, {len(feasible)}/{len(decoders)} feasible)",
        scores=scores,
        rejected=rejected,
    )
