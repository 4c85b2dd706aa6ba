"""Turn reports off the API server's write path: the router streams each turn's usage to the operator
(`api.usage_wire`, POST /v1/usage), and the Conversation's status becomes a checkpoint of it.

Why a stream and not the engines' metrics: the operator needs a conversation's own counters (turns, tokens, the
time of its latest turn) a moment after each turn; vLLM's metrics are per server, and scraping per-conversation
series from every router and engine would cost more than the reports (docs/SCALE.md has the measurements).

A report is applied as a spec.usage patch was (`Engine.apply_usage`: the reservation grown or outgrown, the
queue drained, KV made idle), in memory. The status is written at once when that changed a decision (phase,
reservation, KV state, a condition); a change of counters alone is owed and written as a checkpoint at most
`CHECKPOINT_INTERVAL_S` later, unless a decision's write (Idle, the end, a placement) carries it sooner. An
operator restart rebuilds from the checkpoint; the router notices the new run (`UsageAnswer.operator`) and sends
its latest usage of every live conversation again, so nothing is lost while the router lives; a router restart
seeds from this operator (GET), so nothing is lost while the operator lives.

Authentication: a shared token (a Secret mounted in both), compared in constant time; the endpoint does not
start without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from conserve.api.common import Condition
from conserve.api.conversation import ConversationStatus, ConversationUsage, Phase
from conserve.api.usage_wire import (
    USAGE_PATH,
    Rejected,
    UsageAnswer,
    UsageBatch,
    merge_usage,
    usage_of_status,
)
from conserve.controller import conversation
from conserve.controller.engine import Engine
from conserve.controller.state import ConvRecord, key_of

log = logging.getLogger("conserve.operator")

#: A conversation's counters reach the API server at most this long after a turn (when no decision wrote them
#: sooner): what an operator restart has to re-learn from the router at most. Well below the pools' idle timeouts
#: (default 1800 s), so a checkpointed last turn never makes an active conversation look expired.
CHECKPOINT_INTERVAL_S = 300.0
#: Bodies larger than this are refused (MAX_REPORTS reports fit).
MAX_BODY_BYTES = 2 * 1024 * 1024


class Checkpoints:
    """Which conversations owe their counters to the API server, and since when: `must_write` says whether a
    report's changes are written now or owed, `due` whose checkpoint is due. Pure (the benchmark replays it)."""

    def __init__(self, interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._owed: dict[str, float] = {}

    def must_write(self, key: str, now_s: float, *, decided: bool, outgrown: bool) -> bool:
        """After a report: True when its changes go to the API server now: a decision changed (`decided`), or
        the live context outgrew the reservation held before the report (`outgrown`: the KV went past what was
        reserved, whether or not it could be extended); else the write is owed from `now_s` (the first owed)."""
        if decided or outgrown:
            self._owed.pop(key, None)
            return True
        self._owed.setdefault(key, now_s)
        return False

    def settled(self, key: str) -> None:
        self._owed.pop(key, None)

    def due(self, now_s: float) -> list[str]:
        return [k for k, since in self._owed.items() if now_s - since >= self.interval_s]

    def __len__(self) -> int:
        return len(self._owed)


def _decision(record: ConvRecord) -> tuple[Any, ...]:
    """What a status write must not wait for: a decision the data plane or a user acts on. Not the reservation
    grown in place ahead of the context (a restart re-learns it from the router's reports and the engines'
    occupancy within seconds), not the first turn's Prefilling -> Decoding (nothing acts on it)."""
    status: ConversationStatus = record.status
    phase = Phase.PREFILLING if status.phase is Phase.DECODING else status.phase
    conditions: list[Condition] = sorted(record.conditions.values(), key=lambda c: c.type)
    return (
        phase,
        status.decoder.pod if status.decoder else None,
        status.placement_generation,
        record.kv_state,
        tuple((c.type, c.status, c.reason) for c in conditions),
    )


class UsageIntake:
    """Applies reports to the engine's records; owes and writes the checkpoints."""

    def __init__(self, engine: Engine, checkpoints: Checkpoints | None = None) -> None:
        self.engine = engine
        self.checkpoints = checkpoints or Checkpoints()
        #: This operator run, as the router sees it: a new one means "send everything again".
        self.run_id = secrets.token_hex(8)

    async def apply(self, batch: UsageBatch) -> UsageAnswer:
        applied, deferred, rejected = 0, list[str](), list[Rejected]()
        for report in batch.reports:
            record = self.engine.world.convs.get(key_of(report.namespace, report.name))
            if record is None or (report.uid and record.uid and report.uid != record.uid):
                deferred.append(report.name)
                continue
            try:
                await self.apply_one(record, report.usage)
                if report.completed:
                    await self.complete(record)
            except Exception as exc:  # one bad report must not stop the others
                log.exception("usage report of %s", record.key)
                rejected.append(Rejected(name=report.name, reason=str(exc)))
                continue
            applied += 1
        return UsageAnswer(operator=self.run_id, applied=applied, deferred=deferred, rejected=rejected)

    async def apply_one(self, record: ConvRecord, usage: ConversationUsage) -> None:
        merged = merge_usage(record.spec.usage, usage)
        if merged is record.spec.usage or record.terminal:
            return
        record.spec = record.spec.model_copy(update={"usage": merged})
        engine = self.engine
        if not record.placed:
            await conversation.serve(engine, record)  # counted, and admitted (a rare report before placement)
            return
        pool = engine.world.pool_of(record)
        before, reserved = _decision(record), record.status.reserved_kv_tokens
        async with pool.lock:
            changed, others = engine.apply_usage(pool, record)
        if changed:
            engine.on_pool_changed(pool)
            decided = _decision(record) != before
            outgrown = record.status.live_kv_tokens > reserved
            if self.checkpoints.must_write(record.key, engine.clock.monotonic(), decided=decided, outgrown=outgrown):
                await engine.write_status(record)
        await engine.commit(others, pool)

    async def complete(self, record: ConvRecord) -> None:
        """The client ended the conversation (as a spec.completed patch would say): released, and the status
        written with it (the final counters included)."""
        self.checkpoints.settled(record.key)
        if not record.terminal:
            await self.engine.release(record, Phase.COMPLETED, "the client marked the conversation completed")

    async def write_due(self) -> int:
        """Write the checkpoints that are due; returns how many were written."""
        written = 0
        for key in self.checkpoints.due(self.engine.clock.monotonic()):
            self.checkpoints.settled(key)
            record = self.engine.world.convs.get(key)
            if record is not None and record.dirty and not record.terminal:  # else a decision's write carried it
                await self.engine.write_status(record)
                written += 1
        return written

    def known_usage(self, namespace: str, name: str) -> ConversationUsage | None:
        record = self.engine.world.convs.get(key_of(namespace, name))
        if record is None:
            return None
        return merge_usage(usage_of_status(record.status), record.spec.usage)

    async def run_checkpoints(self) -> None:
        while True:
            await asyncio.sleep(min(self.checkpoints.interval_s / 10, 5.0))
            with contextlib.suppress(Exception):  # a failed write stays dirty: the next decision writes it
                await self.write_due()


def read_token(path: str | Path) -> str:
    token = Path(path).read_text().strip()
    if len(token) < 16:
        raise ValueError(f"usage token in {path}: at least 16 characters, got {len(token)}")
    return token


def make_app(intake: UsageIntake, token: str) -> web.Application:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def authenticated(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response({"error": "a valid bearer token is required"}, status=401)
        return await handler(request)

    async def post(request: web.Request) -> web.Response:
        try:
            batch = UsageBatch.model_validate_json(await request.read())
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            return web.json_response({"error": f"invalid usage batch: {errors}"}, status=400)
        answer = await intake.apply(batch)
        return web.json_response(answer.model_dump(mode="json", by_alias=True))

    async def get(request: web.Request) -> web.Response:
        usage = intake.known_usage(request.match_info["namespace"], request.match_info["name"])
        if usage is None:
            return web.json_response({"operator": intake.run_id, "error": "not held by this operator"}, status=404)
        return web.json_response(
            {"operator": intake.run_id, "usage": usage.model_dump(mode="json", by_alias=True, exclude_none=True)}
        )

    app = web.Application(middlewares=[authenticated], client_max_size=MAX_BODY_BYTES)
    app.router.add_post(USAGE_PATH, post)
    app.router.add_get(USAGE_PATH + "/{namespace}/{name}", get)
    return app


def serve_loop(intake: UsageIntake, port: int, token: str) -> Callable[[], Coroutine[Any, Any, None]]:
    """The endpoint and the checkpoint writer, as one background loop of the operator (started once the ledger is
    rebuilt: reports before then would meet an empty world)."""

    async def run() -> None:
        runner = web.AppRunner(make_app(intake, token), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "0.0.0.0", port)  # in a pod: reached through its Service
        await site.start()
        log.info("usage reports accepted on :%d%s", port, USAGE_PATH)
        try:
            await intake.run_checkpoints()
        finally:
            await runner.cleanup()

    return run
