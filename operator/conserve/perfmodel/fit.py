"""Fitting the model's constants to measurements (least absolute log errors, Nelder-Mead; no dependencies).

Run on the fit set only (`conserve perf-model fit`); the result is pasted into core/perf.py's CALIBRATED with
the data it came from. The held-out set never enters here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from conserve.core.perf import CALIBRATED, PerfParams
from conserve.perfmodel.check import row_errors
from conserve.perfmodel.measurements import Measurement

#: The fitted fields, each with its allowed range (a value outside is clamped).
FITTED: dict[str, tuple[float, float]] = {
    "prefill_step_overhead_s": (1e-5, 0.2),
    "decode_step_overhead_s": (1e-5, 0.2),
    "decode_per_sequence_s": (1e-7, 0.01),
    "gemm_mfu_max": (0.05, 1.0),
    "gemm_half_tokens": (1.0, 8192.0),
    "attention_mfu": (0.02, 1.0),
    "decode_mbu": (0.2, 1.0),
    "allreduce_hop_latency_s": (1e-7, 1e-3),
    "memory_bound_activity": (0.05, 1.0),
}


def _params(vector: Sequence[float], base: PerfParams) -> PerfParams:
    values = {}
    for (name, (low, high)), x in zip(FITTED.items(), vector, strict=True):
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


def fit(rows: Sequence[Measurement], base: PerfParams = CALIBRATED, restarts: int = 3) -> PerfParams:
    vector = [math.log(min(max(getattr(base, name), low), high)) for name, (low, high) in FITTED.items()]
    for _ in range(restarts):  # restarting from the best point escapes Nelder-Mead's early collapse
        vector = nelder_mead(lambda v: loss(rows, _params(v, base)), vector)
    return _params(vector, base)
