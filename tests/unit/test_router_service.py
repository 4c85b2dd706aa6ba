"""The router end to end over loopback: real gpu-sim servers, a fake control plane (no Kubernetes here)."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from conserve.core.pd import PdRule, PdSettings
from conserve.core.slo import SloClass, SloPolicy
from conserve.core.tokens import filler_text
from conserve.exposition import EngineLoad
from conserve.gpusim.engine import Role
from conserve.gpusim.server import GpuSimConfig, GpuSimServer
from conserve.metrics import RouterMetrics
from conserve.router.app import build_app
from conserve.router.control import _Waiters, pd_settings_of
from conserve.router.policy import Backend, Placement, conversation_object_name
from conserve.router.service import Router, RouterConfig
from conserve.testkit import PoolBuilder
from conserve.testkit.metrics import fresh_registry

SCALE = 0.005  # 200x faster than the modelled GPUs
SITES = "conserve_router_prefill_site_turns_total"
SITE_KEYS = [("pool", "first"), ("pool", "later"), ("decoder", "first"), ("decoder", "later")]


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(fn)
    def wrapper() -> None:
        asyncio.run(fn())

    return wrapper


class FakeControlPlane:
    """Places each new conversation on the decoder with the fewest conversations; records usage patches.

    With `room` set, at most that many conversations are placed at once: the rest wait (NoCapacity) until `free`
    makes room, and with `refuse_after_s` set the "operator" refuses a waiting one that long after its creation
    (QueueWaitExceeded: phase Failed; the object stays until the router deletes it)."""

    def __init__(self, prefills: list[Backend], decoders: list[Backend]) -> None:
        self.prefills, self.decoders = prefills, decoders
        self.placements: dict[str, Placement] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.room: int | None = None
        self.reject = False  # whenFull: Reject
        self.problem: tuple[str, str] | None = None  # why nothing is placed at all (PoolNotFound, ...)
        self.refuse_after_s: float | None = None
        self.max_queue_wait_s: float | None = None
        self.waiting: dict[str, tuple[str, str]] = {}
        self.failed: dict[str, tuple[str, str]] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.ended_names: set[str] = set()  # Completed by the "operator" (its idle timeout)
        # The pool's decider settings: the defaults, with llama-3-8b's KV per token (a KV transfer takes time).
        self.pd_settings = pd_settings_of(PoolBuilder("default").build()["spec"])
        self.slo: SloPolicy | None = None  # the pool's spec.slo
        self._waiters = _Waiters()

    def status(self, name: str) -> None:
        return None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def create_conversation(self, name: str, spec: dict[str, Any], owner: str = "") -> None:
        if name in self.failed or name in self.waiting or name in self.placements or name in self.ended_names:
            return  # already there: the API server says Conflict, which the router takes as fine
        self.specs[name] = spec
        self.created.append(name)
        asyncio.get_running_loop().call_later(0.01, self._admit, name)  # the operator's latency

    def _admit(self, name: str) -> None:
        if self.problem is not None:
            self.waiting[name] = self.problem
            return
        if self.room is not None and len(self.placements) >= self.room:
            full = ("NoCapacity", "no decoder has room for 3000 KV tokens")
            if self.reject:
                self.failed[name] = full
                self._waiters.offer(name, None, full)
                return
            self.waiting[name] = full
            if self.refuse_after_s is not None:
                asyncio.get_running_loop().call_later(self.refuse_after_s, self._refuse, name)
            return
        self.waiting.pop(name, None)
        counts = {d.endpoint: 0 for d in self.decoders}
        for p in self.placements.values():
            counts[p.decoder.endpoint] = counts.get(p.decoder.endpoint, 0) + 1
        decoder = min(self.decoders, key=lambda d: (counts[d.endpoint], d.name))
        self.placements[name] = Placement(1, decoder, self.prefills[0] if self.prefills else None)
        self._waiters.offer(name, self.placements[name], None)

    def _refuse(self, name: str) -> None:
        waiting = self.waiting.pop(name, None)
        if waiting is not None:
            detail = f"waited 1 s in the queue of pool default, over its limit of 1 s ({waiting[0]}: {waiting[1]})"
            self.failed[name] = ("QueueWaitExceeded", detail)
            self._waiters.offer(name, None, self.failed[name])

    def free(self, name: str) -> None:
        """A conversation ends: its room goes to the first waiting one."""
        self.placements.pop(name, None)
        for waiting in list(self.waiting)[:1]:
            self._admit(waiting)

    def time_out(self, name: str) -> None:
        """The operator's sweep ends a conversation idle past its timeout: Completed, no placement."""
        self.placements.pop(name, None)
        self.ended_names.add(name)

    async def delete_conversation(self, name: str) -> None:
        self.deleted.append(name)
        self.ended_names.discard(name)
        for known in (self.failed, self.waiting, self.placements):
            known.pop(name, None)

    def waiting_reason(self, name: str) -> tuple[str, str] | None:
        return self.waiting.get(name)

    def pool_max_queue_wait_s(self, pool: str) -> float | None:
        return self.max_queue_wait_s

    def pool_idle_timeout_s(self, pool: str) -> float | None:
        return None

    def pool_pd_settings(self, pool: str) -> PdSettings:
        return self.pd_settings

    def pool_slo(self, pool: str) -> SloPolicy | None:
        return self.slo

    def ended(self, name: str) -> bool:
        return name in self.ended_names

    def owner(self, name: str) -> str | None:
        return None

    def move(self, name: str, decoder: Backend) -> None:
        old = self.placements[name]
        self.placements[name] = Placement(old.generation + 1, decoder, old.prefill)
        self._waiters.offer(name, self.placements[name], None)

    def placement(self, name: str) -> Placement | None:
        return self.placements.get(name)

    async def wait_placement(self, name: str, *, newer_than: int | None, timeout_s: float) -> Placement:
        fut = self._waiters.add(name, newer_than)
        self._waiters.offer(name, self.placements.get(name), self.failed.get(name))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiters.remove(name, fut)

    async def patch_conversation(self, name: str, patch: dict[str, Any]) -> None:
        self.patches.append((name, patch))

    def pool_backends(self, pool: str) -> tuple[list[Backend], list[Backend]]:
        return list(self.prefills), list(self.decoders)


class Harness:
    def __init__(self, config: RouterConfig | None = None) -> None:
        self.servers: dict[str, GpuSimServer] = {}
        self.registry = fresh_registry()
        self.metrics = RouterMetrics.on(self.registry)
        # No background scrape: the tests hand the router the readings they mean (`Router.scrape` reads for real).
        self.config = config or RouterConfig(usage_interval_s=0.05, scrape_interval_s=0)

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
        self.router = Router(self.config, self.control, self.metrics)
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

    async def refused(self, conv: str, *, stream: bool) -> tuple[int, dict[str, str], dict[str, Any]]:
        """A turn expected to get no decoder: its status, headers and JSON error."""
        body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": filler_text(1500)}], "stream": stream}
        headers = {"X-Conversation-Id": conv}
        async with self.http.post(f"{self.url}/v1/chat/completions", json=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.json()

    def turns_served(self, server: str) -> dict[str, int]:
        return dict(self.servers[server].engine.stats.conversation_turns)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def _conversation(
    h: Harness,
    conv: str,
    turns: int,
    *,
    mode: str = "conversation",
    end: bool = True,
    headers: dict[str, str] | None = None,
) -> list[str]:
    messages = [{"role": "user", "content": filler_text(1500)}]
    decoders = []
    extra = headers or {}
    for i in range(turns):
        headers = {"X-Conserve-Routing": mode, **extra}
        if end and i == turns - 1:
            headers["X-Conversation-End"] = "true"
        got, text = await h.chat(conv, messages, stream=i % 2 == 0, headers=headers)
        decoders.append(got["X-Conserve-Decoder"])
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(40)}]
    return decoders


@run
async def test_every_turn_reaches_the_pinned_decoder_and_kv_moves_once() -> None:
    async with Harness() as h:
        # The Decoder rule (first turns on the pool, later turns on the decoder): the routing is what is tested;
        # under Auto these idle decoders, as fast as the prefill server, would prefill the first turns themselves.
        h.control.pd_settings = PdSettings(rule=PdRule.DECODER)
        decoders_a, decoders_b = await asyncio.gather(_conversation(h, "a", 4), _conversation(h, "b", 3))
        await h.router.flush(force=True)
        assert len(set(decoders_a)) == 1
        assert len(set(decoders_b)) == 1
        assert decoders_a[0] != decoders_b[0]
        assert h.turns_served(decoders_a[0]).get("a") == 4
        received = sum(s.engine.stats.kv_transfers_received_total for s in h.servers.values())
        assert received == 2  # one per conversation
        assert h.sample("conserve_router_kv_transfers_total", mode="conversation") == 2
        # Later turns prefilled only their new tokens on the decoder; the first turns went to the prefill server.
        assert h.servers[decoders_a[0]].engine.stats.prefix_cache_hit_tokens_total > 0
        sites = {(site, turn): h.sample(SITES, mode="conversation", site=site, turn=turn) for site, turn in SITE_KEYS}
        assert sites == {("pool", "first"): 2, ("pool", "later"): 0, ("decoder", "first"): 0, ("decoder", "later"): 5}
        assert h.sample("conserve_router_time_to_first_effective_token_seconds_count", mode="conversation") == 2
        assert h.sample("conserve_router_time_to_first_token_seconds_count", mode="conversation") == 7
        name_a = next(n for n, s in h.control.specs.items() if "-a-" in n)
        assert h.control.specs[name_a]["firstTurnInputTokens"] == 1500
        final = [p for n, p in h.control.patches if n == name_a][-1]["spec"]
        assert final["completed"] is True
        assert final["usage"]["turns"] == 4
        assert final["usage"]["outputTokens"] == 32
        assert final["usage"]["inputTokens"] == 1500 + 3 * 40
        assert final["usage"]["poolPrefills"] == 1
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
        # The new decoder holds nothing of it: decided afresh. With every server idle and as fast as the prefill
        # server was seen to be, the KV transfer is the difference: the decoder prefills the whole context.
        assert got["X-Conserve-Prefill-Site"] == "decoder"
        assert h.servers[other.name].engine.stats.kv_transfers_received_total == 0
        assert h.servers[other.name].engine.stats.prompt_tokens_total >= 830
        got, _ = await h.chat("m", [*messages, {"role": "user", "content": "more"}])
        assert got["X-Conserve-Decoder"] == other.name
        assert got["X-Conserve-Prefill-Site"] == "decoder"
        # no KV moved at all: the first turn too was prefilled on its idle decoder (decided once placed)
        assert h.sample("conserve_router_kv_transfers_total", mode="conversation") == 0
        assert h.sample(SITES, mode="conversation", site="decoder", turn="first") == 1


@run
async def test_the_next_turn_of_a_conversation_ended_by_its_idle_timeout_starts_it_afresh() -> None:
    async with Harness() as h:
        h.control.pd_settings = PdSettings(rule=PdRule.DECODER)  # first turns on the pool: the restart is seen there
        messages = [{"role": "user", "content": filler_text(800)}]
        _, text = await h.chat("t", messages)
        name = next(iter(h.control.specs))
        h.control.time_out(name)  # the operator's sweep: no turn for the pool's idle timeout
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(30)}]
        got, _ = await h.chat("t", messages)  # served, not 503: a new placement for the whole context
        assert h.control.deleted == [name]
        assert h.control.created == [name, name]
        assert h.control.specs[name]["firstTurnInputTokens"] > 800
        assert got["X-Conserve-Placement-Generation"] == "1"
        # its KV moved once more: prefilled again on the prefill pool, as the simulator's afresh start does
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


@run
async def test_a_conversation_refused_after_its_queue_wait_gets_429_and_its_retry_queues_afresh() -> None:
    async with Harness() as h:
        h.control.room, h.control.refuse_after_s, h.control.max_queue_wait_s = 1, 0.2, 1.0
        await h.chat("first", [{"role": "user", "content": filler_text(1500)}])
        status, headers, body = await h.refused("second", stream=True)  # a streaming client gets no stream
        assert status == 429
        assert headers["Retry-After"] == "1"  # a quarter of the pool's 1 s limit, at least 1 s
        assert body["error"]["code"] == "QueueWaitExceeded"
        assert body["error"]["message"].startswith("conversation second waited 1 s in the queue of pool default")
        assert "NoCapacity" in body["error"]["message"]
        assert h.sample("conserve_router_unplaced_turns_total", status="429", reason="QueueWaitExceeded") == 1
        name = next(n for n in h.control.specs if "-second-" in n)
        # Room frees; the client's retry with the same id replaces the Failed object and is served.
        h.control.free(next(n for n in h.control.specs if "-first-" in n))
        got, text = await h.chat("second", [{"role": "user", "content": filler_text(1500)}])
        assert text
        assert h.control.deleted == [name]
        assert h.control.created.count(name) == 2
        assert got["X-Conserve-Placement-Generation"] == "1"


@run
async def test_a_refusal_at_once_is_429_and_a_wait_that_ends_while_queued_keeps_the_place() -> None:
    async with Harness(RouterConfig(usage_interval_s=0.05, placement_timeout_s=0.3)) as h:
        h.control.room = 0  # full; nothing refuses: the router's own wait (at most 0.3 s here) ends first
        status, headers, body = await h.refused("waits", stream=False)
        assert status == 429
        assert headers["Retry-After"] == "30"  # the pool's limit is unknown here: 120 s, a quarter, at most 30
        assert body["error"]["code"] == "NoCapacity"
        message = body["error"]["message"]
        assert message.startswith("conversation waits waited ")
        assert message.endswith(" s in the queue of pool default (NoCapacity: no decoder has room for 3000 KV tokens)")
        # The retry waits on the same object (its place in the queue kept) and is served when room frees.
        name = next(iter(h.control.specs))
        retry = asyncio.create_task(h.chat("waits", [{"role": "user", "content": filler_text(1500)}]))
        await asyncio.sleep(0.1)
        h.control.room = 1
        h.control.free("nobody")
        _, text = await retry
        assert text
        assert h.control.deleted == []
        assert h.control.created == [name]


@run
async def test_a_pool_that_rejects_when_full_is_429_at_once_and_a_missing_pool_is_503() -> None:
    async with Harness(RouterConfig(usage_interval_s=0.05, placement_timeout_s=0.3)) as h:
        h.control.room, h.control.reject, h.control.max_queue_wait_s = 0, True, 120.0
        status, headers, body = await h.refused("rejected", stream=True)
        assert (status, headers["Retry-After"], body["error"]["code"]) == (429, "30", "NoCapacity")
        assert body["error"]["message"] == (
            "conversation rejected refused by pool default (NoCapacity: no decoder has room for 3000 KV tokens)"
        )
        # A pool the operator cannot find is a fault, not a busy pool: 503, no Retry-After.
        h.control.reject, h.control.problem = False, ("PoolNotFound", "DecoderPool 'default' not found")
        status, headers, body = await h.refused("lost", stream=False)
        assert status == 503
        assert "Retry-After" not in headers
        assert body["error"]["message"].startswith("conversation lost not placed after ")
        assert body["error"]["message"].endswith(" s (PoolNotFound: DecoderPool 'default' not found)")


@run
async def test_a_short_first_turn_is_prefilled_on_its_decoder_with_no_early_prefill() -> None:
    async with Harness() as h:
        got, text = await h.chat("short", [{"role": "user", "content": filler_text(120)}])  # <= 256 tokens
        assert text
        assert got["X-Conserve-Prefill-Site"] == "decoder"
        assert "X-Conserve-Prefill" not in got
        assert h.servers["pre-0"].engine.stats.prompt_tokens_total == 0  # nothing started on the pool
        assert h.servers[got["X-Conserve-Decoder"]].engine.stats.kv_transfers_received_total == 0
        assert h.servers[got["X-Conserve-Decoder"]].engine.stats.prompt_tokens_total >= 120  # computed there
        assert h.sample("conserve_router_kv_transfers_total", mode="conversation") == 0
        assert h.sample(SITES, mode="conversation", site="decoder", turn="first") == 1


@run
async def test_where_a_later_turn_is_prefilled_follows_the_load_the_router_observes() -> None:
    async with Harness() as h:
        # Auto with no short-prompt shortcut, and a decoder's streams weighed heavily.
        h.control.pd_settings = PdSettings(decoder_max_tokens=0, stall_weight=100.0)
        messages = [{"role": "user", "content": filler_text(3000)}]
        for d in h.control.decoders:  # every decoder runs 16 streams: even the likely one would stall them
            h.router.signals.scraped(d.endpoint, EngineLoad(running=16))
        got, text = await h.chat("load", messages)
        assert got["X-Conserve-Prefill-Site"] == "pool"  # a long first turn, started before its placement
        decoder = h.servers[got["X-Conserve-Decoder"]]
        endpoint = next(d.endpoint for d in h.control.decoders if d.name == got["X-Conserve-Decoder"])
        prefill = h.servers["pre-0"].engine.stats
        sites = []
        for load in ("decoder busy", "pool flooded"):
            if load == "decoder busy":  # 16 streams decode there: a prefill there would stall each
                h.router.signals.scraped(endpoint, EngineLoad(running=16))
            else:  # the streams ended; the prefill server has a long queue of others' prompts
                h.router.signals.scraped(endpoint, EngineLoad(running=0))
                h.router.signals.scraped(h.control.prefills[0].endpoint, EngineLoad(running=1, waiting=100_000))
            before = (prefill.prompt_tokens_total, decoder.engine.stats.kv_transfers_received_total)
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": filler_text(300)}]
            got, text = await h.chat("load", messages)
            assert got["X-Conserve-Decoder"] == decoder.config.name
            sites.append(got["X-Conserve-Prefill-Site"])
            after = (prefill.prompt_tokens_total, decoder.engine.stats.kv_transfers_received_total)
            moved = (after[0] > before[0], after[1] - before[1])
            assert moved == ((True, 1) if sites[-1] == "pool" else (False, 0)), (load, sites)
        assert sites == ["pool", "decoder"]
        assert h.sample(SITES, mode="conversation", site="pool", turn="later") == 1
        assert h.sample(SITES, mode="conversation", site="decoder", turn="later") == 1


@run
async def test_the_scrape_reads_every_server_and_one_that_fails_keeps_its_last_reading() -> None:
    async with Harness() as h:
        assert await h.router.scrape() == 3
        observed = h.router.signals.snapshot()
        assert {e: (o["running"], o["waiting"]) for e, o in observed.items()} == {
            b.endpoint: (0, 0) for b in [*h.control.prefills, *h.control.decoders]
        }
        gone = next(d for d in h.control.decoders if d.name == "dec-1")
        h.router.signals.scraped(gone.endpoint, EngineLoad(running=7))
        await h.servers["dec-1"].stop()
        assert await h.router.scrape() == 2
        assert h.router.signals.snapshot()[gone.endpoint]["running"] == 7
        # The other servers serve turns as before.
        h.control.decoders = [d for d in h.control.decoders if d is not gone]
        got, text = await h.chat("after", [{"role": "user", "content": filler_text(900)}])
        assert text
        assert got["X-Conserve-Decoder"] == "dec-0"


@run
async def test_turns_are_judged_against_their_class_and_misses_reach_the_usage() -> None:
    """A pool with an SLO: the router names the conversation's class in its Conversation (from the first turn's
    X-Conserve-Slo-Class), judges every turn (a class whose TTFET target no turn can meet: every turn missed; the
    pool's own generous targets: met), counts them per class and reports the misses in spec.usage.sloMissedTurns."""
    async with Harness() as h:
        strict = SloClass("strict", 10, ttfet_s=1e-6, tbt_s=1e-7)
        h.control.slo = SloPolicy(ttfet_s=60.0, tbt_s=5.0, classes={"strict": strict})
        await _conversation(h, "s", 2, headers={"X-Conserve-Slo-Class": "strict"})
        await _conversation(h, "p", 2)
        await h.router.flush(force=True)
        assert h.control.specs[conversation_object_name("s")]["sloClass"] == "strict"
        assert "sloClass" not in h.control.specs[conversation_object_name("p")]
        counted = "conserve_router_slo_turns_total"
        assert h.sample(counted, pool="default", slo_class="strict", outcome="missed") == 2
        assert h.sample(counted, pool="default", slo_class="", outcome="met") == 2
        usage = {name: p["spec"]["usage"] for name, p in h.control.patches if "usage" in p.get("spec", {})}
        assert usage[conversation_object_name("s")]["sloMissedTurns"] == 2
        assert "sloMissedTurns" not in usage[conversation_object_name("p")]  # none missed


@run
async def test_a_class_name_that_is_not_a_dns_label_is_refused_naming_the_header() -> None:
    async with Harness() as h:
        body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"X-Conversation-Id": "bad", "X-Conserve-Slo-Class": "Gold Tier!"}
        async with h.http.post(f"{h.url}/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status == 400
            assert "X-Conserve-Slo-Class" in (await resp.json())["error"]["message"]
        assert h.control.created == []  # nothing was created for it
