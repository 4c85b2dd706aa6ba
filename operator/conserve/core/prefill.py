"""The scheduler's pick of a prefill server for a conversation's first turn: a ready one, compute tier first,
least used, by name.

The first turn's prefill runs once; its KV cache then moves to the decoder. Compute-tier GPUs are built for
prefill, so they come first; among equals the one that has run the fewest first turns wins (spreads load),
then the smallest name (deterministic). The pick is a suggestion (`status.prefill`): the router's early prefill
(on by default) starts the first turn on its own least-loaded prefill server before the placement arrives and
reports it (`spec.usage.prefillPod`); `PrefillCounts.moved` then counts the turn where it ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from conserve.core.gpus import Tier


@dataclass(frozen=True, slots=True)
class PrefillState:
    name: str
    tier: Tier | None = None
    ready: bool = True
    assigned: int = 0  # first turns sent to it so far


def pick_prefill(prefills: Sequence[PrefillState]) -> str | None:
    ready = [p for p in prefills if p.ready]
    if not ready:
        return None
    best = min(ready, key=lambda p: (p.tier is not Tier.COMPUTE, p.assigned, p.name))
    return best.name


class PrefillCounts:
    """A pool's prefill servers with the first turns each has been given (the scheduler's bookkeeping)."""

    def __init__(self) -> None:
        self.servers: dict[str, PrefillState] = {}

    def refresh(self, prefills: Sequence[PrefillState]) -> None:
        """The servers as now seen; each known one keeps its count of first turns."""
        self.servers = {p.name: replace(p, assigned=self._assigned(p.name)) for p in prefills}

    def pick(self) -> str | None:
        """The server for a first turn (`pick_prefill`), counted as given one more."""
        name = pick_prefill(list(self.servers.values()))
        if name is not None:
            self._count(name, +1)
        return name

    def moved(self, chosen: str | None, used: str) -> None:
        """A first turn ran on `used` instead of `chosen`: the count follows it."""
        if chosen is not None and self._assigned(chosen) > 0:
            self._count(chosen, -1)
        if used in self.servers:
            self._count(used, +1)

    def _assigned(self, name: str) -> int:
        server = self.servers.get(name)
        return server.assigned if server is not None else 0

    def _count(self, name: str, delta: int) -> None:
        self.servers[name] = replace(self.servers[name], assigned=self.servers[name].assigned + delta)
