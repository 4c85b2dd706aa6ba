"""Decoders that stopped being Ready: how long a pool keeps their conversations before moving them.

A decoder not Ready for a moment (its node NotReady while the API server or the kubelet was away, a readiness
probe failing during a restart) still holds its conversations' KV, and its server often answers all along: moving
them at once would prefill every one again elsewhere, or, with no room, take away conversations that were never
lost. A pool declares a grace (`spec.placement.decoderLostGraceSeconds`); a decoder unready for less keeps its
conversations (it takes no new ones), one unready past it is lost. A decoder deleted or terminating is lost at
once (`sync` tells the caller those apart). Pure: time is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class UnreadyDecoders:
    """When each of a pool's decoders stopped being Ready (while it stays unready), and which were declared lost."""

    since: dict[str, float] = field(default_factory=dict)
    #: Unready decoders already declared lost: not lost again until they were Ready once more.
    lost: set[str] = field(default_factory=set)

    def observe(self, ready: Mapping[str, bool], now_s: float) -> None:
        """The pool's decoders as they are now (name -> Ready); a decoder no longer listed is forgotten."""
        for name in [n for n in self.since if n not in ready]:
            self.forget(name)
        for name, is_ready in ready.items():
            if is_ready:
                self.forget(name)
            else:
                self.since.setdefault(name, now_s)

    def forget(self, name: str) -> None:
        self.since.pop(name, None)
        self.lost.discard(name)

    def mark_lost(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self.since:
                self.lost.add(name)

    def due(self, now_s: float, grace_s: float) -> list[str]:
        """The unready decoders past the grace not yet declared lost (declared now), sorted."""
        out = sorted(n for n, t in self.since.items() if n not in self.lost and now_s - t >= grace_s)
        self.lost.update(out)
        return out

    def unready_for(self, name: str, now_s: float) -> float | None:
        """Seconds the decoder has been unready, None when it is Ready (or unknown)."""
        started = self.since.get(name)
        return None if started is None else now_s - started
