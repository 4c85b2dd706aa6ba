"""The simulator's side of the P/D decider (`conserve.core.pd`): the signals of a turn, read off the simulated
fleet, and the route the decision makes.

Every policy routes a turn the same way once it has picked the decoder: `decided_route` asks the core's decider
with what a router would observe at that moment (each prefill server's queued work and what it holds of the
prompt, the decoder's queued prompt work and running streams, what the decoder holds, the fleet's link), with
prefill speeds from the performance model (the router measures them). A baseline's native rule stays available
(`<name>@native`) for the benchmark's ablation.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from conserve.core.pd import (
    DecoderLoad,
    PdChoice,
    PdSettings,
    PrefillServerLoad,
    TurnPrompt,
    decide,
    decide_before_placement,
)
from conserve.core.perf import Device, prefill_cost
from conserve.sim.records import ConvState, LocalRoute, RemoteRoute, Route, SimView, TurnRecord

if TYPE_CHECKING:
    from conserve.sim.instances import Decoder


def fleet_pd_settings(sim: SimView, base: PdSettings | None = None) -> PdSettings:
    """The decider's settings on this fleet: `base` (the pool's, else the defaults) with the fleet's link."""
    return replace(
        base or PdSettings(),
        kv_link_bytes_per_s=sim.fleet.link.bandwidth_bytes_per_s,
        kv_bytes_per_token=sim.model.kv_bytes_per_token,
    )


def decoder_holds(decoder: Decoder, key: str, prompt_tokens: int) -> int:
    """How much of a prompt a decoder holds for the conversation (GPU or host), at most the prompt."""
    return min(max(decoder.peek_kv(key), decoder.peek_host(key)), prompt_tokens)


def _rate(sim: SimView, device: Device, tokens: int, cached: int) -> float:
    """Modelled prefill tokens per second of `tokens` new over `cached` on `device`."""
    tokens = max(tokens, 1)
    return tokens / max(prefill_cost(device, sim.model, tokens, cached).time_s, 1e-9)


def server_loads(
    sim: SimView, key: str, prompt_tokens: int, now: float, pull_tokens: int = 0
) -> list[PrefillServerLoad]:
    """The prefill servers as a router sees them: queued seconds, speed for this prompt, what each holds of it (its
    prefix cache, the shared store, or KV the route pulls back from a decoder)."""
    loads = []
    for p in sim.prefill.values():
        cached = min(max(p.holds(key), sim.stored_tokens(key), pull_tokens), max(prompt_tokens - 1, 0))
        rate = _rate(sim, p.spec.device, prompt_tokens - cached, cached)
        loads.append(PrefillServerLoad(p.name, p.load_s(now), rate, cached))
    return loads


def decoder_load(sim: SimView, decoder: Decoder, uncached: int, cached: int) -> DecoderLoad:
    device = decoder.spec.device
    jobs = [*decoder.local_queue, *decoder.prefill_batch]
    queued = sum(prefill_cost(device, sim.model, j.left_tokens, j.cached_tokens + j.done_tokens).time_s for j in jobs)
    return DecoderLoad(decoder.name, queued, _rate(sim, device, uncached, cached), len(decoder.running))


def decide_turn(
    sim: SimView, settings: PdSettings, state: ConvState, record: TurnRecord, decoder: str, now: float, pull: int = 0
) -> PdChoice:
    """The decider on the turn's signals, for the turn's decoder."""
    target = sim.decoders[decoder]
    held = decoder_holds(target, state.key, record.input_tokens)
    prompt = TurnPrompt(record.input_tokens, held, first_turn=record.index == 0)
    servers = server_loads(sim, state.key, record.input_tokens, now, pull)
    return decide(settings, prompt, servers, decoder_load(sim, target, prompt.decoder_uncached_tokens, held))


def first_turn_before_placement(
    sim: SimView, settings: PdSettings, state: ConvState, record: TurnRecord, now: float
) -> PdChoice | None:
    """ConServe's router on a first turn, before the placement names its decoder (`decide_before_placement`),
    the likely decoder being the one running fewest streams."""
    prompt = TurnPrompt(record.input_tokens, 0, first_turn=True)
    servers = server_loads(sim, state.key, record.input_tokens, now)
    likely = min(sim.decoders.values(), key=lambda d: (len(d.running), d.name), default=None)
    load = decoder_load(sim, likely, prompt.decoder_uncached_tokens, 0) if likely is not None else None
    return decide_before_placement(settings, prompt, servers, load)


def decided_route(
    sim: SimView, settings: PdSettings, state: ConvState, record: TurnRecord, decoder: str, now: float, pull: int = 0
) -> Route:
    """The turn's route on `decoder` as the decider chooses (`pull`: KV the pool path first pulls back)."""
    return route_for(decide_turn(sim, settings, state, record, decoder, now, pull), record, decoder, pull)


def route_for(choice: PdChoice, record: TurnRecord, decoder: str, pull: int = 0) -> Route:
    """The route a P/D choice makes for the turn on `decoder`."""
    if choice.server is None:
        return LocalRoute(decoder)
    return RemoteRoute(choice.server, decoder, record.input_tokens, pull_tokens=pull)
