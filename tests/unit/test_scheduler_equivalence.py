"""The operator and the simulator make the same decisions: one event sequence (a few hundred conversations with
turns, completions, idle gaps past the lifecycle's TTLs, a decoder lost, energy readings) is driven through the
operator's engine (on the fake API) and through the simulator's ConServe policy; after every event the two
agree on each conversation's decoder, reservation and KV state, on the queue's order and on re-placements."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_controller_engine import NS, h200, pod

from conserve.controller import conversation, decoderpool, startup
from conserve.controller.engine import Engine, EngineConfig
from conserve.controller.state import format_time
from conserve.controller.testing import conversation_body, pool_body
from conserve.core.decisions import ConversationRequest, Verdict
from conserve.core.gpus import Tier
from conserve.core.lifecycle import KvState, LifecycleSettings
from conserve.core.placement import DecoderState, PlacementSettings
from conserve.core.prefill import PrefillState
from conserve.core.scheduler import PoolScheduler, SchedulerSettings
from conserve.sim.policies import ConServe
from conserve.sim.records import ConvState, TurnRecord
from conserve.sim.workload import Conversation, Turn
from conserve.testkit import FakeKube

pytestmark = pytest.mark.unit

EPOCH = 1_800_000_000  # whole seconds: the API's timestamps have one-second resolution
DECODERS = 4
TOKENS = 20_000
HOST_TOKENS = 30_000
IDLE_TIMEOUT_S = 900
RESIDENT_TTL_S = 60
HOST_TTL_S = 300


class FakeClock:
    def __init__(self) -> None:
        self.t = float(EPOCH)

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t


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
    kube = FakeKube()
    kube.nodes = [h200("n0")]
    kube.pods = [pod(f"dec-{i}", "n0") for i in range(DECODERS)]
    kube.pods += [pod(f"pre-{i}", "n0", app="dec-prefill") for i in range(2)]
    body = pool_body(
        "llama",
        tokens_per_decoder=TOKENS,
        defaultIdleTimeoutSeconds=IDLE_TIMEOUT_S,
        kvLifecycle={
            "hostKvTokensPerDecoder": HOST_TOKENS,
            "maxResidentTtlSeconds": RESIDENT_TTL_S,
            "maxHostTtlSeconds": HOST_TTL_S,
        },
    )
    body["metadata"].update(namespace=NS, generation=1)
    kube.objects["decoderpools"] = [body]
    engine = Engine(kube, EngineConfig(), clock=clock)
    await startup.rebuild(engine, [NS])
    return engine, kube


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


def operator_view(engine: Engine, kube: FakeKube, names: list[str]) -> dict[str, Any]:
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


async def run_equivalence(count: int) -> tuple[int, dict[str, int]]:
    clock = FakeClock()
    engine, kube = await operator_engine(clock)
    policy = simulator_policy()
    convs = plans(7, count)
    names = [c.name for c in convs]
    states: dict[str, ConvState] = {}
    replaced_sim: set[str] = set()
    seen: dict[str, int] = {v.value: 0 for v in Verdict}
    checked = 0
    longest_queue = 0
    events = build_events(convs)
    later = itertools.count(len(events))
    while events:
        t, _, kind, payload = heapq.heappop(events)
        clock.t = float(EPOCH + t)
        now = clock.t
        if kind == "create":
            c: Plan = payload
            body = conversation_body(c.name, "llama", c.first_input)
            body["metadata"].update(namespace=NS, uid=f"uid-{c.name}", generation=1, creationTimestamp=format_time(now))
            await conversation.on_event(engine, "ADDED", body)
            key = f"{NS}/{c.name}"
            conv = Conversation(key, now, (Turn(c.first_input, c.first_input, 1),))
            state = ConvState(conv)
            state.turns.append(TurnRecord(key, 0, now, c.first_input, c.first_input, 1, True))
            states[key] = c.state = state
            policy.route(state, state.turns[0], now)
        elif kind == "turn":
            c, k, (_, new_in, out) = payload
            placed = policy.scheduler.ledger.holding(f"{NS}/{c.name}") is not None
            if not placed or len(c.done) != k:
                # a turn runs only on a placed conversation, in order: the client waits and tries again
                if policy.scheduler.conversations.get(f"{NS}/{c.name}") is not None:
                    heapq.heappush(events, (t + 5, next(later), kind, payload))
                continue
            c.context += new_in
            c.cum_in += new_in
            c.cum_out += out
            usage = {
                "turns": k + 1,
                "inputTokens": c.cum_in,
                "outputTokens": c.cum_out,
                "lastTurnTime": format_time(now),
            }
            body = conversation_body(c.name, "llama", c.first_input, usage=usage)
            body["metadata"].update(namespace=NS, uid=f"uid-{c.name}", generation=k + 2)
            await conversation.on_event(engine, "MODIFIED", body)
            assert c.state is not None
            policy.turn_done(c.state, TurnRecord(c.state.key, k, now, c.context, new_in, out, True), now)
            retry_pending(policy, states, now)  # the simulator's turn end retries its queue (see ConServe)
            c.context += out
            c.done.append(k)
        elif kind == "complete":
            c = payload
            if c.state is None or policy.scheduler.conversations.get(c.state.key) is None:
                continue
            if len(c.done) < len(c.turns):  # its last turn has not run yet
                heapq.heappush(events, (t + 5, next(later), kind, payload))
                continue
            usage = {"turns": len(c.done), "inputTokens": c.cum_in, "outputTokens": c.cum_out}
            body = conversation_body(c.name, "llama", c.first_input, usage=usage, completed=True)
            body["metadata"].update(namespace=NS, uid=f"uid-{c.name}", generation=99)
            await conversation.on_event(engine, "MODIFIED", body)
            c.state.finished = True
            policy.release(c.state)
            retry_pending(policy, states, now)
        elif kind == "sweep":
            await engine.sweep_idle()
            if policy.sweep(now):
                retry_pending(policy, states, now)
        elif kind == "lose":
            await decoderpool.on_pod_event(engine, "DELETED", pod(payload, "n0"))
            decisions = policy.decoder_lost(payload, now)
            replaced_sim |= {d.conversation.split("/")[1] for d in decisions if d.verdict is Verdict.REPLACED}
        elif kind == "energy":
            for name, joules in payload.items():
                engine.world.set_decoder_energy(NS, "llama", name, energy_per_token_j=joules)
                policy.energy_measured(name, joules)
        await engine.drain_background()
        assert operator_view(engine, kube, names) == policy_view(policy, names), f"diverged at t={t} ({kind})"
        operator_queue = engine.world.pool(NS, "llama").scheduler.queue()
        assert operator_queue == policy.scheduler.queue(), f"queue order diverged at t={t}"
        checked += 1
        longest_queue = max(longest_queue, len(operator_queue))
        for status in kube.status.values():
            if status.get("kvState"):
                seen[status["kvState"]] = seen.get(status["kvState"], 0) + 1
    replaced_op = {n for (p, n), s in kube.status.items() if p == "conversations" and s["placementGeneration"] > 1}
    assert replaced_op == replaced_sim and replaced_op, "the same conversations moved off the lost decoder"
    totals = {
        "offloads": sum(s.get("offloads", 0) for s in kube.status.values()),
        "reloads": sum(s.get("reloads", 0) for s in kube.status.values()),
        "reprefills": sum(s.get("reprefills", 0) for s in kube.status.values()),
        "longest_queue": longest_queue,
    }
    return checked, totals


def test_operator_and_simulator_equivalence() -> None:
    checked, totals = asyncio.run(run_equivalence(300))
    assert checked > 300
    # The sequence exercises what it claims to: queueing, offloads to host memory, reloads and re-prefills.
    assert totals["longest_queue"] > 1 and totals["offloads"] > 0 and totals["reloads"] > 0, totals


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
        engine, _ = await operator_engine(FakeClock())
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
