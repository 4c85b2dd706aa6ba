"""Real NVML through the reader interface: `pytest -m gpu tests/gpu` on a machine with an NVIDIA GPU.

Nothing is faked: the reader initialises NVML, reads every GPU's energy counter and power, and the counters'
deltas go through the same arithmetic the operator uses. A GPU present with NVML broken fails here.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from conserve.core.energy import DeltaKind, GpuSample, gpu_interval
from conserve.core.gpus import lookup_product
from conserve.energy.nvml import NvmlReader

pytestmark = pytest.mark.gpu

SAMPLE_SPAN_S = 2.0


def test_nvml_reads_every_gpu_with_power_and_an_energy_counter() -> None:
    reader = NvmlReader()
    try:
        count = reader.open()
        assert count >= 1, "NVML initialised but lists no GPU"
        readings = asyncio.run(reader.read())
    finally:
        asyncio.run(reader.close())
    assert len(readings) == count
    for reading in readings:
        assert reading.uuid.startswith(("GPU-", "MIG-")), reading
        assert reading.product, reading
        assert reading.power_w is not None, reading
        assert 5.0 < reading.power_w < 2000.0, reading
        # Volta and later have the counter; every data-centre GPU this project targets does.
        assert reading.energy_mj is not None, reading
        assert reading.energy_mj > 0, reading
    print({r.uuid: (r.product, r.power_w, r.energy_mj) for r in readings})
    print({r.product: lookup_product(r.product) for r in readings})


def test_energy_counter_advances_with_power_over_time() -> None:
    reader = NvmlReader()
    try:
        before = {r.key: r for r in asyncio.run(reader.read())}
        t0 = time.monotonic()
        powers: dict[str, list[float]] = {key: [] for key in before}
        while time.monotonic() - t0 < SAMPLE_SPAN_S:
            for r in asyncio.run(reader.read()):
                if r.power_w is not None:
                    powers[r.key].append(r.power_w)
            time.sleep(0.1)
        t1 = time.monotonic()
        after = {r.key: r for r in asyncio.run(reader.read())}
    finally:
        asyncio.run(reader.close())
    for key, first in before.items():
        baseline, _ = gpu_interval(None, GpuSample(t0, first.energy_mj, first.power_w))
        last = after[key]
        _, interval = gpu_interval(baseline, GpuSample(t1, last.energy_mj, last.power_w), max_power_w=2000.0)
        assert interval is not None, key
        assert interval.kind is DeltaKind.NORMAL, (key, interval)
        mean_power_w = sum(powers[key]) / max(len(powers[key]), 1)
        # The counter and the power gauge are two views of one board: they agree within a generous factor
        # (the power reading is a 1 s average on recent GPUs, the counter is exact).
        assert 0.4 * mean_power_w <= interval.mean_power_w <= 2.5 * mean_power_w, (
            key,
            interval.mean_power_w,
            mean_power_w,
        )
        print(
            key, f"counter {interval.mean_power_w:.1f} W, gauge {mean_power_w:.1f} W over {interval.duration_s:.2f} s"
        )
