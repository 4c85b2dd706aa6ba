"""The fake dcgm-exporter fed by gpu-sim reports the energy gpu-sim counted: the regression tests for the demo's
3-4x gap between DCGM-derived and gpu-sim J per token (the exporter held a 2 s sample of gpu-sim's power gauge,
and the gauge read idle power during every step)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from conserve.core.energy import GpuSample, gpu_interval
from conserve.core.gpus import lookup_product
from conserve.core.llm import lookup_model
from conserve.core.perf import LINKS, Device
from conserve.energy.dcgm import parse_exposition
from conserve.gpusim.engine import Engine, Role, SimRequest
from conserve.gpusim.fakedcgm import FakeDcgmExporter, FakeGpu
from conserve.gpusim.fakedcgm_cluster import GpuSimLoad
from conserve.gpusim.server import GpuSimConfig, GpuSimServer

H200 = "NVIDIA-H200"


def _pod_gpus(count: int) -> list[FakeGpu]:
    return [FakeGpu("kwok-h200-0", i, H200, "dec-a", "ns", "vllm") for i in range(count)]


def test_the_exporter_counter_follows_the_simulator_counter_exactly() -> None:
    """A known gpu-sim counter (a 2-GPU pod): every GPU's DCGM counter moves by its share of every increase,
    whatever the power gauge says in between, across a failed scrape and a simulator restart."""
    now = [0.0]
    gpus = [*_pod_gpus(2), FakeGpu("kwok-h200-0", 2, H200)]
    load = GpuSimLoad(gpus_per_pod={"ns/dec-a": 2})
    exporter = FakeDcgmExporter(targets=lambda: gpus, load=load, counters=load.counter_j, clock=lambda: now[0])

    def scrape() -> dict[int, float]:
        return {r.gpu_index: r.energy_mj or 0.0 for r in parse_exposition(exporter.render())}

    load.power_w["ns/dec-a"], load.energy_j["ns/dec-a"] = 140.0, 5_000.0  # idle gauge, whatever the counter says
    start = scrape()
    total_j = 0.0
    for step_j in (900.0, 0.0, 2_600.0, 35.5):  # 0.0: a scrape that failed kept the last value
        now[0] += 2.0
        load.energy_j["ns/dec-a"] += step_j
        total_j += step_j
        seen = scrape()
        for i in (0, 1):
            assert seen[i] - start[i] == pytest.approx(total_j / 2 * 1000, abs=1.0)  # mJ, the pod's half
    # The simulator restarted (its counter from zero): what it drew since counts, nothing negative.
    now[0] += 2.0
    load.energy_j["ns/dec-a"] = 300.0
    seen = scrape()
    assert seen[0] - start[0] == pytest.approx((total_j + 300.0) / 2 * 1000, abs=1.0)
    # The GPU no pod holds integrates the power model (idle, 10% of the H200's 700 W) over the 10 s.
    assert seen[2] - start[2] == pytest.approx(70.0 * 10.0 * 1000, abs=1.0)
    # An override still wins over the counter (tests and demos move power by hand).
    exporter.overrides["ns/dec-a"] = 1.0
    exporter.tick()
    now[0] += 1.0
    load.energy_j["ns/dec-a"] += 1e6  # ignored while overridden
    after = scrape()
    assert after[0] - seen[0] == pytest.approx(700.0 * 1.0 * 1000, abs=1.0)


def test_gpusim_power_gauge_reads_the_step_power_while_a_step_runs() -> None:
    """The gauge the fake exporter turns into DCGM_FI_DEV_POWER_USAGE: a busy decoder is not at idle power."""
    spec, model = lookup_product(H200), lookup_model("llama-3-8b")
    assert spec is not None
    assert model is not None

    async def scenario() -> list[float]:
        engine = Engine(
            role=Role.DECODE, device=Device(spec), model=model, kv_capacity_tokens=1_000_000, link=LINKS["rdma"]
        )
        engine.start()
        for _ in range(16):
            engine.submit(SimRequest(engine.next_request_id(), 2000, 100_000, remote_kv_tokens=2000))
        seen = []
        for _ in range(5):
            await asyncio.sleep(0.05)
            seen.append(engine.stats.power_w)
        await engine.stop()
        return seen

    assert min(asyncio.run(scenario())) > spec.idle_power_w * 1.5


def test_dcgm_energy_from_a_live_gpusim_matches_its_own_counter() -> None:
    """A real gpu-sim server under a decode load, scraped like the demo's exporter does: the energy the operator's
    counter arithmetic gets from the DCGM page equals gpu-sim's own counter delta over the same window."""

    async def scenario() -> tuple[float, float]:
        server = GpuSimServer(GpuSimConfig(role=Role.DECODE, gpu=H200, port=0, stream_interval=8))
        port = await server.start()
        engine = server.engine
        gpu = _pod_gpus(1)[0]
        load = GpuSimLoad({"ns/dec-a": f"127.0.0.1:{port}"}, {"ns/dec-a": 1})
        exporter = FakeDcgmExporter(targets=lambda: [gpu], load=load, counters=load.counter_j)

        async def drain(request: SimRequest) -> None:
            while not (await request.events.get()).finished:
                pass

        async with aiohttp.ClientSession() as session:
            await load.refresh(session)
            first = parse_exposition(exporter.render())[0]
            baseline = GpuSample(time.monotonic(), first.energy_mj, first.power_w)
            sim0 = load.energy_j["ns/dec-a"]
            tasks = []
            for i in range(24):  # bursts of decodes with idle gaps: the power changes every step
                request = SimRequest(engine.next_request_id(), 1500, 40 + 13 * (i % 7), remote_kv_tokens=1500)
                engine.submit(request)
                tasks.append(asyncio.create_task(drain(request)))
                await asyncio.sleep(0.05 if i % 6 else 0.3)
                if i % 4 == 0:
                    await load.refresh(session)
                    exporter.tick()
            await asyncio.gather(*tasks)
            await load.refresh(session)
            last = parse_exposition(exporter.render())[0]
            sim1 = load.energy_j["ns/dec-a"]
        await server.stop()
        _, interval = gpu_interval(baseline, GpuSample(time.monotonic(), last.energy_mj, last.power_w))
        assert interval is not None
        return interval.energy_j, sim1 - sim0

    dcgm_j, gpusim_j = asyncio.run(scenario())
    assert gpusim_j > 0
    assert dcgm_j == pytest.approx(gpusim_j, rel=1e-6, abs=1e-3)
