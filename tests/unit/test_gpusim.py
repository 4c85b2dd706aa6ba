"""The GPU-server simulator: pacing by the performance model, KV capacity, the disaggregated protocol, metrics."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import pytest

from conserve.core.gpus import CATALOG
from conserve.core.llm import MODELS
from conserve.core.perf import LINKS, Device, decode_step_time_s, prefill_cost
from conserve.core.tokens import estimate_tokens, filler_text
from conserve.gpusim.engine import Engine, RequestRejected, Role, SimRequest
from conserve.gpusim.pods import view_pod, wants_server
from conserve.gpusim.server import GpuSimConfig, GpuSimServer

MODEL = MODELS["llama-3-8b"]


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """No pytest-asyncio here: run the coroutine test in a fresh event loop."""

    @functools.wraps(fn)
    def wrapper() -> None:
        asyncio.run(fn())

    return wrapper


def _engine(role: Role, capacity: int = 1_000_000, scale: float = 0.05, gpu: str = "H100") -> Engine:
    return Engine(
        role=role,
        device=Device(CATALOG[gpu]),
        model=MODEL,
        kv_capacity_tokens=capacity,
        link=LINKS["rdma"],
        time_scale=scale,
    )


async def _drain(req: SimRequest) -> tuple[float, int]:
    """(seconds to the first token, tokens)."""
    start = time.monotonic()
    first: float | None = None
    tokens = 0
    while True:
        event = await req.events.get()
        if first is None:
            first = time.monotonic() - start
        tokens += event.tokens
        if event.finished:
            return first, tokens


def test_filler_text_estimates_exactly() -> None:
    assert estimate_tokens(filler_text(123)) == 123
    assert estimate_tokens("") == 0


@run
async def test_prefill_and_decode_are_paced_by_the_model() -> None:
    engine = _engine(Role.BOTH, scale=0.2)
    engine.start()
    try:
        req = SimRequest("a", prompt_tokens=8000, max_tokens=20)
        engine.submit(req)
        first_s, tokens = await _drain(req)
    finally:
        await engine.stop()
    device = Device(CATALOG["H100"])
    expected_first = prefill_cost(device, MODEL, 8000).time_s * 0.2
    assert tokens == 20
    assert expected_first * 0.9 <= first_s <= expected_first + 0.05
    decode_s = sum(decode_step_time_s(device, MODEL, 1, 8000 + i) for i in range(1, 20))
    assert engine.stats.busy_modelled_s == pytest.approx(prefill_cost(device, MODEL, 8000).time_s + decode_s, rel=1e-6)
    assert engine.stats.energy_j > 0


@run
async def test_kv_capacity_queues_and_rejects() -> None:
    engine = _engine(Role.DECODE, capacity=1000, scale=0.01)
    engine.start()
    try:
        with pytest.raises(RequestRejected):
            engine.submit(SimRequest("big", prompt_tokens=990, max_tokens=20))
        a = SimRequest("a", prompt_tokens=600, max_tokens=10)
        b = SimRequest("b", prompt_tokens=600, max_tokens=10)
        engine.submit(a)
        engine.submit(b)
        await asyncio.sleep(0)
        task_a = asyncio.create_task(_drain(a))
        await asyncio.sleep(0.001)
        assert engine.num_waiting == 1  # b waits for a's KV
        await task_a
        await _drain(b)
        assert engine.num_waiting == 0
    finally:
        await engine.stop()


@run
async def test_decoder_keeps_conversation_kv_for_the_next_turn() -> None:
    engine = _engine(Role.DECODE, scale=0.01)
    engine.start()
    try:
        first = SimRequest("t1", prompt_tokens=2000, max_tokens=50, conversation_id="c")
        engine.submit(first)
        await _drain(first)
        assert engine.cached_tokens_of("c") == 2050
        second = SimRequest("t2", prompt_tokens=2100, max_tokens=5, conversation_id="c")
        engine.submit(second)
        await _drain(second)
        assert second.cached_tokens == 2050
        assert engine.stats.conversation_turns["c"] == 2
    finally:
        await engine.stop()


@run
async def test_host_kv_tier_offloads_evicted_kv_and_reloads_it_over_pcie() -> None:
    # GPU room for one conversation: b's admission evicts a's KV, which goes to host memory (not dropped); a's
    # next turn reloads it over PCIe and prefills only its new tokens. Without a host tier, a prefills again.
    for host, reloaded in ((10_000, True), (0, False)):
        engine = Engine(
            role=Role.DECODE,
            device=Device(CATALOG["H100"]),
            model=MODEL,
            kv_capacity_tokens=5_000,
            link=LINKS["rdma"],
            time_scale=0.01,
            host_kv_capacity_tokens=host,
        )
        engine.start()
        try:
            for rid, conv, prompt in (("a1", "a", 3000), ("b1", "b", 3000), ("a2", "a", 3100)):
                req = SimRequest(rid, prompt_tokens=prompt, max_tokens=20, conversation_id=conv)
                engine.submit(req)
                await _drain(req)
            assert (req.cached_tokens == 3020) is reloaded
            assert (engine.stats.kv_reloads_total, engine.stats.kv_reload_tokens_total) == (
                (1, 3020) if reloaded else (0, 0)
            )
            assert engine.stats.kv_offloads_total == (2 if reloaded else 0)  # a, then b for a's second turn
            assert engine.host_kv_tokens <= host
        finally:
            await engine.stop()


async def _sse_tokens(resp: aiohttp.ClientResponse) -> tuple[int, dict[str, Any] | None]:
    text, usage = "", None
    async for raw in resp.content:
        line = raw.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                text += c.get("delta", {}).get("content", "")
    return estimate_tokens(text), usage


@run
async def test_disaggregated_prefill_protocol_and_metrics() -> None:
    prefill = GpuSimServer(GpuSimConfig(role=Role.PREFILL, gpu="NVIDIA-H100-80GB-HBM3", port=0, time_scale=0.01))
    decode = GpuSimServer(GpuSimConfig(role=Role.DECODE, gpu="H200", port=0, time_scale=0.01, name="dec-0"))
    pport, dport = await prefill.start(), await decode.start()
    try:
        async with aiohttp.ClientSession() as http:
            messages = [{"role": "user", "content": filler_text(3000)}]
            body: dict[str, Any] = {
                "model": "llama-3-8b",
                "messages": messages,
                "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True},
            }
            async with http.post(f"http://127.0.0.1:{pport}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                data = await resp.json()
            params = data["kv_transfer_params"]
            assert params["do_remote_prefill"] is True
            assert params["remote_port"] == pport
            assert data["usage"]["prompt_tokens"] == 3000
            body = {
                "model": "llama-3-8b",
                "messages": messages,
                "max_tokens": 30,
                "stream": True,
                "stream_options": {"include_usage": True},
                "kv_transfer_params": params,
            }
            headers = {"X-Conversation-Id": "c1"}
            async with http.post(f"http://127.0.0.1:{dport}/v1/chat/completions", json=body, headers=headers) as resp:
                assert resp.headers["X-Conserve-Server"] == "dec-0"
                tokens, usage = await _sse_tokens(resp)
            assert tokens == 30
            assert usage is not None
            assert usage["completion_tokens"] == 30
            async with http.get(f"http://127.0.0.1:{dport}/metrics") as resp:
                metrics = await resp.text()
            async with http.get(f"http://127.0.0.1:{dport}/conserve/stats") as resp:
                stats = await resp.json()
    finally:
        await prefill.stop()
        await decode.stop()
    assert stats["kvTransfersReceived"] == 1
    assert stats["conversationTurns"] == {"c1": 1}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        'conserve_gpusim_power_watts{gpu="H200",role="decode"}',
        "conserve_gpusim_energy_joules_total",
    ):
        assert name in metrics, name
    assert 'vllm:generation_tokens_total{engine="0",model_name="llama-3-8b"} 30.0' in metrics
    # The decoder computed none of the prompt: all of it arrived by transfer, as a real vLLM consumer reports it.
    by_source = 'vllm:prompt_tokens_by_source_total{engine="0",model_name="llama-3-8b",source="%s"}'
    assert by_source % "external_kv_transfer" + " 3000.0" in metrics
    assert by_source % "local_compute" + " 0.0" in metrics


def _pod(**overrides: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"namespace": "ns", "name": "dec-0", "uid": "u1", "labels": {"conserve.dev/role": "decode"}},
        "spec": {"nodeName": "kwok-h200-0", "containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
        "status": {"phase": "Running"},
    }
    pod.update(overrides)
    return pod


def test_pod_view_and_which_pods_get_a_simulator() -> None:
    view = view_pod(_pod())
    assert view.role is Role.DECODE
    assert view.gpu_count == 2
    assert view.node == "kwok-h200-0"
    kwok = {"kwok.x-k8s.io/node": "fake"}
    assert wants_server(view, kwok, any_node=False)
    assert not wants_server(view, {}, any_node=False)
    assert wants_server(view, {}, any_node=True)
    unbound = view_pod(_pod(spec={"containers": []}))
    assert not wants_server(unbound, kwok, any_node=True)
    assert unbound.gpu_count == 1
    gone = view_pod(
        _pod(
            metadata={
                "name": "x",
                "uid": "u",
                "labels": {"conserve.dev/role": "prefill"},
                "deletionTimestamp": "2026-01-01T00:00:00Z",
            }
        )
    )
    assert gone.role is Role.PREFILL
    assert not wants_server(gone, kwok, any_node=False)
    assert view_pod(_pod(metadata={"labels": {"conserve.dev/role": "other"}})).role is None
