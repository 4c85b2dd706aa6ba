"""The router's turn reports to the operator (`api.usage_wire`): each turn's cumulative usage POSTed within a
`STREAM_PERIOD_S`, batched across conversations, instead of a `spec.usage` patch per conversation every 30 s.

Nothing is lost to a restart on either side:
- the operator restarted (its answer names a new run): every live conversation's latest usage is sent again;
- a report not sent (the operator unreachable) or deferred (not held there yet) stays queued, the latest winning;
- this router restarted: a conversation it has no state of is seeded from the operator (GET), else from its
  status as the watch cache holds it (the operator's checkpoint), before its turn is counted (`seed`).
With the stream, the router writes no `spec.usage` while the operator answers: a conversation's end goes in its
last report too, and only a completion the operator has not acknowledged within `COMPLETION_HOLD_S` is written as
before (spec.usage with spec.completed), as is everything queued at the router's stop. The operator checkpoints the
counters in the status. (A router killed in the moment between a completion and its acknowledgement loses the
completion: the conversation then ends at its idle timeout.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from conserve.api.conversation import ConversationStatus, ConversationUsage
from conserve.api.usage_wire import (
    MAX_REPORTS,
    USAGE_PATH,
    UsageAnswer,
    UsageBatch,
    UsageReport,
    merge_usage,
    usage_of_status,
)
from conserve.router.policy import Usage
from conserve.router.turns import ConversationState, RouterConfig

log = logging.getLogger(__name__)
#: A turn's report reaches the operator this long after the turn at most (when the operator is reachable).
STREAM_PERIOD_S = 0.25
#: With nothing to report, the router asks this often anyway, to notice an operator restart (and re-send).
HEARTBEAT_S = 2.0
#: A completion the operator has not acknowledged this long after it is written to spec.completed instead.
COMPLETION_HOLD_S = 5.0
#: A seed's wait for the operator's answer before the watch cache's status is used.
SEED_TIMEOUT_S = 1.0


def wire_usage(usage: Usage) -> ConversationUsage:
    """The router's counters as the api model (the same fields a spec.usage patch carries)."""
    return ConversationUsage.model_validate(usage.as_patch()["spec"]["usage"])


def seed(state: ConversationState, usage: ConversationUsage) -> None:
    """A conversation's state resumed from usage counted before (by an earlier router): later turns add to it,
    and their new input is measured against the context it had."""
    state.turns = usage.turns
    state.input_tokens = usage.input_tokens
    state.output_tokens = usage.output_tokens
    state.context_tokens = usage.input_tokens + usage.output_tokens
    state.ttfet_s = usage.time_to_first_effective_token_seconds
    state.prefill_pod = usage.prefill_pod
    state.pool_prefills = usage.pool_prefills
    state.slo_missed_turns = usage.slo_missed_turns


class UsageStream:
    def __init__(
        self,
        url: str,
        token: str,
        namespace: str,
        session: Callable[[], aiohttp.ClientSession],
        on_completed: Callable[[str], None] = lambda _name: None,
    ) -> None:
        self.url = url.rstrip("/")
        self.namespace = namespace
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session = session
        self._pending: dict[str, ConversationUsage] = {}
        self._live: dict[str, ConversationUsage] = {}
        #: Conversations ended and not yet acknowledged: their report says so; `on_completed` once acknowledged
        #: (the router then drops the spec.completed patch it holds as the fallback).
        self._completing: set[str] = set()
        self._on_completed = on_completed
        self.operator: str | None = None  # the operator run last answered
        self.sent = 0
        self.failed = 0  # tries in a row without an answer

    def record(self, name: str, usage: Usage) -> None:
        report = wire_usage(usage)
        self._pending[name] = self._live[name] = report

    def complete(self, name: str) -> None:
        """The conversation ended: its last report says so (with its latest usage)."""
        usage = self._live.pop(name, None)
        if usage is None:  # no turn reported by this router: the spec.completed patch ends it
            return
        self._pending[name] = usage
        self._completing.add(name)

    def forget(self, name: str) -> None:
        """The router forgot the conversation (idle): no more re-sends of it."""
        self._live.pop(name, None)

    def pending(self) -> int:
        return len(self._pending)

    async def send(self) -> bool:
        """One POST of what is queued (also when nothing is: a heartbeat); False when the operator did not answer."""
        names = list(self._pending)[:MAX_REPORTS]
        batch = UsageBatch(
            reports=[
                UsageReport(namespace=self.namespace, name=n, usage=self._pending[n], completed=n in self._completing)
                for n in names
            ]
        )
        for name in names:
            del self._pending[name]
        try:
            async with self._session().post(
                self.url + USAGE_PATH,
                data=batch.model_dump_json(by_alias=True, exclude_none=True),
                headers={**self._headers, "Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body[:200]}")
            answer = UsageAnswer.model_validate_json(body)
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as err:
            self.failed += 1
            for report in batch.reports:  # kept for the next send, unless a newer one was queued meanwhile
                self._pending.setdefault(report.name, report.usage)
            # Said once per outage (the heartbeat retries every HEARTBEAT_S).
            (log.warning if self.failed == 1 else log.debug)(
                "usage reports to %s: %s (%d queued)", self.url, err, len(self._pending)
            )
            return False
        if self.failed:
            log.info("usage reports to %s: answered again after %d failed tries", self.url, self.failed)
        self.failed = 0
        self._answered(answer, [r.name for r in batch.reports if r.completed])
        return True

    def _answered(self, answer: UsageAnswer, completions: list[str]) -> None:
        self.sent += answer.applied
        not_applied = set(answer.deferred) | {r.name for r in answer.rejected}
        for name in completions:
            if name in not_applied:
                continue
            self._completing.discard(name)
            self._on_completed(name)
        for report in answer.deferred:  # retried (a completion too: still in _completing)
            if report in self._live:
                self._pending.setdefault(report, self._live[report])
        for rejected in answer.rejected:
            log.warning("usage report of %s rejected: %s", rejected.name, rejected.reason)
        if answer.operator != self.operator:
            if self.operator is not None:
                log.info(
                    "operator run %s answers (was %s): re-sending %d", answer.operator, self.operator, len(self._live)
                )
            self.operator = answer.operator
            for name, usage in self._live.items():
                self._pending.setdefault(name, usage)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = float("-inf")
        while True:
            await asyncio.sleep(STREAM_PERIOD_S)
            if self._pending or loop.time() - last >= HEARTBEAT_S:
                last = loop.time()
                await self.send()

    async def seed(self, state: ConversationState, status: ConversationStatus | None) -> None:
        """Resume a conversation this router has no count of (it restarted, or forgot the state) from what the
        operator counts."""
        usage = await self.known(state.name, status)
        if usage is not None and usage.turns > state.turns:
            seed(state, usage)
            log.info("usage of %s resumed at %d turns", state.name, usage.turns)

    async def known(self, name: str, status: ConversationStatus | None) -> ConversationUsage | None:
        """What the operator counts of a conversation (it holds the latest reports), else its status's checkpoint
        (the watch cache's), else None."""
        fallback = usage_of_status(status) if status is not None and status.turns_served else None
        try:
            async with self._session().get(
                f"{self.url}{USAGE_PATH}/{self.namespace}/{name}",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=SEED_TIMEOUT_S),
            ) as resp:
                if resp.status != 200:
                    return fallback
                body: dict[str, Any] = await resp.json()
            usage = ConversationUsage.model_validate(body["usage"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as err:
            log.warning("usage of %s from the operator: %s (its status used)", name, err)
            return fallback
        return merge_usage(fallback, usage) if fallback is not None else usage


def from_config(
    config: RouterConfig, session: Callable[[], aiohttp.ClientSession], on_completed: Callable[[str], None]
) -> UsageStream | None:
    """The stream a router's configuration asks for; None without an endpoint (spec.usage patches then)."""
    if not config.usage_endpoint:
        return None
    if not config.usage_token_file:
        raise ValueError("usage_endpoint: needs usage_token_file (the operator authenticates the reports)")
    token = Path(config.usage_token_file).read_text().strip()
    return UsageStream(config.usage_endpoint, token, config.namespace, session, on_completed)
