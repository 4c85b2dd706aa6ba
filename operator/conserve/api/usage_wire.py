"""The turn-report stream: the router tells the operator each turn's usage over HTTP, not by a Conversation write.

    POST /v1/usage   Authorization: Bearer <the shared token>
    {"reports": [{"namespace": "ns", "name": "conv-x", "uid": "...", "usage": {<ConversationUsage, camelCase>},
                  "completed": false}]}
    -> 200 {"operator": "<this operator run>", "applied": 1, "deferred": [], "rejected": []}
    GET /v1/usage/<namespace>/<name>  -> 200 {"usage": {...}}  (404 when this operator does not hold it)

A report carries the whole usage model (`conversation.ConversationUsage`, cumulative), so a field added to it
travels without a change here, and a report is idempotent: a retry, a re-send, reports out of order merge to the
same result (`merge_usage`). `deferred`: conversations this operator does not hold (not seen yet, or another
replica's pool): the router sends them again. A new `operator` tells the router that the operator restarted (or
another replica answers): it sends its latest usage of every live conversation again.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import Field

from conserve.api.common import CamelModel
from conserve.api.conversation import ConversationStatus, ConversationUsage

USAGE_PATH = "/v1/usage"
#: Reports in one POST at most (a router sends more in several).
MAX_REPORTS = 2000


class UsageReport(CamelModel):
    namespace: str = Field(min_length=1, max_length=253)
    name: str = Field(min_length=1, max_length=253)
    uid: str = Field("", max_length=128, description="The object's uid when the router knows it ('' otherwise).")
    usage: ConversationUsage
    completed: bool = Field(False, description="The conversation ended (as spec.completed: true says it).")


class UsageBatch(CamelModel):
    reports: list[UsageReport] = Field(default_factory=list, max_length=MAX_REPORTS)


class Rejected(CamelModel):
    name: str
    reason: str


class UsageAnswer(CamelModel):
    operator: str
    applied: int = 0
    deferred: list[str] = Field(default_factory=list)
    rejected: list[Rejected] = Field(default_factory=list)


def _turn_time_s(usage: ConversationUsage) -> float:
    if not usage.last_turn_time:
        return float("-inf")
    try:
        return dt.datetime.fromisoformat(usage.last_turn_time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


def merge_usage(known: ConversationUsage, report: ConversationUsage) -> ConversationUsage:
    """The usage both say: every counter (an int field: cumulative, as the CRD says) at the larger of the two,
    every other field from the later report (by lastTurnTime; the report on a tie). Generic over the model's
    fields; idempotent, so retries and re-sends are harmless."""
    newer = report if _turn_time_s(report) >= _turn_time_s(known) else known
    values: dict[str, Any] = {}
    for name in ConversationUsage.model_fields:
        old, new = getattr(known, name), getattr(report, name)
        counter = isinstance(old, int) and isinstance(new, int) and not isinstance(old, bool)
        values[name] = max(old, new) if counter else getattr(newer, name)
    merged = ConversationUsage.model_construct(**values)
    return known if merged == known else merged


def behind_status(usage: ConversationUsage, status: ConversationStatus) -> bool:
    """A usage older than what the operator's status already counts (its checkpoint, written from reports the
    Conversation's spec never saw): applying it would take the counters back."""
    return (usage.turns, usage.input_tokens + usage.output_tokens) < (
        status.turns_served,
        status.input_tokens + status.output_tokens,
    )


def usage_of_status(status: ConversationStatus) -> ConversationUsage:
    """The usage the operator's status counts (its checkpoint), as a report would say it."""
    return ConversationUsage(
        turns=status.turns_served,
        input_tokens=status.input_tokens,
        output_tokens=status.output_tokens,
        last_turn_time=status.last_activity_time if status.turns_served else None,
        time_to_first_effective_token_seconds=status.time_to_first_effective_token_seconds,
        pool_prefills=status.pool_prefills,
        prefill_pod=status.prefill.pod if status.prefill is not None else None,
    )
