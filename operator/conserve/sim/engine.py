"""Discrete-event simulation of disaggregated serving: prefill instances, KV transfers, decoders.

What is modelled (every performance and power figure comes from `conserve.core.perf`, the same functions the
operator's energy prior and the GPU-server simulator use):

- **Prefill instances** serve one prompt at a time, first come first served; a prompt of n new tokens over c
  cached tokens takes `prefill_time_s` (compute-bound, at PREFILL_MFU) and draws `power_w(PREFILL_ACTIVITY)`.
  Prompts are not batched together: a long prefill is compute-bound already, so batching does not change its
  throughput (it would only shorten short prompts' waits; all policies get the same treatment). The first output
  token of a turn is produced by its prefill (TTFT ends there), as in DistServe and Splitwise.
- **KV transfer** from a prefill instance to a decoder takes `kv_transfer_time_s` over the fleet's link; links
  are not shared (no contention), and the energy of the NIC is not counted.
- **Decoders** run continuous batching: every running sequence advances one token per step, a step takes
  `decode_step_time_s` of the batch (memory-bound: weights plus every running sequence's KV), at most
  `max_batch_size` sequences. New sequences join at step boundaries. While the batch does not change, steps are
  advanced in closed form (`decode_run_time_s`, `decode_run_energy_j`: exact sums, not an approximation); a run
  ends when a sequence finishes, when memory runs out, or at the first step boundary after a new sequence
  arrives. Prompts prefilled on the decoder itself (a pinned conversation's later turns, a prefix-cache hit, a
  recompute after preemption) run as one prefill iteration that stalls the decode batch (no chunked prefill);
  it draws prefill power.
- **KV memory** of a decoder (`kv_capacity_tokens` of its GPU and model) holds the running sequences, the KV of
  pinned idle conversations (ConServe: not evictable until the conversation is released) and a prefix cache of
  finished turns (per-turn policies: evicted least recently used first). A sequence is admitted only when its
  KV fits; when growing sequences run out of memory, the cache is evicted and then the most recently admitted
  running sequence is preempted by recompute (vLLM's default): its KV is dropped and its whole context is
  prefilled again on the decoder before it continues. Memory never exceeds capacity (tested).
- **Host KV tier** (`conserve.core.offload`): each decoder has `host_capacity` tokens of its node's DRAM. A
  pinned idle conversation's KV moves there under GPU pressure (the policy's rules, least recently active
  first, only once its asynchronous write-back is done) and keeps its pin; its next turn reloads it over PCIe
  (`pcie_transfer_time_s`) on the same decoder, as part of the decoder-side prefill iteration of its new tokens
  (so the reload stalls the decode batch: conservative, vLLM loads asynchronously). Per-turn policies' prefix
  caches spill to the same host tier (LRU) instead of being dropped, and a turn that finds its prefix there
  reloads it the same way. When the host is full, pinned KV falls back to the drop-and-recompute rule. The
  GPU draws only idle power during a reload; PCIe transfer energy is not modelled.
- **Energy**: every instance draws idle power (`GpuSpec.idle_power_w`) for the whole run (the fleet is
  provisioned whether busy or not) plus the dynamic part of `power_w` while it works.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conserve.core.offload import IdleKv, choose_offload_victims, host_kv_capacity_tokens, pcie_transfer_time_s
from conserve.core.perf import (
    PREFILL_ACTIVITY,
    decode_run_energy_j,
    decode_run_time_s,
    decode_steps_within_s,
    kv_transfer_time_s,
    power_w,
    prefill_time_s,
)
from conserve.sim.fleet import Fleet, InstanceSpec
from conserve.sim.workload import Conversation, Workload

if TYPE_CHECKING:
    from conserve.sim.policies import Policy


# --- records -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TurnRecord:
    conversation: str
    index: int
    arrival_s: float
    input_tokens: int
    new_tokens: int
    output_tokens: int
    user_visible: bool
    decoder: str = ""
    prefill_instance: str = ""  # "" when prefilled on the decoder
    prefill_tokens: int = 0  # tokens computed by prefill for this turn (recomputes included)
    transferred_tokens: int = 0
    first_token_s: float = -1.0
    done_s: float = -1.0
    generated_tokens: int = 0
    preemptions: int = 0
    reload_tokens: int = 0  # KV reloaded from host memory over PCIe for this turn
    reload_s: float = 0.0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tbt_s(self) -> float | None:
        """Mean time between tokens of this turn (None for a one-token answer)."""
        if self.output_tokens <= 1:
            return None
        return (self.done_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class ConvState:
    conv: Conversation
    turns: list[TurnRecord] = field(default_factory=list)
    decoder: str | None = None  # where its KV lives (pinned or cached) after its last turn
    kv_tokens: int = 0  # KV it holds there
    kv_transfers: int = 0
    started_s: float | None = None  # when its first turn was admitted (placement), for pending waits
    finished: bool = False

    @property
    def key(self) -> str:
        return self.conv.key

    @property
    def next_index(self) -> int:
        return len(self.turns)


@dataclass(slots=True)
class Seq:
    """One turn in a decoder: its KV (context) and the decode steps it still needs."""

    state: ConvState
    record: TurnRecord
    context: int
    remaining: int
    admitted_order: int = 0


@dataclass(slots=True)
class LocalJob:
    """A prompt prefilled on the decoder itself."""

    seq: Seq
    new_tokens: int
    cached_tokens: int
    recompute: bool = False
    reload_tokens: int = 0  # part of cached_tokens that comes back from host memory first


@dataclass(slots=True)
class PrefillJob:
    seq: Seq
    decoder: str
    new_tokens: int
    cached_tokens: int
    transfer_tokens: int


# --- routes the policies return ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteRoute:
    """Prefill on a prefill instance, then move `transfer_tokens` of KV to the decoder."""

    prefill: str
    decoder: str
    new_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """Prefill the new tokens on the decoder, which holds the conversation's earlier KV."""

    decoder: str


Route = RemoteRoute | LocalRoute


# --- instances ---------------------------------------------------------------------------------------------


class PrefillInstance:
    def __init__(self, spec: InstanceSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.queue: deque[tuple[PrefillJob, float]] = deque()
        self.busy_until = 0.0
        self.current: tuple[PrefillJob, float] | None = None
        self.backlog_s = 0.0  # seconds of work queued, the current job's full duration included
        self.busy_s = 0.0
        self.dynamic_energy_j = 0.0
        self.tokens = 0

    def load_s(self, now: float) -> float:
        """Seconds until this instance could start a new prompt."""
        queued = sum(d for _, d in self.queue)
        return max(self.busy_until - now, 0.0) + queued


class Decoder:
    def __init__(self, spec: InstanceSpec, capacity: int, max_batch: int, host_capacity: int = 0) -> None:
        self.spec = spec
        self.name = spec.name
        self.capacity = capacity
        self.host_capacity = host_capacity
        self.host_pinned: OrderedDict[str, int] = OrderedDict()  # offloaded pinned conversations (not evictable)
        self.host_cache: OrderedDict[str, int] = OrderedDict()  # spilled prefix cache (LRU)
        self.host_tokens = 0
        self.pinned_at: dict[str, float] = {}  # when each pinned conversation's last turn ended
        self.max_batch = max_batch
        self.running: list[Seq] = []
        self.running_tokens = 0
        self.join_queue: deque[Seq] = deque()
        self.local_queue: deque[LocalJob] = deque()
        self.pinned: dict[str, int] = {}
        self.pinned_tokens = 0
        self.cache: OrderedDict[str, int] = OrderedDict()
        self.cache_tokens = 0
        self.inflight_tokens = 0  # KV of local jobs being prefilled
        # state: "idle", "run" or "prefill"
        self.state = "idle"
        self.version = 0
        self.run_start = 0.0
        self.run_batch = 0
        self.run_context = 0
        self.run_steps = 0
        self.prefill_batch: list[LocalJob] = []
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


# --- the simulator -----------------------------------------------------------------------------------------

_ARRIVE, _PREFILL_DONE, _TRANSFER_DONE, _DECODER_WAKE, _IDLE_CHECK, _POKE = range(6)


@dataclass(slots=True)
class SimResult:
    policy: str
    fleet: Fleet
    workload: str
    conversations: list[ConvState]
    prefill: list[PrefillInstance]
    decoders: list[Decoder]
    horizon_s: float
    pending_waits_s: list[float]
    pinned_evictions: int = 0
    offloads: int = 0
    reloads: int = 0


class Simulator:
    def __init__(
        self,
        fleet: Fleet,
        workload: Workload,
        policy: Policy,
        *,
        idle_timeout_s: float | None = None,
        progress: Callable[[int], None] | None = None,
        end_signal: bool = True,
    ) -> None:
        self.fleet = fleet
        #: False: no client says a conversation ended (chat clients cannot): after its last turn it is released
        #: only by the idle timeout (at once when there is none: the policy holds nothing an end would free).
        self.end_signal = end_signal
        self.model = fleet.model
        self.workload = workload
        self.policy = policy
        self.idle_timeout_s = idle_timeout_s
        self.progress = progress
        self.prefill = {p.name: PrefillInstance(p) for p in fleet.prefill}
        host_on = getattr(policy, "host_offload", True)
        self.decoders = {
            d.name: Decoder(
                d,
                fleet.kv_capacity_tokens(d),
                fleet.max_batch_size,
                host_kv_capacity_tokens(fleet.model, d.tp, fleet.host_kv_bytes_per_gpu) if host_on else 0,
            )
            for d in fleet.decode
        }
        self.states = [ConvState(c) for c in workload.conversations]
        self.by_key = {s.key: s for s in self.states}
        self.events: list[tuple[float, int, int, object]] = []
        self.counter = itertools.count()
        self.now = 0.0
        self.pending: list[ConvState] = []  # conversations waiting for a placement (their first turn)
        self.pending_waits_s: list[float] = []
        self.turns_done = 0
        self.pinned_evictions = 0
        self.offloads = 0
        self.reloads = 0
        largest = max(c.final_context_tokens for c in workload.conversations) if workload.conversations else 0
        smallest = min(d.capacity for d in self.decoders.values())
        if largest > smallest:
            raise ValueError(
                f"a conversation reaches {largest} KV tokens, more than decoder capacity {smallest}: use a bigger "
                "decoder (more memory or tensor parallelism) or a smaller model"
            )
        policy.bind(self)

    # events -----------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self.counter), kind, payload))

    def run(self) -> SimResult:
        for s in self.states:
            self._push(s.conv.arrival_s, _ARRIVE, s)
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            self.now = t
            if kind == _ARRIVE:
                assert isinstance(payload, ConvState)
                self._turn_arrives(payload)
            elif kind == _PREFILL_DONE:
                assert isinstance(payload, PrefillInstance)
                self._prefill_done(payload)
            elif kind == _TRANSFER_DONE:
                assert isinstance(payload, tuple)
                decoder, seq = payload
                self._enqueue_join(decoder, seq)
            elif kind == _DECODER_WAKE:
                assert isinstance(payload, tuple)
                decoder, version = payload
                if decoder.version == version:
                    self._decoder_boundary(decoder)
            elif kind == _IDLE_CHECK:
                assert isinstance(payload, tuple)
                state, turns_then = payload
                if not state.finished and len(state.turns) == turns_then:
                    self._release(state)
            elif kind == _POKE:
                assert isinstance(payload, Decoder)
                if payload.state == "idle":
                    self._decoder_boundary(payload)
        if not self.end_signal:
            # The work ended with the last turn; the idle timeouts that followed only end pins (they must not
            # charge a policy that keeps pins with idle power the others are not charged).
            self.now = max((r.done_s for s in self.states for r in s.turns), default=self.now)
        unfinished = [s.key for s in self.states if not s.finished]
        if unfinished:
            raise AssertionError(f"{len(unfinished)} conversations never finished, e.g. {unfinished[:3]}")
        for d in self.decoders.values():
            self._kv_tick(d)
        return SimResult(
            self.policy.name,
            self.fleet,
            self.workload.name,
            self.states,
            list(self.prefill.values()),
            list(self.decoders.values()),
            self.now,
            self.pending_waits_s,
            self.pinned_evictions,
            self.offloads,
            self.reloads,
        )

    # turns ------------------------------------------------------------------------------------------------
    def _turn_arrives(self, state: ConvState) -> None:
        index = state.next_index
        turn = state.conv.turns[index]
        record = TurnRecord(
            state.key, index, self.now, turn.input_tokens, turn.new_tokens, turn.output_tokens, turn.user_visible
        )
        state.turns.append(record)
        self._route(state, record, first_try=True)

    def _route(self, state: ConvState, record: TurnRecord, *, first_try: bool) -> bool:
        route = self.policy.route(state, record, self.now)
        if route is None:
            if first_try:
                self.pending.append(state)
            return False
        if state.started_s is None:
            state.started_s = self.now
            if self.now > record.arrival_s:
                self.pending_waits_s.append(self.now - record.arrival_s)
        turn = state.conv.turns[record.index]
        seq = Seq(state, record, turn.input_tokens, turn.output_tokens - 1)
        record.decoder = route.decoder
        if isinstance(route, LocalRoute):
            self._enqueue_local(self.decoders[route.decoder], LocalJob(seq, turn.new_tokens, turn.reused_tokens))
        else:
            instance = self.prefill[route.prefill]
            job = PrefillJob(seq, route.decoder, route.new_tokens, route.cached_tokens, turn.input_tokens)
            record.prefill_instance = instance.name
            duration = prefill_time_s(instance.spec.device, self.model, route.new_tokens, route.cached_tokens)
            instance.queue.append((job, duration))
            if instance.current is None:
                self._prefill_start(instance)
        return True

    def retry_pending(self) -> None:
        """Place waiting conversations (in the policy's order) while the policy finds room."""
        if not self.pending:
            return
        waiting = self.policy.order_pending(self.pending)
        self.pending = []
        for state in waiting:
            record = state.turns[-1]
            if not self._route(state, record, first_try=False):
                self.pending.append(state)

    def _turn_done(self, decoder: Decoder, seq: Seq) -> None:
        state, record = seq.state, seq.record
        record.done_s = self.now
        self.turns_done += 1
        if self.progress is not None:
            self.progress(1)
        kv = seq.context
        state.decoder = decoder.name
        state.kv_tokens = kv
        keep = self.policy.retain(state, decoder.name)
        if keep == "pin":
            decoder.pinned[state.key] = kv
            decoder.pinned_tokens += kv
            decoder.pinned_at[state.key] = self.now
        else:
            old = decoder.cache.pop(state.key, None)
            if old is not None:
                decoder.cache_tokens -= old
            decoder.cache[state.key] = kv
            decoder.cache_tokens += kv
        self.policy.turn_done(state, record, self.now)
        if state.next_index >= len(state.conv.turns):
            if self.end_signal or self.idle_timeout_s is None:
                self._release(state)
            else:
                self._push(self.now + self.idle_timeout_s, _IDLE_CHECK, (state, len(state.turns)))
            return
        nxt = state.conv.turns[state.next_index]
        at = max(nxt.not_before_s or 0.0, self.now + nxt.think_s)
        self._push(at, _ARRIVE, state)
        if self.idle_timeout_s is not None and at - self.now > self.idle_timeout_s:
            self._push(self.now + self.idle_timeout_s, _IDLE_CHECK, (state, len(state.turns)))

    def _release(self, state: ConvState) -> None:
        """The conversation ends (completed or idle past its timeout): pinned KV is freed."""
        if state.next_index >= len(state.conv.turns):
            state.finished = True
        freed: Decoder | None = None
        if state.decoder is not None:
            freed = self.decoders[state.decoder]
            if state.key in freed.pinned:
                self._kv_tick(freed)
                freed.pinned_tokens -= freed.pinned.pop(state.key)
            freed.pinned_at.pop(state.key, None)
            if state.key in freed.host_pinned:
                freed.drop_host(state.key)
        self.policy.release(state)
        if not state.finished:
            # Released for idleness before its last turn: its next turn starts it again from scratch.
            state.decoder = None
            state.started_s = None
        self.retry_pending()
        if freed is not None and freed.state == "idle":
            self._push(self.now, _POKE, freed)

    # host offload -----------------------------------------------------------------------------------------
    def idle_candidates(self, decoder: Decoder, gpu_kv: Callable[[str, int], int] | None = None) -> list[IdleKv]:
        """The decoder's pinned conversations with no turn in progress, as offload candidates."""
        out: list[IdleKv] = []
        for key, size in decoder.pinned.items():
            state = self.by_key[key]
            if state.turns and state.turns[-1].done_s < 0:
                continue  # its next turn has arrived: it is about to run
            last = decoder.pinned_at.get(key, 0.0)
            ready = last + pcie_transfer_time_s(self.model, size)
            out.append(IdleKv(key, size if gpu_kv is None else gpu_kv(key, size), size, last, ready))
        return out

    def offload(self, decoder: Decoder, key: str) -> None:
        """Move an idle pinned conversation's KV to its decoder's host memory (it keeps its pin)."""
        self._kv_tick(decoder)
        decoder.offload_pinned(key)
        decoder.pinned_at.pop(key, None)
        self.offloads += 1
        self.policy.kv_offloaded(self.by_key[key])

    def drop_pinned(self, decoder: Decoder, key: str) -> None:
        """Discard an idle pinned conversation's GPU KV (its policy dropped it; its next turn recomputes it)."""
        self._kv_tick(decoder)
        decoder.pinned_tokens -= decoder.pinned.pop(key)
        decoder.pinned_at.pop(key, None)

    def _offload_for(self, decoder: Decoder, tokens: int) -> bool:
        """Physical pressure: offload idle pinned KV (least recently active first) until `tokens` fit."""
        need = tokens - decoder.free_tokens()
        if need <= 0:
            return True
        victims = choose_offload_victims(self.idle_candidates(decoder), need, decoder.host_free_tokens(), self.now)
        for key in victims:
            self.offload(decoder, key)
        return decoder.free_tokens() >= tokens

    def _local_duration(self, decoder: Decoder, job: LocalJob) -> tuple[float, float]:
        """(reload seconds, prefill seconds) of a decoder-side prefill job."""
        device = decoder.spec.device
        return (
            pcie_transfer_time_s(self.model, job.reload_tokens),
            prefill_time_s(device, self.model, job.new_tokens, job.cached_tokens),
        )

    # prefill instances ------------------------------------------------------------------------------------
    def _prefill_start(self, instance: PrefillInstance) -> None:
        job, duration = instance.queue.popleft()
        instance.current = (job, duration)
        instance.busy_until = self.now + duration
        self._push(instance.busy_until, _PREFILL_DONE, instance)

    def _prefill_done(self, instance: PrefillInstance) -> None:
        assert instance.current is not None
        job, duration = instance.current
        instance.current = None
        device = instance.spec.device
        instance.busy_s += duration
        instance.dynamic_energy_j += (power_w(device, PREFILL_ACTIVITY) - device.idle_power_w) * duration
        instance.tokens += job.new_tokens
        record = job.seq.record
        record.prefill_tokens += job.new_tokens
        record.first_token_s = self.now
        record.generated_tokens = 1
        record.transferred_tokens += job.transfer_tokens
        job.seq.state.kv_transfers += 1
        arrive = self.now + kv_transfer_time_s(self.model, job.transfer_tokens, self.fleet.link)
        self._push(arrive, _TRANSFER_DONE, (self.decoders[job.decoder], job.seq))
        if instance.queue:
            self._prefill_start(instance)

    # decoders ---------------------------------------------------------------------------------------------
    def _enqueue_join(self, decoder: Decoder, seq: Seq) -> None:
        decoder.join_queue.append(seq)
        self._poke(decoder)

    def _enqueue_local(self, decoder: Decoder, job: LocalJob) -> None:
        decoder.local_queue.append(job)
        self._poke(decoder)

    def _poke(self, decoder: Decoder) -> None:
        """Something arrived: an idle decoder starts now; a running one stops at its next step boundary."""
        if decoder.state == "idle":
            self._push(self.now, _POKE, decoder)
        elif decoder.state == "run":
            elapsed = self.now - decoder.run_start
            device = decoder.spec.device
            done = decode_steps_within_s(
                device, self.model, decoder.run_batch, decoder.run_context, decoder.run_steps, elapsed
            )
            if done < decoder.run_steps:
                spent = decode_run_time_s(device, self.model, decoder.run_batch, decoder.run_context, done)
                stop = done + 1 if spent < elapsed else done
                if stop < decoder.run_steps:
                    decoder.run_steps = stop
                    decoder.version += 1
                    end = decoder.run_start + decode_run_time_s(
                        device, self.model, decoder.run_batch, decoder.run_context, stop
                    )
                    self._push(max(end, self.now), _DECODER_WAKE, (decoder, decoder.version))

    def _kv_tick(self, decoder: Decoder) -> None:
        decoder.kv_token_seconds += decoder.live_tokens() * (self.now - decoder.last_kv_t)
        decoder.last_kv_t = self.now

    def _finish_run(self, decoder: Decoder) -> None:
        steps, batch, context = decoder.run_steps, decoder.run_batch, decoder.run_context
        device = decoder.spec.device
        duration = decode_run_time_s(device, self.model, batch, context, steps)
        energy = decode_run_energy_j(device, self.model, batch, context, steps)
        decoder.decode_s += duration
        decoder.dynamic_energy_j += energy - device.idle_power_w * duration
        decoder.generated_tokens += steps * batch
        decoder.decode_steps += steps
        # KV integral: the running KV grows linearly by batch x steps over the run (the tick counts its start).
        self._kv_tick(decoder)
        decoder.kv_token_seconds += batch * steps / 2.0 * duration
        for seq in decoder.running:
            seq.context += steps
            seq.remaining -= steps
            seq.record.generated_tokens += steps
        decoder.running_tokens += steps * batch
        decoder.note_peak()
        decoder.state = "idle"

    def _finish_prefill(self, decoder: Decoder) -> None:
        device = decoder.spec.device
        jobs = decoder.prefill_batch
        decoder.prefill_batch = []
        parts = [self._local_duration(decoder, j) for j in jobs]
        compute = sum(p for _, p in parts)
        self._kv_tick(decoder)
        decoder.prefill_s += compute + sum(r for r, _ in parts)
        decoder.dynamic_energy_j += (power_w(device, PREFILL_ACTIVITY) - device.idle_power_w) * compute
        for job in jobs:
            seq = job.seq
            decoder.inflight_tokens -= seq.context
            decoder.running_tokens += seq.context
            decoder.prefill_tokens += job.new_tokens
            seq.record.prefill_tokens += job.new_tokens
            if seq.record.first_token_s < 0:
                seq.record.first_token_s = self.now
                seq.record.generated_tokens = 1
            seq.admitted_order = next(decoder.admit_counter)
            decoder.running.append(seq)
        decoder.state = "idle"

    def _decoder_boundary(self, decoder: Decoder) -> None:
        if decoder.state == "run":
            self._finish_run(decoder)
        elif decoder.state == "prefill":
            self._finish_prefill(decoder)
        # Finished sequences leave the batch.
        if any(s.remaining <= 0 for s in decoder.running):
            self._kv_tick(decoder)
            still: list[Seq] = []
            for seq in decoder.running:
                if seq.remaining <= 0:
                    decoder.running_tokens -= seq.context
                    self._turn_done(decoder, seq)
                else:
                    still.append(seq)
            decoder.running = still
        if decoder.state != "idle":  # a release above restarted this decoder already
            return
        if self._start_local_prefill(decoder):
            return
        self._admit_joins(decoder)
        self._start_run(decoder)

    def _start_local_prefill(self, decoder: Decoder) -> bool:
        jobs: list[LocalJob] = []
        self._kv_tick(decoder)
        while decoder.local_queue and len(decoder.running) + len(jobs) < decoder.max_batch:
            job = decoder.local_queue[0]
            seq = job.seq
            key = seq.state.key
            gpu_held = 0 if job.recompute else min(decoder.peek_kv(key), seq.context)
            host_held = 0 if job.recompute or gpu_held else min(decoder.peek_host(key), seq.context)
            held = gpu_held or host_held
            if not job.recompute and held < job.cached_tokens:
                # Only part of the prefix is here (a turn's last output token has no KV until the next turn's
                # prefill writes it), or none of it (evicted): prefill what is missing.
                job.new_tokens, job.cached_tokens = seq.context - held, held
                job.recompute = held == 0
            need = seq.context - gpu_held
            if not decoder.evict_for(need, keep=key) and not self._offload_for(decoder, need):
                if decoder.running or jobs:
                    break
                self.pinned_evictions += decoder.evict_pinned_for(need, keep=key)
                if decoder.free_tokens() < need:
                    break
            if not job.recompute and host_held and decoder.peek_host(key):
                job.reload_tokens = host_held
                seq.record.reload_tokens += host_held
                seq.record.reload_s += pcie_transfer_time_s(self.model, host_held)
                self.reloads += 1
            decoder.take_kv(key)
            decoder.local_queue.popleft()
            decoder.inflight_tokens += seq.context
            decoder.note_peak()
            jobs.append(job)
        if not jobs:
            return False
        duration = sum(sum(self._local_duration(decoder, j)) for j in jobs)
        decoder.prefill_batch = jobs
        decoder.state = "prefill"
        decoder.version += 1
        self._push(self.now + duration, _DECODER_WAKE, (decoder, decoder.version))
        return True

    def _admit_joins(self, decoder: Decoder) -> None:
        self._kv_tick(decoder)
        while decoder.join_queue and len(decoder.running) < decoder.max_batch:
            seq = decoder.join_queue[0]
            decoder.take_kv(seq.state.key)  # an older copy of this conversation's KV is superseded
            if not decoder.evict_for(seq.context) and not self._offload_for(decoder, seq.context):
                if decoder.running:
                    break
                self.pinned_evictions += decoder.evict_pinned_for(seq.context)
                if decoder.free_tokens() < seq.context:
                    break
            decoder.join_queue.popleft()
            seq.admitted_order = next(decoder.admit_counter)
            decoder.running.append(seq)
            decoder.running_tokens += seq.context
            decoder.note_peak()

    def _start_run(self, decoder: Decoder) -> None:
        # One-token turns (remaining 0 after prefill) finish at once.
        if any(s.remaining <= 0 for s in decoder.running):
            self._decoder_boundary(decoder)
            return
        while decoder.running:
            batch = len(decoder.running)
            steps = min(s.remaining for s in decoder.running)
            fit = decoder.free_tokens() // batch
            if fit < steps and decoder.cache:
                decoder.evict_for(batch * steps)
                fit = decoder.free_tokens() // batch
            if fit < steps and decoder.pinned:
                self._offload_for(decoder, batch * steps)
                fit = decoder.free_tokens() // batch
            if fit >= 1:
                steps = min(steps, fit)
                break
            if len(decoder.running) == 1:
                # Preempting the only sequence would only recompute it into the same corner: drop idle pinned
                # KV instead (the last resort, counted). The up-front check (no conversation outgrows a decoder)
                # makes room certain once nothing else is held.
                if not decoder.pinned:
                    raise AssertionError(f"decoder {decoder.name}: one sequence cannot grow ({decoder.used_tokens})")
                self.pinned_evictions += decoder.evict_pinned_for(batch * steps)
                continue
            self._preempt(decoder)
        if not decoder.running:
            if decoder.local_queue and self._start_local_prefill(decoder):
                return
            decoder.state = "idle"
            return
        decoder.state = "run"
        decoder.run_start = self.now
        decoder.run_batch = len(decoder.running)
        decoder.run_context = decoder.running_tokens
        decoder.run_steps = steps
        decoder.version += 1
        end = self.now + decode_run_time_s(
            decoder.spec.device, self.model, decoder.run_batch, decoder.run_context, steps
        )
        self._push(end, _DECODER_WAKE, (decoder, decoder.version))

    def _preempt(self, decoder: Decoder) -> None:
        """Drop the most recently admitted sequence's KV; it is prefilled again (recompute) before continuing."""
        self._kv_tick(decoder)
        victim = max(decoder.running, key=lambda s: s.admitted_order)
        decoder.running.remove(victim)
        decoder.running_tokens -= victim.context
        decoder.preemptions += 1
        victim.record.preemptions += 1
        decoder.local_queue.appendleft(LocalJob(victim, victim.context, 0, recompute=True))


def simulate(
    fleet: Fleet,
    workload: Workload,
    policy: Policy,
    *,
    idle_timeout_s: float | None = None,
    progress: Callable[[int], None] | None = None,
    end_signal: bool = True,
) -> SimResult:
    return Simulator(
        fleet, workload, policy, idle_timeout_s=idle_timeout_s, progress=progress, end_signal=end_signal
    ).run()


def all_records(result: SimResult) -> Iterable[TurnRecord]:
    for state in result.conversations:
        yield from state.turns
