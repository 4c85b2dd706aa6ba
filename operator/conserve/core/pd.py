"""The P/D decider: where one turn's prompt is prefilled, decided per turn from what is observed at that moment.

Two paths reach the first token of a turn on its decoder:

- **pool**: a prefill server computes the part of the prompt it does not hold, then the KV the decoder lacks moves
  over the KV link. Time: the server's queued work, plus its compute, plus the transfer.
- **decoder**: the pinned decoder computes what it does not hold itself (an append-prefill of the new tokens, or
  everything after its copy was dropped or on a first turn). Time: the decoder's own queued prefill work plus its
  compute. It costs the other conversations streaming there too: every decode step that carries a prompt chunk is
  longer, so each running stream is delayed by about the compute time (the time between tokens the issue saw grow).

The `auto` rule compares the two in seconds: decoder when its time plus `stall_weight` x (compute time x running
streams) is no more than the best prefill server's time, and always when the decoder lacks no more than
`decoder_max_tokens` (a short remainder costs less than a transfer's round trip, as llm-d's P/D decider and
Dynamo's conditional disaggregation judge it). `stall_weight` 1.0 counts one second of another user's stream stalled
the same as one second of this turn's wait.

Named rules reproduce other systems' choices for a fair benchmark: `pool` (always remote, vLLM's proxies),
`decoder` (ConServe before this decider: the first turn on the pool, later turns on the decoder, re-prefills too),
`threshold` (remote only when the decoder lacks more than `decoder_max_tokens`: llm-d's prefix-based decider, Dynamo's
`max_local_prefill_length`).

Signals are injected (the router scrapes vLLM's metrics and observes throughput, the simulator reads its model,
the operator its occupancy), so every caller decides with this one function.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from conserve.core.decisions import PrefillSite


class PdRule(enum.StrEnum):
    AUTO = "auto"  # load-aware: the shorter estimated time, the decoder's streams' stall included
    POOL = "pool"  # every turn on a prefill server
    DECODER = "decoder"  # first turns on a prefill server, later turns on the decoder
    THRESHOLD = "threshold"  # the pool when the decoder lacks more than decoder_max_tokens


@dataclass(frozen=True, slots=True)
class PdSettings:
    rule: PdRule = PdRule.AUTO
    #: The decoder prefills when it lacks at most this many tokens of the prompt (auto and threshold).
    decoder_max_tokens: int = 256
    #: Weight of the stall a decoder-side prefill puts on each stream running there (auto).
    stall_weight: float = 1.0
    #: KV link speed, to time a transfer (bytes per second; 0: transfers are free).
    kv_link_bytes_per_s: float = 25e9
    kv_bytes_per_token: int = 0


@dataclass(frozen=True, slots=True)
class PrefillServerLoad:
    """A prefill server as seen now."""

    name: str
    #: Seconds of prompt work queued or running there.
    queued_s: float
    #: Its prefill throughput (tokens per second), observed or modelled.
    tokens_per_s: float
    #: Tokens of this turn's prompt it holds already (its prefix cache).
    cached_tokens: int = 0
    ready: bool = True


@dataclass(frozen=True, slots=True)
class DecoderLoad:
    """The turn's decoder as seen now."""

    name: str
    #: Seconds of prompt work queued or running there.
    queued_prefill_s: float
    #: Its own prefill throughput (tokens per second), observed or modelled.
    prefill_tokens_per_s: float
    #: Sequences decoding there, whose streams a prefill there stalls.
    running: int = 0


@dataclass(frozen=True, slots=True)
class TurnPrompt:
    """The prompt to prefill: its tokens and how many the decoder holds already (0 on a first turn, after a drop,
    or when the turn moved). `first_turn`: the conversation's first turn on this decoder (its first, or the first
    after a re-placement), which the `decoder` rule sends to the pool."""

    prompt_tokens: int
    decoder_cached_tokens: int = 0
    first_turn: bool = False

    @property
    def decoder_uncached_tokens(self) -> int:
        return max(self.prompt_tokens - self.decoder_cached_tokens, 1)


@dataclass(frozen=True, slots=True)
class PdChoice:
    """Where the turn is prefilled, on which server (pool only), and the estimates it was judged by."""

    site: PrefillSite
    server: str | None
    reason: str
    pool_s: float = math.nan
    decoder_s: float = math.nan
    stall_s: float = math.nan

    @property
    def on_pool(self) -> bool:
        return self.site is PrefillSite.POOL


def transfer_s(settings: PdSettings, tokens: int) -> float:
    if settings.kv_link_bytes_per_s <= 0 or settings.kv_bytes_per_token <= 0:
        return 0.0
    return tokens * settings.kv_bytes_per_token / settings.kv_link_bytes_per_s


def pool_time_s(settings: PdSettings, prompt: TurnPrompt, server: PrefillServerLoad) -> float:
    """Until the decoder holds the prompt's KV by the pool path: queue, compute of what the server lacks, transfer
    of what the decoder lacks."""
    compute_tokens = max(prompt.prompt_tokens - server.cached_tokens, 1)
    return (
        server.queued_s
        + compute_tokens / max(server.tokens_per_s, 1e-9)
        + transfer_s(settings, prompt.decoder_uncached_tokens)
    )


def best_server(
    settings: PdSettings, prompt: TurnPrompt, servers: Sequence[PrefillServerLoad]
) -> tuple[PrefillServerLoad, float] | None:
    """The ready prefill server that would finish soonest (ties by name), with its time."""
    ranked = sorted(((pool_time_s(settings, prompt, s), s.name, s) for s in servers if s.ready), key=lambda t: t[:2])
    return (ranked[0][2], ranked[0][0]) if ranked else None


def decide(
    settings: PdSettings, prompt: TurnPrompt, servers: Sequence[PrefillServerLoad], decoder: DecoderLoad | None
) -> PdChoice:
    """Where this turn's prompt is prefilled. `decoder` None: not known yet (a first turn before its placement):
    the pool, unless the prompt is short (`decoder_max_tokens`)."""
    best = best_server(settings, prompt, servers)
    uncached = prompt.decoder_uncached_tokens
    if best is None:
        return PdChoice(PrefillSite.DECODER, None, "no ready prefill server")
    server, pool_s = best
    pool = PdChoice(PrefillSite.POOL, server.name, "", pool_s=pool_s)
    rule = settings.rule
    if rule is PdRule.POOL:
        return _with(pool, "rule pool")
    if rule is PdRule.DECODER:
        if prompt.first_turn:
            return _with(pool, "rule decoder: a first turn")
        return PdChoice(PrefillSite.DECODER, None, "rule decoder: a later turn (a re-prefill too)", pool_s=pool_s)
    if uncached <= settings.decoder_max_tokens:
        return PdChoice(PrefillSite.DECODER, None, f"decoder lacks {uncached} <= {settings.decoder_max_tokens}")
    if rule is PdRule.THRESHOLD or decoder is None:
        return _with(pool, f"decoder lacks {uncached} > {settings.decoder_max_tokens}")
    compute_s = uncached / max(decoder.prefill_tokens_per_s, 1e-9)
    decoder_s = decoder.queued_prefill_s + compute_s
    stall_s = compute_s * decoder.running
    if decoder_s + settings.stall_weight * stall_s <= pool_s:
        return PdChoice(PrefillSite.DECODER, None, "decoder sooner", pool_s, decoder_s, stall_s)
    return PdChoice(PrefillSite.POOL, server.name, "pool sooner", pool_s, decoder_s, stall_s)


def decide_before_placement(
    settings: PdSettings, prompt: TurnPrompt, servers: Sequence[PrefillServerLoad], likely: DecoderLoad | None
) -> PdChoice | None:
    """A first turn before its placement names the decoder (the router starts a prefill on the pool at once, so the
    control plane's latency overlaps it): the pool's server to start on, the decoder for a short prompt, or None
    when the decoder the conversation will likely get (`likely`: the one running fewest streams, as the placement's
    load scorer prefers) would prefill it sooner than the pool. None: decide once the placement names the decoder
    (the turn waits for it, well under a second, rather than pay a prefill elsewhere and a transfer)."""
    choice = decide(settings, prompt, servers, None)
    if not choice.on_pool or likely is None:
        return choice
    return choice if decide(settings, prompt, servers, likely).on_pool else None


def _with(choice: PdChoice, reason: str) -> PdChoice:
    return PdChoice(choice.site, choice.server, reason, choice.pool_s, choice.decoder_s, choice.stall_s)
