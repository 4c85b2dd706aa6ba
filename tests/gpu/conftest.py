"""GPU tests run real NVML. Where the machine has no NVIDIA GPU they are skipped with that reason; where it has
one (a device node or a driver entry) they run, and a broken NVML fails them. CONSERVE_REQUIRE_GPU=1 turns a
missing GPU into a failure too (for the machine that is meant to have one)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

NO_GPU_REASON = "no NVIDIA GPU/NVML on this machine"


def nvidia_gpu_present() -> bool:
    """Evidence of an NVIDIA GPU that does not go through NVML (so a broken NVML cannot hide the GPU)."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    present = nvidia_gpu_present()
    required = os.environ.get("CONSERVE_REQUIRE_GPU") == "1"
    for item in items:
        if here not in Path(str(item.path)).parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if not present and not required:
            item.add_marker(pytest.mark.skip(reason=NO_GPU_REASON))
