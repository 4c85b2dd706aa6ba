"""A clock tests move by hand: `now()` (monotonic seconds) and `wall()` (epoch seconds) advance only by `advance`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    monotonic_s: float = 1_000.0
    epoch_s: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z

    def now(self) -> float:
        return self.monotonic_s

    def wall(self) -> float:
        return self.epoch_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.monotonic_s += seconds
        self.epoch_s += seconds
