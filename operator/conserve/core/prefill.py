"""Which prefill server runs a conversation's first turn: a ready one, compute tier first, least used, by name.

The first turn's prefill runs once; its KV cache then moves to the decoder. Compute-tier GPUs are built for
prefill, so they come first; among equals the one that has run the fewest first turns wins (spreads load),
then the smallest name (deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
