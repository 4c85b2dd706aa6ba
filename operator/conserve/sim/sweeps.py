"""Fleets and loads for `conserve bench --sweep-fleets / --sweep-load`.

Fleets: the file's tiered and homogeneous fleets (equal GPU count; with the default file also equal TDP, since
the H100 and H200 both draw 700 W), then decode tiers that really differ, against an H100 decode pool of the
file's decode count, each at the same GPU count and at the same total decode TDP (so tier mapping is measured
against the same watts): H20 (400 W, 4.0 TB/s, 148 TFLOP/s), A100 (400 W, 2.0 TB/s), H200 (700 W, 4.8 TB/s).
Prefill stays on the file's tiered prefill groups throughout.
"""

from __future__ import annotations

import dataclasses

from conserve.core.gpus import CATALOG
from conserve.sim.fleet import Fleet, FleetFile

DEFAULT_LOADS = (0.5, 1.0, 1.5, 2.0)
DECODE_TIERS = ("H100", "H20", "A100", "H200")


def decode_count(fleet_file: FleetFile) -> int:
    return sum(i.tp for i in fleet_file.build(tiered=True).decode)


def sweep_fleets(fleet_file: FleetFile) -> list[Fleet]:
    fleets = [fleet_file.build(tiered=True), fleet_file.build(tiered=False)]
    count = decode_count(fleet_file)
    watts = count * CATALOG["H100"].tdp_w
    for gpu in DECODE_TIERS:
        fleet = fleet_file.build(tiered=True, decode_gpu=gpu, decode_count=count)
        fleets.append(dataclasses.replace(fleet, name=f"decode-{gpu.lower()}x{count}"))
        same_watts = max(int(watts // CATALOG[gpu].tdp_w), 1)
        if same_watts != count:
            fleet = fleet_file.build(tiered=True, decode_gpu=gpu, decode_count=same_watts)
            fleets.append(dataclasses.replace(fleet, name=f"decode-{gpu.lower()}x{same_watts}-eqTDP"))
    return fleets


def parse_loads(text: str) -> tuple[float, ...]:
    """`0.5,1,1.5,2` -> loads; an error names the bad value."""
    loads: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--sweep-load: {part!r} is not a number") from None
        if value <= 0:
            raise ValueError(f"--sweep-load: {value} must be positive")
        loads.append(value)
    return tuple(loads)
