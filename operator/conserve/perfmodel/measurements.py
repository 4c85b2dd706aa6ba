"""Reading measurement and model-shape CSV files, and the packaged calibration data.

Measurement columns: model, gpu, tp, batch, prompt_tokens, context_tokens, prefill_ms, decode_step_ms (either
time may be empty); optional: power_limit_w (per GPU), prefill_power_w and mean_power_w (per GPU, watts), dtype
(`fp16`/`bf16`, the default, or `fp8`: 8-bit weights and KV cache at twice the 16-bit tensor rate, on GPUs that
have FP8: Ada, Hopper, Blackwell).
- prefill_ms: one prefill step of `batch` prompts of `prompt_tokens` each;
- decode_step_ms: one decode step of `batch` sequences whose mean context is `context_tokens` each;
- prefill_power_w: board power per GPU during the prefill; mean_power_w: per GPU over a request of the row
  (its prefill, then decode steps to twice the context beyond the prompt).
Shape columns: name, parameters, layers, hidden_size, attention_heads, kv_heads, head_dim, ffn_size, vocab_size.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from conserve.core.gpus import GpuSpec, lookup_product
from conserve.core.llm import MODELS, ModelShape, lookup_model

REQUIRED_COLUMNS = ("model", "gpu", "tp", "batch", "prompt_tokens", "context_tokens", "prefill_ms", "decode_step_ms")
SHAPE_COLUMNS = ("name", "layers", "hidden_size", "attention_heads", "kv_heads")
#: Packaged data sets (see data/README.md), each with the engine profile it describes: the fit sets, then the
#: held-out set (never fitted on).
FIT_DATA: dict[str, str] = {"splitwise.csv": "vllm-2023", "tensorrt_llm_v0_9.csv": "tensorrt-llm"}
HELD_OUT_DATA: dict[str, str] = {"tensorrt_llm_a100.csv": "tensorrt-llm"}
SHAPES_DATA = "shapes.csv"
#: GPU products with an FP8 tensor rate (twice their 16-bit rate): Ada, Hopper, Blackwell.
FP8_PRODUCTS = frozenset({"H100", "H100-PCIE", "H200", "H20", "L40S", "L4", "B200"})


class MeasurementError(ValueError):
    """A CSV row that cannot be used, naming the file, line, field and reason."""


@dataclass(frozen=True, slots=True)
class Measurement:
    model: ModelShape
    gpu: GpuSpec
    tp: int
    batch: int
    prompt_tokens: int
    context_tokens: int
    prefill_ms: float | None
    decode_step_ms: float | None
    power_limit_w: float | None = None
    prefill_power_w: float | None = None
    mean_power_w: float | None = None
    line: int = 0


def data_path(name: str) -> Path:
    """A packaged data file (found by the installed command as well as from a checkout)."""
    return Path(str(resources.files("conserve.perfmodel").joinpath("data", name)))


def _number(row: Mapping[str, str], key: str, where: str, *, integer: bool, required: bool) -> float | None:
    raw = (row.get(key) or "").strip()
    if not raw:
        if required:
            raise MeasurementError(f"{where}: field '{key}' is empty")
        return None
    try:
        value = float(raw)
    except ValueError:
        raise MeasurementError(f"{where}: field '{key}' is not a number: {raw!r}") from None
    if value < 0 or (integer and value != int(value)):
        raise MeasurementError(f"{where}: field '{key}' must be a non-negative {'integer' if integer else 'number'}")
    return value


def load_shapes(path: Path) -> dict[str, ModelShape]:
    """Model shapes declared in a CSV file; parameters are counted from the dimensions when left empty."""
    shapes: dict[str, ModelShape] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in SHAPE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise MeasurementError(f"{path}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            ints = {k: int(_number(row, k, where, integer=True, required=True) or 0) for k in SHAPE_COLUMNS[1:]}
            hidden, heads = ints["hidden_size"], ints["attention_heads"]
            head_dim = int(_number(row, "head_dim", where, integer=True, required=False) or hidden // max(heads, 1))
            ffn = int(_number(row, "ffn_size", where, integer=True, required=False) or 4 * hidden)
            vocab = int(_number(row, "vocab_size", where, integer=True, required=False) or 0)
            parameters = _number(row, "parameters", where, integer=False, required=False)
            if parameters is None:  # attention (Q, O full; K, V per KV head) + gated MLP, untied embeddings
                per_layer = 2 * hidden * heads * head_dim + 2 * hidden * ints["kv_heads"] * head_dim + 3 * hidden * ffn
                parameters = float(ints["layers"] * per_layer + 2 * vocab * hidden)
            name = row["name"].strip().lower()
            shapes[name] = ModelShape(
                name,
                parameters,
                ints["layers"],
                hidden,
                heads,
                ints["kv_heads"],
                head_dim,
                ffn_size=ffn,
                vocab_size=vocab,
            )
    return shapes


def known_shapes(extra: Iterable[Path] = ()) -> dict[str, ModelShape]:
    """The catalog's models, the packaged shapes, then any declared in `extra` files (later ones win)."""
    shapes = dict(MODELS)
    shapes.update(load_shapes(data_path(SHAPES_DATA)))
    for path in extra:
        shapes.update(load_shapes(path))
    return shapes


def _model(name: str, shapes: Mapping[str, ModelShape], where: str) -> ModelShape:
    found = shapes.get(name.strip().lower()) or lookup_model(name)
    if found is None:
        raise MeasurementError(f"{where}: field 'model': unknown model {name!r} (declare its shape with --shapes)")
    return found


def _measurement(row: Mapping[str, str], where: str, line: int, shapes: Mapping[str, ModelShape]) -> Measurement:
    gpu = lookup_product(row["gpu"])
    if gpu is None:
        raise MeasurementError(f"{where}: field 'gpu': unknown GPU {row['gpu']!r} (see core/gpus.py CATALOG)")

    def num(key: str, required: bool = False, integer: bool = False) -> float | None:
        return _number(row, key, where, integer=integer, required=required)

    tp, batch = int(num("tp", True, True) or 0), int(num("batch", True, True) or 0)
    if tp < 1 or batch < 1:
        raise MeasurementError(f"{where}: fields 'tp' and 'batch' must be at least 1")
    prompt = int(num("prompt_tokens", integer=True) or 0)
    context = int(num("context_tokens", integer=True) or prompt)
    prefill, decode = num("prefill_ms"), num("decode_step_ms")
    if prefill is None and decode is None:
        raise MeasurementError(f"{where}: fields 'prefill_ms' and 'decode_step_ms' are both empty")
    if prefill is not None and prompt < 1:
        raise MeasurementError(f"{where}: field 'prompt_tokens' must be at least 1 with a prefill time")
    model = _model(row["model"], shapes, where)
    dtype = (row.get("dtype") or "bf16").strip().lower()
    if dtype == "fp8":
        if gpu.product not in FP8_PRODUCTS:
            raise MeasurementError(f"{where}: field 'dtype': {gpu.product} has no FP8 tensor rate")
        model = dataclasses.replace(model, bytes_per_element=1)
        gpu = dataclasses.replace(gpu, bf16_flops_per_s=2 * gpu.bf16_flops_per_s)
    elif dtype not in ("bf16", "fp16"):
        raise MeasurementError(f"{where}: field 'dtype' must be bf16, fp16 or fp8, not {dtype!r}")
    power = (num("power_limit_w"), num("prefill_power_w"), num("mean_power_w"))
    return Measurement(model, gpu, tp, batch, prompt, context, prefill, decode, *power, line=line)


def load_measurements(path: Path, shapes: Mapping[str, ModelShape]) -> list[Measurement]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise MeasurementError(f"{path}: missing column(s) {', '.join(missing)}")
        return [_measurement(row, f"{path}:{line}", line, shapes) for line, row in enumerate(reader, start=2)]
