"""A DecoderPool as its scheduler's settings: the one derivation the operator and the simulator share.

Everything the scheduler needs from a pool's spec is derived here, so the two worlds cannot drift: placement
weights and headroom, whenFull, the idle timeout, the KV lifecycle's bounds and opt-in timers, the host KV tier
(per decoder GPU, so a decoder of n GPUs has n times it), the write-back time of a KV token to host memory, and
each decoder's modelled J/token (the energy scorer's prior until the energy loop measures one).
"""

from __future__ import annotations

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.api.slo import SloSpec
from conserve.core.engine_profiles import lookup_profile
from conserve.core.gpus import lookup_product
from conserve.core.lifecycle import LifecycleSettings
from conserve.core.llm import ModelShape
from conserve.core.offload import HOST_KV_BYTES_PER_GPU, PCIE_GEN5_X16_BYTES_PER_S
from conserve.core.pd import PdRule, PdSettings
from conserve.core.perf import Device, decode_energy_per_token_j
from conserve.core.placement import PlacementSettings, PlacementWeights, TierPolicy
from conserve.core.scheduler import SchedulerSettings
from conserve.core.slo import SloClass, SloPolicy

#: Reference operating point of the energy prior (the extender's node scoring uses the same point): a decode
#: batch of 32 sequences of 2048 tokens.
ENERGY_PRIOR_BATCH = 32
ENERGY_PRIOR_CONTEXT_TOKENS = 2048


def scheduler_settings(
    spec: DecoderPoolSpec, *, host_kv_bytes_per_gpu: float = HOST_KV_BYTES_PER_GPU
) -> SchedulerSettings:
    """The pool's spec as its scheduler's settings. `host_kv_bytes_per_gpu`: host memory given to KV per GPU
    when the pool declares no per-decoder figure (core.offload's default; a simulated fleet may set another)."""
    p = spec.placement
    w = p.weights
    lc = spec.kv_lifecycle
    kv_bytes = spec.model.resolved_kv_bytes_per_token() or 0
    per_gpu = int(host_kv_bytes_per_gpu // kv_bytes) if kv_bytes and lc.enabled else 0
    declared = lc.host_kv_tokens_per_decoder if lc.enabled else 0
    return SchedulerSettings(
        placement=PlacementSettings(
            headroom_fraction=p.headroom_fraction,
            tier_policy=TierPolicy(p.tier_policy),
            weights=PlacementWeights(w.kv_balance, w.kv_pack, w.tier, w.energy, w.conversations, w.load),
        ),
        reject_when_full=p.when_full == "Reject",
        max_queue_wait_s=float(p.max_queue_wait_seconds),
        slo=slo_policy(spec),
        default_idle_timeout_s=float(spec.default_idle_timeout_seconds),
        lifecycle=LifecycleSettings(
            enabled=lc.enabled,
            host_kv_tokens_per_gpu=per_gpu,
            host_kv_tokens_per_decoder=declared,
            max_active_window_s=float(lc.max_active_window_seconds),
            max_resident_ttl_s=_optional_seconds(lc.max_resident_ttl_seconds),
            max_host_ttl_s=_optional_seconds(lc.max_host_ttl_seconds),
            # vLLM and LMCache write a finished request's KV to host memory asynchronously, over PCIe.
            writeback_s_per_kv_token=kv_bytes / PCIE_GEN5_X16_BYTES_PER_S,
        ),
    )


def slo_policy(spec: DecoderPoolSpec) -> SloPolicy | None:
    """The pool's SLO (`spec.slo`) as the scheduler, the router and the operator's accounting use it."""
    return slo_policy_from(spec.slo) if spec.slo is not None else None


def slo_policy_from(slo: SloSpec) -> SloPolicy:
    """`spec.slo` as `conserve.core.slo` holds it (a class's missing targets are the pool's)."""
    classes = {
        c.name: SloClass(c.name, c.priority, c.ttfet_seconds or slo.ttfet_seconds, c.tbt_seconds or slo.tbt_seconds)
        for c in slo.classes
    }
    return SloPolicy(slo.ttfet_seconds, slo.tbt_seconds, slo.attainment_target, classes, slo.default_class)


def pd_settings(spec: DecoderPoolSpec) -> PdSettings:
    """The pool's P/D decider settings (`spec.prefillDecider`), for the router, the operator and the simulator."""
    d = spec.prefill_decider
    return PdSettings(
        rule=PdRule(d.rule.lower()),
        decoder_max_tokens=d.decoder_max_tokens,
        stall_weight=d.stall_weight,
        kv_link_bytes_per_s=d.kv_link_gbps * 1e9 / 8,
        kv_bytes_per_token=spec.model.resolved_kv_bytes_per_token() or 0,
    )


def _optional_seconds(value: int | None) -> float | None:
    return float(value) if value is not None else None


def energy_prior_j(spec: DecoderPoolSpec, gpu_product: str, gpu_count: int) -> float | None:
    """Modelled J per output token of a decoder (its GPU product, its GPUs) for the pool's model; None when
    the product or the model is unknown."""
    gpu = lookup_product(gpu_product) if gpu_product else None
    shape = spec.model.resolved_shape()
    if gpu is None or shape is None:
        return None
    device = Device(gpu, max(gpu_count, 1), params=lookup_profile(spec.engine_profile).params)
    return decoder_energy_prior_j(device, shape)


def decoder_energy_prior_j(device: Device, model: ModelShape) -> float:
    return decode_energy_per_token_j(device, model, ENERGY_PRIOR_BATCH, ENERGY_PRIOR_CONTEXT_TOKENS)
