"""Fitting an engine profile's constants to measurements (least absolute log errors, Nelder-Mead; no dependencies).

Run on a fit set only (`conserve perf-model fit --profile NAME --fields time|power`); the result is pasted into
core/engine_profiles.py with the data it came from (perfmodel/data/README.md gives the procedure). Every fit
starts from the same point (`START`), so it is reproducible from the shipped data whatever is pasted. The
held-out set never enters here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from conserve.core.engine_profiles import VLLM_2023, PerfParams
from conserve.perfmodel.check import row_errors
from conserve.perfmodel.measurements import Measurement

#: The time constants, each with its allowed range (a value outside is clamped).
TIME_FIELDS: dict[str, tuple[float, float]] = {
    "prefill_step_overhead_s": (1e-5, 0.2),
    "decode_step_overhead_s": (1e-5, 0.2),
    "decode_per_sequence_s": (1e-7, 0.01),
    "gemm_mfu_max": (0.05, 1.0),
    "gemm_half_tokens": (1.0, 8192.0),
    "attention_mfu": (0.02, 1.0),
    "decode_mbu": (0.2, 1.0),
    "allreduce_hop_latency_s": (1e-7, 1e-3),
}
#: The power model's weights (shares of the dynamic power range at peak bandwidth and at peak tensor rate).
POWER_FIELDS: dict[str, tuple[float, float]] = {
    "memory_power_weight": (0.01, 3.0),
    "compute_power_weight": (0.01, 3.0),
}
FIELD_SETS: dict[str, dict[str, tuple[float, float]]] = {
    "time": TIME_FIELDS,
    "power": POWER_FIELDS,
    "all": {**TIME_FIELDS, **POWER_FIELDS},
}
#: Where every fit starts: the first fit's time constants (vLLM 2023) and half the dynamic range for power.
START: dict[str, float] = {
    **{name: getattr(VLLM_2023, name) for name in TIME_FIELDS},
    "memory_power_weight": 0.5,
    "compute_power_weight": 0.5,
}


def _params(vector: Sequence[float], base: PerfParams, fields: dict[str, tuple[float, float]]) -> PerfParams:
    values = {}
    for (name, (low, high)), x in zip(fields.items(), vector, strict=True):
        values[name] = min(max(math.exp(x), low), high)
    return dataclasses.replace(base, **values)


def loss(rows: Sequence[Measurement], params: PerfParams) -> float:
    """Mean absolute log error (robust to the few anomalous rows the data has), phases weighted equally."""
    per_phase: dict[str, list[float]] = {}
    for e in row_errors(rows, params):
        per_phase.setdefault(e.phase.split("_")[-1] if "power" in e.phase else e.phase, []).append(
            abs(math.log(max(e.modelled, 1e-12) / e.measured))
        )
    return sum(sum(v) / len(v) for v in per_phase.values())


def _toward(centroid: Sequence[float], worst: Sequence[float], t: float) -> list[float]:
    return [c + t * (w - c) for c, w in zip(centroid, worst, strict=True)]


def nelder_mead(
    f: Callable[[list[float]], float], start: list[float], step: float = 0.5, iterations: int = 1500
) -> list[float]:
    n = len(start)
    simplex = [list(start)] + [[x + (step if i == j else 0.0) for j, x in enumerate(start)] for i in range(n)]
    scores = [f(p) for p in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=lambda i: scores[i])
        simplex, scores = [simplex[i] for i in order], [scores[i] for i in order]
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        reflected = _toward(centroid, worst, -1.0)
        r = f(reflected)
        if r < scores[0]:
            expanded = _toward(centroid, worst, -2.0)
            e = f(expanded)
            simplex[-1], scores[-1] = (expanded, e) if e < r else (reflected, r)
        elif r < scores[-2]:
            simplex[-1], scores[-1] = reflected, r
        else:
            contracted = _toward(centroid, worst, 0.5)
            c = f(contracted)
            if c < scores[-1]:
                simplex[-1], scores[-1] = contracted, c
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, p, strict=True)] for p in simplex[1:]]
                scores = [scores[0]] + [f(p) for p in simplex[1:]]
    return simplex[min(range(n + 1), key=lambda i: scores[i])]


def fit(
    rows: Sequence[Measurement], base: PerfParams, fields: str = "time", restarts: int = 3, iterations: int = 1500
) -> PerfParams:
    """`base` with the `fields` set ("time", "power" or "all") fitted to `rows`, from `START`."""
    fitted = FIELD_SETS[fields]
    vector = [math.log(min(max(START[name], low), high)) for name, (low, high) in fitted.items()]
    for _ in range(restarts):  # restarting from the best point escapes Nelder-Mead's early collapse
        vector = nelder_mead(lambda v: loss(rows, _params(v, base, fitted)), vector, iterations=iterations)
    return _params(vector, base, fitted)
