"""A clock tests move by hand, in each form the code under test takes one: the operator engine's `Clock`
(`now()`: epoch seconds, `monotonic()`), or a plain callable where code defaults to `time.monotonic`
(`clock()`). Both readings advance together, only by `advance` / `advance_to`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    epoch_s: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    monotonic_s: float = 1_000.0

    def now(self) -> float:
        """Seconds since the epoch (`time.time()`)."""
        return self.epoch_s

    def monotonic(self) -> float:
        return self.monotonic_s

    def __call__(self) -> float:
        return self.monotonic_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.monotonic_s += seconds
        self.epoch_s += seconds

    def advance_to(self, epoch_s: float) -> None:
        """Move on to an epoch time (not before the current one)."""
        self.advance(epoch_s - self.epoch_s)
