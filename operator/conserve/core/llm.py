"""Model shapes: what the performance model and KV sizing need to know of an LLM.

Shapes are from each model's published config.json (Hugging Face model cards): hidden size, layers, attention
and KV heads, head dimension, parameter count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BF16_BYTES = 2


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    parameters: float
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    bytes_per_element: int = BF16_BYTES
    ffn_size: int = 0  # MLP intermediate size (informative; 0 when not declared)
    vocab_size: int = 0  # (informative; 0 when not declared)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element

    @property
    def weight_bytes(self) -> float:
        return self.parameters * self.bytes_per_element

    def kv_bytes_per_token_per_gpu(self, gpu_count: int) -> int:
        """KV bytes one GPU of a tensor-parallel group holds per token: KV heads split over the GPUs, each GPU
        keeping at least one (heads are replicated when there are fewer KV heads than GPUs, as in vLLM)."""
        heads_per_gpu = -(-self.kv_heads // max(gpu_count, 1))
        return 2 * self.layers * heads_per_gpu * self.head_dim * self.bytes_per_element


MODELS: Mapping[str, ModelShape] = {
    # meta-llama/Meta-Llama-3-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads -> 128 KiB per token.
    "llama-3-8b": ModelShape("llama-3-8b", 8.03e9, 32, 4096, 32, 8, 128),
    # meta-llama/Meta-Llama-3-70B: 80 layers, hidden 8192, 64 heads, 8 KV heads -> 320 KiB per token.
    "llama-3-70b": ModelShape("llama-3-70b", 70.6e9, 80, 8192, 64, 8, 128),
    # Qwen/Qwen2.5-7B: 28 layers, hidden 3584, 28 heads, 4 KV heads -> 56 KiB per token.
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 7.62e9, 28, 3584, 28, 4, 128),
    # Qwen/Qwen2.5-32B: 64 layers, hidden 5120, 40 heads, 8 KV heads -> 256 KiB per token.
    "qwen2.5-32b": ModelShape("qwen2.5-32b", 32.8e9, 64, 5120, 40, 8, 128),
}


def lookup_model(name: str) -> ModelShape | None:
    """Find a model by name, ignoring case and an organisation prefix ("meta-llama/Meta-Llama-3-8B")."""
    key = name.strip().lower().rsplit("/", 1)[-1].removeprefix("meta-")
    return MODELS.get(key)


def kv_capacity_tokens(*, gpu_memory_bytes: float, gpu_count: int, model: ModelShape, memory_fraction: float) -> int:
    """KV tokens a decoder can hold: (usable memory - weights) / KV bytes per token, never below zero.

    `memory_fraction` mirrors vLLM's gpu_memory_utilization: the share of GPU memory the server may use for
    weights, activations and KV. Weights are split over `gpu_count` GPUs (tensor parallel).
    """
    usable = gpu_memory_bytes * max(gpu_count, 1) * memory_fraction
    free_for_kv = usable - model.weight_bytes
    return max(int(free_for_kv // model.kv_bytes_per_token), 0)
