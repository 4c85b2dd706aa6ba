"""Order of the queue of conversations that wait for capacity: priority (high first), then age, then name."""

from __future__ import annotations

from collections.abc import Iterable

from conserve.core.decisions import ConversationRequest


def order_pending(requests: Iterable[ConversationRequest]) -> list[ConversationRequest]:
    return sorted(requests, key=lambda r: (-r.priority, r.created_at_s, r.key))
