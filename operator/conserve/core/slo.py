"""Conversation SLOs: a pool's classes and targets, whether a turn met them, and attainment over a window.

Pure (no I/O, no clock): the router judges each turn with `turn_met`, the operator and the simulator count ended
conversations in an `AttainmentWindow`, and the scheduler's admission (`conserve.core.admission`) bounds a class's
queue wait by its TTFET target. The API form is `conserve.api.slo`; `conserve.api.scheduling.slo_policy` derives
this one from a DecoderPool spec.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: The class of a conversation that names none in a pool without a default class: the pool's own targets.
NO_CLASS = ""
#: How far back live attainment and goodput look (seconds).
DEFAULT_WINDOW_S = 600.0


@dataclass(frozen=True, slots=True)
class SloClass:
    name: str
    priority: int
    ttfet_s: float  # a turn's first visible token within this long of its arrival
    tbt_s: float  # then its tokens this far apart, on average, or closer


@dataclass(frozen=True, slots=True)
class SloPolicy:
    """A pool's SLO: its own targets (`NO_CLASS`), its classes and the attainment it should keep."""

    ttfet_s: float
    tbt_s: float
    attainment_target: float = 0.95
    classes: Mapping[str, SloClass] = field(default_factory=dict)
    default_class: str | None = None

    def resolve(self, name: str | None) -> SloClass | None:
        """The class a conversation belongs to (its own, else the pool's default, else the pool's targets);
        None when it names a class the pool does not have."""
        chosen = name or self.default_class
        if not chosen:
            return SloClass(NO_CLASS, 0, self.ttfet_s, self.tbt_s)
        return self.classes.get(chosen)

    def class_names(self) -> list[str]:
        return sorted(self.classes) if self.classes else [NO_CLASS]


def turn_met(slo: SloClass, ttft_s: float | None, tbt_s: float | None) -> bool:
    """Whether a turn met its class's SLO: its first token (None: it produced none) within the TTFET target and
    its mean time between tokens (None: fewer than two tokens, nothing to judge) within the TBT target."""
    if ttft_s is None or ttft_s > slo.ttfet_s:
        return False
    return tbt_s is None or tbt_s <= slo.tbt_s


@dataclass(frozen=True, slots=True)
class ClassFigures:
    name: str
    ended: int  # cumulative
    met: int
    refused: int
    attainment: float | None  # over the window; None before one ended in it
    goodput_per_s: float  # over the window


@dataclass(slots=True)
class _ClassCounts:
    ended: int = 0
    met: int = 0
    refused: int = 0
    recent: deque[tuple[float, bool]] = field(default_factory=deque)  # (ended at, met)


class AttainmentWindow:
    """Ended and refused conversations per class: cumulative counts (restorable after a restart) and the recent
    window's attainment and goodput."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self._classes: dict[str, _ClassCounts] = {}
        self._started_s: float | None = None

    def restore(self, name: str, ended: int, met: int, refused: int) -> None:
        """Counts written before a restart (the window itself starts empty)."""
        counts = self._classes.setdefault(name, _ClassCounts())
        counts.ended, counts.met, counts.refused = (
            max(counts.ended, ended),
            max(counts.met, met),
            max(counts.refused, refused),
        )

    def ended(self, name: str, met: bool, now_s: float) -> None:
        counts = self._classes.setdefault(name, _ClassCounts())
        counts.ended += 1
        counts.met += met
        counts.recent.append((now_s, met))
        self._started_s = now_s if self._started_s is None else min(self._started_s, now_s)

    def refused(self, name: str, now_s: float) -> None:
        self._classes.setdefault(name, _ClassCounts()).refused += 1
        self._started_s = now_s if self._started_s is None else min(self._started_s, now_s)

    def figures(self, now_s: float, names: Iterable[str] = ()) -> list[ClassFigures]:
        """Per class (those named, and every class seen), by name."""
        span = self._span(now_s)
        out = []
        for name in sorted(set(names) | set(self._classes)):
            counts = self._classes.get(name) or _ClassCounts()
            self._expire(counts, now_s)
            recent_met = sum(1 for _, met in counts.recent if met)
            attainment = recent_met / len(counts.recent) if counts.recent else None
            out.append(ClassFigures(name, counts.ended, counts.met, counts.refused, attainment, recent_met / span))
        return out

    def overall(self, now_s: float) -> tuple[float | None, float]:
        """All classes together: the window's attainment and goodput (conversations per second)."""
        total = met = 0
        for counts in self._classes.values():
            self._expire(counts, now_s)
            total += len(counts.recent)
            met += sum(1 for _, ok in counts.recent if ok)
        return (met / total if total else None), met / self._span(now_s)

    def _span(self, now_s: float) -> float:
        """The window's length, or less while the window has not filled since the first count."""
        if self._started_s is None:
            return self.window_s
        return max(min(self.window_s, now_s - self._started_s), 1.0)

    def _expire(self, counts: _ClassCounts, now_s: float) -> None:
        while counts.recent and now_s - counts.recent[0][0] > self.window_s:
            counts.recent.popleft()
