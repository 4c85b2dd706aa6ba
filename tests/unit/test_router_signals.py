"""The router's P/D signals and planner, pure: what it observes of each server (scraped load, timed speeds, its own
requests in flight), what the decider is given, and where a turn goes as that changes."""

from __future__ import annotations

import pytest

from conserve.core.decisions import PrefillSite
from conserve.core.pd import PdRule, PdSettings
from conserve.exposition import EngineLoad, engine_load, sample_sum, sample_values
from conserve.router.control import PlacementCache, pd_settings_of
from conserve.router.planner import Planner
from conserve.router.policy import Backend, LoadBook, Mode, Placement, TurnPlan
from conserve.router.signals import (
    MIN_SAMPLE_TOKENS,
    PRIOR_MEAN_PROMPT_TOKENS,
    PRIOR_TOKENS_PER_S,
    Signals,
    turn_prompt,
)
from conserve.router.turns import ConversationState
from conserve.testkit import PoolBuilder

P1, P2 = Backend("pre-0", "10.0.0.1:8000"), Backend("pre-1", "10.0.0.2:8000")
D1 = Backend("dec-0", "10.0.0.3:8000")

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
# TYPE vllm:prompt_tokens_by_source counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_compute"} 700.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="external_kv_transfer"} 640.0
"""


def test_an_engines_load_and_counters_read_from_its_exposition() -> None:
    assert engine_load(VLLM) == EngineLoad(running=3, waiting=2, kv_usage=0.25)
    # gpu-sim's older KV name; no waiting gauge: 0
    assert engine_load("vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_running 1\n") == EngineLoad(1, 0, 0.5)
    assert engine_load("vllm:num_requests_running 4\n") == EngineLoad(4, 0, None)
    assert engine_load("not { a metric") is None
    source = "vllm:prompt_tokens_by_source_total"
    assert sample_sum(VLLM, source, {"source": "external_kv_transfer"}) == 640.0
    assert sample_sum(VLLM, source) == 1340.0
    assert sample_values(VLLM, "vllm:no_such_metric") == []


def test_speeds_are_observed_per_server_from_the_prior_on() -> None:
    s = Signals()
    assert s.tokens_per_s(P1.endpoint) == PRIOR_TOKENS_PER_S
    ticket = s.start(P1.endpoint, 2000, now_s=10.0)
    s.prefilled(ticket, now_s=10.5)  # 2,000 tokens in 0.5 s
    s.end(ticket)
    assert s.tokens_per_s(P1.endpoint) == pytest.approx(4000.0)
    ticket = s.start(P1.endpoint, 1000, now_s=20.0)
    s.prefilled(ticket, now_s=20.1)  # 10,000 tokens/s: the EWMA moves toward it
    assert 4000.0 < s.tokens_per_s(P1.endpoint) < 10_000.0
    fast = s.tokens_per_s(P1.endpoint)
    # A server not observed yet is taken to be as fast as those observed (not the prior any more).
    assert s.tokens_per_s(D1.endpoint) == pytest.approx(fast)
    # No sample: a request that ended before its prefill finished (failed, cancelled), one whose KV came by
    # transfer (no tokens), one too short to time more than the request's fixed costs.
    s.end(s.start(D1.endpoint, 500, now_s=0.0))
    kv_only = s.start(D1.endpoint, 0, now_s=0.0)
    s.prefilled(kv_only, now_s=5.0)
    short = s.start(D1.endpoint, MIN_SAMPLE_TOKENS - 1, now_s=0.0)
    s.prefilled(short, now_s=5.0)
    assert s.tokens_per_s(D1.endpoint) == pytest.approx(fast)
    own = s.start(D1.endpoint, 600, now_s=0.0)
    s.prefilled(own, now_s=0.3)  # its own prefill: 2,000 tokens/s
    assert s.tokens_per_s(D1.endpoint) == pytest.approx(2000.0)
    assert s.tokens_per_s(P1.endpoint) == pytest.approx(fast)  # per server


def test_queued_work_counts_the_routers_own_prompts_and_the_others_the_scrape_shows() -> None:
    s = Signals()
    rate = PRIOR_TOKENS_PER_S
    assert s.prefill_server(P1.name, P1.endpoint).queued_s == 0.0
    mine = s.start(P1.endpoint, 3000, now_s=0.0)
    assert s.queued_s(P1.endpoint, decoder=False) == pytest.approx(3000 / rate)
    # The scrape sees 1 running (the router's own) and 2 waiting: 2 others, of the mean prompt each.
    s.scraped(P1.endpoint, EngineLoad(running=1, waiting=2))
    assert s.queued_s(P1.endpoint, decoder=False) == pytest.approx((3000 + 2 * PRIOR_MEAN_PROMPT_TOKENS) / rate)
    s.prefilled(mine, now_s=0.3)
    s.end(mine)
    # The scrape is older than the router's own count: never fewer than none queued.
    s.scraped(P1.endpoint, EngineLoad(running=0, waiting=0))
    assert s.queued_s(P1.endpoint, decoder=False) == 0.0
    # A decoder: its running streams decode (not queued prefill work); the waiting ones beyond the router's own do.
    s.prompt_seen(400)
    s.scraped(D1.endpoint, EngineLoad(running=6, waiting=1))
    d = s.decoder(D1.name, D1.endpoint)
    rate = s.tokens_per_s(D1.endpoint)
    assert (d.running, d.prefill_tokens_per_s) == (6, rate)
    assert d.queued_prefill_s == pytest.approx(s.mean_prompt.mean / rate)
    s.start(D1.endpoint, 250, now_s=1.0)  # the router's own turn, before its first token (it is the waiting one)
    assert s.decoder(D1.name, D1.endpoint).queued_prefill_s == pytest.approx(250 / rate)


def test_a_server_no_pool_lists_is_forgotten_unless_a_request_is_in_flight_there() -> None:
    s = Signals()
    s.scraped(P1.endpoint, EngineLoad(running=5))
    busy = s.start(P2.endpoint, 100, now_s=0.0)
    s.keep_only({D1.endpoint})
    assert set(s.snapshot()) == {P2.endpoint}
    s.end(busy)
    s.keep_only(set())
    assert s.snapshot() == {}


def test_what_the_decoder_holds_is_the_previous_context_only_while_it_holds_the_conversation() -> None:
    held = turn_prompt(1300, context_tokens=1200, decoder_holds=True)
    assert (held.decoder_cached_tokens, held.decoder_uncached_tokens, held.first_turn) == (1200, 100, False)
    moved = turn_prompt(1300, context_tokens=1200, decoder_holds=False)  # a first turn, a re-placement
    assert (moved.decoder_cached_tokens, moved.decoder_uncached_tokens, moved.first_turn) == (0, 1300, True)
    cut = turn_prompt(500, context_tokens=1200, decoder_holds=True)  # the client cut its history
    assert cut.decoder_cached_tokens == 500


def _planner(settings: PdSettings | None = None) -> tuple[Planner, Signals]:
    signals = Signals()
    return Planner(lambda _pool: settings or PdSettings(), signals, LoadBook()), signals


def _plan(
    planner: Planner, prompt_tokens: int, kv_generation: int | None, prefills: list[Backend] | None = None
) -> tuple[TurnPlan, int]:
    """A later turn (previous context 2,000 tokens) of a conversation placed on D1 (generation 1);
    `kv_generation` 1: D1 served its last turn."""
    state = ConversationState("c", "r-c", Mode.CONVERSATION, 0.0, kv_generation=kv_generation, context_tokens=2000)
    return planner.plan(
        mode=Mode.CONVERSATION,
        pool="p",
        prefills=[P1, P2] if prefills is None else prefills,
        decoders=[D1],
        placement=Placement(1, D1),
        state=state,
        decided=None,
        prompt_tokens=prompt_tokens,
    )


def test_a_first_turn_before_its_placement_goes_to_the_least_busy_prefill_server_unless_short() -> None:
    planner, signals = _planner()
    signals.scraped(P1.endpoint, EngineLoad(running=1, waiting=3))  # P1 busy with others' prompts
    choice, target = planner.first_choice("p", [P1, P2], [], "c", 3000)
    assert choice is not None
    assert (choice.site, target) == (PrefillSite.POOL, P2)
    choice, target = planner.first_choice("p", [P1, P2], [], "c", 200)  # <= decoderMaxTokens (256)
    assert choice is not None
    assert (choice.site, target) == (PrefillSite.DECODER, None)
    choice, target = planner.first_choice("p", [], [], "c", 3000)  # no prefill server at all
    assert choice is not None
    assert (choice.site, target) == (PrefillSite.DECODER, None)


def test_a_first_turn_waits_for_its_decoder_when_the_likely_one_would_prefill_it_sooner() -> None:
    planner, signals = _planner()
    signals.scraped(P1.endpoint, EngineLoad(running=1, waiting=3))
    signals.scraped(P2.endpoint, EngineLoad(running=1, waiting=3))  # the pool is busy, D1 idle: no early prefill
    assert planner.first_choice("p", [P1, P2], [D1], "c", 3000) == (None, None)
    signals.scraped(D1.endpoint, EngineLoad(running=40, waiting=0))  # 40 streams would stall: the pool, at once
    choice, target = planner.first_choice("p", [P1, P2], [D1], "c", 3000)
    assert choice is not None
    assert choice.on_pool
    assert target in (P1, P2)


def test_a_later_turn_follows_the_decoders_load() -> None:
    # Auto, no threshold shortcut, streams' stall counted: an idle decoder prefills 600 new tokens itself rather
    # than have 2,600 recomputed on the pool; with streams running there the pool is sooner in the decider's sum.
    planner, signals = _planner(PdSettings(decoder_max_tokens=0, stall_weight=1.0, kv_bytes_per_token=0))
    plan, own = _plan(planner, 2600, kv_generation=1)
    assert (plan.site, plan.prefill, own) == (PrefillSite.DECODER, None, 600)
    signals.scraped(D1.endpoint, EngineLoad(running=8))
    plan, own = _plan(planner, 2600, kv_generation=1)
    assert (plan.site, plan.prefill, own) == (PrefillSite.POOL, P1, 0)
    assert plan.kv_transfer
    # The streams end: the decoder again.
    signals.scraped(D1.endpoint, EngineLoad(running=0))
    assert _plan(planner, 2600, kv_generation=1)[0].site is PrefillSite.DECODER


def test_a_busy_pool_keeps_a_turn_on_its_decoder() -> None:
    planner, signals = _planner(PdSettings(decoder_max_tokens=0, kv_bytes_per_token=0))
    signals.scraped(D1.endpoint, EngineLoad(running=4))
    assert _plan(planner, 2600, kv_generation=1)[0].site is PrefillSite.POOL
    for server in (P1, P2):  # every prefill server has ten prompts queued
        signals.scraped(server.endpoint, EngineLoad(running=1, waiting=9))
    assert _plan(planner, 2600, kv_generation=1)[0].site is PrefillSite.DECODER


def test_a_re_placed_conversation_is_a_first_turn_on_its_new_decoder() -> None:
    # The `decoder` rule (ConServe before the decider) sends a decoder's first turn to the pool.
    planner, _ = _planner(PdSettings(rule=PdRule.DECODER))
    plan, own = _plan(planner, 2100, kv_generation=None)
    assert (plan.site, own) == (PrefillSite.POOL, 0)
    plan, own = _plan(planner, 2100, kv_generation=1)
    assert (plan.site, own) == (PrefillSite.DECODER, 100)
    # With no prefill server the decoder prefills everything.
    plan, own = _plan(planner, 2100, kv_generation=None, prefills=[])
    assert (plan.site, own) == (PrefillSite.DECODER, 2100)


def test_per_turn_mode_ignores_the_decider() -> None:
    planner, signals = _planner(PdSettings(rule=PdRule.DECODER))
    signals.scraped(D1.endpoint, EngineLoad(running=0))
    plan, own = planner.plan(
        mode=Mode.PER_TURN,
        pool="p",
        prefills=[P1],
        decoders=[D1],
        placement=None,
        state=None,
        decided=None,
        prompt_tokens=900,
    )
    assert (plan.prefill, plan.decoder, own) == (P1, D1, 0)


def test_the_pools_decider_settings_come_from_its_spec_through_the_watch_cache() -> None:
    cache = PlacementCache()
    assert cache.pool_pd_settings("chat") == PdSettings()  # a pool not seen yet: the defaults
    spec = {"rule": "Threshold", "decoderMaxTokens": 512, "stallWeight": 2.5, "kvLinkGbps": 8.0}
    body = PoolBuilder("chat").decoders("dec").spec(prefillDecider=spec).build()
    cache.apply("decoderpools", "ADDED", body)
    settings = cache.pool_pd_settings("chat")
    assert (settings.rule, settings.decoder_max_tokens, settings.stall_weight) == (PdRule.THRESHOLD, 512, 2.5)
    assert settings.kv_link_bytes_per_s == 1e9
    assert settings.kv_bytes_per_token == 131072  # llama-3-8b's KV per token, from the model
    assert pd_settings_of({"model": {"name": "llama-3-8b"}}) == PdSettings()  # no selector: not a valid spec
    cache.apply("decoderpools", "DELETED", body)
    assert cache.pool_pd_settings("chat") == PdSettings()
