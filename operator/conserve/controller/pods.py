"""Decoder discovery: pods chosen by a pool's selectors, and their nodes' GPU Feature Discovery labels.

A decoder is a pod that matches the pool's decoderSelector; it takes conversations while its Ready condition is
True and it is not terminating. Its tier and GPU come from its node's labels (core.gpus); its KV capacity is the
pool's declared `kvCapacity.tokensPerDecoder`, or derived from the node's GPU memory, the GPUs the pod requests,
the model's KV bytes per token and `kvCapacity.gpuMemoryFraction` (core.llm.kv_capacity_tokens).
Its endpoint is the pod annotation `conserve.dev/endpoint` (host:port, set by the local GPU simulator and by any
data plane that fronts pods) or else podIP:spec.endpoint.port.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from conserve.api.conversation import MAX_ENDPOINT_LENGTH
from conserve.api.corev1 import Pod
from conserve.api.decoderpool import DecoderPoolSpec
from conserve.api.scheduling import energy_prior_j
from conserve.controller.state import DecoderInfo, NodeInfo, PodInfo, PoolRuntime, World, key_of
from conserve.core.gpus import NodeGpu, Tier
from conserve.core.llm import ModelShape, kv_capacity_tokens
from conserve.core.placement import DecoderState
from conserve.core.prefill import PrefillState

log = logging.getLogger("conserve.operator")


def pod_info(body: dict[str, Any]) -> PodInfo:
    pod = Pod.model_validate(body)
    meta = pod.metadata
    return PodInfo(
        namespace=meta.namespace,
        name=meta.name,
        labels=meta.labels,
        node=pod.spec.node_name,
        ready=pod.ready,
        ip=pod.status.pod_ip,
        endpoint_annotation=pod.endpoint,
        gpus=pod.gpus,
        uid=meta.uid,
        leaving=pod.terminating or pod.finished,
    )


def decoder_info(pod: PodInfo, node: NodeInfo | None, spec: DecoderPoolSpec) -> DecoderInfo:
    gpu = node.gpu if node is not None else None
    capacity, problem = _kv_capacity(pod, gpu, spec)
    endpoint = pod.endpoint_annotation or (f"{pod.ip}:{spec.endpoint.port}" if pod.ip else "")
    if len(endpoint) > MAX_ENDPOINT_LENGTH:  # the status could not hold it: the API server would refuse the pool's
        endpoint, problem = "", f"endpoint annotation longer than {MAX_ENDPOINT_LENGTH} characters"
    return DecoderInfo(
        pod=pod.name,
        node=pod.node,
        tier=gpu.tier.value if gpu is not None and gpu.tier is not None else "",
        gpu_product=gpu.product if gpu is not None else "",
        ready=pod.ready,
        endpoint=endpoint,
        capacity_kv_tokens=capacity,
        gpu_count=max(pod.gpus, 1),
        problem=problem,
        leaving=pod.leaving,
    )


def _kv_capacity(pod: PodInfo, gpu: NodeGpu | None, spec: DecoderPoolSpec) -> tuple[int, str]:
    """The decoder's KV capacity in tokens, and why it cannot take conversations ("" when it can)."""
    declared = spec.kv_capacity.tokens_per_decoder
    if declared is not None:
        return declared, ""
    shape = spec.model.resolved_shape()
    if gpu is None or gpu.memory_bytes_per_gpu <= 0:
        return 0, "node has no GPU memory label (nvidia.com/gpu.memory): declare kvCapacity.tokensPerDecoder"
    if shape is None:
        # Only the KV size is known (kvBytesPerToken without a shape): no weights to subtract.
        kv_bytes = spec.model.resolved_kv_bytes_per_token() or 1
        usable = gpu.memory_bytes_per_gpu * max(pod.gpus, 1) * spec.kv_capacity.gpu_memory_fraction
        return int(usable // kv_bytes), ""
    if spec.model.kv_bytes_per_token is not None:
        shape = _with_kv_bytes(shape, spec.model.kv_bytes_per_token)
    capacity = kv_capacity_tokens(
        gpu_memory_bytes=gpu.memory_bytes_per_gpu,
        gpu_count=max(pod.gpus, 1),
        model=shape,
        memory_fraction=spec.kv_capacity.gpu_memory_fraction,
    )
    return capacity, "" if capacity > 0 else "the model's weights do not leave room for KV cache on this GPU"


def _with_kv_bytes(shape: ModelShape, kv_bytes: int) -> ModelShape:
    # An explicit kvBytesPerToken wins over the shape's: scale bytes per element to match it.
    per_element_units = 2 * shape.layers * shape.kv_heads * shape.head_dim
    return replace(shape, bytes_per_element=max(kv_bytes // per_element_units, 1))


def decoder_state(info: DecoderInfo, spec: DecoderPoolSpec | None) -> DecoderState:
    """The decoder as the scheduler's table holds it: the modelled J/token as the energy scorer's prior (the
    scheduler keeps a measured one over it)."""
    return DecoderState(
        name=info.pod,
        node=info.node,
        tier=Tier(info.tier) if info.tier else None,
        ready=info.serving,
        capacity_kv_tokens=info.capacity_kv_tokens,
        gpu_count=info.gpu_count,
        energy_per_token_j=energy_prior_j(spec, info.gpu_product, info.gpu_count) if spec is not None else None,
    )


def prefill_states(pool: PoolRuntime) -> list[PrefillState]:
    return [PrefillState(p.pod, Tier(p.tier) if p.tier else None, p.ready) for p in pool.prefills.values()]


def sync_pool(world: World, pool: PoolRuntime) -> tuple[list[str], list[str], bool]:
    """Recompute the pool's decoders and prefills from the pods and nodes known; update the ledger.

    Returns (decoders gone, decoders now unready, whether capacity may have grown). Call under the pool's lock.
    """
    gone: list[str] = []
    unready: list[str] = []
    grew = False
    new_decoders, new_prefills = _selected(world, pool)
    for name, old in pool.decoders.items():
        if name not in new_decoders:
            gone.append(name)
        elif old.ready and not new_decoders[name].ready:
            unready.append(name)
    for name, info in new_decoders.items():
        old_info = pool.decoders.get(name)
        was_smaller = old_info is None or not old_info.ready or old_info.capacity_kv_tokens < info.capacity_kv_tokens
        if info.ready and was_smaller:
            grew = True
        pool.scheduler.decoder_changed(decoder_state(info, pool.spec))
    for name in gone:
        pool.scheduler.decoder_removed(name)  # holdings stay until the engine moves them
    pool.decoders = new_decoders
    pool.prefills = new_prefills
    pool.scheduler.set_prefills(prefill_states(pool))
    return sorted(gone), sorted(unready), grew


def _selected(world: World, pool: PoolRuntime) -> tuple[dict[str, DecoderInfo], dict[str, DecoderInfo]]:
    """The pool's decoders and prefill servers among the pods known, by pod name."""
    decoders: dict[str, DecoderInfo] = {}
    prefills: dict[str, DecoderInfo] = {}
    spec = pool.spec
    if spec is None:
        return decoders, prefills
    pool.overlapping = {}
    for pod in world.pods.values():
        if pod.namespace != pool.namespace:
            continue
        node = world.nodes.get(pod.node)
        if spec.decoder_selector.matches(pod.labels):
            if _claimed_elsewhere(world, pool, pod):
                continue
            decoders[pod.name] = decoder_info(pod, node, spec)
        elif spec.prefill_selector is not None and spec.prefill_selector.matches(pod.labels):
            prefills[pod.name] = decoder_info(pod, node, spec)
    return decoders, prefills


def sync_pod(world: World, pool: PoolRuntime, name: str) -> tuple[list[str], list[str], bool]:
    """`sync_pool` for one pod's change (a pod event costs that pod, not the whole namespace's pods)."""
    spec = pool.spec
    if spec is None:
        return [], [], False
    pod = world.pods.get(key_of(pool.namespace, name))
    old = pool.decoders.get(name)
    pool.prefills.pop(name, None)
    pool.overlapping.pop(name, None)
    if pod is not None and spec.decoder_selector.matches(pod.labels) and not _claimed_elsewhere(world, pool, pod):
        info = decoder_info(pod, world.nodes.get(pod.node), spec)
        pool.decoders[name] = info
        pool.scheduler.decoder_changed(decoder_state(info, pool.spec))
        pool.scheduler.set_prefills(prefill_states(pool))
        unready = [name] if old is not None and old.ready and not info.ready else []
        grew = info.ready and (old is None or not old.ready or old.capacity_kv_tokens < info.capacity_kv_tokens)
        return [], unready, grew
    if pod is not None and spec.prefill_selector is not None and spec.prefill_selector.matches(pod.labels):
        pool.prefills[name] = decoder_info(pod, world.nodes.get(pod.node), spec)
    pool.scheduler.set_prefills(prefill_states(pool))
    if old is None:
        return [], [], False
    del pool.decoders[name]
    pool.scheduler.decoder_removed(name)  # holdings stay until the engine moves them
    return [name], [], False


def decoder_owner(world: World, namespace: str, labels: dict[str, str]) -> PoolRuntime | None:
    """The pool a decode pod belongs to: of the namespace's pools whose decoderSelector matches it, the oldest
    (creation time, then name). A decoder's KV is booked by one pool only."""
    claims = [
        p
        for p in world.pools.values()
        if p.namespace == namespace and p.spec is not None and p.spec.decoder_selector.matches(labels)
    ]
    return min(claims, key=lambda p: p.created_key, default=None)


def _claimed_elsewhere(world: World, pool: PoolRuntime, pod: PodInfo) -> bool:
    """Whether an older pool holds this decode pod (then noted in `pool.overlapping`)."""
    owner = decoder_owner(world, pod.namespace, pod.labels)
    if owner is None or owner is pool:
        return False
    pool.overlapping[pod.name] = owner.name
    return True


def pools_selecting(world: World, namespace: str, *label_sets: dict[str, str]) -> list[PoolRuntime]:
    """The pools of a namespace whose decoder or prefill selector matches any of the label sets."""
    out = []
    for pool in world.pools.values():
        if pool.namespace != namespace or pool.spec is None:
            continue
        selectors = [pool.spec.decoder_selector]
        if pool.spec.prefill_selector is not None:
            selectors.append(pool.spec.prefill_selector)
        if any(sel.matches(labels) for sel in selectors for labels in label_sets):
            out.append(pool)
    return out


def pods_on_node(world: World, node: str) -> list[PodInfo]:
    return [p for p in world.pods.values() if p.node == node]


def pod_key(pod: PodInfo) -> str:
    return key_of(pod.namespace, pod.name)
