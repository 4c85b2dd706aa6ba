"""Admission under overload: how long a conversation may wait in a pool's queue, and when to refuse it early.

Rule (the pool scheduler applies it; the operator and the simulator run that scheduler):

- **Budget.** A conversation may wait for its placement at most its class's TTFET target (`conserve.core.slo`):
  a first turn that waited that long has missed the SLO whatever happens next, so it is refused (the router: HTTP
  429 with Retry-After and the reason) instead of being admitted late, and the room goes to a conversation that can
  still make it. Never longer than the pool's `placement.maxQueueWaitSeconds`; a pool with no SLO has only that.
- **Early refusal** (a pool with an SLO). When a conversation has to queue, its wait is estimated from the queue
  ahead of it (same or higher priority) and the rate at which the pool's conversations have been leaving
  (releases observed over the last `DEPARTURE_WINDOW_S`): `(ahead + 1) / rate`. One whose estimate is past its
  budget is refused at once, with the estimate in the message; with too few departures observed there is no
  estimate and it waits (the budget still bounds it).
- **No preemption.** Admission never takes a reservation from an admitted conversation: only KV that is idle
  between turns may move to host memory to make room (`conserve.core.lifecycle`), and the pin stays.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from conserve.core.slo import SloClass

#: Departures are counted over this window for the early estimate (seconds).
DEPARTURE_WINDOW_S = 120.0
#: Fewer departures than this in the window: no estimate (a refusal needs evidence).
MIN_DEPARTURES = 5


def queue_budget_s(slo_class: SloClass | None, max_queue_wait_s: float) -> float:
    """How long a conversation of this class may wait in the queue."""
    if slo_class is None:
        return max_queue_wait_s
    return min(slo_class.ttfet_s, max_queue_wait_s)


@dataclass(slots=True)
class DepartureRate:
    """Conversations leaving the pool (released: completed, deleted, timed out), over a sliding window."""

    window_s: float = DEPARTURE_WINDOW_S
    _times: deque[float] | None = None

    def departed(self, now_s: float) -> None:
        if self._times is None:
            self._times = deque()
        self._times.append(now_s)

    def per_s(self, now_s: float) -> float | None:
        """Departures per second: the gaps between the departures still in the window, up to now (so a pool that
        has stopped freeing room reads slower and slower); None with fewer than `MIN_DEPARTURES` in it."""
        times = self._times
        if times is None:
            return None
        while times and now_s - times[0] > self.window_s:
            times.popleft()
        if len(times) < MIN_DEPARTURES:
            return None
        return (len(times) - 1) / max(now_s - times[0], 1.0)


def expected_wait_s(ahead: int, departures_per_s: float | None) -> float | None:
    """A queued conversation's expected wait: one departure per conversation ahead of it, and one for itself."""
    if departures_per_s is None or departures_per_s <= 0:
        return None
    return (ahead + 1) / departures_per_s


def refusal_message(pool_budget_s: float, waited_s: float | None, estimate_s: float | None, why: str) -> str:
    """Why a conversation was refused: its wait (or the estimate of it) against its budget, and why it waited."""
    reason = f" ({why})" if why else ""
    if waited_s is not None:
        return f"waited {waited_s:.0f} s in the queue, over its budget of {pool_budget_s:g} s{reason}"
    return (
        f"cannot start within its budget of {pool_budget_s:g} s: the expected wait is {estimate_s:.0f} s at the "
        f"pool's current departure rate{reason}"
    )
