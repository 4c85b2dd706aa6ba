"""The energy loop without an operator in its process (`conserve energy`): each cycle lists the DecoderPools and
Conversations, parsed through the api models, and writes the pools' energy fields itself."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from pydantic import ValidationError

from conserve.api.conversation import PLURAL as CONVERSATIONS
from conserve.api.conversation import ConversationSpec, ConversationStatus
from conserve.api.decoderpool import PLURAL as DECODERPOOLS
from conserve.api.decoderpool import DecoderPoolStatus
from conserve.controller.energy_state import (
    Body,
    ConversationView,
    EnergySnapshot,
    PodFigureKey,
    ServingPod,
    conversation_view,
    status_energy_j,
)
from conserve.controller.state import DecoderEnergy
from conserve.core.gpus import Role

log = logging.getLogger(__name__)
T = TypeVar("T")


class ListingKube(Protocol):
    """The reads and writes of the standalone loop (`conserve.controller.kube.KubeClient` has them)."""

    async def list_objects(self, plural: str, namespace: str | None) -> list[Body]: ...
    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body: ...


def pool_pods(pool: Body) -> list[ServingPod]:
    """A listed pool's serving pods, from its status (decoders[] and prefills[])."""
    meta = pool.get("metadata") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    status = DecoderPoolStatus.model_validate(pool.get("status") or {})
    written = status_energy_j(status)
    decoders = [
        ServingPod(namespace, name, Role.DECODE, d, d.capacity_kv_tokens, written[d.pod]) for d in status.decoders
    ]
    prefills = [ServingPod(namespace, name, Role.PREFILL, p) for p in status.prefills]
    return [p for p in decoders + prefills if p.pod]


def listed_conversation(body: Body) -> ConversationView:
    meta = body.get("metadata") or {}
    spec = ConversationSpec.model_validate(body.get("spec") or {})
    status = ConversationStatus.model_validate(body.get("status") or {})
    return conversation_view(
        str(meta.get("namespace", "")),
        str(meta.get("name", "")),
        spec,
        status.phase,
        status.decoder,
        status.prefill,
        max(status.reserved_kv_tokens, status.live_kv_tokens),
        _finite(status.energy_joules),
    )


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def merge_decoder_energy(
    decoders: Sequence[Body], figures: Mapping[str, tuple[float | None, float | None]]
) -> list[Body]:
    """decoders[] of a pool status with powerWatts/energyJoules set from `figures` (pod -> (W, J)); the rest of
    each entry untouched. Pure: the pool status writer can call it."""
    out = []
    for entry in decoders:
        figure = figures.get(str(entry.get("pod", "")))
        if figure is None:
            out.append(dict(entry))
            continue
        out.append({**entry, "powerWatts": figure[0], "energyJoules": figure[1]})
    return out


def pool_energy_patch(pool: Body, figures: Mapping[str, DecoderEnergy]) -> Body:
    """A merge patch of a pool's energy fields (decoders[] whole: a merge patch replaces a list), guarded by the
    resourceVersion it was built from."""
    meta, status = pool.get("metadata") or {}, pool.get("status") or {}
    decoders = status.get("decoders") or []
    merged = merge_decoder_energy(decoders, {pod: (f.power_watts, f.energy_joules) for pod, f in figures.items()})
    power = [f.power_watts for f in figures.values() if f.power_watts is not None]
    energy = [f.energy_joules for f in figures.values() if f.energy_joules is not None]
    patch: Body = {
        "metadata": {"resourceVersion": meta.get("resourceVersion")},
        "status": {
            "powerWatts": round(math.fsum(power), 3) if power else None,
            "energyJoules": round(math.fsum(energy), 3) if energy else None,
        },
    }
    if merged != decoders:
        patch["status"]["decoders"] = merged
    return patch


class ListedEnergyState:
    """Standalone mode: reads by listing, and writes decoders[].powerWatts/energyJoules and the pool's
    powerWatts/energyJoules itself. The patch carries the resourceVersion it was built from: if the operator wrote
    in between, the API server refuses it (409) and the next cycle rebuilds it from the newer object."""

    def __init__(self, kube: ListingKube, namespaces: Sequence[str] | None = None) -> None:
        self.kube = kube
        self.namespaces: list[str | None] = list(namespaces) if namespaces else [None]  # None: every namespace
        self.pools: list[Body] = []  # as the latest snapshot listed them
        self.figures: dict[PodFigureKey, DecoderEnergy] = {}  # as the latest cycle published them
        self.conflicts = 0

    async def snapshot(self) -> EnergySnapshot:
        pools, conversations = [], []
        for namespace in self.namespaces:
            pools += await self.kube.list_objects(DECODERPOOLS, namespace)
            conversations += await self.kube.list_objects(CONVERSATIONS, namespace)
        self.pools = pools
        pods = {p.key: p for pool in pools for p in _parsed(pool_pods, pool) or []}
        views = [view for body in conversations if (view := _parsed(listed_conversation, body)) is not None]
        return EnergySnapshot(pods, views)

    async def publish_decoders(self, figures: Mapping[PodFigureKey, DecoderEnergy]) -> None:
        self.figures = dict(figures)
        await self.write_pools(self.pools)

    async def write_pools(self, pools: Sequence[Body]) -> None:
        """One patch per pool holding figures, all at once."""
        writes = []
        for pool in pools:
            meta = pool.get("metadata") or {}
            namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
            mine = {pod: f for (ns, p, pod), f in self.figures.items() if (ns, p) == (namespace, name)}
            if mine:
                writes.append((namespace, name, pool_energy_patch(pool, mine)))
        results = await asyncio.gather(
            *(self.kube.patch_status(DECODERPOOLS, ns, name, patch) for ns, name, patch in writes),
            return_exceptions=True,
        )
        for (namespace, name, _), result in zip(writes, results, strict=True):
            if isinstance(result, Exception):  # 409: the operator wrote first; the next cycle has the newer object
                self.conflicts += 1
                log.info("energy: pool %s/%s status not written: %s", namespace, name, result)
            elif isinstance(result, BaseException):
                raise result


def _parsed(parse: Callable[[Body], T], body: Body) -> T | None:
    try:
        return parse(body)
    except ValidationError as exc:  # the schema refuses these; an old object may still hold one
        log.info("energy: %s skipped: %s", (body.get("metadata") or {}).get("name"), exc)
        return None
