"""Energy readers through the one interface: NVML with patched pynvml counters (reset and wraparound included),
dcgm-exporter pages as 3.x and 4.x serve them, the null and fake readers, and the fake dcgm-exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest
from aiohttp import web

from conserve.core.energy import NVML_ENERGY_COUNTER_WRAP_MJ, DeltaKind, GpuSample, gpu_interval
from conserve.energy import EnergyReader, FakeReader, GpuReading, NullReader, PodRef
from conserve.energy.dcgm import DcgmExporterReader, parse_exposition, static_endpoints
from conserve.energy.nvml import NvmlReader, NvmlUnavailableError
from conserve.gpusim.fakedcgm import ConstantLoad, FakeDcgmExporter, FakeGpu, make_app
from conserve.gpusim.fakedcgm_cluster import GpuSimLoad, targets_from_cluster

DATA = Path(__file__).parent / "data" / "energy"


class FakeNvmlBoard:
    """Counters a test scripts, served through the real pynvml module's function names."""

    def __init__(self, energy_mj: list[list[int]], power_mw: list[int], names: list[str]) -> None:
        self.energy_mj = energy_mj  # per GPU, the values successive reads return
        self.power_mw = power_mw
        self.names = names
        self.reads = [0] * len(names)
        self.unsupported_energy: set[int] = set()

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def energy(handle: int) -> int:
            if handle in self.unsupported_energy:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            series = self.energy_mj[handle]
            value = series[min(self.reads[handle], len(series) - 1)]
            self.reads[handle] += 1
            return value

        fakes: dict[str, Callable[..., Any]] = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: len(self.names),
            "nvmlDeviceGetHandleByIndex": lambda index: index,
            "nvmlDeviceGetUUID": lambda handle: f"GPU-0000000{handle}-aaaa-bbbb-cccc-dddddddddddd",
            "nvmlDeviceGetName": lambda handle: self.names[handle],
            "nvmlDeviceGetTotalEnergyConsumption": energy,
            "nvmlDeviceGetPowerUsage": lambda handle: self.power_mw[handle],
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(pynvml, name, fake)


def _accumulate(reader: EnergyReader, reads: int) -> tuple[dict[str, float], dict[str, list[DeltaKind]]]:
    """What the operator's loop does with a reader: one baseline per GPU, intervals summed."""
    baselines: dict[str, GpuSample | None] = {}
    totals: dict[str, float] = {}
    kinds: dict[str, list[DeltaKind]] = {}
    for step in range(reads):
        for reading in asyncio.run(reader.read()):
            sample = GpuSample(float(step), reading.energy_mj, reading.power_w)
            baselines[reading.key], interval = gpu_interval(baselines.get(reading.key), sample, max_power_w=700)
            if interval:
                totals[reading.key] = totals.get(reading.key, 0.0) + interval.energy_j
                kinds.setdefault(reading.key, []).append(interval.kind)
    return totals, kinds


def test_nvml_reader_with_patched_pynvml_counts_reset_and_wraparound(monkeypatch: pytest.MonkeyPatch) -> None:
    wrap = NVML_ENERGY_COUNTER_WRAP_MJ
    board = FakeNvmlBoard(
        energy_mj=[
            [5_000_000, 5_300_000, 5_600_000, 100_000, 400_000],  # driver reload between reads 3 and 4
            [wrap - 200_000, wrap - 50_000, 250_000, 550_000, 850_000],  # the 64-bit counter wraps
        ],
        power_mw=[300_000, 300_000],
        names=["NVIDIA H100 80GB HBM3", "NVIDIA H200"],
    )
    board.patch(monkeypatch)
    reader = NvmlReader(hostname="node-a")  # the default path: the real pynvml module, patched
    first = asyncio.run(reader.read())
    assert [(r.gpu_index, r.product, r.hostname, r.power_w) for r in first] == [
        (0, "NVIDIA H100 80GB HBM3", "node-a", 300.0),
        (1, "NVIDIA H200", "node-a", 300.0),
    ]
    assert first[0].energy_mj == 5_000_000
    board.reads = [0, 0]
    totals, kinds = _accumulate(reader, 5)
    gpu0, gpu1 = (r.key for r in first)
    # 300 + 300 J, then a reset: 100 J since the reset (the bit before it is lost, never invented), then 300 J.
    assert totals[gpu0] == pytest.approx(1000.0)
    assert kinds[gpu0] == [DeltaKind.NORMAL, DeltaKind.NORMAL, DeltaKind.RESET, DeltaKind.NORMAL]
    assert totals[gpu1] == pytest.approx(1050.0)
    assert kinds[gpu1] == [DeltaKind.NORMAL, DeltaKind.WRAP, DeltaKind.NORMAL, DeltaKind.NORMAL]
    asyncio.run(reader.close())


def test_nvml_without_an_energy_counter_falls_back_to_power(monkeypatch: pytest.MonkeyPatch) -> None:
    board = FakeNvmlBoard(energy_mj=[[0]], power_mw=[250_000], names=["Tesla T4"])
    board.unsupported_energy.add(0)
    board.patch(monkeypatch)
    reader = NvmlReader(hostname="node-b")
    reading = asyncio.run(reader.read())[0]
    assert reading.energy_mj is None
    assert reading.power_w == 250.0
    totals, kinds = _accumulate(reader, 3)
    assert totals[reading.key] == pytest.approx(500.0)
    assert kinds[reading.key] == [DeltaKind.POWER, DeltaKind.POWER]


def test_nvml_init_failure_is_an_error_not_an_empty_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", broken)
    with pytest.raises(NvmlUnavailableError):
        asyncio.run(NvmlReader(hostname="x").read())


def test_dcgm_3x_page_with_pod_mapping() -> None:
    readings = parse_exposition((DATA / "dcgm-exporter-3.3.5-h100-k8s.prom").read_text())
    assert len(readings) == 2
    busy, idle = readings
    assert busy.uuid == "GPU-0f5a1c2e-8d0b-3a1e-5b7c-0e4c6f0a9d11"
    assert (busy.gpu_index, busy.hostname, busy.product) == (0, "gpu-node-h100-0", "NVIDIA H100 80GB HBM3")
    assert busy.energy_mj == 88451320977
    assert busy.power_w == pytest.approx(612.459)
    assert busy.pods == (PodRef("serving", "prefill-0", "vllm"),)
    assert (idle.gpu_index, idle.pods) == (1, ())
    assert idle.power_w == pytest.approx(71.388)


def test_dcgm_4x_page_with_a_shared_gpu_counts_it_once() -> None:
    readings = parse_exposition((DATA / "dcgm-exporter-4.2.3-h200-shared.prom").read_text())
    assert [r.gpu_index for r in readings] == [0, 1]
    shared = readings[1]
    assert shared.energy_mj == 149876330512
    assert shared.pods == (PodRef("serving", "decode-1", "vllm"), PodRef("batch", "decode-2", "vllm"))


def test_dcgm_mig_instances_are_one_gpu() -> None:
    readings = parse_exposition((DATA / "dcgm-exporter-3.3.0-a100-mig.prom").read_text())
    assert len(readings) == 1
    assert readings[0].energy_mj == 257858316
    assert readings[0].product == "NVIDIA A100-SXM4-80GB"


def test_dcgm_garbage_is_refused() -> None:
    with pytest.raises(ValueError, match="could not convert"):
        parse_exposition('DCGM_FI_DEV_POWER_USAGE{gpu="0" 12\n')


def test_null_and_fake_readers_follow_the_protocol() -> None:
    fake = FakeReader([GpuReading("GPU-1", 0, "NVIDIA H200", "n", energy_mj=1000.0, power_w=200.0)])
    assert isinstance(fake, EnergyReader)
    assert isinstance(NullReader(), EnergyReader)
    assert asyncio.run(NullReader().read()) == []
    fake.advance(2.0)
    assert asyncio.run(fake.read())[0].energy_mj == pytest.approx(401_000.0)


def test_fake_dcgm_server_power_follows_load_and_scrapes_like_dcgm_exporter() -> None:
    now = [100.0]
    gpus = [
        FakeGpu("kwok-h200-0", 0, "NVIDIA-H200", pod="decode-0", namespace="ns", container="vllm"),
        FakeGpu("kwok-h100-0", 0, "NVIDIA-H100-80GB-HBM3"),
    ]
    exporter = FakeDcgmExporter(targets=lambda: gpus, load=ConstantLoad(0.0), clock=lambda: now[0])

    async def scenario() -> list[list[GpuReading]]:
        runner = web.AppRunner(make_app(exporter, tick_s=3600))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        reader = DcgmExporterReader(static_endpoints([f"http://127.0.0.1:{port}/metrics"]))
        seen = [await reader.read()]
        now[0] += 10.0
        exporter.overrides["ns/decode-0"] = 1.0  # a prefill-like load on the decoder's GPU
        seen.append(await reader.read())
        now[0] += 10.0
        seen.append(await reader.read())
        await reader.close()
        await runner.cleanup()
        return seen

    first, second, third = asyncio.run(scenario())
    by_node = {r.hostname: r for r in third}
    h200, h100 = by_node["kwok-h200-0"], by_node["kwok-h100-0"]
    assert h200.pods == (PodRef("ns", "decode-0", "vllm"),)
    assert h200.product == "NVIDIA H200"
    assert h200.power_w == pytest.approx(700.0)  # TDP at activity 1
    assert h100.power_w == pytest.approx(70.0)  # idle: 10% of TDP
    before = {r.hostname: r.energy_mj for r in second}
    assert h200.energy_mj is not None
    assert h100.energy_mj is not None
    assert h200.energy_mj - (before["kwok-h200-0"] or 0) == pytest.approx(7_000_000, abs=1)  # 700 W x 10 s in mJ
    assert h100.energy_mj - (before["kwok-h100-0"] or 0) == pytest.approx(700_000, abs=1)
    assert {r.uuid for r in first} == {g.uuid for g in gpus}


def test_a_failing_endpoint_is_a_missing_sample_not_an_error() -> None:
    reader = DcgmExporterReader(static_endpoints(["http://127.0.0.1:9/metrics"]), timeout_s=1.0)

    async def scenario() -> list[GpuReading]:
        try:
            return await reader.read()
        finally:
            await reader.close()

    assert asyncio.run(scenario()) == []
    assert "http://127.0.0.1:9/metrics" in reader.last_errors


def test_cluster_targets_hand_out_gpu_indices_like_the_device_plugin() -> None:
    def node(name: str, product: str, gpus: int) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
        }

    def pod(name: str, node_name: str, gpus: int) -> dict[str, Any]:
        limits = {"nvidia.com/gpu": str(gpus)}
        return {
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"nodeName": node_name, "containers": [{"name": "vllm", "resources": {"limits": limits}}]},
        }

    targets = targets_from_cluster(
        [pod("dec-b", "h200-0", 1), pod("dec-a", "h200-0", 2), pod("cpu", "cpu-0", 0)],
        [node("h200-0", "NVIDIA-H200", 4), {"metadata": {"name": "cpu-0", "labels": {}}}],
    )
    assert [(t.node, t.gpu_index, t.pod) for t in targets] == [
        ("h200-0", 0, "dec-a"),
        ("h200-0", 1, "dec-a"),
        ("h200-0", 2, "dec-b"),
        ("h200-0", 3, ""),
    ]
    # gpu-sim's modelled power (for the pod's 2 GPUs) maps back onto the same power model.
    load = GpuSimLoad(gpus_per_pod={"ns/dec-a": 2}, power_w={"ns/dec-a": 2 * 385.0})
    assert load(targets[0]) == pytest.approx(0.5)
    assert load(targets[3]) == 0.0
