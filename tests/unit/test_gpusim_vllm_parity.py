"""gpu-sim speaks what real vLLM speaks: its metric names, types and label sets, and its prefill's
`kv_transfer_params` fields, against an exposition and a response recorded from vLLM 0.32 (CPU build, NIXL,
the tiny local model; see conserve/engine)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from conserve.core.tokens import filler_text
from conserve.gpusim.engine import Role
from conserve.gpusim.server import GpuSimConfig, GpuSimServer

DATA = Path(__file__).parent / "data" / "vllm"
REAL_METRICS = DATA / "decode-metrics-0.32.0.txt"
REAL_PREFILL = DATA / "prefill-response-0.32.0.json"
# What the router, the operator, the demo and dashboards read from a serving engine.
CONSUMED = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:prompt_tokens_by_source_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
}


def samples(exposition: str) -> dict[str, tuple[str, frozenset[str]]]:
    """vllm: sample name -> (family type, label names); `_created` samples left out (gpu-sim has none)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name.startswith("vllm:") and not sample.name.endswith("_created"):
                out[sample.name] = (family.type, frozenset(sample.labels))
    return out


async def _exercise_gpusim() -> tuple[str, dict[str, Any]]:
    """A prefill and a decode through gpu-sim; returns the decoder's exposition and the prefill's response."""
    prefill = GpuSimServer(GpuSimConfig(role=Role.PREFILL, gpu="H100", port=0, time_scale=0.001))
    decode = GpuSimServer(GpuSimConfig(role=Role.DECODE, gpu="H200", port=0, time_scale=0.001))
    pport, dport = await prefill.start(), await decode.start()
    try:
        async with aiohttp.ClientSession() as http:
            body: dict[str, Any] = {"model": "llama-3-8b", "prompt": filler_text(600), "max_tokens": 1}
            body["kv_transfer_params"] = {"do_remote_decode": True}
            async with http.post(f"http://127.0.0.1:{pport}/v1/completions", json=body) as resp:
                prefilled = await resp.json()
            body = {**body, "max_tokens": 4, "kv_transfer_params": prefilled["kv_transfer_params"]}
            async with http.post(f"http://127.0.0.1:{dport}/v1/completions", json=body) as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{dport}/metrics") as resp:
                return await resp.text(), prefilled
    finally:
        await prefill.stop()
        await decode.stop()


def test_gpusim_metrics_have_real_vllm_names_types_and_labels() -> None:
    real = samples(REAL_METRICS.read_text())
    exposition, _ = asyncio.run(_exercise_gpusim())
    sim = samples(exposition)
    assert set(real) >= CONSUMED, CONSUMED - set(real)  # the recording is of the version we claim
    assert set(sim) >= CONSUMED, CONSUMED - set(sim)
    for name, (kind, labels) in sim.items():
        assert name in real, f"gpu-sim exports {name}, which vLLM 0.32 does not"
        assert (kind, labels) == real[name], (name, (kind, labels), real[name])
    assert "vllm:gpu_cache_usage_perc" not in sim


def test_gpusim_prefill_returns_the_real_kv_transfer_params_fields() -> None:
    real = json.loads(REAL_PREFILL.read_text())["kv_transfer_params"]
    _, prefilled = asyncio.run(_exercise_gpusim())
    params = prefilled["kv_transfer_params"]
    assert list(params) == list(real)
    for key, value in real.items():
        if value is not None:
            assert type(params[key]) is type(value), key
    # Blocks come per KV cache group, as lists of ints.
    assert all(isinstance(b, int) for group in params["remote_block_ids"] for b in group)
    assert params["remote_num_tokens"] == prefilled["usage"]["prompt_tokens"]
