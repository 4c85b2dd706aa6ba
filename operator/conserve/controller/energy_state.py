"""What the energy loop reads each cycle and where its figures go, behind one small interface (`EnergyState`).

In the operator (`OperatorEnergyState`) both sides are the operator's in-memory World, fed by its watches: the
serving pods are the pools' decoders and prefills, the conversations its records; per-pod figures go into the
World, whose pool status writer carries them in its next write. The standalone `conserve energy` command lists
the objects instead (`energy_standalone.ListedEnergyState`). Conversation energy is written by merge patch of
its two fields, all of a cycle's at once with bounded concurrency (`ConversationEnergyWriter`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from conserve.api.conversation import PLURAL as CONVERSATIONS
from conserve.api.conversation import TERMINAL_PHASES, ConversationSpec, Endpoint, Phase
from conserve.api.decoderpool import DecoderPoolStatus
from conserve.controller.state import DecoderEnergy, PoolRuntime, World, key_of
from conserve.core.gpus import Role

log = logging.getLogger(__name__)

Body = dict[str, Any]
#: (namespace, pool, pod): whose figures a `DecoderEnergy` is.
PodFigureKey = tuple[str, str, str]
#: Conversation status patches in flight at once: a cycle's writes go out together, not one after another.
WRITE_CONCURRENCY = 16


class PodEntry(Protocol):
    """A pool's serving pod: `DecoderInfo` in the operator, a decoders[] or prefills[] status entry when listed."""

    @property
    def pod(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def gpu_product(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ServingPod:
    """A pool's decode or prefill server, as a cycle sees it: where it serves, and its entry (pod, tier, GPU)."""

    namespace: str
    pool: str
    role: Role  # what its J per token counts: output tokens (decode), first-turn input tokens (prefill)
    entry: PodEntry
    capacity_kv_tokens: int = 0  # a decoder's; a prefill server holds no conversation's KV between cycles
    energy_joules: float | None = None  # as status has it (the starting point after a restart)

    @property
    def pod(self) -> str:
        return self.entry.pod

    @property
    def key(self) -> str:
        return key_of(self.namespace, self.entry.pod)


@dataclass(frozen=True, slots=True)
class ConversationView:
    """A conversation as a cycle sees it: its usage so far, where it runs, the KV it holds."""

    key: str
    namespace: str
    name: str
    pool: str
    decoder_pod: str
    prefill_pod: str
    tokens: int  # input + output reported so far
    output_tokens: int
    first_turn_input_tokens: int
    turns: int
    kv_tokens: int
    terminal: bool
    energy_joules: float | None  # as status had it (the starting point after a restart)


@dataclass(frozen=True, slots=True)
class EnergySnapshot:
    """One cycle's read: serving pods by pod key, and the conversations."""

    pods: Mapping[str, ServingPod]
    conversations: Sequence[ConversationView]


class EnergyState(Protocol):
    async def snapshot(self) -> EnergySnapshot: ...

    async def publish_decoders(self, figures: Mapping[PodFigureKey, DecoderEnergy]) -> None:
        """Every serving pod's figures of this cycle, at once."""
        ...


class StatusWriter(Protocol):
    """The one write the loop makes itself (`conserve.controller.kube.Kube` has it)."""

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> Body: ...


def conversation_view(
    namespace: str,
    name: str,
    spec: ConversationSpec,
    phase: Phase,
    decoder: Endpoint | None,
    prefill: Endpoint | None,
    kv_tokens: int,
    energy_joules: float | None,
) -> ConversationView:
    """A conversation as the loop sees it, from its spec and the operator's decision (record or status)."""
    usage = spec.usage
    return ConversationView(
        key=key_of(namespace, name),
        namespace=namespace,
        name=name,
        pool=spec.pool,
        decoder_pod=decoder.pod if decoder is not None else "",
        prefill_pod=prefill.pod if prefill is not None else "",
        tokens=usage.input_tokens + usage.output_tokens,
        output_tokens=usage.output_tokens,
        first_turn_input_tokens=spec.first_turn_input_tokens,
        turns=usage.turns,
        kv_tokens=kv_tokens,
        terminal=phase in TERMINAL_PHASES or spec.completed,
        energy_joules=energy_joules,
    )


def status_energy_j(status: DecoderPoolStatus) -> dict[str, float | None]:
    """Pod -> the energy its pool status holds (where a restarted loop continues from)."""
    return {d.pod: d.energy_joules for d in status.decoders}


class OperatorEnergyState:
    """The operator's own state, read without a list: its World is what its watches saw."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def snapshot(self) -> EnergySnapshot:
        pods: dict[str, ServingPod] = {}
        for pool in self.world.pools.values():
            pods.update((p.key, p) for p in self._pods_of(pool))
        # A record's status is the operator's decision; its energy fields stay as adopted (the loop writes them,
        # the operator does not), so they are where a restarted loop continues from.
        conversations = [
            conversation_view(
                r.namespace,
                r.name,
                r.spec,
                r.status.phase,
                r.status.decoder,
                r.status.prefill,
                max(r.status.reserved_kv_tokens, r.status.live_kv_tokens),
                r.status.energy_joules,
            )
            for r in self.world.convs.values()
        ]
        return EnergySnapshot(pods, conversations)

    @staticmethod
    def _pods_of(pool: PoolRuntime) -> list[ServingPod]:
        written = status_energy_j(DecoderPoolStatus.model_validate(pool.body.get("status") or {}))
        decoders = [
            ServingPod(pool.namespace, pool.name, Role.DECODE, d, d.capacity_kv_tokens, written.get(d.pod))
            for d in pool.decoders.values()
        ]
        prefills = [ServingPod(pool.namespace, pool.name, Role.PREFILL, p) for p in pool.prefills.values()]
        return decoders + prefills

    async def publish_decoders(self, figures: Mapping[PodFigureKey, DecoderEnergy]) -> None:
        # The pool status writer carries them in its next (coalesced) write; placement scores J per token.
        for (namespace, pool, pod), figure in figures.items():
            self.world.set_decoder_energy(
                namespace,
                pool,
                pod,
                power_watts=figure.power_watts,
                energy_joules=figure.energy_joules,
                energy_per_token_j=figure.energy_per_token_j,
            )


class ConversationEnergyWriter:
    """A cycle's conversation energy writes in one flush: each a merge patch of `energyJoules` and
    `energyPerTokenJoules` only (the operator writes the other fields), at most `concurrency` at a time."""

    def __init__(self, kube: StatusWriter, concurrency: int = WRITE_CONCURRENCY) -> None:
        self.kube = kube
        self.concurrency = concurrency

    async def flush(self, writes: Mapping[str, tuple[str, str, Body]]) -> set[str]:
        """`writes`: conversation key -> (namespace, name, status fields). Returns the keys written; a write that
        failed (a deleted conversation, a transient API error) is logged and left for the next cycle."""
        gate = asyncio.Semaphore(self.concurrency)

        async def write(namespace: str, name: str, fields: Body) -> None:
            async with gate:
                await self.kube.patch_status(CONVERSATIONS, namespace, name, {"status": fields})

        keys = list(writes)
        results = await asyncio.gather(*(write(*writes[key]) for key in keys), return_exceptions=True)
        written = set()
        for key, result in zip(keys, results, strict=True):
            if result is None:
                written.add(key)
            elif isinstance(result, Exception):
                log.info("energy: status of conversation %s not written: %s", key, result)
            else:
                raise result  # cancelled, or an interpreter exit: not a failed write
        return written
