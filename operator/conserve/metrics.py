"""Every conserve_* Prometheus metric, in one place, grouped by the component that updates it.

Naming: `conserve_` prefix, base units in the name (seconds, joules, tokens), `_total` on counters. Labels are
bounded: `namespace` and `pool` (one value per DecoderPool), a fixed set of `result` / `reason` values, and
`decoder` only on per-decoder series (bounded by the pods of the pools). Never a conversation name.

Teammates append their metrics in their own section below; keep one section per component.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: The registry every conserve metric is registered on (the operator serves it on --metrics-port).
REGISTRY = CollectorRegistry(auto_describe=True)

_POOL = ("namespace", "pool")


# The process-wide metrics below are all registered on REGISTRY.
def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(name, doc, labels, registry=REGISTRY)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    return Gauge(name, doc, labels, registry=REGISTRY)


def _histogram(name: str, doc: str, labels: Sequence[str], *, buckets: Sequence[float]) -> Histogram:
    return Histogram(name, doc, labels, buckets=buckets, registry=REGISTRY)


# --- operator: placement (controller/) ------------------------------------------------------------------------

PLACEMENTS = _counter(
    "conserve_placements_total",
    "Placement decisions written. result: placed (first placement), replaced (after a decoder was lost), "
    "queued (no decoder fits, waits), failed (rejected or lost with nothing that fits).",
    [*_POOL, "result"],
)
PLACEMENT_LATENCY = _histogram(
    "conserve_placement_latency_seconds",
    "Time from the operator first seeing a conversation to its placement written to status (queue wait included).",
    _POOL,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
PLACEMENT_DECISION = _histogram(
    "conserve_placement_decision_seconds",
    "Time the core takes to decide one placement (filters, scorers, picker), under the pool's lock.",
    _POOL,
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
QUEUE_LENGTH = _gauge("conserve_pending_conversations", "Conversations waiting for a decoder (phase Pending).", _POOL)
KV_TRANSFERS = _counter(
    "conserve_kv_transfers_total",
    "KV cache transfers: one per first placement (prefill to decoder) and one per move after a decoder loss.",
    _POOL,
)
RELEASES = _counter(
    "conserve_releases_total",
    "Reservations released. reason: Completed, Deleted, IdleTimeout, DecoderLost.",
    [*_POOL, "reason"],
)
OUTGROWN = _counter(
    "conserve_reservation_outgrown_total",
    "Turns that took a conversation past its reservation. result: extended (room on the decoder), "
    "pinned (no room: kept on its decoder and flagged).",
    [*_POOL, "result"],
)
STATUS_WRITE_ERRORS = _counter(
    "conserve_status_write_errors_total",
    "Status patches that failed after retries. kind: Conversation, DecoderPool.",
    ["kind"],
)

# --- operator: SLO attainment and admission (controller/slo.py) ----------------------------------------------

SLO_CONVERSATIONS = _counter(
    "conserve_slo_conversations_total",
    "Conversations of a pool with spec.slo that ended (completed, deleted, idle timeout). outcome: met (every turn "
    "met its class's SLO, as the router measured it) or missed. slo_class: the class (\"\" for the pool's own).",
    [*_POOL, "slo_class", "outcome"],
)
# Goodput is rate(conserve_slo_conversations_total{outcome="met"}[...]); status.slo shows the operator's window.
SLO_ATTAINMENT = _gauge(
    "conserve_slo_attainment_ratio",
    "Share of the conversations that ended in the operator's recent window (status.slo.windowSeconds) and met "
    "the SLO, 0 to 1 (absent before one ended).",
    [*_POOL, "slo_class"],
)
SLO_TARGET_ATTAINMENT = _gauge(
    "conserve_slo_target_attainment_ratio", "The attainment the pool declares (spec.slo.attainmentTarget).", _POOL
)
ADMISSION_REFUSALS = _counter(
    "conserve_refused_conversations_total",
    "Conversations refused before their placement. reason: QueueWaitExceeded (waited their budget: the class's TTFET "
    "target, at most placement.maxQueueWaitSeconds), SloUnattainable (expected wait past the budget), "
    "UnknownSloClass, NoCapacity (whenFull: Reject).",
    [*_POOL, "slo_class", "reason"],
)

# --- operator: capacity (controller/) -------------------------------------------------------------------------

CAPACITY_KV = _gauge("conserve_capacity_kv_tokens", "KV capacity of the pool's ready decoders, in tokens.", _POOL)
RESERVED_KV = _gauge(
    "conserve_reserved_kv_tokens",
    "KV tokens held in the pool: per conversation the larger of its reservation and its live context.",
    _POOL,
)
LIVE_KV = _gauge("conserve_live_kv_tokens", "Live context of the pool's conversations, in KV tokens.", _POOL)
READY_DECODERS = _gauge("conserve_ready_decoders", "Ready decoders of the pool.", _POOL)
PINNED_CONVERSATIONS = _gauge(
    "conserve_pinned_conversations", "Conversations holding a reservation in the pool.", _POOL
)

# --- KV lifecycle (issue 13) ---------------------------------------------------------------------------------
KV_LIFECYCLE = _counter(
    "conserve_kv_lifecycle_transitions",
    "KV lifecycle transitions of pinned conversations. transition: idled, offloaded, reloaded, dropped, "
    "reprefilled; reason: ActiveWindow, RoomNeeded, ResidentTtl, HostTtl, HostFull, HostTooSmall, Turn.",
    [*_POOL, "transition", "reason"],
)
KV_STATE_CONVERSATIONS = _gauge(
    "conserve_kv_state_conversations",
    "Pinned conversations per KV state (Active, Idle, Offloaded, Dropped).",
    [*_POOL, "state"],
)
KV_STATE_TOKENS = _gauge(
    "conserve_kv_state_kv_tokens",
    "Live KV tokens of pinned conversations per KV state (Idle: on GPUs, evictable; Offloaded: host memory).",
    [*_POOL, "state"],
)


def forget_pool(namespace: str, pool: str) -> None:
    """Drop a deleted pool's series so they do not linger."""
    for gauge in (QUEUE_LENGTH, CAPACITY_KV, RESERVED_KV, LIVE_KV, READY_DECODERS, PINNED_CONVERSATIONS):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, pool)


# --- energy: per decoder, pool and conversation, from DCGM or NVML -------------------------------------------

_DECODER = ("namespace", "pool", "decoder", "role")

GPU_POWER = _gauge(
    "conserve_gpu_power_watts",
    "Power of each GPU as its reader reports it (dcgm-exporter, NVML).",
    ["node", "gpu", "model_name"],
)
GPU_ENERGY = _counter(
    "conserve_gpu_energy_joules_total",
    "Energy of each GPU from its counter's deltas (resets and wraps handled, missing samples not invented).",
    ["node", "gpu"],
)
GPU_INTERVALS = _counter(
    "conserve_energy_counter_intervals_total",
    "GPU counter intervals by how they were obtained. kind: normal, wrap, reset, clamped, power (no counter: "
    "power integrated), missing (no sample this cycle).",
    ["kind"],
)
DECODER_POWER = _gauge(
    "conserve_decoder_power_watts",
    "Power of a serving pod's GPUs. role: decode or prefill.",
    _DECODER,
)
DECODER_ENERGY = _counter(
    "conserve_energy_joules_total",
    "Energy of a serving pod's GPUs. role: decode or prefill.",
    _DECODER,
)
POOL_POWER = _gauge(
    "conserve_pool_power_watts",
    "Power of the pool's serving pods' GPUs (decode and prefill).",
    _POOL,
)
ATTRIBUTED_ENERGY = _counter(
    "conserve_attributed_energy_joules_total",
    "Energy attributed to the pool's conversations (work done, and idle shared by KV held).",
    _POOL,
)
UNATTRIBUTED_ENERGY = _counter(
    "conserve_unattributed_energy_joules_total",
    "Energy of the pool's GPUs not attributed to any conversation (idle capacity nobody holds).",
    _POOL,
)
CONVERSATION_ENERGY_FINAL = _histogram(
    "conserve_conversation_energy_joules",
    "Energy of each conversation when it ended (per-conversation figures are in its status).",
    _POOL,
    buckets=(1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1e3, 5e3, 1e4, 5e4, 1e5, 5e5, 1e6),
)
ENERGY_PER_TOKEN = _gauge(
    "conserve_energy_per_token_joules",
    "Measured joules per token by GPU tier: per output token for decode, per input token for prefill.",
    ["tier", "role"],
)


# --- router: the data plane's front door -------------------------------------------------------------------

#: Latency buckets of the router: from a streamed token (milliseconds) to a queued conversation (minutes).
ROUTER_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ROUTER_TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True, slots=True)
class RouterMetrics:
    """The router's metrics; label `mode` is "conversation" or "per-turn" (the routing mode of the turn).

    Built on a registry so tests can use a fresh one; the router process uses ROUTER (on REGISTRY).
    """

    ttfet_seconds: Histogram
    ttft_seconds: Histogram
    tbt_seconds: Histogram
    kv_transfers_total: Counter
    turns_total: Counter
    backend_errors_total: Counter
    conversations_closed_total: Counter
    usage_patches_total: Counter
    placement_wait_seconds: Histogram
    unplaced_turns_total: Counter
    prefill_site_turns_total: Counter
    slo_turns_total: Counter

    @classmethod
    def on(cls, registry: CollectorRegistry) -> RouterMetrics:
        mode = ["mode"]
        return cls(
            ttfet_seconds=Histogram(
                "conserve_router_time_to_first_effective_token_seconds",
                "Start of a conversation (its first request at the router) to its first user-visible token.",
                mode,
                buckets=ROUTER_LATENCY_BUCKETS,
                registry=registry,
            ),
            ttft_seconds=Histogram(
                "conserve_router_time_to_first_token_seconds",
                "Per turn: the request's arrival at the router to its first streamed token.",
                mode,
                buckets=ROUTER_LATENCY_BUCKETS,
                registry=registry,
            ),
            tbt_seconds=Histogram(
                "conserve_router_time_between_tokens_seconds",
                "Per turn: time between streamed tokens (a chunk of n tokens counts its gap over n).",
                mode,
                buckets=ROUTER_TBT_BUCKETS,
                registry=registry,
            ),
            kv_transfers_total=Counter(
                "conserve_router_kv_transfers_total",
                "KV hand-offs from a prefill server to a decoder the router asked for.",
                mode,
                registry=registry,
            ),
            turns_total=Counter("conserve_router_turns_total", "Turns served.", mode, registry=registry),
            backend_errors_total=Counter(
                "conserve_router_backend_errors_total",
                "Prefill or decode servers that failed before answering (the turn is retried elsewhere).",
                mode,
                registry=registry,
            ),
            conversations_closed_total=Counter(
                "conserve_router_conversations_closed_total",
                "Conversations the router closed (last turn marked, or idle).",
                mode,
                registry=registry,
            ),
            usage_patches_total=Counter(
                "conserve_router_usage_patches_total",
                "Batched spec.usage / spec.completed patches written to Conversation objects.",
                registry=registry,
            ),
            placement_wait_seconds=Histogram(
                "conserve_router_placement_wait_seconds",
                "Conversation mode, a turn that needs a placement (a new conversation or a re-placement): "
                'part="total": its arrival (or the decoder\'s loss) to the placement in hand; part="create": the '
                "Conversation create call alone (the rest of total is the operator's decision and the watch "
                'event); part="exposed": what the turn waited beyond its own prefill, which runs meanwhile '
                "(what the control plane adds to TTFT).",
                ["part"],
                buckets=ROUTER_LATENCY_BUCKETS,
                registry=registry,
            ),
            unplaced_turns_total=Counter(
                "conserve_router_unplaced_turns_total",
                "First turns answered without a placement. status: 429 (the pool is busy: refused by the operator "
                "or waited past its maxQueueWaitSeconds) or 503 (a fault: no such pool, no word from the operator); "
                "reason: the operator's condition reason.",
                ["status", "reason"],
                registry=registry,
            ),
            prefill_site_turns_total=Counter(
                "conserve_router_prefill_site_turns_total",
                "Turns served, by where their prompt was prefilled (the P/D decider's choice in conversation mode): "
                'site="pool" (a prefill server, its KV moved to the decoder) or "decoder" (the decoder itself); '
                'turn="first" (a conversation\'s first turn, or a request without one) or "later".',
                ["mode", "site", "turn"],
                registry=registry,
            ),
            slo_turns_total=Counter(
                "conserve_router_slo_turns_total",
                "Conversation-mode turns of a pool with spec.slo, judged against their class's SLO. outcome: met "
                "(first visible token within ttfetSeconds of the turn's arrival, a first turn's queue wait included, "
                "and mean time between tokens within tbtSeconds) or missed.",
                ["pool", "slo_class", "outcome"],
                registry=registry,
            ),
        )


ROUTER = RouterMetrics.on(REGISTRY)


# --- operator: API writes and Events (controller/kube.py, controller/events.py) -------------------------------

API_WRITES = _counter(
    "conserve_api_writes_total",
    "Writes the operator sent to the API server. resource: conversations, conversations/status, "
    "decoderpools/status, events, leases; verb: patch, create, update.",
    ["resource", "verb"],
)
EVENTS_AGGREGATED = _counter(
    "conserve_aggregated_events_total",
    "Normal Events not posted on their own but counted into their window's summary Event.",
    ["reason"],
)
OBSERVED_KV_USAGE = _gauge(
    "conserve_observed_kv_usage_ratio",
    "A decoder's KV cache usage as its engine reports it (vllm:kv_cache_usage_perc), 0 to 1.",
    [*_POOL, "decoder"],
)
OBSERVED_REQUESTS_RUNNING = _gauge(
    "conserve_observed_running_requests",
    "Requests in a decoder's running batch as its engine reports it (vllm:num_requests_running).",
    [*_POOL, "decoder"],
)

# --- operator: leadership (controller/main.py; the Leases of leader.py and shards.py) --------------------------

OPERATOR_SHARDS = _gauge(
    "conserve_operator_shards", "Leases the pools are sharded over (--shards; 1: one Lease, or no leader election)."
)
OPERATOR_LEADING_SHARDS = _gauge(
    "conserve_operator_leading_shards",
    "Shards this replica leads and decides for (0: a standby). Summed over the replicas, less than "
    "conserve_operator_shards means some pools have no operator deciding for them.",
)

# --- scheduler extender: filter and prioritize calls of kube-scheduler ---------------------------------------
