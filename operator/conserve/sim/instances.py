"""Serving instances of the simulator: prefill instances and decoders, with their KV memory.

A **prefill instance** runs iterations of at most `chunk_tokens` prompt tokens (chunked prefill, vLLM's
`max_num_batched_tokens`): the prompts in its batch are served first come first served, each iteration takes
the head prompts' next chunks until the token budget is spent, and a prompt leaves when its last chunk is done.
With the fleet's `prefill_prefix_cache`, it keeps the KV of the prompts it prefilled (least recently used
eviction, its GPU's KV capacity) so a later turn of the same conversation prefills only what is new.

A **decoder** holds running sequences, pinned idle conversations, a prefix cache of finished turns and the
host KV tier (see `conserve.sim.engine`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import TypeVar

from conserve.core.llm import ModelShape
from conserve.core.perf import Device, prefill_cost
from conserve.sim.fleet import InstanceSpec
from conserve.sim.records import LocalJob, PrefillJob, Seq

Job = TypeVar("Job", PrefillJob, LocalJob)


def fill_iteration(jobs: Iterable[Job], budget_tokens: int) -> list[tuple[Job, int]]:
    """The next iteration's prompt chunks, first come first served: each job takes what is left of the token
    budget (chunked prefill); the first job the budget cannot reach ends the iteration."""
    chunks: list[tuple[Job, int]] = []
    for job in jobs:
        take = min(job.left_tokens, budget_tokens)
        if take <= 0 and job.left_tokens > 0:
            break
        chunks.append((job, take))
        budget_tokens -= take
    return chunks


def iteration_prefill_s(device: Device, model: ModelShape, chunks: list[tuple[int, int]]) -> float:
    """One iteration prefilling several prompts' chunks, each (new tokens, cached context): the chunks' compute
    adds up, the engine's per-step overhead (`prefill_step_overhead_s`) is paid once for the iteration."""
    times = [prefill_cost(device, model, n, c).time_s for n, c in chunks if n > 0]
    return sum(times) - device.params.prefill_step_overhead_s * max(len(times) - 1, 0)


class PrefillInstance:
    def __init__(
        self, spec: InstanceSpec, model: ModelShape, *, chunk_tokens: int, max_batch: int, cache_capacity: int = 0
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.max_batch = max_batch
        self.queue: deque[PrefillJob] = deque()  # waiting for a batch slot
        self.batch: list[PrefillJob] = []  # being prefilled, first come first served
        self.busy = False
        self.iteration: list[tuple[PrefillJob, int]] = []  # (job, chunk tokens) of the running iteration
        self.busy_until = 0.0
        self.iteration_s = (0.0, 0.0)  # (prefix loads, prompt compute) of the running iteration
        self.cache = LruKv(cache_capacity)  # prefix cache, when the fleet enables it (capacity 0: off)
        self.busy_s = 0.0
        self.dynamic_energy_j = 0.0
        self.tokens = 0
        self.iterations = 0

    def job_time_s(self, job: PrefillJob) -> float:
        compute = prefill_cost(self.spec.device, self.model, job.left_tokens, job.cached_tokens + job.done_tokens)
        return job.load_s * (not job.started) + compute.time_s

    def load_s(self, now: float) -> float:
        """Seconds of prompt work queued or running here (what a least-loaded choice of prefill compares)."""
        queued = sum(self.job_time_s(j) for j in self.queue) + sum(self.job_time_s(j) for j in self.batch)
        return queued + (max(self.busy_until - now, 0.0) if self.busy else 0.0)

    def holds(self, key: str) -> int:
        return self.cache.holds(key)

    def remember(self, key: str, tokens: int) -> None:
        """Keep a prefilled prompt's KV in the prefix cache, when there is one; a prompt larger than the whole
        cache leaves what the cache holds of the conversation (a prefix of it) in place."""
        if self.cache.capacity <= 0 or tokens > self.cache.capacity:
            return
        self.cache.put(key, tokens)

    def forget(self, key: str) -> None:
        self.cache.drop(key)


class LruKv:
    """KV by conversation, in tokens, least recently used evicted first to stay within a capacity: a prefill
    instance's prefix cache, and the fleet-wide KV store (Mooncake's KVCache pool) finished turns are written to."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = capacity_tokens
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.entries)

    def holds(self, key: str) -> int:
        return self.entries.get(key, 0)

    def put(self, key: str, tokens: int) -> None:
        """Replace the conversation's KV by `tokens` of it (kept only if it fits at all), evicting others."""
        self.drop(key)
        if tokens > self.capacity:
            return
        while self.tokens + tokens > self.capacity and self.entries:
            self.tokens -= self.entries.popitem(last=False)[1]
        self.entries[key] = tokens
        self.tokens += tokens

    def drop(self, key: str) -> None:
        size = self.entries.pop(key, None)
        if size is not None:
            self.tokens -= size


class Decoder:
    def __init__(
        self, spec: InstanceSpec, capacity: int, max_batch: int, host_capacity: int = 0, chunk_tokens: int = 8192
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.capacity = capacity
        self.host_capacity = host_capacity
        self.host_pinned: OrderedDict[str, int] = OrderedDict()  # offloaded pinned conversations (not evictable)
        self.host_cache: OrderedDict[str, int] = OrderedDict()  # spilled prefix cache (LRU)
        self.host_tokens = 0
        self.pinned_at: dict[str, float] = {}  # when each pinned conversation's last turn ended
        self.max_batch = max_batch
        self.chunk_tokens = chunk_tokens  # prompt tokens per iteration (chunked append-prefill)
        self.running: list[Seq] = []
        self.running_tokens = 0
        self.join_queue: deque[Seq] = deque()
        self.local_queue: deque[LocalJob] = deque()
        self.pinned: dict[str, int] = {}
        self.pinned_tokens = 0
        self.cache: OrderedDict[str, int] = OrderedDict()
        self.cache_tokens = 0
        self.inflight_tokens = 0  # KV of local jobs being prefilled
        # state: "idle", "run" (decode steps only) or "prefill" (an iteration with prompt chunks)
        self.state = "idle"
        self.version = 0
        self.run_start = 0.0
        self.run_batch = 0
        self.run_context = 0
        self.run_steps = 0
        self.prefill_batch: list[LocalJob] = []  # admitted prompts, prefilled chunk by chunk
        self.iteration: list[tuple[LocalJob, int]] = []  # (job, chunk tokens) of the running iteration
        self.iteration_decodes = False  # whether the running iteration also advances the decode batch
        self.admit_counter = itertools.count()
        # accounting
        self.decode_s = 0.0
        self.prefill_s = 0.0
        self.dynamic_energy_j = 0.0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.prefill_tokens = 0
        self.preemptions = 0
        self.kv_token_seconds = 0.0  # integral of (running + pinned) KV over time
        self.peak_kv_tokens = 0
        self.last_kv_t = 0.0

    # memory ---------------------------------------------------------------------------------------------
    @property
    def used_tokens(self) -> int:
        return self.running_tokens + self.pinned_tokens + self.cache_tokens + self.inflight_tokens

    def free_tokens(self) -> int:
        return self.capacity - self.used_tokens

    def live_tokens(self) -> int:
        return self.running_tokens + self.pinned_tokens + self.inflight_tokens

    def note_peak(self) -> None:
        used = self.used_tokens
        if used > self.peak_kv_tokens:
            self.peak_kv_tokens = used
        if used > self.capacity:
            raise AssertionError(f"decoder {self.name}: {used} KV tokens exceed capacity {self.capacity}")

    def evict_for(self, tokens: int, keep: str | None = None) -> bool:
        """Evict cached KV (least recently used first, never `keep`) until `tokens` fit; True when they do."""
        kept: int | None = None
        while self.free_tokens() < tokens and self.cache:
            victim, size = self.cache.popitem(last=False)
            if victim == keep:
                kept = size
                continue
            self.cache_tokens -= size
            self.spill_to_host(victim, size)
        if kept is not None and keep is not None:
            self.cache[keep] = kept
        return self.free_tokens() >= tokens

    def spill_to_host(self, key: str, size: int) -> None:
        """A prefix-cache entry evicted from the GPU goes to the host cache (LRU there too) when it can fit."""
        old = self.host_cache.pop(key, None)
        if old is not None:
            self.host_tokens -= old
        if size > self.host_capacity - sum(self.host_pinned.values()):
            return
        while self.host_capacity - self.host_tokens < size and self.host_cache:
            self.host_tokens -= self.host_cache.popitem(last=False)[1]
        if self.host_capacity - self.host_tokens >= size:
            self.host_cache[key] = size
            self.host_tokens += size

    def host_free_tokens(self) -> int:
        """Host room for pinned KV (the host prefix cache of per-turn policies gives way to it)."""
        return self.host_capacity - sum(self.host_pinned.values())

    def offload_pinned(self, key: str) -> int:
        """Move an idle pinned conversation's KV to host memory; returns its size."""
        size = self.pinned.pop(key)
        self.pinned_tokens -= size
        while self.host_capacity - self.host_tokens < size and self.host_cache:
            self.host_tokens -= self.host_cache.popitem(last=False)[1]
        if self.host_capacity - self.host_tokens < size:
            raise AssertionError(f"decoder {self.name}: host memory cannot take {size} KV tokens")
        self.host_pinned[key] = size
        self.host_tokens += size
        return size

    def peek_host(self, key: str) -> int:
        return self.host_pinned.get(key, 0) or self.host_cache.get(key, 0)

    def drop_host(self, key: str) -> None:
        for where in (self.host_pinned, self.host_cache):
            size = where.pop(key, None)
            if size is not None:
                self.host_tokens -= size

    def evict_pinned_for(self, tokens: int, keep: str | None = None) -> int:
        """Last resort of a decoder that cannot run anything: drop idle pinned KV, oldest pin first.

        Returns how many conversations lost their KV (their next turn recomputes it). Only reached when the
        pinned conversations' growth has outrun their reservations and nothing else can free memory.
        """
        dropped = 0
        for key in list(self.pinned):
            if self.free_tokens() >= tokens:
                break
            if key == keep:
                continue
            self.pinned_tokens -= self.pinned.pop(key)
            self.pinned_at.pop(key, None)
            dropped += 1
        return dropped

    def peek_kv(self, key: str) -> int:
        return self.pinned.get(key, 0) or self.cache.get(key, 0)

    def take_kv(self, key: str) -> int:
        """Remove a conversation's pinned or cached KV (it becomes a running sequence's); 0 when absent on the GPU.
        A copy in host memory is dropped too (reloaded, or superseded)."""
        self.drop_host(key)
        self.pinned_at.pop(key, None)
        if key in self.pinned:
            tokens = self.pinned.pop(key)
            self.pinned_tokens -= tokens
            return tokens
        if key in self.cache:
            tokens = self.cache.pop(key)
            self.cache_tokens -= tokens
            return tokens
        return 0

    def holds(self, key: str) -> bool:
        return key in self.pinned or key in self.cache or key in self.host_pinned or key in self.host_cache

    def load_tokens(self) -> int:
        """KV of the sequences running or waiting here (what a least-loaded policy balances)."""
        queued = sum(s.context for s in self.join_queue) + sum(j.seq.context for j in self.local_queue)
        return self.running_tokens + self.inflight_tokens + queued

    def active_sequences(self) -> int:
        return len(self.running) + len(self.join_queue) + len(self.local_queue) + len(self.prefill_batch)
