"""The router end to end over loopback: real gpu-sim servers, a fake control plane (no Kubernetes here)."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from conserve.core.tokens import filler_text
from conserve.gpusim.engine import Role
from conserve.gpusim.server import GpuSimConfig, GpuSimServer
from conserve.metrics import RouterMetrics
from conserve.router.app import build_app
from conserve.router.control import _Waiters
from conserve.router.policy import Backend, Placement
from conserve.router.service import Router, RouterConfig
from conserve.testkit.metrics import fresh_registry

SCALE = 0.005  # 200x faster than the modelled GPUs


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(fn)
    def wrapper() -> None:
        asyncio.run(fn())

    return wrapper


class FakeControlPlane:
    """Places each new conversation on the decoder with the fewest conversations; records usage patches."""

    def __init__(self, prefills: list[Backend], decoders: list[Backend]) -> None:
        self.prefills, self.decoders = prefills, decoders
        self.placements: dict[str, Placement] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self._waiters = _Waiters()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def create_conversation(self, name: str, spec: dict[str, Any]) -> None:
        self.specs[name] = spec

        def place() -> None:
            counts = {d.endpoint: 0 for d in self.decoders}
            for p in self.placements.values():
                counts[p.decoder.endpoint] = counts.get(p.decoder.endpoint, 0) + 1
            decoder = min(self.decoders, key=lambda d: (counts[d.endpoint], d.name))
            self.placements[name] = Placement(1, decoder, self.prefills[0] if self.prefills else None)
            self._waiters.offer(name, self.placements[name], None)

        asyncio.get_running_loop().call_later(0.01, place)  # the operator's latency

    def move(self, name: str, decoder: Backend) -> None:
        old = self.placements[name]
        self.placements[name] = Placement(old.generation + 1, decoder, old.prefill)
        self._waiters.offer(name, self.placements[name], None)

    def placement(self, name: str) -> Placement | None:
        return self.placements.get(name)

    async def wait_placement(self, name: str, *, newer_than: int | None, timeout_s: float) -> Placement:
        fut = self._waiters.add(name, newer_than)
        self._waiters.offer(name, self.placements.get(name), None)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiters.remove(name, fut)

    async def patch_conversation(self, name: str, patch: dict[str, Any]) -> None:
        self.patches.append((name, patch))

    def pool_backends(self, pool: str) -> tuple[list[Backend], list[Backend]]:
        return list(self.prefills), list(self.decoders)


class Harness:
    def __init__(self) -> None:
        self.servers: dict[str, GpuSimServer] = {}
        self.registry = fresh_registry()
        self.metrics = RouterMetrics.on(self.registry)

    async def __aenter__(self) -> Harness:
        backends: dict[str, list[Backend]] = {"prefill": [], "decode": []}
        for name, role, gpu in [
            ("pre-0", Role.PREFILL, "H100"),
            ("dec-0", Role.DECODE, "H200"),
            ("dec-1", Role.DECODE, "H200"),
        ]:
            server = GpuSimServer(GpuSimConfig(role=role, gpu=gpu, port=0, time_scale=SCALE, name=name))
            port = await server.start()
            self.servers[name] = server
            backends["prefill" if role is Role.PREFILL else "decode"].append(Backend(name, f"127.0.0.1:{port}"))
        self.control = FakeControlPlane(backends["prefill"], backends["decode"])
        self.router = Router(RouterConfig(usage_interval_s=0.05), self.control, self.metrics)
        self.runner = web.AppRunner(build_app(self.router, self.registry))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        await self.runner.cleanup()
        for s in self.servers.values():
            await s.stop()

    async def chat(
        self,
        conv: str | None,
        messages: list[dict[str, str]],
        *,
        stream: bool = True,
        max_tokens: int = 8,
        headers: dict[str, str] | None = None,
    ) -> tuple[dict[str, str], str]:
        h = dict(headers or {})
        if conv is not None:
            h["X-Conversation-Id"] = conv
        body = {"model": "llama-3-8b", "messages": messages, "max_tokens": max_tokens, "stream": stream}
        async with self.http.post(f"{self.url}/v1/chat/completions", json=body, headers=h) as resp:
            assert resp.status == 200, await resp.text()
            if not stream:
                return dict(resp.headers), (await resp.json())["choices"][0]["message"]["content"]
            text = ""
            async for raw in resp.content:
                line = raw.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content", "")
            return dict(resp.headers), text

    def turns_served(self, server: str) -> dict[str, int]:
        return dict(self.servers[server].engine.stats.conversation_turns)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def _conversation(
    h: Harness, conv: str, turns: int, *, mode: str = "conversation", end: bool = True
) -> list[str]:
    messages = [{"role": "user", "content": filler_text(1500)}]
    decoders = []
    for i in range(turns):
        headers = {"X-Conserve-Routing": mode}
        if end and i == turns - 1:
            headers["X-Conversation-End"] = "true"
        got, text = await h.chat(conv, messages, stream=i % 2 == 0, headers=headers)
        decoders.append(got["X-Conserve-Decoder"])
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(40)}]
    return decoders


@run
async def test_every_turn_reaches_the_pinned_decoder_and_kv_moves_once() -> None:
    async with Harness() as h:
        decoders_a, decoders_b = await asyncio.gather(_conversation(h, "a", 4), _conversation(h, "b", 3))
        await h.router.flush(force=True)
        assert len(set(decoders_a)) == 1
        assert len(set(decoders_b)) == 1
        assert decoders_a[0] != decoders_b[0]
        assert h.turns_served(decoders_a[0]).get("a") == 4
        received = sum(s.engine.stats.kv_transfers_received_total for s in h.servers.values())
        assert received == 2  # one per conversation
        assert h.sample("conserve_router_kv_transfers_total", mode="conversation") == 2
        # Later turns prefilled only their new tokens on the decoder.
        assert h.servers[decoders_a[0]].engine.stats.prefix_cache_hit_tokens_total > 0
        assert h.sample("conserve_router_time_to_first_effective_token_seconds_count", mode="conversation") == 2
        assert h.sample("conserve_router_time_to_first_token_seconds_count", mode="conversation") == 7
        name_a = next(n for n, s in h.control.specs.items() if "-a-" in n)
        assert h.control.specs[name_a]["firstTurnInputTokens"] == 1500
        final = [p for n, p in h.control.patches if n == name_a][-1]["spec"]
        assert final["completed"] is True
        assert final["usage"]["turns"] == 4
        assert final["usage"]["outputTokens"] == 32
        assert final["usage"]["inputTokens"] == 1500 + 3 * 40
        assert final["usage"]["timeToFirstEffectiveTokenSeconds"] > 0
        # Batched: fewer patches than turns.
        assert len([1 for n, _ in h.control.patches if n == name_a]) < 4 + 1
        # The placement wait is measured once per conversation, in its three parts.
        for part in ("total", "create", "exposed"):
            assert h.sample("conserve_router_placement_wait_seconds_count", part=part) == 2
        total = h.sample("conserve_router_placement_wait_seconds_sum", part="total")
        assert total >= h.sample("conserve_router_placement_wait_seconds_sum", part="exposed")


@run
async def test_a_re_placed_conversation_follows_the_new_decoder() -> None:
    async with Harness() as h:
        messages = [{"role": "user", "content": filler_text(800)}]
        got, text = await h.chat("m", messages)
        first = got["X-Conserve-Decoder"]
        other = next(d for d in h.control.decoders if d.name != first)
        name = next(iter(h.control.specs))
        # The decoder dies; the operator re-places a moment later.
        await h.servers[first].stop()
        h.control.decoders = [other]
        asyncio.get_running_loop().call_later(0.05, h.control.move, name, other)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(30)}]
        got, _ = await h.chat("m", messages)
        assert got["X-Conserve-Decoder"] == other.name
        assert got["X-Conserve-Placement-Generation"] == "2"
        assert h.servers[other.name].engine.stats.kv_transfers_received_total == 1  # the move
        got, _ = await h.chat("m", [*messages, {"role": "user", "content": "more"}])
        assert got["X-Conserve-Decoder"] == other.name
        assert h.sample("conserve_router_kv_transfers_total", mode="conversation") == 2


@run
async def test_per_turn_mode_moves_kv_every_turn_and_creates_no_conversation() -> None:
    async with Harness() as h:
        await _conversation(h, "p", 3, mode="per-turn")
        got, _ = await h.chat(None, [{"role": "user", "content": "hello"}], stream=False)  # no id: one turn
        assert got["X-Conserve-Decoder"].startswith("dec-")
        assert h.control.specs == {}
        assert h.sample("conserve_router_kv_transfers_total", mode="per-turn") == 4
        assert h.sample("conserve_router_time_to_first_effective_token_seconds_count", mode="per-turn") == 1
