"""A continuous-batching engine paced by the roofline model of conserve.core.perf.

One asyncio task plays the scheduler loop of a vLLM server on one GPU (or a tensor-parallel group):
- admission is FIFO (head-of-line blocking, like vLLM): a request is admitted when its KV (prompt plus
  max_tokens, reserved up front so nothing is ever preempted) fits next to the running ones and the prefix
  cache; idle prefix-cache entries are evicted least recently used first to make room;
- every iteration runs a chunk of prefill (up to `prefill_chunk_tokens`, chunked prefill) plus one decode step
  of every running sequence; its modelled duration is prefill_cost + decode_step_time_s;
- a decode request that carries a prefill server's `kv_transfer_params` first pulls the KV (the modelled
  transfer time over `link`, asynchronously, as NIXL does) and skips its prefill;
- a decode server keeps each finished conversation's KV as a prefix cache entry (keyed by conversation id), so
  the next turn on the same decoder prefills only its new tokens. A prefill server frees KV after handing it off.
- host KV tier (`host_kv_capacity_tokens`, 0: none), as vLLM's OffloadingConnector (`--kv-offloading-size`) or
  LMCache's CPU backend keep it: an entry evicted from GPU memory is offloaded to host memory (least recently
  used entries there are dropped when it is full); a turn whose KV is in host memory reloads it over PCIe
  (`pcie_transfer_time_s`, asynchronously like a KV pull) instead of prefilling it again. The offload copy
  itself costs no GPU time (the write-back is asynchronous after the turn).

Time: the engine advances a modelled clock; real time = modelled time x `time_scale` (0.1 runs ten times faster
than the modelled GPU). Energy is integrated over modelled time (joules the modelled GPU would draw).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from conserve.core.llm import ModelShape
from conserve.core.offload import pcie_transfer_time_s
from conserve.core.perf import (
    PREFILL_ACTIVITY,
    Device,
    Link,
    decode_step_activity,
    decode_step_time_s,
    kv_transfer_time_s,
    power_w,
    prefill_cost,
)

#: vLLM's default KV block size in tokens (the unit of `remote_block_ids`).
BLOCK_TOKENS = 16


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"  # an aggregated server: prefill and decode on the same GPU


class RequestRejected(Exception):
    """The request can never fit this server's KV capacity."""


@dataclass
class TokenEvent:
    """`tokens` new output tokens; `finished` on the last event (with the finish reason)."""

    tokens: int
    finished: bool = False


@dataclass
class SimRequest:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    conversation_id: str | None = None
    #: Prompt tokens whose KV comes from a prefill server (0: prefill here).
    remote_kv_tokens: int = 0
    events: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)
    # Engine state.
    reserved_kv_tokens: int = 0
    computed_tokens: int = 0  # prompt tokens whose KV is present (cached, pulled or prefilled)
    cached_tokens: int = 0  # of which reused from the local prefix cache
    generated_tokens: int = 0
    ready: bool = True  # False while its KV is being pulled
    pending_tokens: int = 0  # generated but not yet flushed to `events` (stream interval)
    steps_since_flush: int = 0

    @property
    def prefill_done(self) -> bool:
        return self.computed_tokens >= self.prompt_tokens


@dataclass
class EngineStats:
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_finished_total: int = 0
    requests_rejected_total: int = 0
    requests_aborted_total: int = 0  # running when their client went away
    prefix_cache_hit_tokens_total: int = 0
    kv_transfers_received_total: int = 0
    kv_transfer_tokens_received_total: int = 0
    #: Prompt tokens whose KV is to come from a prefill server, counted on admission (as vLLM counts them).
    external_kv_prompt_tokens_total: int = 0
    kv_offloads_total: int = 0  # GPU prefix-cache entries moved to host memory
    kv_offload_tokens_total: int = 0
    kv_reloads_total: int = 0  # host entries brought back for a turn
    kv_reload_tokens_total: int = 0
    kv_host_drops_total: int = 0  # host entries dropped for room (their next turn prefills again)
    energy_j: float = 0.0
    power_w: float = 0.0
    busy_modelled_s: float = 0.0
    #: Output turns served per conversation id (for tests and debugging; bounded by the cache below).
    conversation_turns: OrderedDict[str, int] = field(default_factory=OrderedDict)


MAX_TRACKED_CONVERSATIONS = 100_000


class Engine:
    def __init__(
        self,
        *,
        role: Role,
        device: Device,
        model: ModelShape,
        kv_capacity_tokens: int,
        link: Link,
        time_scale: float = 1.0,
        max_batch: int = 256,
        prefill_chunk_tokens: int = 8192,
        stream_interval: int = 1,
        clock: Callable[[], float] = time.monotonic,
        host_kv_capacity_tokens: int = 0,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.role = role
        self.device = device
        self.model = model
        self.kv_capacity_tokens = kv_capacity_tokens
        self.link = link
        self.time_scale = time_scale
        self.max_batch = max_batch
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.stream_interval = max(stream_interval, 1)
        self.stats = EngineStats(power_w=power_w(device, 0.0))
        self._clock = clock
        self._waiting: deque[SimRequest] = deque()
        self._running: list[SimRequest] = []
        self._prefix_cache: OrderedDict[str, int] = OrderedDict()  # conversation id -> cached tokens
        self.host_kv_capacity_tokens = max(host_kv_capacity_tokens, 0)
        self._host_cache: OrderedDict[str, int] = OrderedDict()  # offloaded KV in host memory (LRU)
        self._wake = asyncio.Event()
        self._next_real_s = clock()
        self._last_energy_real_s = clock()
        self._task: asyncio.Task[None] | None = None
        self._in_step = False
        self._transfers: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()

    # ---- observed state -------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running_kv_tokens(self) -> int:
        return sum(r.reserved_kv_tokens for r in self._running)

    @property
    def used_kv_tokens(self) -> int:
        return self.running_kv_tokens + sum(self._prefix_cache.values())

    @property
    def kv_usage_fraction(self) -> float:
        """What vLLM reports as `kv_cache_usage_perc`: the KV of running requests only. vLLM's block pool counts
        a finished request's blocks as free even while they stay cached for a prefix hit (they are evicted
        lazily), so a conversation's KV kept for its next turn is not usage; counting it made every decoder look
        full to the operator's observed-occupancy fold once the caches had filled."""
        if self.kv_capacity_tokens <= 0:
            return 0.0
        return min(self.running_kv_tokens / self.kv_capacity_tokens, 1.0)

    def cached_tokens_of(self, conversation_id: str) -> int:
        return self._prefix_cache.get(conversation_id, 0)

    def host_tokens_of(self, conversation_id: str) -> int:
        return self._host_cache.get(conversation_id, 0)

    @property
    def host_kv_tokens(self) -> int:
        return sum(self._host_cache.values())

    def _offload(self, conversation_id: str, tokens: int) -> None:
        """A GPU entry leaves for host memory (oldest host entries dropped to make room), if it can fit at all."""
        if tokens > self.host_kv_capacity_tokens:
            return
        self._host_cache.pop(conversation_id, None)
        while self.host_kv_tokens + tokens > self.host_kv_capacity_tokens and self._host_cache:
            self._host_cache.popitem(last=False)
            self.stats.kv_host_drops_total += 1
        self._host_cache[conversation_id] = tokens
        self.stats.kv_offloads_total += 1
        self.stats.kv_offload_tokens_total += tokens

    def next_request_id(self) -> str:
        return f"{self.role.value}-{next(self._ids)}"

    def energy_j_now(self) -> float:
        """Energy so far, counting idle draw up to now."""
        self._account_idle()
        return self.stats.energy_j

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"gpusim-engine-{self.role}")

    async def stop(self) -> None:
        for t in [self._task, *self._transfers]:
            if t is not None:
                t.cancel()
        for t in [self._task, *self._transfers]:
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        self._task = None

    def submit(self, request: SimRequest) -> None:
        """Queue a request; its tokens arrive on `request.events`. Raises RequestRejected if it can never fit."""
        request.max_tokens = max(request.max_tokens, 1)
        need = request.prompt_tokens + request.max_tokens
        if need > self.kv_capacity_tokens:
            self.stats.requests_rejected_total += 1
            raise RequestRejected(
                f"request needs {need} KV tokens, more than this server's capacity of {self.kv_capacity_tokens}"
            )
        self._waiting.append(request)
        self._wake.set()

    def abort(self, request: SimRequest) -> None:
        """Drop a request whose client went away (vLLM aborts it): it stops generating and frees its KV."""
        if request in self._waiting:
            self._waiting.remove(request)
        elif request in self._running:
            self._running.remove(request)
            self.stats.requests_aborted_total += 1
        self._wake.set()

    # ---- the scheduler loop ---------------------------------------------------------------------------------
    def _account_idle(self) -> None:
        """Idle draw between iterations: energy at idle power over the modelled time that passed."""
        if self._in_step:
            return
        now = self._clock()
        if now > self._last_energy_real_s:
            idle_s = (now - self._last_energy_real_s) / self.time_scale
            self.stats.energy_j += self.device.idle_power_w * idle_s
            self.stats.power_w = self.device.idle_power_w
        self._last_energy_real_s = max(now, self._last_energy_real_s)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            req = self._waiting[0]
            reuse = 0
            if req.conversation_id is not None and req.remote_kv_tokens == 0:
                reuse = min(self._prefix_cache.get(req.conversation_id, 0), max(req.prompt_tokens - 1, 0))
            need = req.prompt_tokens + req.max_tokens
            own_cache = self._prefix_cache.get(req.conversation_id, 0) if req.conversation_id else 0
            free = self.kv_capacity_tokens - self.used_kv_tokens + own_cache
            # Evict idle conversations' KV, least recently used first, to make room.
            while free < need:
                victim = next((c for c in self._prefix_cache if c != req.conversation_id), None)
                if victim is None:
                    break
                size = self._prefix_cache.pop(victim)
                free += size
                self._offload(victim, size)
            if free < need:
                return  # head-of-line blocking, as vLLM's FCFS scheduler
            self._waiting.popleft()
            reload = 0
            if req.conversation_id is not None:
                self._prefix_cache.pop(req.conversation_id, None)
                host = self._host_cache.pop(req.conversation_id, 0)
                if reuse == 0 and req.remote_kv_tokens == 0 and host:
                    reload = min(host, max(req.prompt_tokens - 1, 0))
            req.reserved_kv_tokens = need
            req.cached_tokens = reuse
            req.computed_tokens = reuse
            self.stats.prefix_cache_hit_tokens_total += reuse
            self.stats.prompt_tokens_total += req.prompt_tokens
            self.stats.external_kv_prompt_tokens_total += min(req.remote_kv_tokens, req.prompt_tokens)
            self._running.append(req)
            if reload > 0:
                req.ready = False
                task = asyncio.get_running_loop().create_task(self._reload_kv(req, reload))
                self._transfers.add(task)
                task.add_done_callback(self._transfers.discard)
            elif req.remote_kv_tokens > 0:
                req.ready = False
                task = asyncio.get_running_loop().create_task(self._pull_kv(req))
                self._transfers.add(task)
                task.add_done_callback(self._transfers.discard)

    async def _pull_kv(self, req: SimRequest) -> None:
        tokens = min(req.remote_kv_tokens, req.prompt_tokens)
        await asyncio.sleep(kv_transfer_time_s(self.model, tokens, self.link) * self.time_scale)
        req.computed_tokens = max(req.computed_tokens, tokens)
        req.ready = True
        self.stats.kv_transfers_received_total += 1
        self.stats.kv_transfer_tokens_received_total += tokens
        self._wake.set()

    async def _reload_kv(self, req: SimRequest, tokens: int) -> None:
        """Host memory to GPU over PCIe; the reloaded prefix then counts as cached."""
        await asyncio.sleep(pcie_transfer_time_s(self.model, tokens) * self.time_scale)
        req.computed_tokens = max(req.computed_tokens, tokens)
        req.cached_tokens = max(req.cached_tokens, tokens)
        req.ready = True
        self.stats.kv_reloads_total += 1
        self.stats.kv_reload_tokens_total += tokens
        self._wake.set()

    def _plan_step(self) -> tuple[list[tuple[SimRequest, int]], list[SimRequest]]:
        """(prefill chunks, decoding sequences) of the next iteration."""
        budget = self.prefill_chunk_tokens
        chunks: list[tuple[SimRequest, int]] = []
        decoding: list[SimRequest] = []
        for req in self._running:
            if not req.ready:
                continue
            if not req.prefill_done:
                if budget > 0:
                    take = min(req.prompt_tokens - req.computed_tokens, budget)
                    chunks.append((req, take))
                    budget -= take
            else:
                decoding.append(req)
        return chunks, decoding

    async def _loop(self) -> None:
        while True:
            self._account_idle()
            self._admit()
            chunks, decoding = self._plan_step()
            if not chunks and not decoding:
                self._wake.clear()
                await self._wake.wait()
                continue
            prefill_s = sum(
                prefill_cost(self.device, self.model, n, cached_context_tokens=r.computed_tokens).time_s
                for r, n in chunks
            )
            context = sum(r.computed_tokens + r.generated_tokens for r in decoding)
            decode_s = decode_step_time_s(self.device, self.model, len(decoding), context)
            step_s = prefill_s + decode_s
            energy = power_w(self.device, PREFILL_ACTIVITY) * prefill_s
            energy += power_w(self.device, decode_step_activity(self.device, self.model, len(decoding), context)) * (
                decode_s
            )
            # The step's mean power is what the board draws while it runs: the gauge must say so during the step
            # (scrapes land in the sleep below), not the idle power `_account_idle` set at the top of the loop.
            self.stats.power_w = energy / step_s if step_s > 0 else self.device.idle_power_w
            # Pace against a running target so sleep overshoot does not accumulate.
            now = self._clock()
            start = max(self._next_real_s, now)
            self._next_real_s = start + step_s * self.time_scale
            self._in_step = True
            try:
                await asyncio.sleep(max(self._next_real_s - self._clock(), 0.0))
            finally:
                self._in_step = False
            self.stats.energy_j += energy
            self.stats.busy_modelled_s += step_s
            self._last_energy_real_s = max(self._clock(), self._last_energy_real_s)
            for req, n in chunks:
                req.computed_tokens += n
                if req.prefill_done:
                    self._emit(req)  # the iteration that completes a prefill samples the first token
            for req in decoding:
                self._emit(req)

    def _emit(self, req: SimRequest) -> None:
        req.generated_tokens += 1
        req.pending_tokens += 1
        req.steps_since_flush += 1
        self.stats.generation_tokens_total += 1
        finished = req.generated_tokens >= req.max_tokens
        # The first token always goes out at once (it is what TTFT measures).
        if finished or req.generated_tokens == 1 or req.steps_since_flush >= self.stream_interval:
            req.events.put_nowait(TokenEvent(req.pending_tokens, finished))
            req.pending_tokens = 0
            req.steps_since_flush = 0
        if finished:
            self._finish(req)

    def _finish(self, req: SimRequest) -> None:
        self._running.remove(req)
        self.stats.requests_finished_total += 1
        if req.conversation_id is not None:
            turns = self.stats.conversation_turns
            turns[req.conversation_id] = turns.pop(req.conversation_id, 0) + 1
            while len(turns) > MAX_TRACKED_CONVERSATIONS:
                turns.popitem(last=False)
            if self.role is not Role.PREFILL:
                # Keep the conversation's KV (prompt and output) for its next turn.
                self._prefix_cache[req.conversation_id] = req.prompt_tokens + req.generated_tokens
        self._wake.set()


def remote_block_ids(tokens: int) -> list[int]:
    """Block ids of a prompt's KV, as a vLLM prefill server lists them in `kv_transfer_params`."""
    return list(range(math.ceil(tokens / BLOCK_TOKENS)))
