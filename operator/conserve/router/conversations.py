"""The router's memory of conversations: their states, by (routing mode, owner, conversation id), each created on
its first turn under its owner's object name (`conserve.router.auth.owned_name`), and forgotten once idle past its
pool's idle timeout (memory only: the operator's sweep ends a conversation at that timeout, the one owner of it; a
later turn starts it afresh)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from conserve.metrics import RouterMetrics
from conserve.router.auth import owned_name
from conserve.router.control import ControlPlane
from conserve.router.policy import Mode
from conserve.router.turns import ConversationState, RouterConfig

#: A conversation idle this long is forgotten when its pool's idle timeout is not known yet.
DEFAULT_FORGET_AFTER_S = 1800.0


class ConversationStates:
    def __init__(
        self, config: RouterConfig, control: ControlPlane, metrics: RouterMetrics, clock: Callable[[], float]
    ) -> None:
        self.config, self.control, self.metrics, self._clock = config, control, metrics, clock
        self._states: dict[tuple[Mode, str, str], ConversationState] = {}

    def get_or_create(self, owner: str, conv_id: str, mode: Mode, now: float) -> ConversationState:
        key = (mode, owner, conv_id)
        state = self._states.get(key)
        if state is None:
            name = owned_name(owner, conv_id)
            state = ConversationState(conv_id, name, mode, now, owner=owner, last_turn_s=now)
            self._states[key] = state
        return state

    def find(self, owner: str, conv_id: str) -> Iterator[ConversationState]:
        """The owner's states of that id (one per routing mode it used)."""
        for mode in Mode:
            state = self._states.get((mode, owner, conv_id))
            if state is not None:
                yield state

    def drop(self, state: ConversationState) -> None:
        self._states.pop((state.mode, state.owner, state.conversation_id), None)

    async def forget_idle(self, on_forget: Callable[[ConversationState], None] = lambda _state: None) -> None:
        """Forever: forget conversations idle past their pool's idle timeout (`on_forget` told of each)."""
        while True:
            await asyncio.sleep(5.0 if self.config.idle_close_s is None else min(self.config.idle_close_s / 4, 5.0))
            now = self._clock()
            for key, state in list(self._states.items()):
                if state.lock.locked() or now - state.last_turn_s < self._forget_after_s(state):
                    continue
                self._states.pop(key, None)
                on_forget(state)
                self.metrics.conversations_closed_total.labels(mode=state.mode.value).inc()

    def _forget_after_s(self, state: ConversationState) -> float:
        if self.config.idle_close_s is not None:
            return self.config.idle_close_s
        if self.config.idle_timeout_seconds is not None:
            return float(self.config.idle_timeout_seconds)
        pool_timeout = self.control.pool_idle_timeout_s(state.pool or self.config.pool)
        return pool_timeout if pool_timeout is not None else DEFAULT_FORGET_AFTER_S
