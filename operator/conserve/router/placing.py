"""The router's dealings with the control plane: a turn's Conversation created (or replaced), its first placement
awaited, a lost decoder's re-placement followed (answers without a placement are TurnErrors, `policy.not_placed`);
and the batched usage reports (`policy.UsageBatcher`) patched, a few at a time.

A first turn waits as long as its conversation waits in the pool's queue, up to the pool's `maxQueueWaitSeconds`
(and a margin, so that the operator's refusal arrives first); a re-placement up to `--placement-timeout`
(`policy.DEFAULT_PLACEMENT_WAIT_S` without it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from conserve.metrics import RouterMetrics
from conserve.router.control import ControlPlane, ControlPlaneError, ConversationFailed
from conserve.router.policy import (
    DEFAULT_PLACEMENT_WAIT_S,
    Placement,
    UsageBatcher,
    not_placed,
    placement_wait_s,
)
from conserve.router.turns import ConversationState, RouterConfig, TurnError

log = logging.getLogger(__name__)
#: Usage patches in flight at once, to be gentle with the API server.
PATCHES_AT_ONCE = 8


class Placing:
    def __init__(
        self, control: ControlPlane, metrics: RouterMetrics, config: RouterConfig, clock: Callable[[], float]
    ) -> None:
        self.control = control
        self.metrics = metrics
        self.config = config
        self._clock = clock

    async def create(self, name: str, spec: dict[str, Any], *, replace: bool = False, owner: str = "") -> None:
        """Create the Conversation (`owner`: the identity that starts it); `replace`: delete the one that ended
        without a placement first."""
        started = self._clock()
        if replace:
            await self.control.delete_conversation(name)
        await self.control.create_conversation(name, spec, owner=owner)
        self.metrics.placement_wait_seconds.labels(part="create").observe(self._clock() - started)

    async def first_placement(self, state: ConversationState, pool: str) -> Placement:
        """The first placement; TurnError 429 (a busy pool) or 503 (a fault) without one (`policy.not_placed`)."""
        assert state.created is not None
        try:
            await state.created
        except ControlPlaneError as err:
            state.created = None  # the next turn tries again
            log.warning("creating conversation %s: %s", state.name, err)  # the API server's address: logged only
            message = f"conversation {state.conversation_id} could not be created (the control plane did not answer)"
            raise TurnError(502, message, code="ControlPlaneUnavailable") from err
        max_wait_s = self.control.pool_max_queue_wait_s(pool)
        started = self._clock()
        reason: str | None
        try:
            return await self.control.wait_placement(
                state.name, newer_than=None, timeout_s=placement_wait_s(self.config.placement_timeout_s, max_wait_s)
            )
        except ConversationFailed as err:
            state.created, state.refused = None, True  # a retry replaces the object and queues afresh
            failed, reason, detail = True, err.reason, err.detail
        except TimeoutError:  # the conversation keeps its place in the queue for the client's retry
            waiting = self.control.waiting_reason(state.name)
            failed, reason, detail = False, waiting[0] if waiting else None, waiting[1] if waiting else ""
        answer = not_placed(
            state.conversation_id,
            pool,
            failed=failed,
            reason=reason,
            detail=detail,
            waited_s=self._clock() - started,
            pool_max_wait_s=max_wait_s,
        )
        self.metrics.unplaced_turns_total.labels(status=str(answer.status), reason=answer.reason).inc()
        raise TurnError(answer.status, answer.message, retry_after_s=answer.retry_after_s, code=answer.reason)

    async def re_placement(self, state: ConversationState, lost_generation: int) -> Placement:
        """The pinned decoder is gone: the operator's re-placement (a newer generation); TurnError 503 without."""
        lost = self._clock()
        try:
            placement = await self.control.wait_placement(
                state.name,
                newer_than=lost_generation,
                timeout_s=self.config.placement_timeout_s or DEFAULT_PLACEMENT_WAIT_S,
            )
        except (TimeoutError, ConversationFailed) as err:
            why = str(err) if isinstance(err, ConversationFailed) else "no new placement in time"
            raise TurnError(503, f"decoder of {state.conversation_id} gone and not re-placed: {why}") from err
        self.metrics.placement_wait_seconds.labels(part="total").observe(self._clock() - lost)
        return placement


class UsageReports:
    """Sends the usage patches the batcher says are due; a failed one is logged (the next report carries the same
    cumulative counters)."""

    def __init__(
        self, batcher: UsageBatcher, control: ControlPlane, metrics: RouterMetrics, clock: Callable[[], float]
    ) -> None:
        self.batcher = batcher
        self.control = control
        self.metrics = metrics
        self._clock = clock
        self._patches = asyncio.Semaphore(PATCHES_AT_ONCE)

    async def flush(self, *, force: bool = False) -> None:
        patches = self.batcher.due(self._clock(), force=force)
        if patches:
            await asyncio.gather(*(self._patch(name, patch) for name, patch in patches))

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(min(interval_s / 2, 0.25))
            await self.flush()

    async def _patch(self, name: str, patch: dict[str, Any]) -> None:
        async with self._patches:
            try:
                await self.control.patch_conversation(name, patch)
                self.metrics.usage_patches_total.inc()
            except ControlPlaneError as err:
                log.warning("usage patch of %s: %s", name, err)
