"""The router's turn loop: the I/O around the pure decisions of conserve.router.policy.

One `Router` serves every conversation. A turn: find (or create) the conversation's state; in conversation mode
create the Conversation object on its first turn and wait for the placement (the first turn's prefill starts
meanwhile on the least-loaded prefill server, so the control plane's latency overlaps the prefill); plan the turn;
prefill and hand the KV over when the plan says so; stream the decode; record TTFT, time between tokens and, on
the conversation's first user-visible output, TTFET; queue the cumulative usage for the batched report.
A decoder that cannot be reached before it sent anything is treated as gone: the router waits for the operator's
re-placement (a newer placementGeneration) and replays the turn there, KV included.

A first turn waits as long as its conversation waits in the pool's queue, up to the pool's `maxQueueWaitSeconds`
(and a margin, so that the operator's refusal arrives first). A refused conversation (the operator's queue limit,
`whenFull: Reject`), or a wait that ends while the pool is busy, is HTTP 429 with Retry-After (`policy.not_placed`),
and the router forgets the conversation's object: the client's retry with the same id deletes the Failed object and
creates it again, so it queues afresh.

The router ends no conversation: the operator's sweep owns the idle timeout. The router only forgets its own state of
a conversation idle past its pool's idle timeout (`--idle-close` overrides); a turn for a conversation the operator
has ended (its idle timeout) replaces the object, so it is placed afresh for its whole context and prefilled again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from conserve.api.openai_wire import prompt_tokens_of
from conserve.core.tokens import estimate_tokens
from conserve.metrics import RouterMetrics
from conserve.router import backend
from conserve.router.control import ControlPlane, ControlPlaneError, ConversationFailed
from conserve.router.policy import (
    DEFAULT_PLACEMENT_WAIT_S,
    EFFECTIVE_HEADER,
    END_HEADER,
    MODE_HEADER,
    POOL_HEADER,
    Backend,
    LoadBook,
    Mode,
    NoBackend,
    Placement,
    TurnPlan,
    Usage,
    UsageBatcher,
    conversation_id_of,
    conversation_object_name,
    header_flag,
    least_loaded,
    new_input_tokens,
    not_placed,
    parse_mode,
    placement_wait_s,
    plan_turn,
)
from conserve.router.turns import ConversationState, TurnError, TurnRequest, TurnResult, TurnStarted
from conserve.router.turns import RouterConfig as RouterConfig  # re-exported: a Router is made with one

log = logging.getLogger(__name__)
#: A conversation idle this long is forgotten when its pool's idle timeout is not known yet.
DEFAULT_FORGET_AFTER_S = 1800.0


@dataclass
class EarlyPrefill:
    """A first turn's prefill, started while the operator places the conversation."""

    backend: Backend
    task: asyncio.Task[dict[str, Any] | None]
    done_s: float | None = None  # when it finished (the placement wait exposed to the user ends there or later)

    def finished(self, now: float) -> None:
        self.done_s = now


class Router:
    def __init__(
        self,
        config: RouterConfig,
        control: ControlPlane,
        metrics: RouterMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.control = control
        self.metrics = metrics
        self._clock = clock
        self._book = LoadBook()
        self._batcher = UsageBatcher(config.usage_interval_s)
        self._states: dict[tuple[Mode, str], ConversationState] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._patches = asyncio.Semaphore(8)  # concurrent usage patches, to be gentle with the API server

    # ---- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        await self.control.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flush_loop()), loop.create_task(self._idle_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.flush(force=True)
        if self._session is not None:
            await self._session.close()
        await self.control.stop()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Router.start() first"
        return self._session

    def backends(self, pool: str | None = None) -> tuple[list[Backend], list[Backend]]:
        return self.control.pool_backends(pool or self.config.pool)

    # ---- one turn -------------------------------------------------------------------------------------------
    async def turn(self, request: TurnRequest) -> AsyncIterator[dict[str, Any] | TurnStarted | TurnResult]:
        """Yields the decoder's chunks as they come, then the TurnResult. Raises TurnError before any chunk."""
        arrival = self._clock()
        mode = parse_mode(request.headers.get(MODE_HEADER), self.config.mode)
        pool = request.headers.get(POOL_HEADER) or self.config.pool
        conv_id = conversation_id_of(request.headers, request.body)
        prompt_tokens = prompt_tokens_of(request.body, request.kind == "chat")
        effective = header_flag(request.headers.get(EFFECTIVE_HEADER), True)
        ending = header_flag(request.headers.get(END_HEADER), False)
        if conv_id is None:
            mode = Mode.PER_TURN  # nothing to pin: a one-turn request
        state = self._state(conv_id, mode, arrival) if conv_id is not None else None
        lock = state.lock if state is not None else asyncio.Lock()
        async with lock:
            async for item in self._turn_locked(request, mode, pool, state, prompt_tokens, effective, arrival):
                yield item
            if state is not None and ending:
                self._close(state)

    def _state(self, conv_id: str, mode: Mode, now: float) -> ConversationState:
        key = (mode, conv_id)
        state = self._states.get(key)
        if state is None:
            state = ConversationState(conv_id, conversation_object_name(conv_id), mode, now, last_turn_s=now)
            self._states[key] = state
        return state

    async def _turn_locked(
        self,
        request: TurnRequest,
        mode: Mode,
        pool: str,
        state: ConversationState | None,
        prompt_tokens: int,
        effective: bool,
        arrival: float,
    ) -> AsyncIterator[dict[str, Any] | TurnStarted | TurnResult]:
        conv_id = state.conversation_id if state is not None else None
        early: EarlyPrefill | None = None
        placement: Placement | None = None
        if mode is Mode.CONVERSATION:
            assert state is not None
            placement, early = await self._placement_for_turn(request, pool, state, prompt_tokens, arrival)
        attempts = 0
        failed: set[str] = set()
        while True:
            attempts += 1
            plan = self._plan(mode, pool, placement, state, failed, early)
            try:
                kv_params: dict[str, Any] | None = None
                if plan.prefill is not None:
                    prefill = (
                        early.task
                        if early is not None
                        else self._prefill(plan.prefill, request, conv_id, prompt_tokens)
                    )
                    kv_params, early = await prefill, None
                    self.metrics.kv_transfers_total.labels(mode=mode.value).inc()
                async for item in self._decode(
                    request, mode, plan, state, prompt_tokens, effective, arrival, kv_params
                ):
                    yield item
                return
            except backend.BackendUnavailable as err:
                if early is not None:
                    early.task.cancel()
                    early = None
                failed.add(plan.decoder.endpoint)
                placement = await self._after_backend_error(err, attempts, mode, state, plan, placement)

    async def _placement_for_turn(
        self, request: TurnRequest, pool: str, state: ConversationState, prompt_tokens: int, arrival: float
    ) -> tuple[Placement, EarlyPrefill | None]:
        """The conversation's placement (created on its first turn), and the early prefill started meanwhile."""
        state.pool = pool
        if state.created is not None and state.created.done() and self.control.ended(state.name):
            # The operator ended it (its idle timeout, the one owner of it): this turn starts it afresh, a new
            # placement sized by its whole context, prefilled again (as the simulator does).
            state.created, state.kv_generation, state.refused = None, None, True
        if state.created is None:
            spec: dict[str, Any] = {"pool": pool, "firstTurnInputTokens": max(prompt_tokens, 1)}
            if self.config.idle_timeout_seconds is not None:
                spec["idleTimeoutSeconds"] = self.config.idle_timeout_seconds
            replace, state.refused = state.refused or self.control.ended(state.name), False
            if replace:  # the conversation starts again (its TTFET too): the refused attempt was never admitted
                state.started_s = arrival
            state.created = asyncio.get_running_loop().create_task(self._create(state.name, spec, replace=replace))
        placement = self.control.placement(state.name)
        if placement is not None and placement.generation == state.kv_generation:
            return placement, None
        early = None
        if placement is None and self.config.early_prefill:
            early = self._start_early_prefill(request, pool, state.conversation_id, prompt_tokens)
        try:
            placement = await self._created_and_placed(state, pool)
        except BaseException:
            if early is not None:
                early.task.cancel()
            raise
        placed = self._clock()
        self.metrics.placement_wait_seconds.labels(part="total").observe(placed - arrival)
        exposed_from = arrival if early is None else (early.done_s or placed)
        self.metrics.placement_wait_seconds.labels(part="exposed").observe(max(placed - exposed_from, 0.0))
        return placement, early

    def _start_early_prefill(
        self, request: TurnRequest, pool: str, conv_id: str, prompt_tokens: int
    ) -> EarlyPrefill | None:
        """Prefill does not depend on the decoder: start it on the least-loaded prefill server while the
        operator places the conversation."""
        prefills, _ = self.backends(pool)
        target = least_loaded(prefills, self._book)
        if target is None:
            return None
        early = EarlyPrefill(
            target, asyncio.get_running_loop().create_task(self._prefill(target, request, conv_id, prompt_tokens))
        )
        early.task.add_done_callback(lambda _t: early.finished(self._clock()))
        return early

    async def _created_and_placed(self, state: ConversationState, pool: str) -> Placement:
        """The first placement; TurnError 429 (a busy pool) or 503 (a fault) without one (`policy.not_placed`)."""
        assert state.created is not None
        try:
            await state.created
        except ControlPlaneError as err:
            state.created = None  # the next turn tries again
            raise TurnError(502, f"creating conversation {state.conversation_id}: {err}") from err
        max_wait_s = self.control.pool_max_queue_wait_s(pool)
        started = self._clock()
        reason: str | None
        try:
            return await self.control.wait_placement(
                state.name, newer_than=None, timeout_s=placement_wait_s(self.config.placement_timeout_s, max_wait_s)
            )
        except ConversationFailed as err:
            state.created, state.refused = None, True  # a retry replaces the object and queues afresh
            failed, reason, detail = True, err.reason, err.detail
        except TimeoutError:  # the conversation keeps its place in the queue for the client's retry
            waiting = self.control.waiting_reason(state.name)
            failed, reason, detail = False, waiting[0] if waiting else None, waiting[1] if waiting else ""
        answer = not_placed(
            state.conversation_id,
            pool,
            failed=failed,
            reason=reason,
            detail=detail,
            waited_s=self._clock() - started,
            pool_max_wait_s=max_wait_s,
        )
        self.metrics.unplaced_turns_total.labels(status=str(answer.status), reason=answer.reason).inc()
        raise TurnError(answer.status, answer.message, retry_after_s=answer.retry_after_s, code=answer.reason)

    def _plan(
        self,
        mode: Mode,
        pool: str,
        placement: Placement | None,
        state: ConversationState | None,
        failed: set[str],
        early: EarlyPrefill | None,
    ) -> TurnPlan:
        """The turn's servers (an early prefill's server as its prefill); TurnError when there are none."""
        prefills, decoders = self.backends(pool)
        try:
            plan = plan_turn(
                mode=mode,
                placement=placement,
                kv_generation=state.kv_generation if state is not None and mode is Mode.CONVERSATION else None,
                prefills=prefills,
                decoders=[d for d in decoders if d.endpoint not in failed],
                book=self._book,
            )
        except NoBackend as err:
            raise TurnError(503, str(err)) from err
        if early is not None and plan.prefill is not None:
            return TurnPlan(plan.decoder, early.backend, plan.generation)
        return plan

    async def _after_backend_error(
        self,
        err: backend.BackendUnavailable,
        attempts: int,
        mode: Mode,
        state: ConversationState | None,
        plan: TurnPlan,
        placement: Placement | None,
    ) -> Placement | None:
        """The placement to retry on after a server could not be reached; TurnError after the third attempt."""
        self.metrics.backend_errors_total.labels(mode=mode.value).inc()
        conv_id = state.conversation_id if state is not None else None
        if attempts >= 3:
            raise TurnError(502, str(err)) from err
        log.warning("turn of %s: %s; retrying", conv_id, err)
        if mode is not Mode.CONVERSATION or state is None:
            return placement
        # The pinned decoder is gone: follow the operator's re-placement.
        lost = self._clock()
        try:
            placement = await self.control.wait_placement(
                state.name,
                newer_than=plan.generation,
                timeout_s=self.config.placement_timeout_s or DEFAULT_PLACEMENT_WAIT_S,
            )
        except (TimeoutError, ConversationFailed) as werr:
            raise TurnError(503, f"decoder of {conv_id} gone and not re-placed: {werr}") from werr
        self.metrics.placement_wait_seconds.labels(part="total").observe(self._clock() - lost)
        state.kv_generation = None
        return placement

    async def _create(self, name: str, spec: dict[str, Any], *, replace: bool = False) -> None:
        """Create the Conversation; `replace`: delete the one that ended without a placement first."""
        started = self._clock()
        if replace:
            await self.control.delete_conversation(name)
        await self.control.create_conversation(name, spec)
        self.metrics.placement_wait_seconds.labels(part="create").observe(self._clock() - started)

    async def _prefill(
        self, target: Backend, request: TurnRequest, conv_id: str | None, prompt_tokens: int
    ) -> dict[str, Any] | None:
        self._book.start(target.endpoint, prompt_tokens)
        try:
            return await backend.prefill(self.session, target.endpoint, request.kind, request.body, conv_id)
        finally:
            self._book.finish(target.endpoint, prompt_tokens)

    async def _decode(
        self,
        request: TurnRequest,
        mode: Mode,
        plan: TurnPlan,
        state: ConversationState | None,
        prompt_tokens: int,
        effective: bool,
        arrival: float,
        kv_params: dict[str, Any] | None,
    ) -> AsyncIterator[dict[str, Any] | TurnStarted | TurnResult]:
        conv_id = state.conversation_id if state is not None else None
        result = TurnResult(conv_id, mode, plan.decoder, plan.prefill, plan.generation, prompt_tokens)
        endpoint = plan.decoder.endpoint
        in_flight = prompt_tokens + int(request.body.get("max_tokens") or 0)
        self._book.start(endpoint, in_flight)
        labels = {"mode": mode.value}
        last_token_s: float | None = None
        texts: list[str] = []
        started = False
        try:
            async for chunk in backend.stream_decode(
                self.session, endpoint, request.kind, request.body, conv_id, kv_params
            ):
                now = self._clock()
                _note_usage_and_finish(chunk, result)
                text = backend.chunk_text(chunk)
                if text:
                    texts.append(text)
                    if last_token_s is None:
                        result.ttft_s = now - arrival
                        self.metrics.ttft_seconds.labels(**labels).observe(result.ttft_s)
                        if state is not None and effective and state.ttfet_s is None:
                            state.ttfet_s = now - state.started_s
                            result.ttfet_s = state.ttfet_s
                            self.metrics.ttfet_seconds.labels(**labels).observe(state.ttfet_s)
                    else:
                        tokens = max(estimate_tokens(text), 1)
                        self.metrics.tbt_seconds.labels(**labels).observe((now - last_token_s) / tokens)
                    last_token_s = now
                if not started:
                    started = True
                    yield TurnStarted(plan.decoder, plan.prefill, plan.generation)
                yield chunk
        finally:
            self._book.finish(endpoint, in_flight)
        result.text = "".join(texts)
        if result.completion_tokens == 0:
            result.completion_tokens = estimate_tokens(result.text)
        self.metrics.turns_total.labels(**labels).inc()
        if state is not None:
            self._account(state, plan, prompt_tokens, result.completion_tokens)
        yield result

    def _account(self, state: ConversationState, plan: TurnPlan, prompt_tokens: int, output_tokens: int) -> None:
        state.turns += 1
        state.input_tokens += new_input_tokens(prompt_tokens, state.context_tokens)
        state.output_tokens += output_tokens
        state.context_tokens = prompt_tokens + output_tokens
        state.last_turn_s = self._clock()
        if state.mode is Mode.CONVERSATION:
            state.kv_generation = plan.generation
            if state.prefill_pod is None and plan.prefill is not None:
                state.prefill_pod = plan.prefill.name
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            usage = Usage(state.turns, state.input_tokens, state.output_tokens, stamp, state.ttfet_s, state.prefill_pod)
            self._batcher.record(state.name, usage)

    def _close(self, state: ConversationState) -> None:
        self._states.pop((state.mode, state.conversation_id), None)
        if state.mode is Mode.CONVERSATION and state.created is not None:
            self._batcher.complete(state.name)
        self.metrics.conversations_closed_total.labels(mode=state.mode.value).inc()

    async def close_conversation(self, conversation_id: str) -> bool:
        closed = False
        for mode in Mode:
            state = self._states.get((mode, conversation_id))
            if state is not None:
                async with state.lock:
                    self._close(state)
                closed = True
        return closed

    # ---- background: batched usage reports, idle conversations -----------------------------------------------
    async def flush(self, *, force: bool = False) -> None:
        patches = self._batcher.due(self._clock(), force=force)
        if patches:
            await asyncio.gather(*(self._patch(name, patch) for name, patch in patches))

    async def _patch(self, name: str, patch: dict[str, Any]) -> None:
        async with self._patches:
            try:
                await self.control.patch_conversation(name, patch)
                self.metrics.usage_patches_total.inc()
            except ControlPlaneError as err:  # the next report carries the same cumulative counters
                log.warning("usage patch of %s: %s", name, err)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.usage_interval_s / 2, 0.25))
            await self.flush()

    async def _idle_loop(self) -> None:
        """Forget conversations idle past their pool's idle timeout (memory only: the operator's sweep ends them
        at that timeout, the one owner of it; a later turn starts a conversation afresh)."""
        while True:
            await asyncio.sleep(5.0 if self.config.idle_close_s is None else min(self.config.idle_close_s / 4, 5.0))
            now = self._clock()
            for (mode, conv_id), state in list(self._states.items()):
                if state.lock.locked() or now - state.last_turn_s < self._forget_after_s(state):
                    continue
                self._states.pop((mode, conv_id), None)
                self.metrics.conversations_closed_total.labels(mode=mode.value).inc()

    def _forget_after_s(self, state: ConversationState) -> float:
        if self.config.idle_close_s is not None:
            return self.config.idle_close_s
        if self.config.idle_timeout_seconds is not None:
            return float(self.config.idle_timeout_seconds)
        pool_timeout = self.control.pool_idle_timeout_s(state.pool or self.config.pool)
        return pool_timeout if pool_timeout is not None else DEFAULT_FORGET_AFTER_S


def _note_usage_and_finish(chunk: dict[str, Any], result: TurnResult) -> None:
    """The decoder's own count of output tokens and its finish reason, when a chunk carries them."""
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        result.completion_tokens = usage["completion_tokens"]
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            result.finish_reason = str(choice["finish_reason"])
