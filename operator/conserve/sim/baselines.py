"""Per-turn baselines: every turn placed on its own, each policy modelled on a real router's rule.

They have no capacity model: a turn is admitted wherever it is sent and waits there for memory. When the
chosen decoder still holds the conversation's KV (GPU prefix cache or its host tier), a policy may prefill
only the new tokens there (`LocalRoute`); otherwise the prompt is prefilled on a prefill instance and its KV
moves to the decoder (`RemoteRoute`), the cost a per-turn policy pays when a turn moves. Every policy sees the
same signals, idle timeout, host tier and prefill-side caches (the engine applies them alike).

- `round-robin`: prefill instances and decoders in turn.
- `least-loaded`: the prefill instance with the least queued work, the decoder with the least KV of running
  and waiting sequences relative to its capacity.
- `prefix-aware`: SGLang's router `cache_aware` policy (sgl-router, `src/policies/cache_aware.rs`): when the
  decoders are balanced (the most and least loaded differ by at most 32 requests or by a factor of at most
  1.0001, its default `balance_abs_threshold` and `balance_rel_threshold`), a turn goes to the decoder
  holding its prefix; otherwise, or without a prefix anywhere, to the least-loaded decoder (fewest requests).
- `sticky`: session affinity: the first turn round-robin, every later turn to the same decoder.
- `per-turn-prediction` (the paper's baseline): the decoder with the most KV left after adding the turn's
  predicted peak (input plus predicted output: the mean output so far, 256 tokens until 10 are seen) to the
  predicted peaks of what runs and waits there; a decoder already holding the conversation's prefix is
  preferred whenever the predicted peak fits there (the prefix need not move).
- `llmd-pd-decider`: llm-d's inference scheduler. The decoder maximizes the weighted sum of its scorers:
  prefix cache (share of the prompt cached there; weight 2), load (`pkg/plugins/scorer/load_aware.go`: 0.5
  for an empty waiting queue, falling linearly to 0 at 128 waiting; weight 1) and session affinity
  (`pkg/plugins/scorer/session_affinity.go`: 1 for the decoder of the conversation's previous turn; weight 1).
  Then the prefix-based P/D decider (`pkg/plugins/profile/prefix_based_pd_decider.go`) prefills remotely only
  when the chosen decoder lacks at least `nonCachedTokens` of the prompt (we set 256; llm-d's default 0 means
  always), else on the decoder. The prefill instance is picked by the prefill profile's prefix and load
  scorers (its own cached prefix when the fleet gives prefill instances a prefix cache).
- `vllm-multiturn-proxy`: vLLM's multi-turn disaggregated proxy
  (`examples/online_serving/disaggregated_serving/disagg_proxy_multiturn.py`): prefill and decode instances
  round-robin; every turn is prefilled on a prefill instance, which first pulls the previous turn's KV back
  from the decoder that holds it (the proxy's cached `kv_transfer_params`, single use, 450 s TTL) so only the
  new tokens are computed; then the whole KV moves to the next decoder.
- `sticky-least-loaded`: session affinity with a least-loaded fallback: a conversation stays on its decoder
  unless that decoder is overloaded (running and waiting KV above 90% of its capacity, or 128 waiting
  requests: llm-d's load-aware threshold), then moves to the least-loaded decoder, which becomes its home.
- `dynamo-kv-router`: NVIDIA Dynamo's KV router (`lib/llm/src/kv_router/scheduler.rs`, documented in
  `docs/router/kv_cache_routing.md`): the decoder of least cost = overlap_score_weight (1.0) x potential prefill
  blocks (the prompt's blocks not cached there, plus prompts queued there) + potential decode blocks (active KV
  blocks there plus the prompt's uncached blocks), 16-token blocks; the prefill
  instance by the same cost over the prefill pool (its own cached prefix, its queued prompt blocks). With
  conditional disaggregation a prompt whose uncached part is under 1000 tokens
  (`max_local_prefill_length`) is prefilled on the decoder.

Prefill instances, unless a policy says otherwise: least queued work first, ties by name.

**Where a turn is prefilled.** By default every baseline hands the decoder it picked to the shared P/D decider
(`conserve.sim.pd.decided_route`, ConServe's), so policies differ only in placement, admission and KV
lifecycle. `<name>@native` runs the policy's own rule (`native_route`, described above and in `native_rule`) for
the benchmark's attribution of the P/D decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

from conserve.sim.pd import decided_route
from conserve.sim.pd import decoder_holds as held_tokens
from conserve.sim.policy_base import PolicyBase
from conserve.sim.records import ConvState, LocalRoute, RemoteRoute, Route, TurnRecord

if TYPE_CHECKING:
    from conserve.sim.instances import Decoder


def waiting_requests(decoder: Decoder) -> int:
    return len(decoder.join_queue) + len(decoder.local_queue)


class Rotation:
    """Round-robin over names: the n-th pick takes the n-th name, wrapping around."""

    def __init__(self) -> None:
        self._picks = 0

    def pick(self, names: Iterable[str]) -> str:
        ordered = list(names)
        name = ordered[self._picks % len(ordered)]
        self._picks += 1
        return name


class PerTurn(PolicyBase):
    """A per-turn policy: pick a decoder, then prefill where the shared decider says (natively: reuse the
    decoder's cached prefix if it has one, else prefill and move all)."""

    native_rule = "the decoder when it holds the conversation's earlier KV, else the pool"

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        raise NotImplementedError

    def pick_prefill(self, record: TurnRecord, now: float) -> str:
        return self.least_loaded_prefill(now)

    def pull_tokens(self, state: ConvState, record: TurnRecord, now: float) -> int:
        """KV of the conversation a pool-side prefill first pulls back from a decoder (0: none)."""
        return 0

    def route(self, state: ConvState, record: TurnRecord, now: float) -> Route | None:
        name = self.pick_decoder(state, record, now)
        if self.native:
            return self.native_route(state, record, name, now)
        return decided_route(self.sim, self.pd, state, record, name, now, self.pull_tokens(state, record, now))

    def native_route(self, state: ConvState, record: TurnRecord, name: str, now: float) -> Route:
        decoder = self.sim.decoders[name]
        if record.index > 0 and record.new_tokens < record.input_tokens and decoder.holds(state.key):
            return LocalRoute(name)
        return RemoteRoute(self.pick_prefill(record, now), name, record.input_tokens)

    def decoders(self) -> list[Decoder]:
        return list(self.sim.decoders.values())


Memory = TypeVar("Memory")


class PerConversationMemory(PerTurn, Generic[Memory]):
    """A per-turn policy that remembers one thing per conversation (its home decoder, the decoder of its previous
    turn...) and forgets it when the conversation is released."""

    def __init__(self) -> None:
        super().__init__()
        self.memory: dict[str, Memory] = {}

    def release(self, state: ConvState, now: float) -> None:
        self.memory.pop(state.key, None)


class ConditionalDisaggregation(PerTurn):
    """Prefill on the chosen decoder when it lacks fewer than `LOCAL_PREFILL_BELOW_TOKENS` of the prompt (its
    cached prefix covers the rest), else on a prefill instance (llm-d's P/D decider, Dynamo's conditional
    disaggregation)."""

    LOCAL_PREFILL_BELOW_TOKENS = 0

    @property
    def native_rule(self) -> str:  # type: ignore[override]
        return f"the decoder when it lacks under {self.LOCAL_PREFILL_BELOW_TOKENS} tokens of the prompt"

    def native_route(self, state: ConvState, record: TurnRecord, name: str, now: float) -> Route:
        uncached = record.input_tokens - held_tokens(self.sim.decoders[name], state.key, record.input_tokens)
        if uncached < self.LOCAL_PREFILL_BELOW_TOKENS:
            return LocalRoute(name)
        return RemoteRoute(self.pick_prefill(record, now), name, record.input_tokens)


class RoundRobin(PerTurn):
    name = "round-robin"

    def __init__(self) -> None:
        super().__init__()
        self._decoders = Rotation()
        self._prefills = Rotation()

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        return self._decoders.pick(self.sim.decoders)

    def pick_prefill(self, record: TurnRecord, now: float) -> str:
        return self._prefills.pick(self.sim.prefill)


class LeastLoaded(PerTurn):
    name = "least-loaded"

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        return min(self.decoders(), key=lambda d: (d.load_tokens() / d.capacity, d.name)).name


class PrefixAware(PerTurn):
    name = "prefix-aware"
    #: sgl-router defaults (cache_aware policy).
    BALANCE_ABS_THRESHOLD = 32
    BALANCE_REL_THRESHOLD = 1.0001

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        decoders = self.decoders()
        loads = {d.name: d.active_sequences() for d in decoders}
        least = min(decoders, key=lambda d: (loads[d.name], d.name)).name
        most, fewest = max(loads.values()), min(loads.values())
        imbalanced = most - fewest > self.BALANCE_ABS_THRESHOLD and most > fewest * self.BALANCE_REL_THRESHOLD
        if imbalanced:
            return least
        holders = [d for d in decoders if d.holds(state.key)]
        if holders:
            return min(holders, key=lambda d: (loads[d.name], d.name)).name
        return least


class Sticky(PerConversationMemory[str]):
    name = "sticky"

    def __init__(self) -> None:
        super().__init__()
        self._first_turns = Rotation()

    @property
    def home(self) -> dict[str, str]:
        """Conversation -> the decoder it sticks to."""
        return self.memory

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        home = self.home.get(state.key)
        if home is None:
            home = self.home[state.key] = self._first_turns.pick(self.sim.decoders)
        return home


class StickyLeastLoaded(Sticky):
    name = "sticky-least-loaded"
    OVERLOAD_KV_FRACTION = 0.9
    OVERLOAD_WAITING = 128

    def overloaded(self, decoder: Decoder) -> bool:
        return (
            decoder.load_tokens() > self.OVERLOAD_KV_FRACTION * decoder.capacity
            or waiting_requests(decoder) >= self.OVERLOAD_WAITING
        )

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        home = self.home.get(state.key)
        if home is not None and not self.overloaded(self.sim.decoders[home]):
            return home
        least = min(self.decoders(), key=lambda d: (d.load_tokens() / d.capacity, d.name)).name
        self.home[state.key] = least
        return least


class PerTurnPrediction(PerTurn):
    name = "per-turn-prediction"
    PRIOR_OUTPUT_TOKENS = 256
    MIN_OBSERVATIONS = 10

    def __init__(self) -> None:
        super().__init__()
        self.outputs_seen = 0
        self.outputs_sum = 0

    def predicted_output(self) -> float:
        if self.outputs_seen < self.MIN_OBSERVATIONS:
            return float(self.PRIOR_OUTPUT_TOKENS)
        return self.outputs_sum / self.outputs_seen

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        predicted = self.predicted_output()

        def left(decoder: Decoder) -> float:
            running = sum(s.context + max(predicted - s.record.generated_tokens, 0.0) for s in decoder.running)
            waiting = sum(s.context + predicted for s in decoder.join_queue)
            local = sum(j.seq.context + predicted for j in decoder.local_queue)
            batch = sum(j.seq.context + predicted for j in decoder.prefill_batch)
            return decoder.capacity - (running + waiting + local + batch + record.input_tokens + predicted)

        holders = [d for d in self.decoders() if record.index > 0 and d.holds(state.key) and left(d) >= 0]
        if holders:
            return max(holders, key=lambda d: (left(d) / d.capacity, d.name)).name
        return min(self.decoders(), key=lambda d: (-left(d) / d.capacity, d.name)).name

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        self.outputs_seen += 1
        self.outputs_sum += record.output_tokens


class LlmdPdDecider(ConditionalDisaggregation, PerConversationMemory[str]):
    name = "llmd-pd-decider"
    PREFIX_WEIGHT = 2.0
    LOAD_WEIGHT = 1.0
    SESSION_WEIGHT = 1.0
    QUEUE_THRESHOLD = 128  # load_aware.go QueueThresholdDefault
    LOCAL_PREFILL_BELOW_TOKENS = 256  # the decider's nonCachedTokens

    @property
    def last_decoder(self) -> dict[str, str]:
        """The session cookie: conversation -> the decoder its previous turn ran on."""
        return self.memory

    def score(self, decoder: Decoder, key: str, prompt: int) -> float:
        waiting = min(waiting_requests(decoder), self.QUEUE_THRESHOLD)
        load = 0.5 * (1.0 - waiting / self.QUEUE_THRESHOLD)
        prefix = held_tokens(decoder, key, prompt) / max(prompt, 1)
        session = 1.0 if self.last_decoder.get(key) == decoder.name else 0.0
        return self.PREFIX_WEIGHT * prefix + self.LOAD_WEIGHT * load + self.SESSION_WEIGHT * session

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        best = max(self.decoders(), key=lambda d: (self.score(d, state.key, record.input_tokens), d.name))
        self.last_decoder[state.key] = best.name
        return best.name

    def pick_prefill(self, record: TurnRecord, now: float) -> str:
        def score(name: str) -> float:
            p = self.sim.prefill[name]
            waiting = min(len(p.queue), self.QUEUE_THRESHOLD)
            load = 0.5 * (1.0 - waiting / self.QUEUE_THRESHOLD)
            prefix = min(p.holds(record.conversation), record.input_tokens) / max(record.input_tokens, 1)
            return self.PREFIX_WEIGHT * prefix + self.LOAD_WEIGHT * load - p.load_s(now) * 1e-9  # ties: less work

        return max(sorted(self.sim.prefill), key=score)


class VllmMultiturnProxy(RoundRobin, PerConversationMemory[tuple[str, float]]):
    """Remembers, per conversation, the decoder of its previous turn and when that turn ended."""

    name = "vllm-multiturn-proxy"
    native_rule = "the pool, which pulls the previous turn's KV back from its decoder"
    KV_PARAMS_TTL_S = 450.0

    def pull_tokens(self, state: ConvState, record: TurnRecord, now: float) -> int:
        cached = self.memory.pop(state.key, None)  # single use
        if cached is not None and now - cached[1] <= self.KV_PARAMS_TTL_S:
            return min(self.sim.decoders[cached[0]].peek_kv(state.key), record.input_tokens)
        return 0

    def native_route(self, state: ConvState, record: TurnRecord, name: str, now: float) -> Route:
        prefill = self.pick_prefill(record, now)
        pulled = self.pull_tokens(state, record, now)
        return RemoteRoute(prefill, name, record.input_tokens, pull_tokens=pulled)

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        self.memory[state.key] = (record.decoder, now)


class DynamoKvRouter(ConditionalDisaggregation):
    name = "dynamo-kv-router"
    OVERLAP_SCORE_WEIGHT = 1.0
    BLOCK_TOKENS = 16
    LOCAL_PREFILL_BELOW_TOKENS = 1000  # max_local_prefill_length

    def cost(self, decoder: Decoder, key: str, prompt: int) -> float:
        """Potential blocks if the request went there: the prefill still to do there (the prompt's uncached part
        plus prompts queued there) and the active blocks plus what the request adds (its uncached part)."""
        uncached = prompt - held_tokens(decoder, key, prompt)
        pending = sum(j.left_tokens for j in decoder.local_queue) + sum(j.left_tokens for j in decoder.prefill_batch)
        prefill_blocks = (uncached + pending) / self.BLOCK_TOKENS
        decode_blocks = (decoder.load_tokens() + uncached) / self.BLOCK_TOKENS
        return self.OVERLAP_SCORE_WEIGHT * prefill_blocks + decode_blocks

    def pick_decoder(self, state: ConvState, record: TurnRecord, now: float) -> str:
        return min(self.decoders(), key=lambda d: (self.cost(d, state.key, record.input_tokens), d.name)).name

    def pick_prefill(self, record: TurnRecord, now: float) -> str:
        def cost(name: str) -> float:
            p = self.sim.prefill[name]
            cached = min(p.holds(record.conversation), record.input_tokens)
            queued = sum(j.left_tokens for j in p.queue) + sum(j.left_tokens for j in p.batch)
            return (self.OVERLAP_SCORE_WEIGHT * (record.input_tokens - cached) + queued) / self.BLOCK_TOKENS

        return min(self.sim.prefill, key=lambda n: (cost(n), n))


PER_TURN_BASELINES: tuple[type[PerTurn], ...] = (
    RoundRobin,
    LeastLoaded,
    PrefixAware,
    Sticky,
    PerTurnPrediction,
    LlmdPdDecider,
    VllmMultiturnProxy,
    StickyLeastLoaded,
    DynamoKvRouter,
)


def with_native_rule(policy: type[PerTurn]) -> type[PerTurn]:
    """The policy with its own P/D rule instead of the shared decider, named `<name>@native`."""
    doc = f"{policy.name} with its own P/D rule (the benchmark's attribution)."
    namespace = {"name": f"{policy.name}@native", "native": True, "__doc__": doc}
    return type(f"{policy.__name__}Native", (policy,), namespace)


NATIVE_BASELINES: tuple[type[PerTurn], ...] = tuple(with_native_rule(p) for p in PER_TURN_BASELINES)
