"""The operator and the simulator make the same decisions: one event sequence (a few hundred conversations with
turns, completions, idle gaps past the lifecycle's TTLs, a decoder lost, energy readings) is driven through the
operator's engine (on the fake API) and through the simulator's ConServe policy; after every event the two
agree on each conversation's decoder, reservation and KV state, on the queue's order and on re-placements."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fake_operator import NS, pod, pool_world, started_engine, stored, stored_conv

from conserve.controller import conversation, decoderpool
from conserve.controller.engine import Engine
from conserve.controller.state import format_time
from conserve.core.decisions import ConversationRequest, Verdict
from conserve.core.gpus import Tier
from conserve.core.lifecycle import KvState, LifecycleSettings
from conserve.core.placement import DecoderState, PlacementSettings
from conserve.core.prefill import PrefillState
from conserve.core.scheduler import PoolScheduler, SchedulerSettings
from conserve.sim.policies import ConServe
from conserve.sim.records import ConvState, TurnRecord
from conserve.sim.workload import Conversation, Turn
from conserve.testkit import FakeClock, FakeKube, conversation_body

pytestmark = pytest.mark.unit

EPOCH = 1_800_000_000  # whole seconds: the API's timestamps have one-second resolution
DECODERS = 4
TOKENS = 20_000
HOST_TOKENS = 30_000
IDLE_TIMEOUT_S = 900
RESIDENT_TTL_S = 60
HOST_TTL_S = 300


@dataclass
class Plan:
    name: str
    start: int
    first_input: int
    turns: list[tuple[int, int, int]]  # (time of the report, new input tokens, output tokens)
    completes: bool
    state: ConvState | None = None
    context: int = 0
    cum_in: int = 0
    cum_out: int = 0
    done: list[int] = field(default_factory=list)


def plans(seed: int, count: int) -> list[Plan]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        start = i // 2
        first = rng.randint(400, 5_000)
        t = start
        turns = []
        for k in range(rng.randint(1, 4)):
            t += rng.randint(5, 30) if k == 0 else rng.randint(10, 400)  # idle gaps past the resident TTL too
            turns.append((t, first if k == 0 else rng.randint(50, 800), rng.randint(50, 400)))
        out.append(Plan(f"c{i:03d}", start, first, turns, completes=rng.random() < 0.5))
    return out


def build_events(convs: list[Plan]) -> list[tuple[int, int, str, Any]]:
    events: list[tuple[int, int, str, Any]] = []
    seq = 0

    def push(t: int, kind: str, payload: Any) -> None:
        nonlocal seq
        events.append((t, seq, kind, payload))
        seq += 1

    last = max(c.turns[-1][0] for c in convs) + IDLE_TIMEOUT_S + 30
    # The operator sweeps every second; so does the simulator's policy (lazily, at its next event). Sweeps go
    # first within a second, so the policy's lazy sweep and the operator's timer see the same state.
    for t in range(0, last):
        push(t, "sweep", None)
    for c in convs:
        push(c.start, "create", c)
        for k, turn in enumerate(c.turns):
            push(turn[0], "turn", (c, k, turn))
        if c.completes:
            push(c.turns[-1][0] + 5, "complete", c)
    push(300, "lose", "dec-3")
    push(150, "energy", {"dec-0": 0.9, "dec-1": 0.1, "dec-2": 0.5, "dec-3": 0.5})
    push(700, "energy", {"dec-0": 0.1, "dec-1": 0.9, "dec-2": 0.5})
    heapq.heapify(events)
    return events


async def operator_engine(clock: FakeClock) -> tuple[Engine, FakeKube]:
    lifecycle = {
        "hostKvTokensPerDecoder": HOST_TOKENS,
        "maxResidentTtlSeconds": RESIDENT_TTL_S,
        "maxHostTtlSeconds": HOST_TTL_S,
    }
    kube = pool_world(DECODERS, TOKENS, prefills=2, defaultIdleTimeoutSeconds=IDLE_TIMEOUT_S, kvLifecycle=lifecycle)
    return await started_engine(kube, clock), kube


def simulator_policy() -> ConServe:
    policy = ConServe()
    # The same pool as the operator derives it: H200 decoders (bandwidth tier), two prefill servers.
    decoders = [DecoderState(f"dec-{i}", "n0", Tier.BANDWIDTH, True, TOKENS) for i in range(DECODERS)]
    prefills = [PrefillState(f"pre-{i}", Tier.BANDWIDTH) for i in range(2)]
    lifecycle = LifecycleSettings(
        host_kv_tokens_per_decoder=HOST_TOKENS, max_resident_ttl_s=RESIDENT_TTL_S, max_host_ttl_s=HOST_TTL_S
    )
    policy.bind_pool(decoders, prefills, idle_timeout_s=IDLE_TIMEOUT_S, lifecycle=lifecycle)
    return policy


def operator_view(kube: FakeKube, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        status = kube.status.get(("conversations", name))
        if not status or status.get("phase") in ("Completed", "Failed", None):
            out[name] = None
            continue
        decoder = (status.get("decoder") or {}).get("pod")
        out[name] = (decoder, status["reservedKvTokens"] if decoder else 0, status.get("kvState") if decoder else None)
    return out


def policy_view(policy: ConServe, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    s = policy.scheduler
    for name in names:
        key = f"{NS}/{name}"
        view = s.conversations.get(key)
        if view is None:
            out[name] = None
            continue
        held = s.ledger.holding(key)
        out[name] = (held[0], held[1], view.kv_state.value) if held else (None, 0, None)
    return out


def retry_pending(policy: ConServe, states: dict[str, ConvState], now: float) -> None:
    """What the simulator does after a release: route the waiting conversations in the policy's order."""
    waiting = [states[k] for k in policy.scheduler.pending if k in states]
    for state in policy.order_pending(waiting):
        policy.route(state, state.turns[-1], now)


class Replay:
    """The event sequence driven through the operator's engine and the simulator's policy side by side; after
    every event the two must agree (`check`)."""

    def __init__(self, engine: Engine, kube: FakeKube, clock: FakeClock, convs: list[Plan]) -> None:
        self.engine, self.kube, self.clock = engine, kube, clock
        self.policy = simulator_policy()
        self.names = [c.name for c in convs]
        self.states: dict[str, ConvState] = {}
        self.replaced_sim: set[str] = set()
        self.checked = 0
        self.longest_queue = 0
        self.events = build_events(convs)
        self.later = itertools.count(len(self.events))

    async def run(self) -> None:
        handlers: dict[str, Callable[[int, Any], Awaitable[bool]]] = {
            "create": self.create,
            "turn": self.turn,
            "complete": self.complete,
            "sweep": self.sweep,
            "lose": self.lose,
            "energy": self.energy,
        }
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            self.clock.advance_to(EPOCH + t)
            if await handlers[kind](t, payload):
                await self.engine.drain_background()
                self.check(t, kind)

    def retry_later(self, t: int, kind: str, payload: Any) -> bool:
        """The client waits and tries again 5 s later; nothing happened now."""
        heapq.heappush(self.events, (t + 5, next(self.later), kind, payload))
        return False

    async def create(self, t: int, c: Plan) -> bool:
        now = self.clock.now()
        body = stored_conv(c.name, c.first_input, created=format_time(now))
        await conversation.on_event(self.engine, "ADDED", body)
        key = f"{NS}/{c.name}"
        state = ConvState(Conversation(key, now, (Turn(c.first_input, c.first_input, 1),)))
        state.turns.append(TurnRecord(key, 0, now, c.first_input, c.first_input, 1, True))
        self.states[key] = c.state = state
        self.policy.route(state, state.turns[0], now)
        return True

    async def turn(self, t: int, payload: tuple[Plan, int, tuple[int, int, int]]) -> bool:
        c, k, (_, new_in, out) = payload
        placed = self.policy.scheduler.ledger.holding(f"{NS}/{c.name}") is not None
        if not placed or len(c.done) != k:
            # a turn runs only on a placed conversation, in order: the client waits and tries again
            if self.policy.scheduler.conversations.get(f"{NS}/{c.name}") is not None:
                return self.retry_later(t, "turn", payload)
            return False
        now = self.clock.now()
        c.context += new_in
        c.cum_in += new_in
        c.cum_out += out
        usage = {"turns": k + 1, "inputTokens": c.cum_in, "outputTokens": c.cum_out, "lastTurnTime": format_time(now)}
        body = stored(conversation_body(c.name, "llama", c.first_input, usage=usage), generation=k + 2)
        await conversation.on_event(self.engine, "MODIFIED", body)
        assert c.state is not None
        self.policy.turn_done(c.state, TurnRecord(c.state.key, k, now, c.context, new_in, out, True), now)
        retry_pending(self.policy, self.states, now)  # the simulator's turn end retries its queue (see ConServe)
        c.context += out
        c.done.append(k)
        return True

    async def complete(self, t: int, c: Plan) -> bool:
        if c.state is None or self.policy.scheduler.conversations.get(c.state.key) is None:
            return False
        if len(c.done) < len(c.turns):  # its last turn has not run yet
            return self.retry_later(t, "complete", c)
        usage = {"turns": len(c.done), "inputTokens": c.cum_in, "outputTokens": c.cum_out}
        body = stored(conversation_body(c.name, "llama", c.first_input, usage=usage, completed=True), generation=99)
        await conversation.on_event(self.engine, "MODIFIED", body)
        c.state.finished = True
        self.policy.release(c.state)
        retry_pending(self.policy, self.states, self.clock.now())
        return True

    async def sweep(self, t: int, _: None) -> bool:
        await self.engine.sweep_idle()
        if self.policy.sweep(self.clock.now()):
            retry_pending(self.policy, self.states, self.clock.now())
        return True

    async def lose(self, t: int, decoder: str) -> bool:
        await decoderpool.on_pod_event(self.engine, "DELETED", pod(decoder, "n0"))
        decisions = self.policy.decoder_lost(decoder, self.clock.now())
        self.replaced_sim |= {d.conversation.split("/")[1] for d in decisions if d.verdict is Verdict.REPLACED}
        return True

    async def energy(self, t: int, joules_per_token: dict[str, float]) -> bool:
        for name, joules in joules_per_token.items():
            self.engine.world.set_decoder_energy(NS, "llama", name, energy_per_token_j=joules)
            self.policy.energy_measured(name, joules)
        return True

    def check(self, t: int, kind: str) -> None:
        policy = self.policy
        assert operator_view(self.kube, self.names) == policy_view(policy, self.names), f"diverged at t={t} ({kind})"
        operator_queue = self.engine.world.pool(NS, "llama").scheduler.queue()
        assert operator_queue == policy.scheduler.queue(), f"queue order diverged at t={t}"
        self.checked += 1
        self.longest_queue = max(self.longest_queue, len(operator_queue))


async def run_equivalence(count: int) -> tuple[int, dict[str, int]]:
    clock = FakeClock(epoch_s=EPOCH)
    engine, kube = await operator_engine(clock)
    replay = Replay(engine, kube, clock, plans(7, count))
    await replay.run()
    statuses = [s for (plural, _), s in kube.status.items() if plural == "conversations"]
    replaced_op = {n for (p, n), s in kube.status.items() if p == "conversations" and s["placementGeneration"] > 1}
    assert replaced_op, "conversations moved off the lost decoder"
    assert replaced_op == replay.replaced_sim, "the same conversations moved off the lost decoder"
    totals = {
        "offloads": sum(s.get("offloads", 0) for s in statuses),
        "reloads": sum(s.get("reloads", 0) for s in statuses),
        "reprefills": sum(s.get("reprefills", 0) for s in statuses),
        "longest_queue": replay.longest_queue,
    }
    return replay.checked, totals


def test_operator_and_simulator_equivalence() -> None:
    checked, totals = asyncio.run(run_equivalence(300))
    assert checked > 300
    # The sequence exercises what it claims to: queueing, offloads to host memory, reloads and re-prefills.
    assert totals["longest_queue"] > 1, totals
    assert totals["offloads"] > 0, totals
    assert totals["reloads"] > 0, totals


def test_measured_energy_changes_the_next_placement() -> None:
    scheduler = PoolScheduler(SchedulerSettings(placement=PlacementSettings()))
    for name in ("dec-0", "dec-1"):
        scheduler.decoder_changed(DecoderState(name, "n0", Tier.BANDWIDTH, True, 100_000))
    scheduler.energy_measured("dec-0", 0.9)
    scheduler.energy_measured("dec-1", 0.1)
    first = scheduler.admit(ConversationRequest("a", 1000), 0.0)
    assert [d.decoder for d in first] == ["dec-1"]
    scheduler.release("a", first[0].reason)
    scheduler.energy_measured("dec-0", 0.1)
    scheduler.energy_measured("dec-1", 0.9)
    second = scheduler.admit(ConversationRequest("b", 1000), 1.0)
    assert [d.decoder for d in second] == ["dec-0"]


def test_operator_energy_hook_reaches_the_decoder_table() -> None:
    async def run() -> None:
        engine, _ = await operator_engine(FakeClock(epoch_s=EPOCH))
        engine.world.set_decoder_energy(NS, "llama", "dec-0", energy_per_token_j=0.9)
        engine.world.set_decoder_energy(NS, "llama", "dec-1", energy_per_token_j=0.1)
        table = {d.name: d.energy_per_token_j for d in engine.world.pool(NS, "llama").ledger.snapshot()}
        assert table["dec-0"] == 0.9
        assert table["dec-1"] == 0.1
        # a pod event (readiness refresh) keeps the measured figure
        await decoderpool.on_pod_event(engine, "MODIFIED", pod("dec-0", "n1"))
        table = {d.name: d.energy_per_token_j for d in engine.world.pool(NS, "llama").ledger.snapshot()}
        assert table["dec-0"] == 0.9

    asyncio.run(run())


def test_idle_kv_is_reclaimable_by_admission() -> None:
    scheduler = PoolScheduler(
        SchedulerSettings(lifecycle=LifecycleSettings(host_kv_tokens_per_decoder=10_000, max_resident_ttl_s=600))
    )
    scheduler.decoder_changed(DecoderState("dec-0", "n0", Tier.BANDWIDTH, True, 10_000))
    first = scheduler.admit(ConversationRequest("a", 4000), 0.0)
    assert first[-1].verdict is Verdict.PLACED
    assert scheduler.admit(ConversationRequest("b", 4000), 1.0)[-1].verdict is Verdict.QUEUED  # a is active
    scheduler.usage_observed("a", 4200, 2.0, turns=1)  # a's turn ended: active for the window, then idle
    assert scheduler.drain(3.0) == []
    assert [d.verdict for d in scheduler.sweep(12.0)] == [Verdict.IDLED]
    decisions = scheduler.drain(12.0)
    assert [(d.conversation, d.verdict) for d in decisions] == [("a", Verdict.OFFLOADED), ("b", Verdict.PLACED)]
    assert scheduler.conversations["a"].kv_state is KvState.OFFLOADED
    # a's next turn: it comes back to its pinned decoder (b, idle by then, goes to host memory to make room)
    scheduler.usage_observed("b", 4100, 40.0, turns=1)
    scheduler.sweep(70.0)
    back = scheduler.usage_observed("a", 4500, 71.0, turns=2)
    assert [(d.conversation, d.verdict) for d in back][-1] == ("a", Verdict.RELOADED)
    assert ("b", Verdict.OFFLOADED) in [(d.conversation, d.verdict) for d in back]
    assert scheduler.ledger.holding("a")[0] == "dec-0"  # type: ignore[index]
