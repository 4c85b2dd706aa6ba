"""Each per-turn baseline's decision rule, on a bound simulator whose decoders' state is set by hand."""

from __future__ import annotations

import pytest

from conserve.sim.baselines import (
    DynamoKvRouter,
    LlmdPdDecider,
    PerTurn,
    PerTurnPrediction,
    StickyLeastLoaded,
    VllmMultiturnProxy,
    with_native_rule,
)
from conserve.sim.engine import Simulator
from conserve.sim.fleet import build_fleet
from conserve.sim.instances import Decoder
from conserve.sim.records import ConvState, LocalRoute, RemoteRoute, Seq, TurnRecord
from conserve.sim.workload import Conversation, Turn, Workload

FLEET = build_fleet(
    {
        "model": "llama-3-8b",
        "tiered": {"prefill": [{"gpu": "H100", "count": 2}], "decode": [{"gpu": "H200", "count": 2}]},
    },
    tiered=True,
)
CONV = Conversation("c", 0.0, (Turn(3000, 3000, 10, 0.0), Turn(3100, 90, 10, 0.0)))
OTHER = Conversation("o", 0.0, (Turn(1000, 1000, 10, 0.0),))


def bound(policy: PerTurn) -> tuple[Simulator, ConvState, TurnRecord]:
    sim = Simulator(FLEET, Workload("t", (CONV, OTHER)), policy)
    state = sim.by_key["c"]
    record = TurnRecord("c", 1, 10.0, 3100, 90, 10, True)
    state.turns = [TurnRecord("c", 0, 0.0, 3000, 3000, 10, True), record]
    return sim, state, record


def cache(decoder: Decoder, key: str, tokens: int) -> None:
    decoder.cache[key] = tokens
    decoder.cache_tokens += tokens


def load(sim: Simulator, decoder: Decoder, tokens: int, sequences: int = 1) -> None:
    other = sim.by_key["o"]
    for _ in range(sequences):
        seq = Seq(other, TurnRecord("o", 0, 0.0, 1000, 1000, 10, True), tokens // sequences, 10)
        decoder.running.append(seq)
        decoder.running_tokens += seq.context


def native(policy: type[PerTurn]) -> PerTurn:
    """The policy with its own P/D rule (the default is the shared decider)."""
    made = with_native_rule(policy)()
    assert made.native
    assert made.name == f"{policy.name}@native"
    return made


def test_llmd_prefills_on_the_decoder_when_little_is_uncached() -> None:
    sim, state, record = bound(native(LlmdPdDecider))
    _, d1 = sim.decoders.values()
    cache(d1, "c", 3009)  # the previous turn's context: all but 91 of the prompt's tokens
    route = sim.policy.route(state, record, 10.0)
    assert route == LocalRoute(d1.name)  # prefix scorer picks d1; 91 uncached < nonCachedTokens (256)


def test_llmd_disaggregates_when_much_is_uncached() -> None:
    sim, state, record = bound(native(LlmdPdDecider))
    _, d1 = sim.decoders.values()
    cache(d1, "c", 1000)  # 2100 tokens missing there
    route = sim.policy.route(state, record, 10.0)
    assert isinstance(route, RemoteRoute)
    assert route.decoder == d1.name
    assert route.new_tokens == 3100


def test_llmd_session_affinity_breaks_a_tie() -> None:
    policy = LlmdPdDecider()
    sim, state, record = bound(policy)
    d0, d1 = sim.decoders.values()
    policy.last_decoder["c"] = d0.name  # the session cookie names d0; neither decoder holds a prefix
    assert policy.pick_decoder(state, record, 10.0) == d0.name
    load(sim, d1, 100)  # load on d1 does not matter while both waiting queues are empty
    assert policy.pick_decoder(state, record, 10.0) == d0.name


def test_vllm_proxy_pulls_the_previous_turns_kv_back() -> None:
    policy = native(VllmMultiturnProxy)
    assert isinstance(policy, VllmMultiturnProxy)
    sim, state, record = bound(policy)
    d0, _ = sim.decoders.values()
    cache(d0, "c", 3009)
    policy.turn_done(state, TurnRecord("c", 0, 0.0, 3000, 3000, 10, True, decoder=d0.name), 5.0)
    route = policy.route(state, record, 10.0)
    assert isinstance(route, RemoteRoute)
    assert route.pull_tokens == 3009
    assert route.decoder == d0.name  # round-robin: the first pick
    # single use, and stale after the TTL
    assert isinstance(again := policy.route(state, record, 11.0), RemoteRoute)
    assert again.pull_tokens == 0
    policy.turn_done(state, TurnRecord("c", 0, 0.0, 3000, 3000, 10, True, decoder=d0.name), 5.0)
    late = policy.route(state, record, 5.0 + VllmMultiturnProxy.KV_PARAMS_TTL_S + 1.0)
    assert isinstance(late, RemoteRoute)
    assert late.pull_tokens == 0


def test_sticky_least_loaded_moves_only_when_home_is_overloaded() -> None:
    policy = StickyLeastLoaded()
    sim, state, record = bound(policy)
    d0, d1 = sim.decoders.values()
    policy.home["c"] = d1.name
    load(sim, d1, int(d1.capacity * 0.5))
    assert policy.pick_decoder(state, record, 10.0) == d1.name  # busy but not overloaded: stays
    load(sim, d1, int(d1.capacity * 0.45))
    assert policy.pick_decoder(state, record, 10.0) == d0.name  # over 90%: least loaded, the new home
    assert policy.home["c"] == d0.name


def test_dynamo_cost_trades_cached_blocks_against_decode_load() -> None:
    policy = native(DynamoKvRouter)
    assert isinstance(policy, DynamoKvRouter)
    sim, state, record = bound(policy)
    d0, d1 = sim.decoders.values()
    cache(d1, "c", 3009)
    assert policy.pick_decoder(state, record, 10.0) == d1.name
    assert policy.route(state, record, 10.0) == LocalRoute(d1.name)  # 91 uncached < max_local_prefill_length
    # d1 saves the cached 3009 tokens twice (no prefill blocks, no new decode blocks): 376 blocks of cost
    load(sim, d1, 5900)
    assert policy.pick_decoder(state, record, 10.0) == d1.name
    load(sim, d1, 200)  # now its active blocks outweigh what the cache saves
    assert policy.pick_decoder(state, record, 10.0) == d0.name
    route = policy.route(state, record, 10.0)
    assert isinstance(route, RemoteRoute)
    assert route.decoder == d0.name


def test_per_turn_prediction_keeps_a_turn_where_its_prefix_is_cached() -> None:
    policy = PerTurnPrediction()
    sim, state, record = bound(policy)
    d0, d1 = sim.decoders.values()
    cache(d1, "c", 3009)
    load(sim, d1, 10_000)  # d1 has less room left than d0, but the turn fits there
    assert policy.pick_decoder(state, record, 10.0) == d1.name
    load(sim, d1, d1.capacity - 10_000 - 1000)  # now the predicted peak does not fit on d1
    assert policy.pick_decoder(state, record, 10.0) == d0.name


@pytest.mark.parametrize("policy", [LlmdPdDecider, VllmMultiturnProxy, StickyLeastLoaded, DynamoKvRouter])
@pytest.mark.parametrize("own_rule", [False, True])
def test_new_baselines_run_a_workload_to_completion(policy: type[PerTurn], own_rule: bool) -> None:
    made = with_native_rule(policy)() if own_rule else policy()
    result = Simulator(FLEET, Workload("t", (CONV, OTHER)), made).run()
    assert result.pd_rule.startswith("native" if own_rule else "decider: auto")
    assert all(s.finished for s in result.conversations)
    assert all(r.done_s > r.first_token_s > r.arrival_s for s in result.conversations for r in s.turns)


def test_the_shared_decider_moves_a_later_turn_to_the_pool_when_its_decoder_is_busy() -> None:
    policy = StickyLeastLoaded()
    sim, state, record = bound(policy)
    _, d1 = sim.decoders.values()
    policy.home["c"] = d1.name
    cache(d1, "c", 1000)  # 2,100 of the prompt's tokens missing there
    assert policy.route(state, record, 10.0) == LocalRoute(d1.name)  # idle: computing 2,100 there is soonest
    load(sim, d1, 20_000, sequences=40)  # 40 streams would each stall while it computes
    route = policy.route(state, record, 10.0)
    assert isinstance(route, RemoteRoute)
    assert route.decoder == d1.name
    assert policy.pd_rule == "decider: auto"
