"""Engine profiles: the performance model's constants for one serving engine and version, by name.

An engine's fixed costs differ by engine and version: vLLM in 2023 ran every decode step from Python (about
9 ms per step and 0.34 ms per sequence on Splitwise's measurements), while engines that replay decode steps as
CUDA graphs (vLLM >= 0.6 with CUDA graphs, SGLang, TensorRT-LLM) pay far less. A profile names one set of
constants (`PerfParams`); a fleet file (`engine_profile`) and a DecoderPool (`spec.engineProfile`) choose one.

Every profile's constants come from `conserve perf-model fit` on the data named in its `source`
(operator/conserve/perfmodel/data/README.md gives the data's origin and license and the fitting procedure).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PerfParams:
    """The model's calibration constants (units in names); see core/perf.py for where each enters."""

    prefill_step_overhead_s: float
    decode_step_overhead_s: float
    decode_per_sequence_s: float
    gemm_mfu_max: float
    gemm_half_tokens: float
    attention_mfu: float
    decode_mbu: float
    allreduce_hop_latency_s: float
    #: Share of the dynamic power range (TDP less idle) drawn while HBM streams at its peak bandwidth.
    memory_power_weight: float = 1.0
    #: Share of the dynamic power range drawn while the tensor cores run at their peak rate.
    compute_power_weight: float = 1.0
    allreduce_link_efficiency: float = 0.7  # nccl-tests bus bandwidth vs NVLink peak (see core/perf.py)
    clock_power_exponent: float = 1.0 / 3.0  # P_dynamic ~ f^3 on the DVFS curve (see core/perf.py)

    def gemm_mfu(self, tokens: float) -> float:
        return self.gemm_mfu_max * tokens / (tokens + self.gemm_half_tokens)


@dataclass(frozen=True, slots=True)
class EngineProfile:
    name: str
    description: str
    source: str  # the data set(s) its constants were fitted on (perfmodel/data)
    params: PerfParams


#: vLLM 2023 (no CUDA graphs): data/splitwise.csv. Its time constants are the project's first fit, kept as
#: data; its power weights: `conserve perf-model fit --profile vllm-2023 --fields power` (loss 0.678 -> 0.402).
VLLM_2023 = PerfParams(
    prefill_step_overhead_s=0.010442,
    decode_step_overhead_s=0.0093908,
    decode_per_sequence_s=0.000335722,
    gemm_mfu_max=0.499715,
    gemm_half_tokens=1.0,
    attention_mfu=0.380089,
    decode_mbu=0.767348,
    allreduce_hop_latency_s=6.33756e-06,
    memory_power_weight=1.14037,
    compute_power_weight=3.0,  # the fit's upper bound: a prefill at a third of the peak rate reaches the limit
)

#: Engines that replay decode as CUDA graphs: `conserve perf-model fit --profile tensorrt-llm --fields time` on
#: data/tensorrt_llm_v0_9.csv (loss 1.382 -> 0.276); power weights from the vllm-2023 fit (the only power
#: data; they describe the GPUs, not the engine).
CUDA_GRAPHS = PerfParams(
    prefill_step_overhead_s=0.00417543,
    decode_step_overhead_s=0.00405877,
    decode_per_sequence_s=3.69188e-05,
    gemm_mfu_max=0.548278,
    gemm_half_tokens=1.0,
    attention_mfu=1.0,  # the fit's upper bound
    decode_mbu=0.97736,
    allreduce_hop_latency_s=1.92574e-05,
    memory_power_weight=VLLM_2023.memory_power_weight,
    compute_power_weight=VLLM_2023.compute_power_weight,
)

PROFILES: Mapping[str, EngineProfile] = {
    "vllm-cuda-graphs": EngineProfile(
        "vllm-cuda-graphs",
        "current vLLM (V1 engine, CUDA graphs); until licensed vLLM >= 0.10 step timings are added, the "
        "CUDA-graph engines' fit",
        "tensorrt_llm_v0_9.csv",
        CUDA_GRAPHS,
    ),
    "tensorrt-llm": EngineProfile(
        "tensorrt-llm", "TensorRT-LLM (in-flight batching, CUDA graphs)", "tensorrt_llm_v0_9.csv", CUDA_GRAPHS
    ),
    "vllm-2023": EngineProfile(
        "vllm-2023", "vLLM as measured for Splitwise (2023, decode from Python)", "splitwise.csv", VLLM_2023
    ),
}

#: The profile used where none is chosen: a current vLLM.
DEFAULT_PROFILE = "vllm-cuda-graphs"
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)


def lookup_profile(name: str | None) -> EngineProfile:
    """The profile called `name` (None: the default); an unknown name raises ValueError naming the known ones."""
    key = DEFAULT_PROFILE if name is None else name.strip().lower()
    if key not in PROFILES:
        raise ValueError(f"unknown engine profile {name!r} (known: {', '.join(PROFILES)})")
    return PROFILES[key]
