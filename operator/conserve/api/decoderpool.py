"""The DecoderPool custom resource (conserve.dev/v1alpha1, short name `dp`).

The decode servers (a pod selector) and the prefill servers that feed them, for one model. Per-decoder KV
capacity is declared (`kvCapacity.tokensPerDecoder`) or derived from the node's GPU memory (GFD labels), the
GPUs the pod requests, the model's KV bytes per token and `kvCapacity.gpuMemoryFraction`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from conserve.api.common import NON_EMPTY_SELECTOR, CamelModel, Condition, LabelSelector, ServingPod, StatusModel, cel
from conserve.api.slo import PoolSloStatus, SloSpec
from conserve.core.llm import MODELS, ModelShape, lookup_model

KIND = "DecoderPool"
PLURAL = "decoderpools"
SHORT_NAME = "dp"


class ModelShapeSpec(CamelModel):
    parameters: float = Field(gt=0, le=1e15, description="Parameter count.")
    layers: int = Field(ge=1, le=10_000)
    hidden_size: int = Field(ge=1, le=1_000_000)
    attention_heads: int = Field(ge=1, le=100_000)
    kv_heads: int = Field(ge=1, le=100_000)
    head_dim: int = Field(ge=1, le=100_000)
    bytes_per_element: int = Field(2, ge=1, le=8)

    def to_shape(self, name: str) -> ModelShape:
        return ModelShape(
            name,
            self.parameters,
            self.layers,
            self.hidden_size,
            self.attention_heads,
            self.kv_heads,
            self.head_dim,
            self.bytes_per_element,
        )


class ModelSpec(CamelModel):
    name: str = Field(min_length=1, max_length=253, description=f"Model name; built in: {', '.join(sorted(MODELS))}.")
    kv_bytes_per_token: int | None = Field(
        None, ge=1, le=1_000_000_000, description="Overrides the KV size derived from the shape."
    )
    shape: ModelShapeSpec | None = Field(None, description="Needed when the name is not in the built-in catalog.")

    def resolved_shape(self) -> ModelShape | None:
        return self.shape.to_shape(self.name) if self.shape is not None else lookup_model(self.name)

    def resolved_kv_bytes_per_token(self) -> int | None:
        if self.kv_bytes_per_token is not None:
            return self.kv_bytes_per_token
        shape = self.resolved_shape()
        return shape.kv_bytes_per_token if shape is not None else None


def _known_model_rule(field: str) -> str:
    # CEL twin of lookup_model(): case-insensitive, an organisation prefix and a "meta-" prefix are ignored.
    checks = []
    for name in sorted(MODELS):
        checks.append(f"{field} == '{name}' || {field} == 'meta-{name}'")
        checks.append(f"{field}.endsWith('/{name}') || {field}.endsWith('/meta-{name}')")
    return " || ".join(checks)


#: A decoder's KV capacity at most (a pool's sums over a million decoders stay inside int64).
MAX_KV_TOKENS_PER_DECODER = 10_000_000_000


class KvCapacitySpec(CamelModel):
    tokens_per_decoder: int | None = Field(
        None, ge=1, le=MAX_KV_TOKENS_PER_DECODER, description="Declared KV capacity of every decoder."
    )
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1, description="Share of GPU memory the server may use.")


_WEIGHT_DEFAULTS = {"kvBalance": 1.0, "kvPack": 0.0, "tier": 1.0, "energy": 0.5, "conversations": 0.25, "load": 1.0}


class WeightsSpec(CamelModel):
    # has() guards: the rule also checks the schema's `default: {}` before inner defaults are filled in.
    model_config = ConfigDict(
        json_schema_extra=cel(
            " + ".join(f"(has(self.{k}) ? self.{k} : {v})" for k, v in _WEIGHT_DEFAULTS.items()) + " > 0.0",
            "at least one scorer weight must be positive",
        )
    )

    kv_balance: float = Field(_WEIGHT_DEFAULTS["kvBalance"], ge=0, le=100, description="Most free KV left.")
    kv_pack: float = Field(_WEIGHT_DEFAULTS["kvPack"], ge=0, le=100, description="Tightest fit.")
    tier: float = Field(_WEIGHT_DEFAULTS["tier"], ge=0, le=100, description="Bandwidth-tier GPU.")
    energy: float = Field(_WEIGHT_DEFAULTS["energy"], ge=0, le=100, description="Fewest joules per token.")
    conversations: float = Field(_WEIGHT_DEFAULTS["conversations"], ge=0, le=100, description="Fewest pinned.")
    load: float = Field(_WEIGHT_DEFAULTS["load"], ge=0, le=100, description="Fewest turns running now.")

    @model_validator(mode="after")
    def _some_weight(self) -> WeightsSpec:
        if self.kv_balance + self.kv_pack + self.tier + self.energy + self.conversations + self.load <= 0:
            raise ValueError("at least one scorer weight must be positive")
        return self


#: How long a conversation may wait in a pool's queue by default (the router's placement wait before the field).
DEFAULT_MAX_QUEUE_WAIT_SECONDS = 120
MAX_QUEUE_WAIT_LIMIT_SECONDS = 3600


class PlacementSpec(CamelModel):
    headroom_fraction: float = Field(0.05, ge=0, lt=1, description="Capacity kept free for growth.")
    tier_policy: Literal["strict", "preferred"] = "preferred"
    when_full: Literal["Queue", "Reject"] = Field("Queue", description="Queue waits for capacity; Reject fails.")
    max_queue_wait_seconds: int = Field(
        DEFAULT_MAX_QUEUE_WAIT_SECONDS,
        ge=1,
        le=MAX_QUEUE_WAIT_LIMIT_SECONDS,
        description="Longest a conversation waits in the queue for a decoder, counted from its creation. Past it "
        "the operator refuses it (phase Failed, condition Placed=False, reason QueueWaitExceeded) and the router "
        "answers its turn with HTTP 429 and Retry-After; a retry of the same conversation queues it afresh.",
    )
    decoder_lost_grace_seconds: int = Field(
        120,
        ge=0,
        le=3600,
        description="How long a decoder may be not Ready (its node NotReady, say an API-server outage, or its "
        "readiness probe failing) and keep its conversations. Past it they are re-placed, or wait in the queue "
        "until room exists (never failed for it). A deleted or terminating decoder is re-placed at once.",
    )
    weights: WeightsSpec = Field(default_factory=WeightsSpec)


def _opt_in_timer(description: str) -> Any:
    """An optional lifecycle timer in seconds (1 s to a week); unset means memory pressure only."""
    return Field(None, ge=1, le=7 * 24 * 3600, description=description)


class KvLifecycleSpec(CamelModel):
    """Idle conversations' KV: resident (evictable) on the GPU, then in the decoder node's host memory, then
    dropped, each move on memory pressure (a placement or a reload needing room). The active window (and the
    opt-in TTLs) derive from the pool's observed gaps between turns, bounded by these limits."""

    enabled: bool = Field(True, description="Offload and drop idle conversations' KV (false: it stays resident).")
    host_kv_tokens_per_decoder: int | None = Field(
        None,
        ge=0,
        le=1_000_000_000,
        description="Host-memory KV tokens per decoder (default: 125 GB per decoder GPU over the model's KV size; "
        "0: no host tier, reclaimed KV is dropped).",
    )
    max_active_window_seconds: int = Field(
        10,
        ge=0,
        le=3600,
        description="Upper bound of the window after a turn during which its KV is not reclaimable (0: none).",
    )
    max_resident_ttl_seconds: int | None = _opt_in_timer(
        "Opt-in timer: offload an idle conversation's KV after the median observed gap between turns, at most this "
        "long (unset: offload only when GPU room is needed)."
    )
    max_host_ttl_seconds: int | None = _opt_in_timer(
        "Opt-in timer, with maxResidentTtlSeconds: drop an offloaded conversation's KV after the 90th percentile "
        "observed gap, at most this long (unset: drop only when host room is needed)."
    )


class PrefillDeciderSpec(CamelModel):
    """Where each turn's prompt is prefilled: on a prefill server (its KV then moves to the decoder) or on the
    conversation's decoder itself (`conserve.core.pd`). The router decides per turn from the servers' live
    metrics; the simulator and the benchmark run the same rule."""

    rule: Literal["Auto", "Pool", "Decoder", "Threshold"] = Field(
        "Auto",
        description="Auto: the path with the shorter estimated time to the first token, counting the stall a "
        "decoder-side prefill puts on the streams running there. Pool: always a prefill server. Decoder: first turns "
        "on a prefill server, later turns on the decoder. Threshold: a prefill server when the decoder lacks more "
        "than decoderMaxTokens of the prompt.",
    )
    decoder_max_tokens: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="The decoder prefills a prompt it lacks at most this many tokens of (Auto and Threshold).",
    )
    stall_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Auto: weight of one second of stall of each stream running on the decoder against one second of "
        "this turn's wait (0: the decoder's streams do not count).",
    )
    kv_link_gbps: float = Field(
        200.0, gt=0, le=100_000, description="KV link speed between prefill servers and decoders, in Gbit/s."
    )


class EndpointSpec(CamelModel):
    port: int = Field(8000, ge=1, le=65535, description="Port of the servers' OpenAI-compatible API.")


_KV_SIZE_KNOWN = cel(
    "(has(self.kvCapacity) && has(self.kvCapacity.tokensPerDecoder)) || has(self.model.kvBytesPerToken)"
    " || has(self.model.shape) || " + _known_model_rule("self.model.name.lowerAscii()"),
    "unknown model: give model.kvBytesPerToken, model.shape or kvCapacity.tokensPerDecoder",
    field_path=".model.name",
)


class DecoderPoolSpec(CamelModel):
    model_config = ConfigDict(json_schema_extra=_KV_SIZE_KNOWN)

    model: ModelSpec
    decoder_selector: LabelSelector = Field(
        description="Selects the decode pods (namespace of the pool).", json_schema_extra=NON_EMPTY_SELECTOR
    )
    prefill_selector: LabelSelector | None = Field(
        None, description="Selects the prefill pods.", json_schema_extra=NON_EMPTY_SELECTOR
    )
    kv_capacity: KvCapacitySpec = Field(default_factory=KvCapacitySpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    endpoint: EndpointSpec = Field(default_factory=EndpointSpec)
    kv_lifecycle: KvLifecycleSpec = Field(default_factory=KvLifecycleSpec)
    prefill_decider: PrefillDeciderSpec = Field(default_factory=PrefillDeciderSpec)
    slo: SloSpec | None = Field(
        None,
        description="The conversation SLO: targets, the attainment to keep, priority classes (conserve.api.slo). "
        "Bounds each class's queue wait by its TTFET target; status.slo reports attainment and goodput.",
    )
    default_idle_timeout_seconds: int = Field(1800, ge=1, le=7 * 24 * 3600)
    # engine profile (issue 26): the serving engine's overheads for the performance model (core/engine_profiles.py)
    engine_profile: Literal["vllm-cuda-graphs", "tensorrt-llm", "vllm-2023"] = Field(
        "vllm-cuda-graphs",
        description="The serving engine's profile for the performance and power model (energy priors): "
        "vllm-cuda-graphs (a current vLLM), tensorrt-llm, or vllm-2023 (vLLM without CUDA graphs).",
    )

    @model_validator(mode="after")
    def _selector_not_empty(self) -> DecoderPoolSpec:
        if self.decoder_selector.empty:
            raise ValueError("decoderSelector must select something (an empty selector would match every pod)")
        if self.prefill_selector is not None and self.prefill_selector.empty:
            raise ValueError("prefillSelector must select something (an empty selector would match every pod)")
        return self

    @model_validator(mode="after")
    def _kv_size_known(self) -> DecoderPoolSpec:
        if self.kv_capacity.tokens_per_decoder is None and self.model.resolved_kv_bytes_per_token() is None:
            raise ValueError("unknown model: give model.kvBytesPerToken, model.shape or kvCapacity.tokensPerDecoder")
        return self


class PrefillStatus(ServingPod):
    ready: bool = False
    endpoint: str = Field("", max_length=300)


class MeasuredPower(StatusModel):
    """Power and energy as the energy loop measures them (a decoder's; a pool's are its decoders' sums)."""

    power_watts: float | None = None
    energy_joules: float | None = None


#: A pool status count or token sum: at most 2^53 - 1, the largest integer a JSON number (a float64) holds exactly
#: (a larger bound does not survive the API server's round trip: a server-side apply of the CRD then conflicts).
StatusInt = Annotated[int, Field(ge=0, le=2**53 - 1)]


class DecoderStatus(MeasuredPower, PrefillStatus):
    capacity_kv_tokens: StatusInt = 0
    reserved_kv_tokens: StatusInt = 0
    live_kv_tokens: StatusInt = 0
    conversations: StatusInt = 0
    #: KV lifecycle: conversations (and their live KV tokens) per state.
    active_conversations: StatusInt = 0
    idle_conversations: StatusInt = 0
    idle_kv_tokens: StatusInt = 0
    offloaded_conversations: StatusInt = 0
    offloaded_kv_tokens: StatusInt = 0
    dropped_conversations: StatusInt = 0
    host_capacity_kv_tokens: StatusInt = 0


class DecoderPoolStatus(MeasuredPower):
    #: Written whole by the operator; powerWatts/energyJoules of each entry come from the energy loop.
    decoders: list[DecoderStatus] = Field(default_factory=list)
    prefills: list[PrefillStatus] = Field(default_factory=list)
    ready_decoders: StatusInt = 0
    capacity_kv_tokens: StatusInt = 0
    reserved_kv_tokens: StatusInt = 0
    live_kv_tokens: StatusInt = 0
    conversations: StatusInt = 0
    pending_conversations: StatusInt = 0
    idle_conversations: StatusInt = 0
    offloaded_conversations: StatusInt = 0
    dropped_conversations: StatusInt = 0
    #: Gaps between turns the lifecycle's TTLs derive from, and the TTLs in force (seconds).
    observed_turn_gaps_seconds: list[float] = Field(default_factory=list)
    active_window_seconds: float | None = None
    resident_ttl_seconds: float | None = None
    host_ttl_seconds: float | None = None
    #: "used/total" KV tokens, for the printer column.
    kv_usage: str = Field("", max_length=64)
    kv_bytes_per_token: int | None = Field(None, ge=1, le=1_000_000_000)
    #: Per-turn growth ratios observed in the pool (context after a turn / before it), newest last (bounded).
    observed_growth_ratios: list[float] = Field(default_factory=list)
    #: SLO attainment and goodput per class (a pool with spec.slo).
    slo: PoolSloStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


#: The pool's own power and energy: the sums of its decoders' figures, written once measured (by the operator, or
#: by the energy loop when it runs standalone), never cleared.
MEASURED_FIELDS = frozenset(MeasuredPower.model_fields)
#: The status fields the operator writes whatever it knows (decoders[] whole, each entry's figures carried over).
OPERATOR_STATUS_FIELDS = frozenset(DecoderPoolStatus.model_fields) - MEASURED_FIELDS
