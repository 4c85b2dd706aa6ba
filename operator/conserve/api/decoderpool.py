"""The DecoderPool custom resource (conserve.dev/v1alpha1, short name `dp`).

The decode servers (a pod selector) and the prefill servers that feed them, for one model. Per-decoder KV
capacity is declared (`kvCapacity.tokensPerDecoder`) or derived from the node's GPU memory (GFD labels), the
GPUs the pod requests, the model's KV bytes per token and `kvCapacity.gpuMemoryFraction`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from conserve.api.common import CamelModel, Condition, LabelSelector, StatusModel

KIND = "DecoderPool"
PLURAL = "decoderpools"
SHORT_NAME = "dp"


class ModelShapeSpec(CamelModel):
    parameters: float = Field(gt=0, description="Parameter count.")
    layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    attention_heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    bytes_per_element: int = Field(2, ge=1, le=8)


class ModelSpec(CamelModel):
    name: str = Field(min_length=1, max_length=253, description="Model name, e.g. llama-3-8b.")
    kv_bytes_per_token: int | None = Field(None, ge=1, description="Overrides the KV size derived from the shape.")
    shape: ModelShapeSpec | None = Field(None, description="Needed when the name is not in the built-in catalog.")


class KvCapacitySpec(CamelModel):
    tokens_per_decoder: int | None = Field(None, ge=1, description="Declared KV capacity of every decoder.")
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1, description="Share of GPU memory the server may use.")


class WeightsSpec(CamelModel):
    kv_balance: float = Field(1.0, ge=0, le=100)
    kv_pack: float = Field(0.0, ge=0, le=100)
    tier: float = Field(1.0, ge=0, le=100)
    energy: float = Field(0.5, ge=0, le=100)
    conversations: float = Field(0.25, ge=0, le=100)


class PlacementSpec(CamelModel):
    headroom_fraction: float = Field(0.05, ge=0, lt=1, description="Capacity kept free for growth.")
    tier_policy: Literal["strict", "preferred"] = "preferred"
    when_full: Literal["Queue", "Reject"] = Field("Queue", description="Queue waits for capacity; Reject fails.")
    weights: WeightsSpec = Field(default_factory=WeightsSpec)


class EndpointSpec(CamelModel):
    port: int = Field(8000, ge=1, le=65535, description="Port of the servers' OpenAI-compatible API.")


class DecoderPoolSpec(CamelModel):
    model: ModelSpec
    decoder_selector: LabelSelector = Field(description="Selects the decode pods (namespace of the pool).")
    prefill_selector: LabelSelector | None = Field(None, description="Selects the prefill pods.")
    kv_capacity: KvCapacitySpec = Field(default_factory=KvCapacitySpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    endpoint: EndpointSpec = Field(default_factory=EndpointSpec)
    default_idle_timeout_seconds: int = Field(1800, ge=1, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _selector_not_empty(self) -> DecoderPoolSpec:
        if not self.decoder_selector.match_labels and not self.decoder_selector.match_expressions:
            raise ValueError("decoderSelector must select something (an empty selector would match every pod)")
        return self


class DecoderStatus(StatusModel):
    pod: str
    node: str = ""
    tier: str = ""
    gpu_product: str = ""
    ready: bool = False
    endpoint: str = ""
    capacity_kv_tokens: int = 0
    reserved_kv_tokens: int = 0
    live_kv_tokens: int = 0
    conversations: int = 0
    power_watts: float | None = None
    energy_joules: float | None = None


class PrefillStatus(StatusModel):
    pod: str
    node: str = ""
    tier: str = ""
    gpu_product: str = ""
    ready: bool = False
    endpoint: str = ""


class DecoderPoolStatus(StatusModel):
    decoders: list[DecoderStatus] = Field(default_factory=list)
    prefills: list[PrefillStatus] = Field(default_factory=list)
    ready_decoders: int = 0
    capacity_kv_tokens: int = 0
    reserved_kv_tokens: int = 0
    live_kv_tokens: int = 0
    conversations: int = 0
    pending_conversations: int = 0
    #: "used/total" KV tokens, for the printer column.
    kv_usage: str = ""
    #: Recent completed conversations' final context / first-turn input, newest last (bounded).
    observed_growth_ratios: list[float] = Field(default_factory=list)
    power_watts: float | None = None
    energy_joules: float | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
