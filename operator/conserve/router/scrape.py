"""The router's scrape of its servers' `/metrics` (the I/O around conserve.router.signals).

Every `interval_s` each prefill server and decoder of the pools the router serves is read at once (concurrently,
each bounded by `timeout_s`), parsed by `conserve.exposition.engine_load` and handed to `Signals.scraped`. A server
that does not answer, answers an error or something that is not an exposition keeps its last reading (logged at
debug level): a scrape never fails a turn, it only makes the decider's view older.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from conserve.exposition import engine_load
from conserve.router.signals import Signals

log = logging.getLogger(__name__)

#: Default seconds between scrapes (`conserve router --scrape-interval`).
SCRAPE_INTERVAL_S = 1.0
#: A server slower than this to answer keeps its last reading until the next round.
SCRAPE_TIMEOUT_S = 2.0


class Scraper:
    def __init__(
        self,
        signals: Signals,
        targets: Callable[[], set[str]],
        *,
        interval_s: float,
        timeout_s: float = SCRAPE_TIMEOUT_S,
    ) -> None:
        self.signals = signals
        self.targets = targets
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def once(self, session: aiohttp.ClientSession) -> int:
        """One round over the current targets; returns how many servers answered."""
        endpoints = self.targets()
        self.signals.keep_only(endpoints)
        answered = await asyncio.gather(*(self._one(session, e) for e in sorted(endpoints)))
        return sum(answered)

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            await self.once(session)
            await asyncio.sleep(self.interval_s)

    async def _one(self, session: aiohttp.ClientSession, endpoint: str) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with session.get(f"http://{endpoint}/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    log.debug("scrape of %s: HTTP %s", endpoint, resp.status)
                    return False
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:  # ValueError: a body not in its charset
            log.debug("scrape of %s: %s", endpoint, err)
            return False
        load = engine_load(text)
        if load is None:
            log.debug("scrape of %s: not a metrics exposition", endpoint)
            return False
        self.signals.scraped(endpoint, load)
        return True
