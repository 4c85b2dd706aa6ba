"""Read a vLLM (or gpu-sim) Prometheus exposition: the figures that prove where a turn's KV came from."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from conserve.exposition import sample_sum

SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")


@dataclass(frozen=True, slots=True)
class TokenSources:
    """Cumulative prompt tokens of one server by where their KV came from, and its finished requests."""

    local_compute: float
    local_cache_hit: float
    external_kv_transfer: float
    prompt_tokens: float
    requests: float

    def __sub__(self, other: TokenSources) -> TokenSources:
        return TokenSources(
            self.local_compute - other.local_compute,
            self.local_cache_hit - other.local_cache_hit,
            self.external_kv_transfer - other.external_kv_transfer,
            self.prompt_tokens - other.prompt_tokens,
            self.requests - other.requests,
        )


def token_sources(exposition: str) -> TokenSources:
    by_source = "vllm:prompt_tokens_by_source_total"
    return TokenSources(
        local_compute=sample_sum(exposition, by_source, {"source": "local_compute"}),
        local_cache_hit=sample_sum(exposition, by_source, {"source": "local_cache_hit"}),
        external_kv_transfer=sample_sum(exposition, by_source, {"source": "external_kv_transfer"}),
        prompt_tokens=sample_sum(exposition, "vllm:prompt_tokens_total"),
        requests=sample_sum(exposition, "vllm:request_success_total"),
    )


def scrape(endpoint: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=timeout_s) as resp:
        return str(resp.read().decode())


def healthy(endpoint: str, timeout_s: float = 2.0) -> bool:
    """The server answers /health with 200 (a pod's endpoint is listed before its server is up)."""
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
