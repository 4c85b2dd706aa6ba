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

from conserve.api.decoderpool import DecoderPoolSpec
from conserve.api.labels import ANNOTATION_ENDPOINT
from conserve.controller.state import DecoderInfo, NodeInfo, PodInfo, PoolRuntime, World, key_of
from conserve.core.gpus import RESOURCE_GPU, Tier
from conserve.core.llm import kv_capacity_tokens
from conserve.core.placement import DecoderState

log = logging.getLogger("conserve.operator")

ENDPOINT_ANNOTATION = ANNOTATION_ENDPOINT


def pod_info(body: dict[str, Any]) -> PodInfo:
    meta = body.get("metadata", {})
    spec = body.get("spec", {})
    status = body.get("status", {})
    ready = (
        not meta.get("deletionTimestamp")
        and status.get("phase") == "Running"
        and any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    )
    return PodInfo(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        labels=dict(meta.get("labels") or {}),
        node=spec.get("nodeName") or "",
        ready=bool(ready),
        ip=status.get("podIP") or "",
        endpoint_annotation=(meta.get("annotations") or {}).get(ENDPOINT_ANNOTATION, ""),
        gpus=_pod_gpus(spec),
        uid=meta.get("uid", ""),
    )


def _pod_gpus(spec: dict[str, Any]) -> int:
    total = 0
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(RESOURCE_GPU) or (resources.get("requests") or {}).get(RESOURCE_GPU)
        try:
            total += int(str(value)) if value is not None else 0
        except ValueError:
            continue
    return total


def decoder_info(pod: PodInfo, node: NodeInfo | None, spec: DecoderPoolSpec) -> DecoderInfo:
    gpu = node.gpu if node is not None else None
    endpoint = pod.endpoint_annotation or (f"{pod.ip}:{spec.endpoint.port}" if pod.ip else "")
    info = DecoderInfo(
        pod=pod.name,
        node=pod.node,
        tier=gpu.tier.value if gpu is not None and gpu.tier is not None else "",
        gpu_product=gpu.product if gpu is not None else "",
        ready=pod.ready,
        endpoint=endpoint,
    )
    declared = spec.kv_capacity.tokens_per_decoder
    if declared is not None:
        info.capacity_kv_tokens = declared
        return info
    shape = spec.model.resolved_shape()
    if gpu is None or gpu.memory_bytes_per_gpu <= 0:
        info.problem = "node has no GPU memory label (nvidia.com/gpu.memory): declare kvCapacity.tokensPerDecoder"
        return info
    if shape is None:
        # Only the KV size is known (kvBytesPerToken without a shape): no weights to subtract.
        kv_bytes = spec.model.resolved_kv_bytes_per_token() or 1
        usable = gpu.memory_bytes_per_gpu * max(pod.gpus, 1) * spec.kv_capacity.gpu_memory_fraction
        info.capacity_kv_tokens = int(usable // kv_bytes)
        return info
    if spec.model.kv_bytes_per_token is not None:
        shape = _with_kv_bytes(shape, spec.model.kv_bytes_per_token)
    info.capacity_kv_tokens = kv_capacity_tokens(
        gpu_memory_bytes=gpu.memory_bytes_per_gpu,
        gpu_count=max(pod.gpus, 1),
        model=shape,
        memory_fraction=spec.kv_capacity.gpu_memory_fraction,
    )
    if info.capacity_kv_tokens <= 0:
        info.problem = "the model's weights do not leave room for KV cache on this GPU"
    return info


def _with_kv_bytes(shape: Any, kv_bytes: int) -> Any:
    # An explicit kvBytesPerToken wins over the shape's: scale bytes per element to match it.
    per_element_units = 2 * shape.layers * shape.kv_heads * shape.head_dim
    return replace(shape, bytes_per_element=max(kv_bytes // per_element_units, 1))


def decoder_state(info: DecoderInfo, energy_per_token_j: float | None) -> DecoderState:
    return DecoderState(
        name=info.pod,
        node=info.node,
        tier=Tier(info.tier) if info.tier else None,
        ready=info.ready and not info.problem,
        capacity_kv_tokens=info.capacity_kv_tokens,
        energy_per_token_j=energy_per_token_j,
    )


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
        energy = pool.energy.get(name)
        pool.ledger.upsert_decoder(decoder_state(info, energy.energy_per_token_j if energy else None))
    for name in gone:
        pool.ledger.decoders.pop(name, None)  # holdings stay until the engine moves them
    pool.decoders = new_decoders
    pool.prefills = new_prefills
    return sorted(gone), sorted(unready), grew


def _selected(world: World, pool: PoolRuntime) -> tuple[dict[str, DecoderInfo], dict[str, DecoderInfo]]:
    """The pool's decoders and prefill servers among the pods known, by pod name."""
    decoders: dict[str, DecoderInfo] = {}
    prefills: dict[str, DecoderInfo] = {}
    spec = pool.spec
    if spec is None:
        return decoders, prefills
    for pod in world.pods.values():
        if pod.namespace != pool.namespace:
            continue
        node = world.nodes.get(pod.node)
        if spec.decoder_selector.matches(pod.labels):
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
    if pod is not None and spec.decoder_selector.matches(pod.labels):
        info = decoder_info(pod, world.nodes.get(pod.node), spec)
        pool.decoders[name] = info
        energy = pool.energy.get(name)
        pool.ledger.upsert_decoder(decoder_state(info, energy.energy_per_token_j if energy else None))
        unready = [name] if old is not None and old.ready and not info.ready else []
        grew = info.ready and (old is None or not old.ready or old.capacity_kv_tokens < info.capacity_kv_tokens)
        return [], unready, grew
    if pod is not None and spec.prefill_selector is not None and spec.prefill_selector.matches(pod.labels):
        pool.prefills[name] = decoder_info(pod, world.nodes.get(pod.node), spec)
    if old is None:
        return [], [], False
    del pool.decoders[name]
    pool.ledger.decoders.pop(name, None)  # holdings stay until the engine moves them
    return [name], [], False


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


async def resync(engine: Any, pool: PoolRuntime, pod: str | None = None) -> None:
    """Re-derive the pool's decoders (or one pod's); move conversations off lost ones; place waiting ones if
    room grew."""
    async with pool.lock:
        if pod is None:
            gone, unready, grew = sync_pool(engine.world, pool)
        else:
            gone, unready, grew = sync_pod(engine.world, pool, pod)
    lost = gone + unready
    if lost:
        log.info("pool %s lost decoders %s", pool.key, lost)
        engine.post_pool_event(pool, "DecoderLost", f"decoders gone or not ready: {', '.join(lost)}", warning=True)
        await engine.decoders_lost(pool, lost)
    engine.on_pool_changed(pool)
    if grew or lost:
        await engine.drain(pool)


# --- watch handlers -------------------------------------------------------------------------------------------


async def on_pod_event(engine: Any, event_type: str | None, body: dict[str, Any]) -> None:
    world: World = engine.world
    meta = body.get("metadata", {})
    key = key_of(meta.get("namespace", ""), meta.get("name", ""))
    old = world.pods.get(key)
    if event_type == "DELETED":
        world.pods.pop(key, None)
        new = None
    else:
        new = pod_info(body)
        if old is not None and old == new:
            return
        world.pods[key] = new
    label_sets = [p.labels for p in (old, new) if p is not None]
    namespace = meta.get("namespace", "")
    for pool in pools_selecting(world, namespace, *label_sets):
        await resync(engine, pool, pod=meta.get("name", ""))


async def on_node_event(engine: Any, event_type: str | None, body: dict[str, Any]) -> None:
    world: World = engine.world
    meta = body.get("metadata", {})
    name = meta.get("name", "")
    old = world.nodes.get(name)
    if event_type == "DELETED":
        world.nodes.pop(name, None)
    else:
        node = NodeInfo.from_labels(name, meta.get("labels") or {})
        if old is not None and old.labels == node.labels:
            return
        world.nodes[name] = node
    affected: dict[str, PoolRuntime] = {}
    for pod in pods_on_node(world, name):
        for pool in pools_selecting(world, pod.namespace, pod.labels):
            affected[pool.key] = pool
    for pool in affected.values():
        await resync(engine, pool)
