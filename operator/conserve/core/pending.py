"""The queue of conversations that wait for capacity: its order (priority, high first; then age; then name),
and how long one may wait (`overdue`, the pool's `placement.maxQueueWaitSeconds`).

A wait counts from the conversation's creation, not from when it was last queued: a conversation only waits before
its first placement (one whose decoder is lost and fits nowhere fails at once), and its creation is when its
client's first turn started waiting, which is the wait the limit bounds. After an operator restart the creation
time (from the API server) is still right.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from conserve.core.decisions import ConversationRequest


def order_pending(requests: Iterable[ConversationRequest]) -> list[ConversationRequest]:
    return sorted(requests, key=lambda r: (-r.priority, r.created_at_s, r.key))


def overdue(queued_since_s: Mapping[str, float], now_s: float, max_wait_s: float) -> list[str]:
    """The waiting conversations (key -> when their wait started) that have waited `max_wait_s` or longer at
    `now_s`: the longest waiting first, then by key."""
    late = [(since, key) for key, since in queued_since_s.items() if now_s - since >= max_wait_s]
    return [key for _, key in sorted(late)]


def queue_wait_message(pool: str, waited_s: float, max_wait_s: float, reason: str | None, detail: str) -> str:
    """Why a conversation was refused after waiting: its wait, the pool's limit and why it was waiting."""
    why = f" ({reason}: {detail})" if reason and detail else f" ({reason})" if reason else ""
    return f"waited {waited_s:.0f} s in the queue of pool {pool}, over its limit of {max_wait_s:g} s{why}"
