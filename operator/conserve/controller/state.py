"""What the operator knows, in memory: pools (each with its ledger and queue), pods, nodes and conversations.

The single writer's view. Every decision is made on it under the pool's asyncio lock, then written to the API
server; on start it is rebuilt from the API server (startup.py) before any decision.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conserve.api.common import Condition, ConditionStatus
from conserve.api.conversation import TERMINAL_PHASES, ConversationSpec, ConversationStatus, Endpoint, Phase
from conserve.api.decoderpool import DecoderPoolSpec, PrefillStatus
from conserve.api.labels import FINALIZER as FINALIZER  # re-exported: declared once in api.labels
from conserve.core.decisions import ConversationRequest
from conserve.core.gpus import NodeGpu, node_gpu_from_labels
from conserve.core.healing import UnreadyDecoders
from conserve.core.integrity import StatusPrint, status_print
from conserve.core.lifecycle import KvState
from conserve.core.occupancy import ObservedOccupancy
from conserve.core.scheduler import PoolScheduler
from conserve.core.slo import AttainmentWindow

Key = str  # "namespace/name"


def key_of(namespace: str, name: str) -> Key:
    return f"{namespace}/{name}"


def parse_time(value: str | None) -> float | None:
    """RFC 3339 -> seconds since the epoch, None when absent or unreadable."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kv_state(value: str | None) -> KvState | None:
    try:
        return KvState(value) if value else None
    except ValueError:
        return None


@dataclass(slots=True)
class PodInfo:
    namespace: str
    name: str
    labels: dict[str, str]
    node: str
    ready: bool
    ip: str
    endpoint_annotation: str
    gpus: int
    uid: str = ""
    #: Terminating, Succeeded or Failed: not coming back (its conversations move at once, no grace).
    leaving: bool = False


@dataclass(slots=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    gpu: NodeGpu

    @classmethod
    def from_labels(cls, name: str, labels: Mapping[str, str]) -> NodeInfo:
        return cls(name, dict(labels), node_gpu_from_labels(labels))


class DecoderInfo(PrefillStatus):
    """A decode or prefill server as the pool sees it: its status entry's static facts (KV occupancy lives in the
    ledger), its KV capacity, and why it cannot take conversations besides readiness (e.g. unknown GPU memory)."""

    capacity_kv_tokens: int = 0
    gpu_count: int = 1
    problem: str = ""
    leaving: bool = False  # its pod is terminating or finished

    @property
    def serving(self) -> bool:
        return self.ready and not self.problem

    def endpoint_model(self) -> Endpoint:
        return Endpoint.model_validate(self, from_attributes=True)


@dataclass(slots=True)
class DecoderEnergy:
    power_watts: float | None = None
    energy_joules: float | None = None
    energy_per_token_j: float | None = None


@dataclass(slots=True)
class ConvRecord:
    """One conversation: its spec as last seen, and the operator's decision (authoritative while it runs), held as
    the status it writes (`written_status()`).

    Three status fields are kept in runtime form beside `status` (which leaves them as adopted): the latest
    activity in seconds (the idle timers read it), the KV state as the core's enum, the conditions by type."""

    namespace: str
    name: str
    uid: str
    spec: ConversationSpec
    created_at_s: float
    generation: int = 0
    status: ConversationStatus = field(default_factory=ConversationStatus)
    last_activity_s: float | None = None
    kv_state: KvState | None = None  # None until placed
    conditions: dict[str, Condition] = field(default_factory=dict)
    has_finalizer: bool = False
    finalizers: list[str] = field(default_factory=list)  # as last seen on the object
    finalizer_in_flight: bool = False  # our finalizer patch is on its way: events without it are older
    first_seen_monotonic: float = 0.0
    # Set while a status patch is owed (the decision is made; the API server does not have it yet).
    dirty: bool = False
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The decisions this run wrote lately, and the resourceVersion its latest write made: a status seen on the
    #: object that is neither (nor older) was written by someone else (`core.integrity.foreign`).
    written: deque[StatusPrint] = field(default_factory=lambda: deque(maxlen=8))
    written_rv: int = 0

    @classmethod
    def adopt(cls, status: ConversationStatus, **identity: Any) -> ConvRecord:
        """A record resuming from a status written earlier (by this or an earlier run); `identity` gives the
        fields that are not status (namespace, name, uid, spec, created_at_s...)."""
        record = cls(
            **identity,
            status=status.model_copy(),  # not the caller's: the record updates its own
            last_activity_s=parse_time(status.last_activity_time) or parse_time(status.placed_at),
            kv_state=_kv_state(status.kv_state),
            conditions={c.type: c for c in status.conditions},
        )
        if not record.terminal and record.status.decoder is None:
            record.status.phase = Phase.PENDING
        return record

    def written_status(self) -> ConversationStatus:
        """The operator's decision as it writes it: `status` with the runtime-form fields converted back."""
        return self.status.model_copy(
            update={
                "last_activity_time": format_time(self.last_activity_s) if self.last_activity_s else None,
                "kv_state": self.kv_state.value if self.kv_state is not None and self.placed else None,
                "conditions": list(self.conditions.values()),
                "observed_generation": self.generation,
            }
        )

    def decision_print(self) -> StatusPrint:
        """The operator's current decision, as `core.integrity` compares statuses."""
        status = self.status
        decoder = status.decoder
        return status_print(
            status.phase.value,
            decoder.pod if decoder else None,
            decoder.endpoint if decoder else None,
            status.reserved_kv_tokens,
            status.placement_generation,
        )

    @property
    def key(self) -> Key:
        return key_of(self.namespace, self.name)

    @property
    def terminal(self) -> bool:
        return self.status.phase in TERMINAL_PHASES

    @property
    def placed(self) -> bool:
        return self.status.decoder is not None and not self.terminal

    def request(self) -> ConversationRequest:
        """What the pool's scheduler knows of this conversation's start."""
        return ConversationRequest(
            self.key,
            self.spec.first_turn_input_tokens,
            self.spec.priority,
            self.created_at_s,
            self.spec.expected_turns,
            self.spec.idle_timeout_seconds,
            self.spec.slo_class,
        )

    def set_condition(self, type_: str, status: ConditionStatus, reason: str, message: str, now_s: float) -> bool:
        """Set a condition; returns True when it changed (lastTransitionTime moves only on a status change)."""
        old = self.conditions.get(type_)
        if old is not None and (old.status, old.reason, old.message) == (status, reason, message):
            return False
        moved = old is None or old.status != status
        self.conditions[type_] = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=format_time(now_s) if moved else old.last_transition_time if old else "",
            observed_generation=self.generation,
        )
        return True


@dataclass(slots=True)
class PoolRuntime:
    namespace: str
    name: str
    spec: DecoderPoolSpec | None = None  # None: the pool does not exist (yet), or its spec is invalid
    spec_error: str = ""
    body: dict[str, Any] = field(default_factory=dict)  # latest object seen (for Events and energy fields)
    generation: int = 0
    #: Every decision of the pool (decoder table, reservations, queue, growth history, lifecycle): read through
    #: its view (core/view.py), changed through its event methods.
    scheduler: PoolScheduler = field(default_factory=PoolScheduler)
    decoders: dict[str, DecoderInfo] = field(default_factory=dict)
    prefills: dict[str, DecoderInfo] = field(default_factory=dict)
    #: Measured power and energy per decoder for the status (J/token goes to the scheduler's decoder table).
    energy: dict[str, DecoderEnergy] = field(default_factory=dict)
    #: Decoders' KV occupancy as their engines report it (controller/occupancy.py), by pod.
    observed: dict[str, ObservedOccupancy] = field(default_factory=dict)
    #: Ended and refused conversations per SLO class (controller/slo.py); None until the pool has an SLO.
    slo_window: AttainmentWindow | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    status_dirty: asyncio.Event = field(default_factory=asyncio.Event)
    #: Decoders not Ready, since when: their conversations stay until the pool's decoderLostGraceSeconds.
    unready: UnreadyDecoders = field(default_factory=UnreadyDecoders)
    #: Why the last status write failed ("" once written): logged once, not at every retry.
    status_error: str = ""
    #: Pods its decoderSelector matches that an older pool of the namespace holds (pod -> that pool's name).
    overlapping: dict[str, str] = field(default_factory=dict)

    @property
    def lost_grace_s(self) -> float:
        return float(self.spec.placement.decoder_lost_grace_seconds) if self.spec is not None else 0.0

    @property
    def created_key(self) -> tuple[str, str]:
        """Older pools first (creation time, then name): the order in which pools claim a shared decoder."""
        return (str(self.body.get("metadata", {}).get("creationTimestamp") or "~"), self.name)

    @property
    def key(self) -> Key:
        return key_of(self.namespace, self.name)

    @property
    def exists(self) -> bool:
        return self.spec is not None


@dataclass(slots=True)
class World:
    pools: dict[Key, PoolRuntime] = field(default_factory=dict)
    pods: dict[Key, PodInfo] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    convs: dict[Key, ConvRecord] = field(default_factory=dict)

    def pool(self, namespace: str, name: str) -> PoolRuntime:
        """The pool's runtime, created empty when first referenced (conversations may name it first)."""
        key = key_of(namespace, name)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = PoolRuntime(namespace, name)
        return pool

    def pool_of(self, record: ConvRecord) -> PoolRuntime:
        return self.pool(record.namespace, record.spec.pool)

    def set_decoder_energy(
        self,
        namespace: str,
        pool: str,
        pod: str,
        *,
        power_watts: float | None = None,
        energy_joules: float | None = None,
        energy_per_token_j: float | None = None,
    ) -> None:
        """Hook for the energy loop (controller/energy.py): the next pool status carries these figures, and
        placement's energy scorer uses joules per token."""
        runtime = self.pool(namespace, pool)
        runtime.energy[pod] = DecoderEnergy(power_watts, energy_joules, energy_per_token_j)
        runtime.scheduler.energy_measured(pod, energy_per_token_j)
        runtime.status_dirty.set()
