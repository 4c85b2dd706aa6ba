"""Observed KV occupancy: the decoders' own metrics, scraped, beside the ledger's reservations.

Every `interval_s` the operator GETs each ready decoder's Prometheus `/metrics` and reads
`vllm:kv_cache_usage_perc` (a fraction, 0 to 1, despite the name; `vllm:gpu_cache_usage_perc`, vLLM V0's and
the GPU simulator's older name, is accepted too) and `vllm:num_requests_running`. The result goes to the engine
through one hook, `observe_occupancy` (re-point it when the scheduler object owns the pool's decisions).

Which source wins when they disagree: **the larger** (the rule and why: `core/occupancy.py`). Usage is reported
at most every 30 s per conversation now, so observed KV above the ledger is common between reports; observed KV
below the reservations frees nothing (reservations are room promised to coming turns).
`vllm:num_requests_running` feeds the placement's load scorer (turns running now: the larger of it and the
scheduler's own count of turns in flight); it does not size anything, since it counts in-flight requests, not
the conversations pinned to the decoder between turns, which is what the ledger holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from conserve import metrics
from conserve.core.occupancy import ObservedOccupancy
from conserve.exposition import engine_load

log = logging.getLogger("conserve.operator")


def parse_metrics(text: str) -> tuple[float, int] | None:
    """(KV used fraction, requests running) from a Prometheus text exposition (`conserve.exposition`); None when it
    has no KV usage or does not parse."""
    load = engine_load(text)
    if load is None or load.kv_usage is None:
        return None
    return load.kv_usage, load.running


Fetch = Callable[[str], Any]  # endpoint "host:port" -> awaitable metrics text


class OccupancyScraper:
    """Scrapes the ready decoders of the pools this replica decides for; hands each reading to `observe`."""

    def __init__(
        self,
        decoders: Callable[[], list[tuple[str, str, str, str]]],
        observe: Callable[[str, str, str, ObservedOccupancy], None],
        *,
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
        concurrency: int = 32,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`decoders()` lists (namespace, pool, pod, endpoint); `observe(namespace, pool, pod, reading)`."""
        self.decoders, self.observe = decoders, observe
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._limit = asyncio.Semaphore(concurrency)
        self._fetch = fetch
        self._clock = clock
        self._session: Any = None

    async def _get(self, endpoint: str) -> str:
        if self._fetch is not None:
            return str(await self._fetch(endpoint))
        import aiohttp  # noqa: PLC0415 the client loads on first scrape

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self._session.get(f"http://{endpoint}/metrics") as resp:
            resp.raise_for_status()
            return str(await resp.text())

    async def scrape_once(self) -> int:
        """One round over every decoder; returns how many readings were delivered."""

        async def one(namespace: str, pool: str, pod: str, endpoint: str) -> bool:
            async with self._limit:
                try:
                    text = await asyncio.wait_for(self._get(endpoint), self.timeout_s)
                except Exception as exc:  # noqa: BLE001 unreachable or slow: ages out
                    log.debug("occupancy of %s/%s (%s) not read: %s", namespace, pod, endpoint, exc)
                    return False
            parsed = parse_metrics(text)
            if parsed is None:
                return False
            fraction, running = parsed
            self.observe(namespace, pool, pod, ObservedOccupancy(fraction, running, self._clock()))
            metrics.OBSERVED_KV_USAGE.labels(namespace, pool, pod).set(fraction)
            metrics.OBSERVED_REQUESTS_RUNNING.labels(namespace, pool, pod).set(running)
            return True

        results = await asyncio.gather(*(one(*d) for d in self.decoders() if d[3]))
        return sum(results)

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                try:
                    await self.scrape_once()
                except Exception:
                    log.exception("occupancy scrape failed")
        finally:
            await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def engine_hook(engine: Any, *, drain_on_drop: float = 0.05) -> Callable[[str, str, str, ObservedOccupancy], None]:
    """The hook that hands a reading to the pool's scheduler (placement folds it in, `core.occupancy`); a drop in
    observed usage may have made room, so the pool's queue drains. The reading is restamped in the scheduler's
    clock, so the scheduler's sweep can expire it."""

    def observe(namespace: str, pool_name: str, pod: str, reading: ObservedOccupancy) -> None:
        pool = engine.world.pools.get(f"{namespace}/{pool_name}")
        if pool is None:
            return
        previous = pool.observed.get(pod)
        pool.observed[pod] = reading
        pool.scheduler.occupancy_observed(pod, replace(reading, at_s=engine.clock.now()))
        if (
            previous is not None
            and pool.scheduler.pending_count
            and reading.kv_used_fraction < previous.kv_used_fraction - drain_on_drop
        ):
            engine.spawn(engine.drain(pool))

    return observe


def engine_decoders(engine: Any) -> Callable[[], list[tuple[str, str, str, str]]]:
    """The ready decoders (namespace, pool, pod, endpoint) of the pools the engine decides for."""

    def decoders() -> list[tuple[str, str, str, str]]:
        return [
            (pool.namespace, pool.name, info.pod, info.endpoint)
            for pool in list(engine.world.pools.values())
            for info in pool.decoders.values()
            if info.ready and info.endpoint
        ]

    return decoders
