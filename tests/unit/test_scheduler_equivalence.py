"""The simulator and the operator decide the same (issue 23), checked on the shipped code of both.

The shipped `Simulator` with the shipped `ConServe` policy runs 93 conversations (queueing, reclaiming, host memory
filling) on Llama-3-70B decoders of three kinds: H200 x2, A100 x4, H20 x2 (KV capacities 344k, 448k, 96k tokens;
host KV 125 GB per GPU, so 2 or 4 times it), with the DecoderPool's default idle timeout and each decoder's energy
prior; the H20 is lost mid-run. Its scheduler records every call the policy makes (not its calls to itself), with
the simulated time and the scheduler's state after it. The same events, as the operator gets them, go to the
operator's `Engine` on the fake API: a first turn creates the Conversation (ADDED), a turn's end patches spec.usage,
a completion sets spec.completed, the sweep is `Engine.sweep_idle`, the lost decoder's pod is DELETED; a later turn's
arrival and the engine's own offloads go to `Engine.turn_started` and `Engine.kv_offloaded`, which nothing in the
operator's watch path calls yet. The operator's pool names the model and keeps every default; its decoders'
capacity, tier, GPUs and energy prior come from node GPU labels and pod GPU requests. After every event both sides
must agree on each conversation's decoder, reservation and KV state as written in status, on releases and their
reason, the queue's order and the scheduler's whole state (holdings, in flight, turns, lifecycle counts, host KV
used, decoder table, growth and gap history); at the end, on the re-placements. Times: the operator's clock reads
the simulator's seconds (epoch 0), arrivals are whole seconds (creationTimestamp has 1 s resolution) and reports
carry no lastTurnTime, so both compute with the same floats.

Breakages tried in the shipped code, one at a time (then reverted); each fails this test:
- ConServe not draining after a release (`release` without `now_s`): c035 placed at t=31 s by the operator only.
- Operator settings from `scheduler_settings(spec, host_kv_bytes_per_gpu=HOST_KV_BYTES_PER_GPU / 2)`, or its idle
  timeout +1 s, or ConServe's idle timeout off: the settings check; with it and the state check off, the decisions
  still differ (a drop instead of an offload at t=115 s; a release at t=1809 s).
- Operator decoders of one GPU (`gpu_count=1` in pods.py), or its energy prior for one GPU: the decoder table at
  step 0 (with the table check off: a host drop at t=115 s; the energy prior alone changes no decision here).
- Host KV not scaled by GPUs in `Residency` (both worlds alike): the scheduler's host tier != the simulated one.
- The sweep idling a conversation with a turn in flight (both worlds alike): the in-flight check (t=33 s).
- `Engine.turn_started` or `Engine.kv_offloaded` a no-op (the operator's watch path today): t=33 s, t=117 s.
- A second queue in ConServe re-admitting its waiting first turns after releases and turn ends (as before
  4c577ba): an admit the operator never gets.
Extra drains in ConServe (every sweep, every turn's arrival) change nothing: the scheduler drains already.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import pytest

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.api.labels import LABEL_GPU_COUNT, LABEL_GPU_PRODUCT
from conserve.controller import conversation, decoderpool, startup
from conserve.controller.engine import Engine, EngineConfig
from conserve.controller.state import format_time
from conserve.core.decisions import ConversationRequest, Decision, PrefillSite, Reason, Verdict
from conserve.core.lifecycle import KvState
from conserve.core.pd import PdRule
from conserve.core.scheduler import PoolScheduler, SchedulerSettings
from conserve.sim.conversations import Conversation, Signals, Turn, Workload
from conserve.sim.engine import Simulator
from conserve.sim.fleet import Fleet, build_fleet
from conserve.sim.policies import ConServe
from conserve.sim.records import SimView
from conserve.testkit import FakeClock, FakeKube, PodBuilder, conversation_body, pool_body

pytestmark = pytest.mark.unit

NS, POOL, MODEL = "ns", "llama", "llama-3-70b"
FLEET: dict[str, Any] = {
    "model": MODEL,
    # The scenario was sized with this profile's dynamics. Under the default `vllm-cuda-graphs` the two worlds
    # stay equal, but in the `completed` case 12 of the 93 conversations are refused at t = 39-41 s by the
    # early SLO refusal (expected wait 124-159 s > the default 120 s budget), so not every one completes.
    "engine_profile": "vllm-2023",
    "tiered": {
        "prefill": [{"gpu": "H100", "count": 2, "tp": 2}],
        "decode": [{"gpu": gpu, "count": 1, "tp": tp} for gpu, tp in (("H200", 2), ("A100", 4), ("H20", 2))],
    },
}
#: GPU Feature Discovery's product labels of the fleet's GPUs (no memory label: both sides use the catalog's).
PRODUCT_LABELS = {"H100": "NVIDIA-H100-80GB-HBM3", "H200": "NVIDIA-H200", "A100": "NVIDIA-A100", "H20": "NVIDIA-H20"}
#: The shipped idle timeout: the DecoderPool's default (the operator's pool leaves it unset).
IDLE_TIMEOUT_S = float(DecoderPoolSpec.model_fields["default_idle_timeout_seconds"].default)
LOST, LOSE_AFTER_S = "d2-h20", 300.0

Body = dict[str, Any]
State = dict[tuple[str, str], Any]
Row = tuple[str | None, int, str | None]


def workload(seed: int, end_signal: bool) -> Workload:
    """Two conversations a second for 45 s (names in arrival order), 8k-30k first turns and up to four more turns
    after think times of seconds to 15 minutes (never past the idle timeout: a conversation is never restarted),
    contexts below the smallest decoder; three long conversations keep the run going past the idle timeout."""
    rng = random.Random(seed)
    convs: list[Conversation] = []
    for i in range(90):
        first, out = rng.randint(8_000, 30_000), rng.randint(100, 400)
        turns = [Turn(first, first, out)]
        context = first + out
        for _ in range(rng.randint(0, 4)):
            new, out = rng.randint(500, 9_000), rng.randint(100, 400)
            if context + new + out > 90_000:
                break
            turns.append(Turn(context + new, new, out, think_s=rng.choice([2.0, 15.0, 60.0, 240.0, 900.0])))
            context += new + out
        convs.append(Conversation(f"{NS}/c{i:03d}", float(1 + i // 2), tuple(turns)))
    for i in range(3):  # turns of 1,000 new tokens (100 out) every 850 s
        turns = [Turn(1_100 * k + 1_000, 1_000, 100, think_s=850.0 * (k > 0)) for k in range(5)]
        convs.append(Conversation(f"{NS}/long{i}", 50.0 + i, tuple(turns)))
    return Workload("equivalence", tuple(convs), signals=Signals(end_of_conversation=end_signal))


# --- the simulator, recorded -----------------------------------------------------------------------------------


class Seen(NamedTuple):
    """One conversation as its pool's scheduler holds it."""

    request: ConversationRequest
    holding: tuple[str, int, int] | None  # decoder, reserved, live
    offloaded: bool
    kv_state: KvState
    in_flight: bool
    turns: int
    live_kv_tokens: int
    last_activity_s: float | None
    counts: tuple[int, int, int, bool]  # offloads, reloads, reprefills, told it waits


def scheduler_state(s: PoolScheduler) -> State:
    """What a pool's scheduler decides with: conversations, queue, decoder table, host use, histories (all
    through its read-only view, as the adapters see it)."""
    state: State = {}
    for key in s.conversation_keys():
        v = s.conversation(key)
        assert v is not None
        h = v.holding
        state[("conversation", key)] = Seen(
            v.request,
            (h.decoder, h.reserved_kv_tokens, h.live_kv_tokens) if h is not None else None,
            h is not None and h.offloaded,
            v.kv_state,
            v.in_flight,
            v.turns,
            v.live_kv_tokens,
            v.last_activity_s,
            (v.offloads, v.reloads, v.reprefills, v.told_waiting),
        )
    state.update({("decoder", d.name): (d, s.host_used_on(d.name)) for d in s.decoders()})
    state[("queue", "")] = tuple(s.queue())
    state[("growth ratios", "")] = tuple(s.growth_ratios)
    state[("turn gaps", "")] = tuple(s.turn_gaps_s)
    return state


def rows(state: State) -> dict[str, Row]:
    """Each conversation's decoder, reservation and KV state (as status shows them) in a scheduler's state."""
    return {
        key: (seen.holding[0], seen.holding[1], seen.kv_state.value) if seen.holding else (None, 0, None)
        for (kind, key), seen in state.items()
        if kind == "conversation"
    }


@dataclass(frozen=True, slots=True)
class Step:
    """One call of the simulator's policy on its scheduler, and the scheduler after it."""

    call: str
    now: float
    args: tuple[Any, ...]
    decisions: list[Decision]
    state: State


class Recorder(PoolScheduler):
    """The simulator's scheduler, unchanged, recording the policy's calls (not the scheduler's own)."""

    def __init__(self, settings: SchedulerSettings) -> None:
        super().__init__(settings)
        self.steps: list[Step] = []
        self.clock: Callable[[], float] = lambda: 0.0  # the simulator's
        self._depth = 0

    def _record(self, call: str, run: Callable[[], list[Decision]], *args: Any) -> list[Decision]:
        self._depth += 1
        try:
            decisions = run()
        finally:
            self._depth -= 1
        if self._depth == 0:
            self.steps.append(Step(call, self.clock(), args, decisions, scheduler_state(self)))
        return decisions

    def admit(self, request: ConversationRequest, now_s: float) -> list[Decision]:
        return self._record("admit", partial(super().admit, request, now_s), request)

    def turn_started(self, key: str, now_s: float, prefill_site: PrefillSite = PrefillSite.DECODER) -> list[Decision]:
        return self._record("turn_started", partial(super().turn_started, key, now_s, prefill_site), key, prefill_site)

    def usage_observed(
        self, key: str, live_kv_tokens: int, now_s: float, *, turns: int | None = None, turn_ended: bool = True
    ) -> list[Decision]:
        assert turn_ended, "the operator hears of a turn at its end only"
        run = partial(super().usage_observed, key, live_kv_tokens, now_s, turns=turns)
        return self._record("usage_observed", run, key, live_kv_tokens, turns)

    def release(self, key: str, reason: Reason, message: str = "", now_s: float | None = None) -> list[Decision]:
        return self._record("release", partial(super().release, key, reason, message, now_s), key, reason)

    def kv_offloaded(self, key: str, now_s: float) -> list[Decision]:
        return self._record("kv_offloaded", partial(super().kv_offloaded, key, now_s), key)

    def sweep(self, now_s: float) -> list[Decision]:
        return self._record("sweep", partial(super().sweep, now_s))

    def decoders_lost(self, names: Iterable[str], now_s: float) -> list[Decision]:
        lost = list(names)
        return self._record("decoders_lost", partial(super().decoders_lost, lost, now_s), lost)


class RecordedConServe(ConServe):
    """The shipped ConServe on a recording scheduler; it loses decoder `LOST` at the first sweep after
    `LOSE_AFTER_S` when none of that decoder's turns is in flight (the simulator does not model a turn cut off
    mid-decode: the operator's router replays it; the scheduler's rules are what is compared here)."""

    def __init__(self, pd_rule: PdRule | None = None) -> None:
        super().__init__(pd_rule=pd_rule)
        self.recorder = self.scheduler = Recorder(self.scheduler.settings)
        self.lost = False
        self.tables: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def bind(self, sim: SimView, idle_timeout_s: float | None = None) -> None:
        super().bind(sim, idle_timeout_s)
        self.recorder.clock = lambda: sim.now
        # The decoders as the scheduler sizes them, and as the simulator runs them (GPU and host KV tokens).
        s = self.scheduler
        capacity = {d.name: d.capacity_kv_tokens for d in s.decoders()}
        self.tables = [
            ((capacity[n], s.host_capacity_on(n)), (d.capacity, d.host_capacity)) for n, d in sim.decoders.items()
        ]

    def sweep(self, now: float) -> list[Decision]:
        if not self.lost and now >= LOSE_AFTER_S and self._quiet(LOST):
            self.lost = True
            self.decoder_lost(LOST, now)  # the shipped policy's own entry point
        return super().sweep(now)

    def _quiet(self, name: str) -> bool:
        s, decoder = self.scheduler, self.sim.decoders[name]
        busy = decoder.running or decoder.join_queue or decoder.local_queue or decoder.prefill_batch
        views = [v for k in s.conversations_on(name) if (v := s.conversation(k)) is not None]
        return not busy and all(v.turns > 0 and not v.in_flight for v in views)


# --- the operator, on the fake API ------------------------------------------------------------------------------


def node(name: str, gpu: str, count: int) -> Body:
    return {"metadata": {"name": name, "labels": {LABEL_GPU_PRODUCT: PRODUCT_LABELS[gpu], LABEL_GPU_COUNT: str(count)}}}


def serving_pod(name: str, gpus: int, app: str) -> Body:
    return PodBuilder(name).namespace(NS).on(name).app(app).gpus(gpus).running().build()


def operator_world(fleet: Fleet) -> FakeKube:
    """Each fleet instance as a pod (its GPUs requested) alone on a node labelled with its GPU product, and the
    pool a user would write: the model, the selectors, the fleet's engine profile, every other field left at
    its default."""
    kube = FakeKube()
    instances = [(i, "dec") for i in fleet.decode] + [(i, "dec-prefill") for i in fleet.prefill]
    kube.nodes = [node(i.name, i.gpu, 8) for i, _ in instances]
    kube.pods = [serving_pod(i.name, i.tp, app) for i, app in instances]
    body = pool_body(POOL, tokens_per_decoder=None, model={"name": MODEL})
    body["spec"]["engineProfile"] = fleet.engine_profile.name  # the engine the fleet runs
    body["metadata"].update(namespace=NS, generation=1)
    kube.objects["decoderpools"] = [body]
    return kube


class Replay:
    """The simulator's steps as the operator receives them; after each, the two must agree (`check`)."""

    def __init__(self, work: Workload, prefill_used: dict[str, str], fleet: Fleet) -> None:
        self.convs = {c.key: c for c in work.conversations}
        self.prefill_used = prefill_used
        self.clock = FakeClock(epoch_s=0.0)
        self.kube = operator_world(fleet)
        self.engine = Engine(self.kube, EngineConfig(), clock=self.clock)
        self.generation: dict[str, int] = {}
        self.usage: dict[str, Body] = {}
        self.released: dict[str, str] = {}  # the simulator's releases: key -> reason
        self.replaced: dict[str, str | None] = {}

    @property
    def scheduler(self) -> PoolScheduler:
        return self.engine.world.pool(NS, POOL).scheduler

    def body(self, key: str, **spec: Any) -> Body:
        """The Conversation as the API server returns it (creation at its first turn's whole-second arrival)."""
        name, arrival = key.split("/")[1], self.convs[key].arrival_s
        assert arrival == int(arrival), "creationTimestamp has one-second resolution"
        self.generation[key] = self.generation.get(key, 0) + 1
        body = conversation_body(name, POOL, self.convs[key].turns[0].input_tokens, **spec)
        meta = {"namespace": NS, "uid": f"uid-{name}", "generation": self.generation[key]}
        body["metadata"].update(meta, creationTimestamp=format_time(arrival))
        return body

    async def run(self, step: Step) -> None:
        self.clock.epoch_s = self.clock.monotonic_s = step.now
        handler = getattr(self, step.call)
        await handler(step, *step.args)
        await self.engine.drain_background()
        for d in step.decisions:
            if d.verdict in (Verdict.RELEASED, Verdict.FAILED):
                self.released[d.conversation] = d.reason.value
            elif d.verdict is Verdict.REPLACED:
                self.replaced[d.conversation] = d.decoder

    async def admit(self, step: Step, request: ConversationRequest) -> None:
        known = f"admit of {request.key}, which the operator has already: no operator event asks again"
        assert request.key not in self.generation, known
        assert request.created_at_s == self.convs[request.key].arrival_s
        assert request.first_input_tokens == self.convs[request.key].turns[0].input_tokens
        await conversation.on_event(self.engine, "ADDED", self.body(request.key))

    async def turn_started(self, step: Step, key: str, site: PrefillSite) -> None:
        await self.engine.turn_started(self.engine.world.convs[key], site)

    async def usage_observed(self, step: Step, key: str, live: int, turns: int) -> None:
        outputs = sum(t.output_tokens for t in self.convs[key].turns[:turns])
        usage: Body = {"turns": turns, "inputTokens": live - outputs, "outputTokens": outputs}
        if turns == 1:
            usage["prefillPod"] = self.prefill_used[key]  # the router's report of the server it used
        self.usage[key] = usage
        await conversation.on_event(self.engine, "MODIFIED", self.body(key, usage=usage))

    async def release(self, step: Step, key: str, reason: Reason) -> None:
        if not step.decisions:
            return  # the simulator ending a conversation its scheduler already released (idle timeout)
        assert reason is Reason.COMPLETED, f"release of {key} for {reason}: no operator event replays it"
        body = self.body(key, usage=self.usage.get(key, {}), completed=True)
        await conversation.on_event(self.engine, "MODIFIED", body)

    async def kv_offloaded(self, step: Step, key: str) -> None:
        await self.engine.kv_offloaded(self.engine.world.convs[key])

    async def sweep(self, step: Step) -> None:
        await self.engine.sweep_idle()

    async def decoders_lost(self, step: Step, names: list[str]) -> None:
        for name in names:
            await decoderpool.on_pod_event(self.engine, "DELETED", serving_pod(name, 1, "dec"))

    def written(self) -> tuple[dict[str, Row], dict[str, str]]:
        """Each live conversation's decoder, reservation and KV state as the operator wrote them; the ended
        ones' Ended reason."""
        live: dict[str, Row] = {}
        ended: dict[str, str] = {}
        for (plural, name), status in self.kube.status.items():
            key = f"{NS}/{name}"
            if plural != "conversations":
                continue
            if status.get("phase") in ("Completed", "Failed"):
                reasons = {c["type"]: c["reason"] for c in status.get("conditions", [])}
                ended[key] = reasons.get("Ended") or reasons["Placed"]
                continue
            decoder = (status.get("decoder") or {}).get("pod")
            reserved = status.get("reservedKvTokens", 0) if decoder else 0
            live[key] = (decoder, reserved, status.get("kvState") if decoder else None)
        return live, ended

    def check(self, step: Step, index: int) -> None:
        where = f"step {index} ({step.call} at t={step.now:.3f}s)"
        written, ended = self.written()
        assert_same(rows(step.state), written, f"decoder, reservation, KV state (status) after {where}")
        assert_same(self.released, ended, f"releases after {where}")
        assert tuple(self.scheduler.queue()) == step.state[("queue", "")], f"queue order after {where}"
        assert_same(step.state, scheduler_state(self.scheduler), f"the scheduler after {where}")


def assert_same(sim: dict[Any, Any], operator: dict[Any, Any], where: str) -> None:
    """Equal mappings; else the first keys that differ, with both sides' values."""
    if sim == operator:
        return
    keys = sorted({*sim, *operator}, key=str)
    diffs = [
        f"{k}: simulator {sim.get(k)!r} != operator {operator.get(k)!r}" for k in keys if sim.get(k) != operator.get(k)
    ]
    raise AssertionError(f"{where}: " + "; ".join(diffs[:3]))


# --- the test ---------------------------------------------------------------------------------------------------


def simulate(end_signal: bool) -> tuple[Workload, RecordedConServe, dict[str, str]]:
    work = workload(seed=2, end_signal=end_signal)
    # Two P/D rules, one per case: the default decider, and later turns always on the decoder (which fills host
    # memory in this run: drops and re-prefills). The scheduler is told each turn's site either way.
    policy = RecordedConServe(None if end_signal else PdRule.DECODER)
    result = Simulator(build_fleet(FLEET, tiered=True), work, policy, idle_timeout_s=IDLE_TIMEOUT_S).run()
    return work, policy, {s.key: s.turns[0].prefill_instance for s in result.conversations}


async def replay(work: Workload, policy: RecordedConServe, prefill_used: dict[str, str]) -> Replay:
    op = Replay(work, prefill_used, build_fleet(FLEET, tiered=True))
    await startup.rebuild(op.engine, [NS])
    assert op.scheduler.settings == policy.scheduler.settings, "the pool's settings, derived in both worlds"
    for index, step in enumerate(policy.recorder.steps):
        await op.run(step)
        op.check(step, index)
    return op


def assert_in_flight_kept(steps: list[Step]) -> None:
    """No decision idles, offloads, drops or times out a conversation whose turn is in flight: a rule both worlds
    run, so that equivalence alone could not see it broken in both."""
    before: State = {}
    for step in steps:
        for d in step.decisions:
            seen = before.get(("conversation", d.conversation))
            moved = d.verdict in (Verdict.IDLED, Verdict.OFFLOADED, Verdict.DROPPED) or d.reason is Reason.IDLE_TIMEOUT
            assert not (moved and seen is not None and seen.in_flight), f"{d} at t={step.now}: a turn is in flight"
        before = step.state


def exercised(steps: list[Step]) -> dict[str, int]:
    """How often each call and each decision (verdict/reason) occurred; placements from the queue; the longest
    queue; the decoders conversations were placed on."""
    counts: dict[str, int] = {}
    for step in steps:
        names = [step.call, *(f"{d.verdict.value}/{d.reason.value}" for d in step.decisions)]
        names += ["placed-from-queue" for d in step.decisions if d.verdict is Verdict.PLACED and step.call != "admit"]
        names += [f"on/{d.decoder}" for d in step.decisions if d.placed]
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    counts["longest-queue"] = max(len(step.state[("queue", "")]) for step in steps)
    return counts


@pytest.mark.parametrize("end_signal", [False, True], ids=["idle-timeout", "completed"])
def test_simulator_and_operator_equivalence(end_signal: bool) -> None:
    work, policy, prefill_used = simulate(end_signal)
    assert all(scheduled == simulated for scheduled, simulated in policy.tables), policy.tables
    assert_in_flight_kept(policy.recorder.steps)
    op = asyncio.run(replay(work, policy, prefill_used))
    moved = {
        f"{NS}/{name}": status["decoder"]["pod"]
        for (plural, name), status in op.kube.status.items()
        if plural == "conversations" and status.get("placementGeneration", 0) > 1 and status.get("decoder")
    }
    assert moved == op.replaced, "the same conversations moved off the lost decoder, to the same decoders"
    # The run exercises what it claims: a queue drained by releases and turn ends, reclaiming (idle, offload,
    # reload), outgrowth, every decoder type, re-placement off the lost decoder, the end of every conversation.
    seen = ("turn_started", "kv_offloaded", "idled/ActiveWindow", "offloaded/RoomNeeded", "reloaded/Turn")
    more_than = dict.fromkeys((*seen, "extended/Extended", "outgrown/DecoderFull", "on/d0-h200", "on/d1-a100"), 0)
    more_than |= {"on/d2-h20": 0, "longest-queue": 10, "placed-from-queue": 10, "replaced/Replaced": 4}
    if end_signal:
        more_than["released/Completed"] = len(work.conversations) - 1
    else:  # the run ends with the last turn (some are not idle long enough); host memory fills: drops, re-prefills
        more_than |= {
            "released/IdleTimeout": len(work.conversations) // 2,
            "dropped/HostFull": 0,
            "reprefilled/Turn": 0,
        }
    counts = exercised(policy.recorder.steps)
    for name, least in more_than.items():
        assert counts.get(name, 0) > least, (name, counts)
