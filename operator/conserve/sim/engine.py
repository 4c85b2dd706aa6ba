"""Discrete-event simulation of disaggregated serving: prefill instances, KV transfers, decoders.

What is modelled (every performance and power figure comes from `conserve.core.perf`, the same functions the
operator's energy prior and the GPU-server simulator use):

- **Prefill instances** (`conserve.sim.instances`) batch prompts with chunked prefill: iterations of at most
  the fleet's `chunk_tokens`, first come first served; a chunk of n tokens over c cached ones takes
  `prefill_cost` (an iteration pays the per-step overhead once) and draws `power_w(PREFILL_ACTIVITY)`.
  Optional for every policy alike (fleet settings): a prefix cache on each prefill instance, and a shared KV
  store (Mooncake's KVCache pool) that decoders write every finished turn to and prefill instances read
  prefixes from.
- **KV transfer** from a prefill instance to a decoder takes `kv_transfer_time_s` over the fleet's link (no
  contention). The first token reaches the user when the KV has arrived at the decoder: TTFT and TTFET include
  the transfer. NIC, store and PCIe energy are counted (`conserve.sim.transfer`).
- **Decoders** (`conserve.sim.decoding`) run continuous batching with chunked append-prefill of the prompts
  prefilled on the decoder itself (a pinned or cached conversation's later turn, a recompute after preemption).
- **KV memory** of a decoder holds the running sequences, the KV of pinned idle conversations (ConServe: not
  evictable until the conversation is released) and a prefix cache of finished turns (per-turn policies: least
  recently used eviction). A sequence is admitted only when its KV fits; when growing sequences run out of
  memory, the cache is evicted and then the most recently admitted running sequence is preempted by recompute
  (vLLM's default). Memory never exceeds capacity (tested).
- **Host KV tier** (`conserve.core.offload`): pinned idle KV moves to the decoder's host DRAM under GPU
  pressure (the policy's rules) and keeps its pin; prefix caches spill there (LRU); a turn that finds its
  prefix there reloads it over PCIe before its first chunk.
- **Equal information**: a conversation ends for every policy the same way. When the workload carries an end
  signal (`Workload.signals.end_of_conversation`: the agentic client knows when its task is done), the
  conversation is released after its last turn; when it does not (Mooncake, Azure), it is released once idle
  for the idle timeout, which every policy gets. Releasing drops the conversation's KV everywhere: pinned,
  cached on any decoder, in host memory, in prefill instances' caches and in the shared store.
- **Energy**: every instance draws idle power (`GpuSpec.idle_power_w`) from 0 to the last turn's completion
  (the fleet is provisioned whether busy or not) plus the dynamic part of `power_w` while it works, plus the
  data path's energy of every KV move.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from conserve.core.offload import IdleKv, choose_offload_victims, host_kv_capacity_tokens, pcie_transfer_time_s
from conserve.core.perf import PREFILL_ACTIVITY, kv_transfer_time_s, power_w
from conserve.sim.conversations import Workload
from conserve.sim.decoding import DECODER_WAKE, POKE, DecoderLoop
from conserve.sim.fleet import Fleet
from conserve.sim.instances import Decoder, LruKv, PrefillInstance, fill_iteration, iteration_prefill_s
from conserve.sim.records import (
    ConvState,
    LocalJob,
    LocalRoute,
    Policy,
    PrefillJob,
    Route,
    Seq,
    TurnRecord,
)
from conserve.sim.transfer import link_transfer_energy_j, pcie_transfer_energy_j

_ARRIVE, _PREFILL_DONE, _TRANSFER_DONE, _IDLE_CHECK, _SWEEP = 0, 1, 2, 4, 6  # 3, 5: sim.decoding


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
    transfer_energy_j: float = 0.0  # NICs, shared store and PCIe while KV moves
    pd_rule: str = ""  # which P/D rule the policy ran (`Policy.pd_rule`)
    load_scale: float = 1.0  # the workload's arrival rate over the trace's


class Simulator(DecoderLoop):
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
        self.host_kv_bytes_per_gpu = fleet.host_kv_bytes_per_gpu
        #: Whether clients say a conversation ended: the workload's signal, which `end_signal=False` withholds
        #: (chat clients cannot say it): after its last turn a conversation is then released only by the idle
        #: timeout (at once when there is none: the policy holds nothing an end would free).
        self.end_signal = end_signal and workload.signals.end_of_conversation
        self.model = fleet.model
        self.workload = workload
        self.policy = policy
        self.idle_timeout_s = idle_timeout_s
        self.progress = progress
        self.prefill = {
            p.name: PrefillInstance(
                p,
                fleet.model,
                chunk_tokens=fleet.chunk_tokens,
                max_batch=fleet.max_batch_size,
                cache_capacity=fleet.kv_capacity_tokens(p) if fleet.prefill_prefix_cache else 0,
            )
            for p in fleet.prefill
        }
        self.store = (
            LruKv(int(fleet.shared_kv_store_bytes // fleet.model.kv_bytes_per_token))
            if fleet.shared_kv_store_bytes > 0
            else None
        )
        host_on = getattr(policy, "host_offload", True)
        self.decoders = {
            d.name: Decoder(
                d,
                fleet.kv_capacity_tokens(d),
                fleet.max_batch_size,
                host_kv_capacity_tokens(fleet.model, d.tp, fleet.host_kv_bytes_per_gpu) if host_on else 0,
                fleet.chunk_tokens,
            )
            for d in fleet.decode
        }
        self.states = [ConvState(c) for c in workload.conversations]
        self.by_key = {s.key: s for s in self.states}
        self.events: list[tuple[float, int, int, Any]] = []
        self.counter = itertools.count()
        self.now = 0.0
        self.last_done_s = 0.0
        #: Waits of first turns for a placement (the policy's queue: the scheduler's, for ConServe).
        self.pending_waits_s: list[float] = []
        self.turns_done = 0
        self.total_turns = sum(len(c.turns) for c in workload.conversations)
        self.pinned_evictions = 0
        self.offloads = 0
        self.reloads = 0
        self.transfer_energy_j = 0.0
        self.released: set[str] = set()
        # idle_candidates per (decoder, gpu_kv given), valid while `epoch` stands: every event, release and
        # offload moves it on (a policy may ask for candidates many times while nothing changes)
        self.epoch = 0
        self._candidates: dict[tuple[str, bool], tuple[int, list[IdleKv]]] = {}
        largest = max(c.final_context_tokens for c in workload.conversations) if workload.conversations else 0
        smallest = min(d.capacity for d in self.decoders.values())
        if largest > smallest:
            raise ValueError(
                f"a conversation reaches {largest} KV tokens, more than decoder capacity {smallest}: use a bigger "
                "decoder (more memory or tensor parallelism) or a smaller model"
            )
        policy.bind(self, idle_timeout_s)

    # events -----------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.events, (t, next(self.counter), kind, payload))

    def run(self) -> SimResult:
        for s in self.states:
            self._push(s.conv.arrival_s, _ARRIVE, s)
        interval = self.policy.sweep_interval_s
        if interval is not None and self.states:
            self._push(min(s.conv.arrival_s for s in self.states) + interval, _SWEEP, interval)
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            self.now = t
            self.epoch += 1
            self._handle(kind, payload)
        unfinished = [s.key for s in self.states if not s.finished]
        if unfinished:
            raise AssertionError(f"{len(unfinished)} conversations never finished, e.g. {unfinished[:3]}")
        self.now = self.last_done_s  # idle checks after the last turn do not lengthen the run
        for d in self.decoders.values():
            d.last_kv_t = min(d.last_kv_t, self.now)
            self._kv_tick(d)
        return SimResult(
            self.policy.name,
            self.fleet,
            self.workload.name,
            self.states,
            list(self.prefill.values()),
            list(self.decoders.values()),
            self.last_done_s,
            self.pending_waits_s,
            self.pinned_evictions,
            self.offloads,
            self.reloads,
            self.transfer_energy_j,
            getattr(self.policy, "pd_rule", ""),
            self.workload.load_scale,
        )

    def _handle(self, kind: int, payload: Any) -> None:
        if kind == _ARRIVE:
            self._turn_arrives(payload)
        elif kind == _PREFILL_DONE:
            self._prefill_done(payload)
        elif kind == _TRANSFER_DONE:
            decoder, seq = payload
            if seq.record.first_token_s < 0:
                seq.record.first_token_s = self.now
            self._enqueue_join(decoder, seq)
        elif kind == DECODER_WAKE:
            decoder, version = payload
            if decoder.version == version:
                self._decoder_boundary(decoder)
        elif kind in (_IDLE_CHECK, _SWEEP):
            self._timer(kind, payload)
        elif kind == POKE and payload.state == "idle":
            self._decoder_boundary(payload)

    def _timer(self, kind: int, payload: Any) -> None:
        if kind == _IDLE_CHECK:  # the simulator's idle timeout, for policies that do not own one
            state, turns_then = payload
            if state.key not in self.released and len(state.turns) == turns_then:
                self._release(state)
            return
        self.policy.sweep(self.now)  # the policy's timers (ConServe: the scheduler's sweep)
        if self._timers_matter(payload):
            self._push(self.now + payload, _SWEEP, payload)

    def _timers_matter(self, interval_s: float) -> bool:
        """Keep sweeping while work is left, or a waiting turn may still be placed by an idle timeout."""
        if self.events:
            return True
        if self.turns_done >= self.total_turns:
            return False
        timeout = self.idle_timeout_s or 0.0
        return self.now <= self.last_done_s + timeout + 2 * interval_s

    # turns ------------------------------------------------------------------------------------------------
    def _turn_arrives(self, state: ConvState) -> None:
        index = state.next_index
        turn = state.conv.turns[index]
        record = TurnRecord(
            state.key, index, self.now, turn.input_tokens, turn.new_tokens, turn.output_tokens, turn.user_visible
        )
        state.turns.append(record)
        self.released.discard(state.key)
        self._route(state, record)

    def _route(self, state: ConvState, record: TurnRecord) -> None:
        route = self.policy.route(state, record, self.now)
        if route is not None:  # None: it waits in the policy's queue until `start_placed`
            self._start(state, record, route)

    def waiting_turn(self, key: str) -> tuple[ConvState, TurnRecord] | None:
        """The conversation's turn waiting for its placement (None: no turn waits)."""
        state = self.by_key.get(key)
        record = state.turns[-1] if state is not None and state.turns else None
        if state is None or record is None or record.decoder or record.done_s >= 0:
            return None
        return state, record

    def start_placed(self, key: str, route: Route) -> None:
        """A conversation placed from the policy's queue: its waiting first turn starts now, by `route`."""
        waiting = self.waiting_turn(key)
        if waiting is None:
            return  # no turn waiting (a placement the data plane has nothing to do for)
        self._start(waiting[0], waiting[1], route)

    def stored_tokens(self, key: str) -> int:
        return self.store.holds(key) if self.store is not None else 0

    def release_conversation(self, key: str) -> None:
        """The policy released a conversation (its idle timeout): its KV goes everywhere."""
        state = self.by_key[key]
        if key not in self.released:
            self._release(state)

    def refuse(self, key: str, reason: str) -> None:
        """The policy turned the conversation's client away (admission): its waiting turn is never served, no later
        turn comes, and whatever KV it left anywhere goes."""
        state = self.by_key[key]
        if state.finished:
            return
        state.refused = reason
        state.finished = True
        self.total_turns -= len(state.conv.turns) - sum(1 for r in state.turns if r.done_s >= 0)
        if key not in self.released:
            self._release(state)

    def _start(self, state: ConvState, record: TurnRecord, route: Route) -> None:
        if state.started_s is None:
            state.started_s = self.now
            if self.now > record.arrival_s:
                self.pending_waits_s.append(self.now - record.arrival_s)
        turn = state.conv.turns[record.index]
        seq = Seq(state, record, turn.input_tokens, turn.output_tokens - 1)
        record.decoder = route.decoder
        if isinstance(route, LocalRoute):
            self._enqueue_local(self.decoders[route.decoder], LocalJob(seq, turn.new_tokens, turn.reused_tokens))
            return
        instance = self.prefill[route.prefill]
        prompt = route.new_tokens + route.cached_tokens
        cached, load_s = route.cached_tokens, 0.0
        # What the fleet's prefill-side caches hold (same for every policy): the instance's own prefix cache,
        # else the shared store or the decoder the route pulls from (loaded over the link before the first
        # chunk). The prompt's last token is always computed.
        local = min(instance.holds(state.key), prompt - 1)
        stored = min(self.store.holds(state.key), prompt - 1) if self.store is not None else 0
        remote = max(stored, min(route.pull_tokens, prompt - 1))
        if local > cached:
            cached = local
        if remote > cached:
            load_s = kv_transfer_time_s(self.model, remote, self.fleet.link)
            self.transfer_energy_j += link_transfer_energy_j(self.model, remote, self.fleet.link)
            record.loaded_tokens = remote
            cached = remote
        job = PrefillJob(seq, route.decoder, prompt - cached, cached, turn.input_tokens, load_s)
        record.prefill_instance = instance.name
        instance.queue.append(job)
        if not instance.busy:
            self._prefill_next(instance)

    def _turn_done(self, decoder: Decoder, seq: Seq) -> None:
        state, record = seq.state, seq.record
        record.done_s = self.now
        self.last_done_s = max(self.last_done_s, self.now)
        self.turns_done += 1
        if self.progress is not None:
            self.progress(1)
        kv = seq.context
        self.epoch += 1
        state.decoder = decoder.name
        state.kv_tokens = kv
        if self.policy.retain(state, decoder.name) == "pin":
            decoder.pinned[state.key] = kv
            decoder.pinned_tokens += kv
            decoder.pinned_at[state.key] = self.now
        else:
            old = decoder.cache.pop(state.key, None)
            if old is not None:
                decoder.cache_tokens -= old
            decoder.cache[state.key] = kv
            decoder.cache_tokens += kv
        if self.store is not None:  # written back asynchronously, off the turn's critical path
            self.store.put(state.key, kv)
            self.transfer_energy_j += link_transfer_energy_j(self.model, kv, self.fleet.link)
        self.policy.turn_done(state, record, self.now)
        own_checks = self.idle_timeout_s is not None and not self.policy.owns_idle_timeout
        if state.next_index >= len(state.conv.turns):
            state.finished = True
            if self.end_signal:
                self._release(state)
            elif own_checks:
                self._push(self.now + (self.idle_timeout_s or 0.0), _IDLE_CHECK, (state, len(state.turns)))
            return
        nxt = state.conv.turns[state.next_index]
        at = max(nxt.not_before_s or 0.0, self.now + nxt.think_s)
        self._push(at, _ARRIVE, state)
        if own_checks and at - self.now > (self.idle_timeout_s or 0.0):
            self._push(self.now + (self.idle_timeout_s or 0.0), _IDLE_CHECK, (state, len(state.turns)))

    def _release(self, state: ConvState) -> None:
        """The conversation ends (its end signal, or idle past the timeout): its KV is dropped everywhere."""
        self.released.add(state.key)
        key = state.key
        for decoder in self.decoders.values():
            if key in decoder.pinned:
                self._kv_tick(decoder)
                decoder.pinned_tokens -= decoder.pinned.pop(key)
            size = decoder.cache.pop(key, None)
            if size is not None:
                decoder.cache_tokens -= size
            decoder.pinned_at.pop(key, None)
            decoder.drop_host(key)
        for instance in self.prefill.values():
            instance.forget(key)
        if self.store is not None:
            self.store.drop(key)
        freed = self.decoders.get(state.decoder or "")
        self.epoch += 1
        if not state.finished:
            # Released for idleness before its last turn: its next turn starts it again from scratch.
            state.decoder = None
            state.started_s = None
        self.policy.release(state, self.now)  # its queue may place waiting conversations (start_placed)
        if freed is not None and freed.state == "idle":
            self._push(self.now, POKE, freed)

    # host offload -----------------------------------------------------------------------------------------
    def idle_candidates(self, decoder: Decoder, gpu_kv: Callable[[str, int], int] | None = None) -> list[IdleKv]:
        """The decoder's pinned conversations with no turn in progress, as offload candidates."""
        cached = self._candidates.get((decoder.name, gpu_kv is None))
        if cached is not None and cached[0] == self.epoch:
            return list(cached[1])
        out: list[IdleKv] = []
        for key, size in decoder.pinned.items():
            state = self.by_key[key]
            if state.turns and state.turns[-1].done_s < 0:
                continue  # its next turn has arrived: it is about to run
            last = decoder.pinned_at.get(key, 0.0)
            ready = last + pcie_transfer_time_s(self.model, size)
            out.append(IdleKv(key, size if gpu_kv is None else gpu_kv(key, size), size, last, ready))
        self._candidates[(decoder.name, gpu_kv is None)] = (self.epoch, out)
        return list(out)

    def offload(self, decoder: Decoder, key: str) -> None:
        """Move an idle pinned conversation's KV to its decoder's host memory (it keeps its pin)."""
        self._kv_tick(decoder)
        self.epoch += 1
        size = decoder.offload_pinned(key)
        decoder.pinned_at.pop(key, None)
        self.offloads += 1
        self.transfer_energy_j += pcie_transfer_energy_j(self.model, size)
        self.policy.kv_offloaded(self.by_key[key])

    def drop_pinned(self, decoder: Decoder, key: str) -> None:
        """Discard an idle pinned conversation's GPU KV (its policy dropped it; its next turn recomputes it)."""
        self._kv_tick(decoder)
        self.epoch += 1
        decoder.pinned_tokens -= decoder.pinned.pop(key)
        decoder.pinned_at.pop(key, None)

    def _offload_for(self, decoder: Decoder, tokens: int) -> bool:
        """Physical pressure: offload idle pinned KV (least recently active first) until `tokens` fit."""
        need = tokens - decoder.free_tokens()
        if need <= 0:
            return True
        self.epoch += 1  # the decoder loop may have dropped or pinned KV within this event
        victims = choose_offload_victims(self.idle_candidates(decoder), need, decoder.host_free_tokens(), self.now)
        for key in victims:
            self.offload(decoder, key)
        return decoder.free_tokens() >= tokens

    # prefill instances ------------------------------------------------------------------------------------
    def _prefill_next(self, instance: PrefillInstance) -> None:
        """The next chunked-prefill iteration: the batch's prompts first come first served, `chunk_tokens` at
        most (a prompt's shared-store load comes before its first chunk)."""
        while instance.queue and len(instance.batch) < instance.max_batch:
            instance.batch.append(instance.queue.popleft())
        if not instance.batch:
            instance.busy = False
            return
        instance.iteration = fill_iteration(instance.batch, instance.chunk_tokens)
        loads = sum(job.load_s for job, _ in instance.iteration if not job.started)
        compute = iteration_prefill_s(
            instance.spec.device,
            self.model,
            [(take, j.cached_tokens + j.done_tokens) for j, take in instance.iteration],
        )
        instance.iteration_s = (loads, compute)
        duration = loads + compute
        instance.busy = True
        instance.busy_until = self.now + duration
        self._push(instance.busy_until, _PREFILL_DONE, instance)

    def _prefill_done(self, instance: PrefillInstance) -> None:
        device = instance.spec.device
        instance.iterations += 1
        loads, compute = instance.iteration_s
        instance.busy_s += loads + compute
        instance.dynamic_energy_j += (power_w(device, PREFILL_ACTIVITY) - device.idle_power_w) * compute
        for job, take in instance.iteration:
            job.started = True
            job.done_tokens += take
            instance.tokens += take
            record = job.seq.record
            record.prefill_tokens += take
            if job.left_tokens > 0:
                continue
            instance.batch.remove(job)
            instance.remember(record.conversation, job.new_tokens + job.cached_tokens)
            record.generated_tokens = 1
            record.transferred_tokens += job.transfer_tokens
            job.seq.state.kv_transfers += 1
            self.transfer_energy_j += link_transfer_energy_j(self.model, job.transfer_tokens, self.fleet.link)
            arrive = self.now + kv_transfer_time_s(self.model, job.transfer_tokens, self.fleet.link)
            self._push(arrive, _TRANSFER_DONE, (self.decoders[job.decoder], job.seq))
        instance.iteration = []
        self._prefill_next(instance)


class RunOptions(TypedDict, total=False):
    """`Simulator`'s keyword options, for `simulate` to pass on."""

    idle_timeout_s: float | None
    progress: Callable[[int], None] | None
    end_signal: bool


def simulate(fleet: Fleet, workload: Workload, policy: Policy, **options: Unpack[RunOptions]) -> SimResult:
    return Simulator(fleet, workload, policy, **options).run()


def all_records(result: SimResult) -> Iterable[TurnRecord]:
    for state in result.conversations:
        yield from state.turns
