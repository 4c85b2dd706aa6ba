"""Await a condition instead of sleeping: poll a probe until it returns something truthy, or time out."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout_s: float = 60.0,
    interval_s: float = 0.1,
    *,
    tolerate: tuple[type[Exception], ...] = (),
) -> T:
    """The probe's first truthy result. An exception of a `tolerate`d type counts as not yet (a 404 while an
    object appears). After `timeout_s`: TimeoutError naming `what` and the probe's last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        last: Any
        try:
            last = probe()
        except tolerate as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}: last={last!r}")
        time.sleep(interval_s)


async def async_wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.05) -> Any:
    """`wait_for` on an event loop; the probe may be a coroutine function."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = probe()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}: last={last!r}")
        await asyncio.sleep(interval_s)


__all__ = ["async_wait_for", "wait_for"]
