"""A baseline that queues too: llm-d's flow control in front of its session-aware P/D router.

Modelled on the Gateway API inference extension's endpoint picker with flow control on (read in its public docs and
defaults; no code taken): a **saturation detector** calls an endpoint saturated when its waiting queue reaches
`QUEUE_DEPTH_THRESHOLD` requests or its KV cache usage `KV_CACHE_UTIL_THRESHOLD` (the defaults, 5 and 0.8; usage
as vLLM reports it: KV held by requests, the evictable prefix cache counted free), and the pool saturated when every
endpoint is. While the pool is saturated, requests wait in the **gateway queue** (one band, first come first served:
a conversation's turns carry no priority here); when an endpoint has room again, the oldest is dispatched to the
router behind it (`LlmdPdDecider`: prefix, load and session scorers; the shared P/D decider). A request that waited
its **TTL** is rejected (HTTP 429): the TTL is the conversations' TTFET target when an SLO is declared (the same
budget ConServe's admission gets), else `DEFAULT_TTL_S` (ConServe's default maxQueueWaitSeconds). Flow control
works per request: a rejected turn ends its conversation (its client got an error), whichever turn it was.

Same information as every policy: the simulated engines' queues and KV, read when a turn arrives, when one ends
and every `sweep_interval_s` (the picker's metrics refresh, coarser here).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from conserve.sim.baselines import LlmdPdDecider, waiting_requests
from conserve.sim.instances import Decoder
from conserve.sim.records import ConvState, Route, TurnRecord

DEFAULT_TTL_S = 120.0


@dataclass(slots=True)
class _Held:
    state: ConvState
    record: TurnRecord
    since_s: float


class LlmdFlowControl(LlmdPdDecider):
    name = "llmd-flow-control"
    QUEUE_DEPTH_THRESHOLD = 5
    KV_CACHE_UTIL_THRESHOLD = 0.8
    sweep_interval_s: float | None = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.held: deque[_Held] = deque()

    @property
    def ttl_s(self) -> float:
        return self.slo.ttfet_s if self.slo is not None else DEFAULT_TTL_S

    def saturated(self, decoder: Decoder) -> bool:
        if waiting_requests(decoder) >= self.QUEUE_DEPTH_THRESHOLD:
            return True
        return (decoder.used_tokens - decoder.cache_tokens) / decoder.capacity >= self.KV_CACHE_UTIL_THRESHOLD

    def pool_saturated(self) -> bool:
        return all(self.saturated(d) for d in self.decoders())

    def route(self, state: ConvState, record: TurnRecord, now: float) -> Route | None:
        if self.held or self.pool_saturated():  # first come, first served: none passes the queue
            self.held.append(_Held(state, record, now))
            return None
        return super().route(state, record, now)

    def turn_done(self, state: ConvState, record: TurnRecord, now: float) -> None:
        super().turn_done(state, record, now)
        self._dispatch(now)

    def sweep(self, now: float) -> object:
        self._dispatch(now)
        return None

    def _dispatch(self, now: float) -> None:
        """Reject what waited its TTL, then dispatch the oldest while the pool has room."""
        kept: deque[_Held] = deque()
        for held in self.held:
            if now - held.since_s >= self.ttl_s:
                self.sim.refuse(held.state.key, "FlowControlTtl")
            else:
                kept.append(held)
        self.held = kept
        while self.held and not self.pool_saturated():
            held = self.held.popleft()
            route = super().route(held.state, held.record, now)
            if route is not None:
                self.sim.start_placed(held.state.key, route)
