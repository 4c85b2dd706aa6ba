"""Each conversation-mode turn judged against its conversation's SLO class (the pool's `spec.slo`).

The router is where a turn's latency is seen as the client sees it: from the request's arrival (a first turn's
wait for its placement included) to its first streamed token, then the gaps between tokens. A turn the user sees
(`X-Conserve-Effective` not false) is judged on both; a hidden one (an agent's tool call) on its token gaps only,
and a conversation's first visible turn on its time to first effective token (from the conversation's start).
Missed turns go to the operator in `spec.usage.sloMissedTurns`; every judged turn is counted in
`conserve_router_slo_turns_total`.
"""

from __future__ import annotations

import re

from prometheus_client import Counter

from conserve.api.slo import CLASS_NAME_PATTERN
from conserve.core.slo import SloPolicy, turn_met
from conserve.router.turns import ConversationState, TurnResult

_CLASS_NAME = re.compile(CLASS_NAME_PATTERN)


def valid_class_name(value: str) -> bool:
    return len(value) <= 63 and _CLASS_NAME.match(value) is not None


def mean_tbt_s(first_token_s: float | None, last_token_s: float | None, completion_tokens: int) -> float | None:
    """A turn's mean time between tokens; None with fewer than two tokens."""
    if first_token_s is None or last_token_s is None or completion_tokens < 2:
        return None
    return max(last_token_s - first_token_s, 0.0) / (completion_tokens - 1)


def judge_turn(
    slo: SloPolicy | None, slo_class: str | None, ttft_s: float | None, tbt_s: float | None, *, visible: bool
) -> tuple[str, bool] | None:
    """(the class's name, whether the turn met it); None when the pool has no SLO or the class is unknown (the
    operator refuses such a conversation)."""
    if slo is None:
        return None
    resolved = slo.resolve(slo_class)
    if resolved is None:
        return None
    return resolved.name, turn_met(resolved, ttft_s if visible else 0.0, tbt_s)


def judge_and_count(
    turns_total: Counter,
    slo: SloPolicy | None,
    state: ConversationState,
    result: TurnResult,
    arrival_s: float,
    last_token_s: float | None,
    visible: bool,
) -> None:
    """Judge a served conversation-mode turn: counted in `turns_total` (the router's
    conserve_router_slo_turns_total), a miss in the conversation's usage."""
    first_visible = visible and result.ttfet_s is not None  # its first visible turn: judged on its TTFET
    ttft = result.ttfet_s if first_visible else result.ttft_s
    first_token = arrival_s + result.ttft_s if result.ttft_s is not None else None
    tbt = mean_tbt_s(first_token, last_token_s, result.completion_tokens)
    judged = judge_turn(slo, state.slo_class, ttft, tbt, visible=visible)
    if judged is None:
        return
    name, met = judged
    turns_total.labels(pool=state.pool, slo_class=name, outcome="met" if met else "missed").inc()
    state.slo_missed_turns += not met
