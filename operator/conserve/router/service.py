"""The router's turn loop: the I/O around the pure decisions of conserve.router.policy.

One `Router` serves every conversation. A turn: find (or create) the conversation's state; in conversation mode
create the Conversation object on its first turn and wait for the placement; ask the P/D decider
(`conserve.core.pd.decide`, the pool's `spec.prefillDecider`) where the turn's prompt is prefilled, with the live
signals of conserve.router.signals (each server's scraped `/metrics`, the speeds the router observes, what the
pinned decoder holds); plan the turn; prefill on the chosen prefill server and hand the KV over, or let the decoder
prefill; stream the decode; record TTFT, time between tokens and, on the conversation's first user-visible output,
TTFET; queue the cumulative usage for the batched report. Every turn's site is counted
(`conserve_router_prefill_site_turns_total`) and answered (`X-Conserve-Prefill-Site`).
A first turn is decided before its placement arrives (`Planner.first_choice`: the pool's best server, the decoder
for a short prompt, or "once placed" when the likely decoder would prefill it sooner): on "pool" its prefill starts
at once on that server, so the control plane's latency overlaps the prefill; otherwise it waits for the placement
and goes to the decoder without a KV transfer, or is decided then for the decoder placed.
A decoder that cannot be reached before it sent anything is treated as gone: the router waits for the operator's
re-placement (a newer placementGeneration; conserve.router.placing) and replays the turn there, decided afresh (the
new decoder holds nothing of the conversation). A server that answers an error is there: `backend.as_turn_error`.
Every turn has a caller (`conserve.router.auth`) whose conversations are its own (`conserve.router.conversations`).

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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp

from conserve.api.openai_wire import prompt_tokens_of
from conserve.core.pd import PdChoice
from conserve.core.tokens import estimate_tokens
from conserve.metrics import RouterMetrics
from conserve.router import backend, slo, usage_stream
from conserve.router.auth import AuthError, BackendCredentials
from conserve.router.control import ControlPlane
from conserve.router.conversations import ConversationStates
from conserve.router.placing import Placing, UsageReports
from conserve.router.planner import Planner
from conserve.router.policy import (
    EFFECTIVE_HEADER,
    END_HEADER,
    MODE_HEADER,
    POOL_HEADER,
    SLO_CLASS_HEADER,
    Backend,
    LoadBook,
    Mode,
    NoBackend,
    Placement,
    TurnPlan,
    UsageBatcher,
    conversation_id_of,
    header_flag,
    new_input_tokens,
    parse_mode,
)
from conserve.router.scrape import Scraper
from conserve.router.signals import Signals
from conserve.router.turns import ConversationState, EarlyPrefill, TurnError, TurnRequest, TurnResult, TurnStarted
from conserve.router.turns import RouterConfig as RouterConfig  # re-exported: a Router is made with one

log = logging.getLogger(__name__)


class Router:
    def __init__(
        self,
        config: RouterConfig,
        control: ControlPlane,
        metrics: RouterMetrics,
        clock: Callable[[], float] = time.monotonic,
        credentials: BackendCredentials | None = None,
    ) -> None:
        self.config = config
        self.control = control
        self.metrics = metrics
        self.credentials = credentials or BackendCredentials()
        self._clock = clock
        self._book = LoadBook()
        self.signals = Signals()
        self._pools: set[str] = {config.pool}  # whose servers the scrape reads
        self._scraper = Scraper(self.signals, self._scrape_targets, interval_s=config.scrape_interval_s)
        self._planner = Planner(control.pool_pd_settings, self.signals, self._book)
        self._placing = Placing(control, metrics, config, clock)
        self._batcher = UsageBatcher(config.usage_interval_s)
        self._stream = usage_stream.from_config(config, lambda: self.session, lambda name: self._batcher.forget(name))
        if self._stream is not None:  # turns streamed: spec.usage only for a completion not acknowledged
            self._batcher = UsageBatcher(
                config.usage_interval_s, periodic=False, completion_hold_s=usage_stream.COMPLETION_HOLD_S
            )
        self._reports = UsageReports(self._batcher, control, metrics, clock)
        self._states = ConversationStates(config, control, metrics, clock)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        await self.control.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._reports.run(self.config.usage_interval_s)),
            loop.create_task(self._states.forget_idle(self._forgotten)),
        ]
        if self.config.scrape_interval_s > 0:
            self._tasks.append(loop.create_task(self._scraper.run(self.session)))
        if self._stream is not None:
            self._tasks.append(loop.create_task(self._stream.run()))

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

    def _scrape_targets(self) -> set[str]:
        prefills_decoders = [self.backends(pool) for pool in self._pools]
        return {b.endpoint for pair in prefills_decoders for group in pair for b in group if b.endpoint}

    async def scrape(self) -> int:
        """One scrape round now (the background loop's; tests); returns how many servers answered."""
        return await self._scraper.once(self.session)

    # ---- one turn -------------------------------------------------------------------------------------------
    async def turn(self, request: TurnRequest) -> AsyncGenerator[dict[str, Any] | TurnStarted | TurnResult, None]:
        """Yields the decoder's chunks as they come, then the TurnResult. Raises TurnError before any chunk."""
        arrival = self._clock()
        mode = parse_mode(request.headers.get(MODE_HEADER), self.config.mode)
        try:
            pool = request.identity.pool_for(request.headers.get(POOL_HEADER), self.config.pool)
        except AuthError as err:
            raise TurnError(err.status, str(err), code="PoolNotAllowed") from err
        conv_id = conversation_id_of(request.headers, request.body)
        prompt_tokens = prompt_tokens_of(request.body, request.kind == "chat")
        effective = header_flag(request.headers.get(EFFECTIVE_HEADER), True)
        ending = header_flag(request.headers.get(END_HEADER), False)
        slo_class = request.headers.get(SLO_CLASS_HEADER)
        if slo_class is not None and not slo.valid_class_name(slo_class):
            raise TurnError(400, f"{SLO_CLASS_HEADER}: {slo_class[:80]!r} is not a class name (a DNS label)")
        if conv_id is None:
            mode = Mode.PER_TURN  # nothing to pin: a one-turn request
        if pool not in self._pools and any(self.backends(pool)):  # a pool with servers (not any name a client sends)
            self._pools.add(pool)
        self.signals.prompt_seen(prompt_tokens)
        owner = request.identity.name
        state = self._states.get_or_create(owner, conv_id, mode, arrival) if conv_id is not None else None
        if state is not None and state.turns == 0 and slo_class is not None:
            state.slo_class = slo_class
        lock = state.lock if state is not None else asyncio.Lock()
        async with lock:
            async for item in self._turn_locked(request, mode, pool, state, prompt_tokens, effective, arrival):
                yield item
            if state is not None and ending:
                self._close(state)

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
        decided: PdChoice | None = None  # a first turn's choice, made before its placement
        if mode is Mode.CONVERSATION:
            assert state is not None
            placement, early, decided = await self._placement_for_turn(request, pool, state, prompt_tokens, arrival)
        attempts = 0
        failed: set[str] = set()
        while True:
            attempts += 1
            plan, own_tokens = self._plan(mode, pool, placement, state, failed, early, decided, prompt_tokens)
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
                    request, mode, plan, state, prompt_tokens, effective, arrival, kv_params, own_tokens
                ):
                    yield item
                return
            except backend.BackendUnavailable as err:
                if early is not None:
                    early.task.cancel()
                    early = None
                decided = None  # decided again, for the decoder the turn goes to next
                failed.add(plan.decoder.endpoint)
                placement = await self._after_backend_error(err, attempts, mode, state, plan, placement)
            except (backend.BackendRejected, backend.BackendBroken) as err:  # the server is there: not lost
                if early is not None:
                    early.task.cancel()
                self.metrics.backend_errors_total.labels(mode=mode.value).inc()
                log.warning("turn of %s on %s (%s): %s", conv_id, plan.decoder.name, plan.decoder.endpoint, err)
                raise backend.as_turn_error(err) from err

    async def _placement_for_turn(
        self, request: TurnRequest, pool: str, state: ConversationState, prompt_tokens: int, arrival: float
    ) -> tuple[Placement, EarlyPrefill | None, PdChoice | None]:
        """The conversation's placement (created on its first turn), the early prefill started meanwhile, and the
        decider's choice for a first turn made before its placement (None when the turn is decided after it)."""
        state.pool = pool
        if state.created is not None and state.created.done() and self.control.ended(state.name):
            # The operator ended it (its idle timeout, the one owner of it): this turn starts it afresh, a new
            # placement sized by its whole context, prefilled again (as the simulator does).
            state.created, state.kv_generation, state.refused = None, None, True
        if state.created is None:
            self._create(state, pool, prompt_tokens, arrival)  # refuses another owner's object
            await self._resume_usage(state)
        placement = self.control.placement(state.name)
        if placement is not None and placement.generation == state.kv_generation:
            return placement, None, None
        early, decided = None, None
        if placement is None and self.config.early_prefill:
            early, decided = self._early_prefill(request, pool, state.conversation_id, prompt_tokens)
        try:
            placement = await self._placing.first_placement(state, pool)
        except BaseException:
            if early is not None:
                early.task.cancel()
            raise
        placed = self._clock()
        self.metrics.placement_wait_seconds.labels(part="total").observe(placed - arrival)
        exposed_from = arrival if early is None else (early.done_s or placed)
        self.metrics.placement_wait_seconds.labels(part="exposed").observe(max(placed - exposed_from, 0.0))
        return placement, early, decided

    def _create(self, state: ConversationState, pool: str, prompt_tokens: int, arrival: float) -> None:
        """Start creating the conversation's object (its owner's; another's under that name is a 404)."""
        owner = self.control.owner(state.name)
        if owner is not None and owner != state.owner:  # an object this caller did not make
            self._states.drop(state)
            raise TurnError(404, f"conversation {state.conversation_id} not found", code="NotFound")
        spec: dict[str, Any] = {"pool": pool, "firstTurnInputTokens": max(prompt_tokens, 1)}
        if state.slo_class is not None:
            spec["sloClass"] = state.slo_class
        if self.config.idle_timeout_seconds is not None:
            spec["idleTimeoutSeconds"] = self.config.idle_timeout_seconds
        replace, state.refused = state.refused or self.control.ended(state.name), False
        if replace:  # the conversation starts again (its TTFET too): the refused attempt was never admitted
            state.started_s = arrival
        state.created = asyncio.get_running_loop().create_task(
            self._placing.create(state.name, spec, replace=replace, owner=state.owner)
        )

    async def _resume_usage(self, state: ConversationState) -> None:
        """A conversation the cluster has and this router holds no count of (it restarted, or forgot the state):
        the count resumes from the operator's, so the reports go on from there."""
        if self._stream is not None and state.turns == 0 and self.control.placement(state.name):
            await self._stream.seed(state, self.control.status(state.name))

    def _early_prefill(
        self, request: TurnRequest, pool: str, conv_id: str, prompt_tokens: int
    ) -> tuple[EarlyPrefill | None, PdChoice | None]:
        """A prefill on the pool does not depend on the decoder: the decider (the decoder not known yet) picks the
        server and the prefill starts there while the operator places the conversation. Otherwise nothing starts:
        the turn waits for its decoder (and, without a choice, is decided for it)."""
        prefills, decoders = self.backends(pool)
        choice, target = self._planner.first_choice(pool, prefills, decoders, conv_id, prompt_tokens)
        if target is None:
            return None, choice
        task = asyncio.get_running_loop().create_task(self._prefill(target, request, conv_id, prompt_tokens))
        early = EarlyPrefill(target, task)
        early.task.add_done_callback(lambda _t: early.finished(self._clock()))
        return early, choice

    def _plan(
        self,
        mode: Mode,
        pool: str,
        placement: Placement | None,
        state: ConversationState | None,
        failed: set[str],
        early: EarlyPrefill | None,
        decided: PdChoice | None,
        prompt_tokens: int,
    ) -> tuple[TurnPlan, int]:
        """The turn's servers (an early prefill's server as its prefill) and the prompt tokens its decoder
        prefills itself; TurnError when there are none."""
        prefills, decoders = self.backends(pool)
        try:
            plan, own_tokens = self._planner.plan(
                mode=mode,
                pool=pool,
                prefills=prefills,
                decoders=[d for d in decoders if d.endpoint not in failed],
                placement=placement,
                state=state,
                decided=decided,
                prompt_tokens=prompt_tokens,
            )
        except NoBackend as err:
            raise TurnError(503, str(err)) from err
        if early is not None:  # already running there
            return TurnPlan(plan.decoder, early.backend, plan.generation), 0
        return plan, own_tokens

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
        log.warning("turn of %s: %s; retrying", conv_id, err)
        if attempts >= 3:
            raise TurnError(502, f"no model server could be reached ({attempts} attempts)") from err
        if mode is not Mode.CONVERSATION or state is None:
            return placement
        placement = await self._placing.re_placement(state, plan.generation)
        state.kv_generation = None
        return placement

    async def _prefill(
        self, target: Backend, request: TurnRequest, conv_id: str | None, prompt_tokens: int
    ) -> dict[str, Any] | None:
        self._book.start(target.endpoint, prompt_tokens)
        ticket = self.signals.start(target.endpoint, prompt_tokens, self._clock())
        try:
            params = await backend.prefill(
                self.session, target.endpoint, request.kind, request.body, conv_id, self.credentials.headers()
            )
            self.signals.prefilled(ticket, self._clock())  # its speed: prompt tokens over the request's time
            return params
        finally:
            self.signals.end(ticket)
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
        own_tokens: int,
    ) -> AsyncIterator[dict[str, Any] | TurnStarted | TurnResult]:
        """Streams the decode. `own_tokens`: the prompt tokens the decoder prefills itself (0: its KV comes from
        the prefill server); their time to the first chunk is a sample of its prefill speed."""
        conv_id = state.conversation_id if state is not None else None
        result = TurnResult(conv_id, mode, plan.decoder, plan.prefill, plan.generation, prompt_tokens)
        endpoint = plan.decoder.endpoint
        in_flight = prompt_tokens + int(request.body.get("max_tokens") or 0)
        self._book.start(endpoint, in_flight)
        ticket = self.signals.start(endpoint, own_tokens if kv_params is None else 0, self._clock())
        labels = {"mode": mode.value}
        last_token_s: float | None = None
        texts: list[str] = []
        started = False
        try:
            async for chunk in backend.stream_decode(
                self.session, endpoint, request.kind, request.body, conv_id, kv_params, self.credentials.headers()
            ):
                now = self._clock()
                self.signals.prefilled(ticket, now)
                backend.note_usage_and_finish(chunk, result)
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
            self.signals.end(ticket)
            self._book.finish(endpoint, in_flight)
        result.text = "".join(texts)
        if result.completion_tokens == 0:
            result.completion_tokens = estimate_tokens(result.text)
        self.metrics.turns_total.labels(**labels).inc()
        first = state is None or state.turns == 0
        self.metrics.prefill_site_turns_total.labels(
            mode=mode.value, site=plan.site.value, turn="first" if first else "later"
        ).inc()
        if state is not None and mode is Mode.CONVERSATION:
            pool_slo = self.control.pool_slo(state.pool)
            slo.judge_and_count(self.metrics.slo_turns_total, pool_slo, state, result, arrival, last_token_s, effective)
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
            if plan.prefill is not None:
                state.prefill_pod = state.prefill_pod or plan.prefill.name
                state.pool_prefills += 1
            usage = state.usage(datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            self._batcher.record(state.name, usage)
            if self._stream is not None:
                self._stream.record(state.name, usage)

    def _close(self, state: ConversationState) -> None:
        self._states.drop(state)
        if state.mode is Mode.CONVERSATION and state.created is not None:
            self._batcher.complete(state.name, self._clock())
            if self._stream is not None:
                self._stream.complete(state.name)
        self.metrics.conversations_closed_total.labels(mode=state.mode.value).inc()

    def _forgotten(self, state: ConversationState) -> None:
        """Idle past its pool's timeout and forgotten: no more re-sends of its usage."""
        if self._stream is not None:
            self._stream.forget(state.name)

    async def close_conversation(self, conversation_id: str, owner: str = "") -> bool:
        """End the caller's conversation of that id (another caller's is not found)."""
        closed = False
        for state in list(self._states.find(owner, conversation_id)):
            async with state.lock:
                self._close(state)
            closed = True
        return closed

    # ---- background: batched usage reports ---------------------------------------------------------------------
    async def flush(self, *, force: bool = False) -> None:
        await self._reports.flush(force=force)
