"""The operator's energy loop on fakes: a FakeReader for the GPUs, an in-memory API for pools and conversations
(the standalone loop lists them; the operator's reads its World)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from conserve.api.conversation import ConversationSpec, ConversationUsage
from conserve.controller.conversation import record_from_body
from conserve.controller.energy_accountant import EnergyAccountant
from conserve.controller.energy_standalone import ListedEnergyState, merge_decoder_energy
from conserve.controller.energy_state import ConversationEnergyWriter, OperatorEnergyState
from conserve.controller.state import DecoderEnergy, DecoderInfo, World
from conserve.energy import FakeReader, GpuReading, PodRef
from conserve.testkit import FakeKube

Body = dict[str, Any]


def pool() -> Body:
    return {
        "metadata": {"name": "llama", "namespace": "ns", "resourceVersion": "1"},
        "spec": {},
        "status": {
            "decoders": [
                {
                    "pod": "dec-0",
                    "node": "h200-0",
                    "tier": "bandwidth",
                    "gpuProduct": "NVIDIA-H200",
                    "capacityKvTokens": 100_000,
                    "ready": True,
                },
                {
                    "pod": "dec-1",
                    "node": "h200-1",
                    "tier": "bandwidth",
                    "gpuProduct": "NVIDIA-H200",
                    "capacityKvTokens": 100_000,
                    "ready": True,
                },
            ],
            "prefills": [{"pod": "pre-0", "node": "h100-0", "tier": "compute", "gpuProduct": "NVIDIA-H100"}],
        },
    }


def conversation(name: str, decoder: str, *, turns: int, inputs: int, outputs: int, kv: int) -> Body:
    return {
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
        "spec": {
            "pool": "llama",
            "firstTurnInputTokens": 1000,
            "usage": {"turns": turns, "inputTokens": inputs, "outputTokens": outputs},
        },
        "status": {
            "phase": "Decoding",
            "decoder": {"pod": decoder},
            "prefill": {"pod": "pre-0"},
            "reservedKvTokens": kv,
            "liveKvTokens": 0,
        },
    }


def gpus() -> list[GpuReading]:
    return [
        GpuReading("GPU-a", 0, "NVIDIA H200", "h200-0", 1e9, 400.0, (PodRef("ns", "dec-0", "vllm"),)),
        GpuReading("GPU-b", 0, "NVIDIA H200", "h200-1", 2e9, 200.0, (PodRef("ns", "dec-1", "vllm"),)),
        GpuReading("GPU-c", 0, "NVIDIA H100 80GB HBM3", "h100-0", 3e9, 650.0, (PodRef("ns", "pre-0", "vllm"),)),
        GpuReading("GPU-d", 1, "NVIDIA H100 80GB HBM3", "h100-0", 4e9, 70.0),  # no pod: node-only energy
    ]


def figure(figures: dict[tuple[str, str, str], DecoderEnergy], pod: str) -> tuple[Any, ...]:
    """(W, J, J per token) published for a pod of the pool."""
    published = figures[("ns", "llama", pod)]
    return (published.power_watts, published.energy_joules, published.energy_per_token_j)


def test_a_cycle_attributes_energy_to_conversations_and_decoders() -> None:
    kube = FakeKube(
        {
            "decoderpools": [pool()],
            "conversations": [
                conversation("a", "dec-0", turns=0, inputs=0, outputs=0, kv=20_000),
                conversation("b", "dec-0", turns=0, inputs=0, outputs=0, kv=30_000),
            ],
        }
    )
    reader, now = FakeReader(gpus()), [0.0]
    sink = ListedEnergyState(kube)
    accountant = EnergyAccountant(reader, sink, ConversationEnergyWriter(kube), clock=lambda: now[0])
    first = asyncio.run(accountant.cycle())
    assert first.gpu_energy_j == 0  # baselines only

    # 10 s pass; conversation a served a turn of 1000 in + 300 out, b one of 1000 in + 100 out.
    reader.advance(10.0)
    now[0] = 10.0
    kube.get("conversations", "a")["spec"]["usage"] = {"turns": 1, "inputTokens": 1000, "outputTokens": 300}
    kube.get("conversations", "b")["spec"]["usage"] = {"turns": 1, "inputTokens": 1000, "outputTokens": 100}
    report = asyncio.run(accountant.cycle())

    # Every GPU's 10 s: 4000 + 2000 + 6500 + 700 J; the unused GPU is on its node only.
    assert report.gpu_energy_j == pytest.approx(13_200.0)
    assert report.unmapped_j == pytest.approx(700.0)
    assert math.isclose(report.attributed_j + report.unattributed_j + report.unmapped_j, report.gpu_energy_j)
    status_a = kube.get("conversations", "a")["status"]
    status_b = kube.get("conversations", "b")["status"]
    # dec-0: 4000 J, idle 70 W x 10 s = 700 J shared by KV (0.2, 0.3 of capacity), 3300 J by tokens (1300:1100).
    # pre-0: 6500 J, idle 700 J unattributed (prefill holds no KV), 5800 J by first-turn input (1:1).
    expected_a = 3300 * 1300 / 2400 + 700 * 0.2 + 5800 / 2
    expected_b = 3300 * 1100 / 2400 + 700 * 0.3 + 5800 / 2
    assert status_a["energyJoules"] == pytest.approx(expected_a, abs=0.01)
    assert status_b["energyJoules"] == pytest.approx(expected_b, abs=0.01)
    assert status_a["energyPerTokenJoules"] == pytest.approx(expected_a / 300, rel=1e-4)
    # Decoder figures: power now and energy since the first cycle; dec-1 idles (nobody pinned there).
    assert figure(sink.figures, "dec-0")[:2] == (400.0, 4000.0)
    assert figure(sink.figures, "dec-1")[:2] == (200.0, 2000.0)
    assert figure(sink.figures, "pre-0")[:2] == (650.0, 6500.0)
    # J per output token on dec-0 (its energy over the interval's output tokens); dec-1 gets its tier's figure.
    assert figure(sink.figures, "dec-0")[2] == pytest.approx(4000 / 400)
    assert accountant.tier_energy_per_token_j("decode") == {"bandwidth": pytest.approx(6000 / 400)}
    assert figure(sink.figures, "dec-1")[2] == pytest.approx(6000 / 400)
    assert accountant.product_energy_per_token_j("prefill") == {"NVIDIA-H100": pytest.approx(6500 / 2000)}


class OneConversation:
    """Conversation a pinned to dec-0 (20,000 KV tokens of 100,000), the fake GPUs, a clock; standalone loops."""

    def __init__(self, *, turns: int, inputs: int, outputs: int) -> None:
        conv = conversation("a", "dec-0", turns=turns, inputs=inputs, outputs=outputs, kv=20_000)
        self.kube = FakeKube({"decoderpools": [pool()], "conversations": [conv]})
        self.reader = FakeReader(gpus())
        self.now_s = 0.0

    def accountant(self) -> EnergyAccountant:
        state, writer = ListedEnergyState(self.kube), ConversationEnergyWriter(self.kube)
        return EnergyAccountant(self.reader, state, writer, clock=lambda: self.now_s)

    def measured_once(self) -> EnergyAccountant:
        """A loop that has read the GPUs twice: a baseline, then a 10 s interval."""
        accountant = self.accountant()
        asyncio.run(accountant.cycle())
        self.after(10.0)
        asyncio.run(accountant.cycle())
        return accountant

    def after(self, seconds: float) -> None:
        self.reader.advance(seconds)
        self.now_s += seconds

    def energy_j(self) -> float:
        return float(self.kube.get("conversations", "a")["status"]["energyJoules"])

    def serve_a_turn_during_a_missed_scrape(self, accountant: EnergyAccountant) -> None:
        """10 s in which the exporter answers nothing while a serves a turn (1000 in + 300 out); its counters
        keep running meanwhile."""
        readings = self.reader.readings
        self.reader.set([])
        self.now_s += 10.0
        self.kube.get("conversations", "a")["spec"]["usage"] = {"turns": 1, "inputTokens": 1000, "outputTokens": 300}
        asyncio.run(accountant.cycle())
        self.reader.set(readings)
        self.reader.advance(10.0)


def test_a_restarted_loop_continues_from_status_without_repeating() -> None:
    world = OneConversation(turns=1, inputs=1000, outputs=300)
    world.measured_once()
    before = world.energy_j()
    assert before > 0
    # A new operator: the same GPUs and objects. Its first cycle counts nothing (no baseline), and the tokens
    # already reported are not work again.
    second = world.accountant()
    asyncio.run(second.cycle())
    assert world.energy_j() == before
    world.after(10.0)
    asyncio.run(second.cycle())
    # No new tokens: only its KV share of dec-0 (4000 J, all of it shared by occupancy: 0.2).
    assert world.energy_j() - before == pytest.approx(4000 * 0.2, abs=0.01)


def test_work_during_a_missed_reading_counts_in_the_interval_that_covers_it() -> None:
    world = OneConversation(turns=0, inputs=0, outputs=0)
    accountant = world.measured_once()  # an interval with no tokens: a's KV share of dec-0
    before = world.energy_j()
    assert before == pytest.approx(4000 * 0.2, abs=0.01)
    world.serve_a_turn_during_a_missed_scrape(accountant)
    # The exporter answers again 10 s later: the counters moved 20 s, an interval spanning both cycles.
    world.after(10.0)
    asyncio.run(accountant.cycle())
    # dec-0's 8000 J: idle 70 W x 20 s = 1400 J by KV (0.2 to a), the other 6600 J by tokens (a's alone);
    # pre-0's 13000 J: idle 1400 J unattributed (prefill holds no KV), the rest by first-turn input (a's alone).
    expected_decode = 6600 + 1400 * 0.2
    expected_prefill = 650 * 20 - 70 * 20
    assert world.energy_j() - before == pytest.approx(expected_decode + expected_prefill, abs=0.01)
    # The 300 output tokens served in the gap count in the measured J per token.
    assert "bandwidth" in accountant.tier_energy_per_token_j("decode")


def test_held_back_work_of_a_conversation_deleted_meanwhile_is_dropped_not_fatal() -> None:
    world = OneConversation(turns=0, inputs=0, outputs=0)
    accountant = world.measured_once()
    # A turn during a missed scrape, then the conversation is deleted before the exporter answers again.
    world.serve_a_turn_during_a_missed_scrape(accountant)
    world.kube.objects["conversations"].clear()
    world.after(10.0)
    report = asyncio.run(accountant.cycle())
    # The GPUs' 20 s are all accounted (nobody left to charge on the decoders: unattributed), none lost.
    assert report.gpu_energy_j == pytest.approx(2 * 13_200.0)
    assert math.isclose(report.attributed_j + report.unattributed_j + report.unmapped_j, report.gpu_energy_j)
    assert report.attributed_j == 0
    # The tokens it was served still count in dec-0's J per token.
    assert "bandwidth" in accountant.tier_energy_per_token_j("decode")


def test_pool_status_sink_writes_only_energy_fields_and_yields_on_conflict() -> None:
    kube = FakeKube({"decoderpools": [pool()], "conversations": []})
    sink = ListedEnergyState(kube)
    sink.figures = {
        ("ns", "llama", "dec-0"): DecoderEnergy(power_watts=300.0, energy_joules=1200.0),
        ("ns", "llama", "pre-0"): DecoderEnergy(power_watts=600.0, energy_joules=100.0),
    }
    asyncio.run(sink.write_pools(kube.objects["decoderpools"]))
    status = kube.get("decoderpools", "llama")["status"]
    assert status["decoders"][0] == {**pool()["status"]["decoders"][0], "powerWatts": 300.0, "energyJoules": 1200.0}
    assert status["decoders"][1] == pool()["status"]["decoders"][1]
    assert (status["powerWatts"], status["energyJoules"]) == (900.0, 1300.0)
    stale = pool()  # resourceVersion 1: the object has moved on since
    asyncio.run(sink.write_pools([stale]))
    assert sink.conflicts == 1


def test_merge_decoder_energy_is_pure() -> None:
    decoders: list[Body] = [{"pod": "x", "ready": True}, {"pod": "y"}]
    merged = merge_decoder_energy(decoders, {"y": (10.0, 20.0)})
    assert merged == [{"pod": "x", "ready": True}, {"pod": "y", "powerWatts": 10.0, "energyJoules": 20.0}]
    assert decoders[1] == {"pod": "y"}


def operator_world(conversations: list[Body]) -> World:
    """The operator's World as its watches fill it: the pool's decoders and prefills, the conversations' records."""
    world = World()
    runtime = world.pool("ns", "llama")
    runtime.body = pool()
    for entry in pool()["status"]["decoders"]:
        info = DecoderInfo.model_validate(entry)
        runtime.decoders[info.pod] = info
    runtime.prefills["pre-0"] = DecoderInfo.model_validate(pool()["status"]["prefills"][0])
    for body in conversations:
        spec = ConversationSpec.model_validate(body["spec"])
        record = record_from_body(body, spec, now_s=0.0, monotonic=0.0)
        world.convs[record.key] = record
    return world


def report_usage(world: World, name: str, turns: int, inputs: int, outputs: int) -> None:
    """A usage report as the operator's conversation watch applies it (the record's spec is replaced)."""
    record = world.convs[f"ns/{name}"]
    usage = {"turns": turns, "inputTokens": inputs, "outputTokens": outputs}
    record.spec = record.spec.model_copy(update={"usage": ConversationUsage.model_validate(usage)})


def test_in_the_operator_the_loop_reads_its_world_and_writes_every_conversation_in_one_flush() -> None:
    world = operator_world(
        [
            conversation("a", "dec-0", turns=0, inputs=0, outputs=0, kv=20_000),
            conversation("b", "dec-0", turns=0, inputs=0, outputs=0, kv=30_000),
        ]
    )
    kube = FakeKube()  # nothing to list: every read comes from the World
    reader, now = FakeReader(gpus()), [0.0]
    accountant = EnergyAccountant(
        reader, OperatorEnergyState(world), ConversationEnergyWriter(kube), clock=lambda: now[0]
    )
    asyncio.run(accountant.cycle())
    reader.advance(10.0)
    now[0] = 10.0
    report_usage(world, "a", 1, 1000, 300)
    report_usage(world, "b", 1, 1000, 100)
    report = asyncio.run(accountant.cycle())

    # The same figures as the standalone loop's (the first test), from the World.
    assert report.gpu_energy_j == pytest.approx(13_200.0)
    assert report.conversations_written == 2
    assert [(plural, name) for plural, name, _ in kube.patches] == [("conversations", "a"), ("conversations", "b")]
    expected_a = 3300 * 1300 / 2400 + 700 * 0.2 + 5800 / 2
    status_a = kube.get("conversations", "a")["status"]
    assert status_a == {
        "energyJoules": pytest.approx(expected_a, abs=0.01),
        "energyPerTokenJoules": pytest.approx(expected_a / 300, rel=1e-4),
    }
    energy = world.pools["ns/llama"].energy
    assert (energy["dec-0"].power_watts, energy["dec-0"].energy_joules) == (400.0, 4000.0)
    assert energy["dec-0"].energy_per_token_j == pytest.approx(4000 / 400)
    assert energy["dec-1"].energy_per_token_j == pytest.approx(6000 / 400)  # its tier's
    assert (energy["pre-0"].power_watts, energy["pre-0"].energy_joules) == (650.0, 6500.0)
    assert world.pools["ns/llama"].status_dirty.is_set()  # the pool status writer carries them next


def test_in_the_operator_a_restart_continues_from_the_status_its_records_were_built_from() -> None:
    written = conversation("a", "dec-0", turns=1, inputs=1000, outputs=300, kv=20_000)
    written["status"]["energyJoules"] = 5000.0
    pool_status = pool()
    world = operator_world([written])
    pool_status["status"]["decoders"][0]["energyJoules"] = 9000.0
    world.pools["ns/llama"].body = pool_status
    kube = FakeKube()
    reader, now = FakeReader(gpus()), [0.0]
    accountant = EnergyAccountant(
        reader, OperatorEnergyState(world), ConversationEnergyWriter(kube), clock=lambda: now[0]
    )
    asyncio.run(accountant.cycle())
    assert kube.patches == []  # nothing new yet: status already holds it
    reader.advance(10.0)
    now[0] = 10.0
    asyncio.run(accountant.cycle())
    # The tokens reported before the restart are not work again: only its KV share of dec-0 (4000 J x 0.2).
    assert kube.get("conversations", "a")["status"]["energyJoules"] == pytest.approx(5000.0 + 800.0, abs=0.01)
    assert world.pools["ns/llama"].energy["dec-0"].energy_joules == pytest.approx(9000.0 + 4000.0)
