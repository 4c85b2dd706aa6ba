"""How far the model is from measurements: relative errors per row, grouped by model / GPU / TP."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from conserve.core import perf
from conserve.core.perf import Device, PerfParams
from conserve.perfmodel.measurements import Measurement

PHASES = ("prefill", "decode", "prefill_power", "mean_power")


@dataclass(frozen=True, slots=True)
class RowError:
    row: Measurement
    phase: str
    measured: float
    modelled: float

    @property
    def relative(self) -> float:
        return (self.modelled - self.measured) / self.measured


@dataclass(frozen=True, slots=True)
class ErrorStats:
    rows: int
    median_abs: float
    p90_abs: float
    bias: float  # median signed relative error: negative when the model is too fast (or too low)


def device_of(row: Measurement, params: PerfParams | None = None) -> Device:
    """The row's GPUs under the given constants (None: the default engine profile's)."""
    if params is None:
        return Device(row.gpu, row.tp, power_limit_w=row.power_limit_w)
    return Device(row.gpu, row.tp, power_limit_w=row.power_limit_w, params=params)


def _prefill_tokens(row: Measurement) -> int:
    return row.batch * row.prompt_tokens


def _prefill(row: Measurement, params: PerfParams | None) -> perf.StepCost:
    return perf.prefill_cost(device_of(row, params), row.model, _prefill_tokens(row), 0, row.batch)


def modelled_prefill_ms(row: Measurement, params: PerfParams | None = None) -> float:
    return 1e3 * _prefill(row, params).time_s


def modelled_decode_step_ms(row: Measurement, params: PerfParams | None = None) -> float:
    return 1e3 * perf.decode_step_time_s(device_of(row, params), row.model, row.batch, row.batch * row.context_tokens)


def _prefill_power_per_gpu_w(row: Measurement, params: PerfParams | None) -> float:
    return perf.power_w(device_of(row, params), _prefill(row, params).activity) / row.tp


def modelled_mean_power_w(row: Measurement, params: PerfParams | None = None) -> float:
    """Per GPU, over the row's request: its prefill when the row has a prefill time, then decode steps from the
    prompt to twice the row's context beyond it (a row with no decode beyond its prompt: one step at its
    context)."""
    device = device_of(row, params)
    prefill_s = prefill_j = 0.0
    if row.prefill_ms and row.prompt_tokens > 0:
        prefill_s = _prefill(row, params).time_s
        prefill_j = _prefill_power_per_gpu_w(row, params) * row.tp * prefill_s
    steps = max(2 * (row.context_tokens - row.prompt_tokens), 0)
    start = row.batch * row.prompt_tokens
    if steps == 0 and prefill_s == 0.0:
        steps, start = 1, row.batch * row.context_tokens
    decode = perf.decode_run(device, row.model, row.batch, start)
    decode_s, decode_j = decode.time_s(steps), decode.energy_j(steps)
    return (prefill_j + decode_j) / (prefill_s + decode_s) / row.tp


def row_errors(rows: Iterable[Measurement], params: PerfParams | None = None) -> list[RowError]:
    """Every measured column of every row against the model: prefill and decode times, prefill power (rows
    with a prompt), mean power (with or without a prefill time)."""
    errors: list[RowError] = []
    for row in rows:
        if row.prefill_ms:
            errors.append(RowError(row, "prefill", row.prefill_ms, modelled_prefill_ms(row, params)))
        if row.decode_step_ms:
            errors.append(RowError(row, "decode", row.decode_step_ms, modelled_decode_step_ms(row, params)))
        if row.prefill_power_w and row.prompt_tokens > 0:
            errors.append(RowError(row, "prefill_power", row.prefill_power_w, _prefill_power_per_gpu_w(row, params)))
        if row.mean_power_w:
            errors.append(RowError(row, "mean_power", row.mean_power_w, modelled_mean_power_w(row, params)))
    return errors


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def stats(errors: Sequence[RowError]) -> ErrorStats:
    absolute = sorted(abs(e.relative) for e in errors)
    signed = [e.relative for e in errors]
    return ErrorStats(len(errors), _quantile(absolute, 0.5), _quantile(absolute, 0.9), statistics.median(signed))


def grouped(errors: Iterable[RowError]) -> dict[tuple[str, str, int, str], list[RowError]]:
    """Errors by (model, GPU, TP, phase)."""
    groups: dict[tuple[str, str, int, str], list[RowError]] = defaultdict(list)
    for e in errors:
        groups[(e.row.model.name, e.row.gpu.product, e.row.tp, e.phase)].append(e)
    return dict(sorted(groups.items()))


def by_phase(errors: Iterable[RowError], phase: str, tp: int | None = None) -> list[RowError]:
    return [e for e in errors if e.phase == phase and (tp is None or e.row.tp == tp)]


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%" if x < 0 else f"{100 * x:.1f}%"


def report(errors: Sequence[RowError], *, worst: int = 5, title: str = "") -> str:
    """A plain-text table: per model / GPU / TP and phase, then per phase and TP, then the worst rows."""
    lines = [title] if title else []
    header = f"{'model':<14}{'gpu':<10}{'tp':>3}  {'phase':<14}{'rows':>5}{'median|e|':>11}{'p90|e|':>9}{'bias':>9}"
    lines.append(header)
    for (model, gpu, tp, phase), group in grouped(errors).items():
        s = stats(group)
        lines.append(
            f"{model:<14}{gpu:<10}{tp:>3}  {phase:<14}{s.rows:>5}{_pct(s.median_abs):>11}{_pct(s.p90_abs):>9}"
            f"{_pct(s.bias):>9}"
        )
    lines.append("")
    lines.append("all models and GPUs, per phase and TP:")
    for phase in PHASES:
        for tp in sorted({e.row.tp for e in errors}):
            group = by_phase(errors, phase, tp)
            if group:
                s = stats(group)
                lines.append(
                    f"  {phase:<14} tp={tp}: rows {s.rows:>4}  median|e| {_pct(s.median_abs):>7}  "
                    f"p90|e| {_pct(s.p90_abs):>7}  bias {_pct(s.bias):>7}"
                )
    if worst > 0 and errors:
        lines.append("")
        lines.append(f"worst {worst} rows (line: model gpu tp batch prompt context phase measured -> modelled):")
        for e in sorted(errors, key=lambda e: -abs(e.relative))[:worst]:
            r = e.row
            lines.append(
                f"  {r.line}: {r.model.name} {r.gpu.product} tp={r.tp} batch={r.batch} prompt={r.prompt_tokens} "
                f"context={r.context_tokens} {e.phase} {e.measured:.1f} -> {e.modelled:.1f} ({_pct(e.relative)})"
            )
    return "\n".join(lines)
