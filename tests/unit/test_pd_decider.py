"""The P/D decider (`conserve.core.pd`): where a turn is prefilled, from the load observed at that moment."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.api.scheduling import pd_settings
from conserve.core.decisions import PrefillSite
from conserve.core.pd import DecoderLoad, PdRule, PdSettings, PrefillServerLoad, TurnPrompt, decide

pytestmark = pytest.mark.unit

AUTO = PdSettings(kv_link_bytes_per_s=25e9, kv_bytes_per_token=131_072)  # llama-3-8b over 200 Gb/s
IDLE_POOL = [PrefillServerLoad("p0", 0.0, 20_000.0), PrefillServerLoad("p1", 0.0, 20_000.0)]
#: A later turn of 8,000 tokens whose decoder holds 6,000: 2,000 new.
LATER = TurnPrompt(8_000, 6_000)


def decoder(running: int = 0, queued_s: float = 0.0, rate: float = 10_000.0) -> DecoderLoad:
    return DecoderLoad("d0", queued_s, rate, running)


def test_a_short_remainder_stays_on_the_decoder_whatever_the_load() -> None:
    choice = decide(AUTO, TurnPrompt(8_000, 7_800), IDLE_POOL, decoder(running=200))
    assert choice.site is PrefillSite.DECODER
    assert choice.server is None


def test_an_idle_decoder_appends_a_later_turn_rather_than_recomputing_it_on_the_pool() -> None:
    # Pool: 8,000 tokens (it holds none) at 20k/s plus moving 2,000 tokens' KV; decoder: 2,000 at 10k/s.
    choice = decide(AUTO, LATER, IDLE_POOL, decoder())
    assert choice.site is PrefillSite.DECODER
    assert choice.decoder_s == pytest.approx(0.2)
    assert choice.pool_s == pytest.approx(0.4 + 2_000 * 131_072 / 25e9)


def test_streams_running_on_the_decoder_send_the_prefill_to_an_idle_pool() -> None:
    # Each of 10 streams would stall 0.2 s: 2.0 s of others' time against 0.41 s on the pool.
    choice = decide(AUTO, LATER, IDLE_POOL, decoder(running=10))
    assert choice.site is PrefillSite.POOL
    assert choice.stall_s == pytest.approx(2.0)
    # ... unless the pool is busier still: its queue outweighs the stall
    busy = [PrefillServerLoad("p0", 5.0, 20_000.0)]
    assert decide(AUTO, LATER, busy, decoder(running=10)).site is PrefillSite.DECODER
    # ... or the stall does not count
    blind = PdSettings(stall_weight=0.0)
    assert decide(blind, LATER, IDLE_POOL, decoder(running=10)).site is PrefillSite.DECODER


def test_the_pool_server_that_finishes_first_is_chosen() -> None:
    servers = [
        PrefillServerLoad("a-busy", 3.0, 20_000.0),
        PrefillServerLoad("b-cached", 0.25, 20_000.0, cached_tokens=6_000),
        PrefillServerLoad("c-idle", 0.0, 20_000.0),
        PrefillServerLoad("d-down", 0.0, 90_000.0, ready=False),
    ]
    first = TurnPrompt(8_000, 0, first_turn=True)
    nothing_cached = [replace(s, cached_tokens=0) for s in servers]
    assert decide(AUTO, first, nothing_cached, decoder(running=50)).server == "c-idle"  # 0.4 s against 0.25 + 0.4 s
    assert decide(AUTO, LATER, servers, decoder(running=50)).server == "b-cached"  # 0.25 + 0.1 s: computes 2,000 only


def test_a_first_turn_before_its_placement_goes_to_the_pool_unless_short() -> None:
    assert decide(AUTO, TurnPrompt(8_000, first_turn=True), IDLE_POOL, None).server == "p0"
    assert decide(AUTO, TurnPrompt(200, first_turn=True), IDLE_POOL, None).site is PrefillSite.DECODER


def test_without_a_ready_prefill_server_the_decoder_prefills() -> None:
    down = [PrefillServerLoad("p0", 0.0, 20_000.0, ready=False)]
    assert decide(AUTO, LATER, down, decoder()).site is PrefillSite.DECODER


@pytest.mark.parametrize(
    ("rule", "first", "later", "short"),
    [
        (PdRule.POOL, PrefillSite.POOL, PrefillSite.POOL, PrefillSite.POOL),
        (PdRule.DECODER, PrefillSite.POOL, PrefillSite.DECODER, PrefillSite.DECODER),
        (PdRule.THRESHOLD, PrefillSite.POOL, PrefillSite.POOL, PrefillSite.DECODER),
    ],
)
def test_named_rules_ignore_load(rule: PdRule, first: PrefillSite, later: PrefillSite, short: PrefillSite) -> None:
    settings = PdSettings(rule=rule)
    busy = [PrefillServerLoad("p0", 60.0, 20_000.0)]
    assert decide(settings, TurnPrompt(8_000, first_turn=True), busy, decoder()).site is first
    assert decide(settings, LATER, busy, decoder()).site is later
    assert decide(settings, TurnPrompt(8_000, 7_900), busy, decoder()).site is short


def test_the_pool_spec_sets_the_decider() -> None:
    spec = DecoderPoolSpec.model_validate(
        {
            "model": {"name": "llama-3-8b"},
            "decoderSelector": {"matchLabels": {"r": "d"}},
            "prefillDecider": {"rule": "Threshold", "decoderMaxTokens": 1000, "kvLinkGbps": 400},
        }
    )
    settings = pd_settings(spec)
    assert settings.rule is PdRule.THRESHOLD
    assert settings.decoder_max_tokens == 1000
    assert settings.kv_link_bytes_per_s == pytest.approx(50e9)
    assert settings.kv_bytes_per_token == 131_072


@pytest.mark.parametrize(
    ("field", "value"),
    [("rule", "Sometimes"), ("decoderMaxTokens", -1), ("stallWeight", 101), ("kvLinkGbps", 0)],
)
def test_out_of_range_decider_settings_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        DecoderPoolSpec.model_validate(
            {
                "model": {"name": "llama-3-8b"},
                "decoderSelector": {"matchLabels": {"r": "d"}},
                "prefillDecider": {field: value},
            }
        )
