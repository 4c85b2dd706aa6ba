"""The queue of conversations that wait for capacity: its order (their SLO class's priority, high first; then their
own priority; then age; then name), and how long one may wait (`overdue`: the budget of `conserve.core.admission`).

A wait counts from the conversation's creation, not from when it was last queued: a conversation only waits before
its first placement (one whose decoder is lost and fits nowhere fails at once), and its creation is when its
client's first turn started waiting, which is the wait the limit bounds. After an operator restart the creation
time (from the API server) is still right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from conserve.core.decisions import ConversationRequest


def order_pending(
    requests: Iterable[ConversationRequest], class_priority: Callable[[ConversationRequest], int] | None = None
) -> list[ConversationRequest]:
    """Queue order: the class's priority (`class_priority`, 0 without one), the conversation's, then age, then key."""
    rank = class_priority or (lambda r: 0)
    return sorted(requests, key=lambda r: (-rank(r), -r.priority, r.created_at_s, r.key))


def overdue_by_budget(queued_since_s: Mapping[str, float], now_s: float, budget_s: Callable[[str], float]) -> list[str]:
    """The waiting conversations (key -> when their wait started) whose wait reached their own budget."""
    late = [(since, key) for key, since in queued_since_s.items() if now_s - since >= budget_s(key)]
    return [key for _, key in sorted(late)]


def overdue(queued_since_s: Mapping[str, float], now_s: float, max_wait_s: float) -> list[str]:
    """The waiting conversations (key -> when their wait started) that have waited `max_wait_s` or longer at
    `now_s`: the longest waiting first, then by key."""
    return overdue_by_budget(queued_since_s, now_s, lambda key: max_wait_s)
