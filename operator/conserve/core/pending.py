"""Order of the queue of conversations that wait for capacity: priority (high first), then age, then name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PendingItem:
    conversation: str
    priority: int
    created_at_s: float  # seconds since the epoch of the object's creationTimestamp
    reservation_kv_tokens: int


def order_pending(items: Iterable[PendingItem]) -> list[PendingItem]:
    return sorted(items, key=lambda i: (-i.priority, i.created_at_s, i.conversation))
