"""Node filters and scorers for serving pods by role: where a prefill or a decode pod should run.

The kube-scheduler extender calls this module; it is pure (no Kubernetes, no clock, no I/O): a pod's demand and
a snapshot of GPU nodes in, a decision out.

Plugins follow the placement contract (`conserve.core.placement`): a filter says why a node is unfit (or None);
a scorer returns a value in [0, 1] and does no I/O; weights are explicit (`NodeWeights`). The adapter scales the
weighted mean to the extender's 0..10 (`to_extender_score`).

Filters, in order (the first that rejects gives the reason):
- tier: under the strict tier policy a prefill pod runs only on a compute-tier node and a decode pod only on a
  bandwidth-tier node (`ROLE_TIER`); a node with no GPU tier is rejected for either role. Under the preferred
  policy every node passes and the tier scorer ranks them. A tier mismatch is unresolvable: preempting pods
  does not change a node's GPUs.
- free GPUs: the node's allocatable `nvidia.com/gpu` minus the GPUs requested by pods bound to it must cover the
  pod's request (a serving pod with a role needs at least one GPU). Preemption could free GPUs, so resolvable.

Scorers:
- tier: 1 when the node's tier is the one the role wants, 0.5 when the node has no tier, 0 otherwise.
- free-gpus: the share of the node's GPUs still free after the pod lands (least allocated first).
- energy: modelled joules per token of the node's GPU for the pod's role (`conserve.core.perf`) at a reference
  operating point, as min over the candidates / this node's; 0.5 when the GPU is not in the catalog.
- spread: fewer pods of the same role on the node first: 1 - n / (max n + 1).

Pods without a role pass every filter and score 0 everywhere (neutral: the extender does not express a
preference).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from conserve.core.gpus import ROLE_TIER, GpuSpec, NodeGpu, Role, Tier
from conserve.core.llm import MODELS, ModelShape
from conserve.core.perf import Device, decode_energy_per_token_j, prefill_energy_per_token_j
from conserve.core.placement import TierPolicy

#: The extender's scores are integers in [0, MAX_EXTENDER_PRIORITY] (k8s.io/kube-scheduler/extender/v1).
MAX_EXTENDER_PRIORITY = 10

#: The model whose shape prices energy per token when a pod does not name one (`conserve.dev/model`).
DEFAULT_MODEL = "llama-3-8b"


class NodeFilterReason(enum.StrEnum):
    """Why a node was filtered out; a bounded set (it labels a metric)."""

    TIER_MISMATCH = "tier-mismatch"
    NO_GPU_TIER = "no-gpu-tier"
    INSUFFICIENT_GPU = "insufficient-gpu"
    #: Adapter-level: the extender's cache does not know the node (nodeCacheCapable mode).
    UNKNOWN_NODE = "unknown-node"


@dataclass(frozen=True, slots=True)
class NodeRejection:
    reason: NodeFilterReason
    #: Shown in `kubectl describe pod`; the scheduler counts identical messages, so keep them node-independent.
    message: str
    #: False when preempting pods cannot make the node fit (the extender's FailedAndUnresolvableNodes).
    resolvable: bool


#: `GpuNode.key`: (id of its NodeGpu, allocatable GPUs, used GPUs, prefill pods, decode pods).
NodeKey = tuple[int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class GpuNode:
    """One node as the extender sees it: its GPU class, its GPUs and what is bound to it."""

    name: str
    gpu: NodeGpu
    allocatable_gpus: int
    used_gpus: int = 0
    prefill_pods: int = 0
    decode_pods: int = 0
    #: Everything but the name (set on construction): nodes with equal keys get equal filter results and, for one
    #: candidate set, equal scores. Fleets have few distinct keys, which keeps a 5,000-node request cheap.
    key: NodeKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # id(): equal-but-distinct NodeGpu objects only cost a memo miss (adapters intern them); hashing the
        # dataclass itself would hash its GpuSpec on every lookup. Keys are compared only within one call.
        key = (id(self.gpu), self.allocatable_gpus, self.used_gpus, self.prefill_pods, self.decode_pods)
        object.__setattr__(self, "key", key)

    @property
    def free_gpus(self) -> int:
        return max(self.allocatable_gpus - self.used_gpus, 0)

    def role_pods(self, role: Role) -> int:
        return self.prefill_pods if role is Role.PREFILL else self.decode_pods


@dataclass(frozen=True, slots=True)
class PodDemand:
    """What a pod asks for: its role (None: not a ConServe serving pod), its GPUs, the model it serves."""

    role: Role | None
    gpus: int = 1
    model: str = DEFAULT_MODEL

    @property
    def needed_gpus(self) -> int:
        return max(self.gpus, 1) if self.role is not None else max(self.gpus, 0)


@dataclass(frozen=True, slots=True)
class NodeWeights:
    """Weights of the node scorers; zero turns a scorer off. Names as in `as_dict` (the CLI's --weights)."""

    tier: float = 1.0
    free_gpus: float = 0.5
    energy: float = 0.5
    spread: float = 0.25

    def as_dict(self) -> dict[str, float]:
        return {"tier": self.tier, "free-gpus": self.free_gpus, "energy": self.energy, "spread": self.spread}

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> NodeWeights:
        """Weights from names as in `as_dict`; unnamed weights keep their default. Raises ValueError."""
        known = cls().as_dict()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown weight(s) {', '.join(unknown)}; known: {', '.join(known)}")
        merged = {**known, **values}
        for name, value in merged.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"weight {name} must be a finite number >= 0, got {value}")
        return cls(merged["tier"], merged["free-gpus"], merged["energy"], merged["spread"])


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Where energy per token is priced: a steady decode batch, and a prefill of a typical first turn."""

    decode_batch_size: int = 32
    decode_mean_context_tokens: int = 2048
    prefill_tokens: int = 2048


@dataclass(frozen=True, slots=True)
class NodeScoringSettings:
    tier_policy: TierPolicy = TierPolicy.STRICT
    weights: NodeWeights = field(default_factory=NodeWeights)
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)


# --- filters ---------------------------------------------------------------------------------------------------

NodeFilter = Callable[[PodDemand, GpuNode, NodeScoringSettings], NodeRejection | None]


@functools.lru_cache(maxsize=64)
def _tier_rejection(role: Role, tier: Tier | None) -> NodeRejection:
    wanted = ROLE_TIER[role]
    if tier is None:
        return NodeRejection(
            NodeFilterReason.NO_GPU_TIER,
            f"conserve: {role.value} pod needs a {wanted.value}-tier GPU node, node has no GPU tier "
            "(strict tier policy)",
            resolvable=False,
        )
    return NodeRejection(
        NodeFilterReason.TIER_MISMATCH,
        f"conserve: {role.value} pod needs a {wanted.value}-tier GPU node, node is {tier.value} tier "
        "(strict tier policy)",
        resolvable=False,
    )


@functools.lru_cache(maxsize=256)
def _gpu_rejection(role: Role | None, needed: int) -> NodeRejection:
    return NodeRejection(
        NodeFilterReason.INSUFFICIENT_GPU,
        f"conserve: not enough free nvidia.com/gpu for a {role.value if role else 'GPU'} pod (needs {needed})",
        resolvable=True,
    )


def filter_tier(pod: PodDemand, node: GpuNode, settings: NodeScoringSettings) -> NodeRejection | None:
    if pod.role is None or settings.tier_policy is not TierPolicy.STRICT:
        return None
    if node.gpu.tier is not ROLE_TIER[pod.role]:
        return _tier_rejection(pod.role, node.gpu.tier)
    return None


def filter_free_gpus(pod: PodDemand, node: GpuNode, _: NodeScoringSettings) -> NodeRejection | None:
    needed = pod.needed_gpus
    if needed <= 0 or node.free_gpus >= needed:
        return None
    return _gpu_rejection(pod.role, needed)


NODE_FILTERS: Sequence[tuple[str, NodeFilter]] = (
    ("tier", filter_tier),
    ("free-gpus", filter_free_gpus),
)


def filter_node(pod: PodDemand, node: GpuNode, settings: NodeScoringSettings) -> NodeRejection | None:
    """The first filter's rejection, or None when the node fits. Pods without a role always fit."""
    if pod.role is None:
        return None
    for _, check in NODE_FILTERS:
        rejection = check(pod, node, settings)
        if rejection is not None:
            return rejection
    return None


def filter_nodes(
    pod: PodDemand, nodes: Sequence[GpuNode], settings: NodeScoringSettings
) -> tuple[list[GpuNode], dict[str, NodeRejection]]:
    """Split nodes into those that fit (in input order) and the rejected ones with their reasons."""
    if pod.role is None:
        return list(nodes), {}
    fits: list[GpuNode] = []
    rejected: dict[str, NodeRejection] = {}
    memo: dict[NodeKey, NodeRejection | None] = {}
    for node in nodes:
        key = node.key
        if key in memo:
            rejection = memo[key]
        else:
            rejection = memo[key] = filter_node(pod, node, settings)
        if rejection is None:
            fits.append(node)
        else:
            rejected[node.name] = rejection
    return fits, rejected


# --- scorers (each in [0, 1], no I/O) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScoringContext:
    """What scorers may know of the whole candidate set (computed once per request)."""

    min_energy_per_token_j: float | None
    max_role_pods: int


NodeScorer = Callable[[PodDemand, GpuNode, ScoringContext, NodeScoringSettings], float]


def score_tier(pod: PodDemand, node: GpuNode, _: ScoringContext, __: NodeScoringSettings) -> float:
    if pod.role is None:
        return 0.0
    if node.gpu.tier is None:
        return 0.5
    return 1.0 if node.gpu.tier is ROLE_TIER[pod.role] else 0.0


def score_free_gpus(pod: PodDemand, node: GpuNode, _: ScoringContext, __: NodeScoringSettings) -> float:
    if node.allocatable_gpus <= 0:
        return 0.0
    free_after = node.free_gpus - pod.needed_gpus
    return min(max(free_after / node.allocatable_gpus, 0.0), 1.0)


@functools.lru_cache(maxsize=1024)
def energy_per_token_j(spec: GpuSpec, role: Role, model: str, gpus: int, point: OperatingPoint) -> float:
    """Modelled joules per token of `model` on `gpus` x `spec` for the role, at the operating point."""
    shape: ModelShape = MODELS.get(model) or MODELS[DEFAULT_MODEL]
    device = Device(spec, max(gpus, 1))
    if role is Role.PREFILL:
        return prefill_energy_per_token_j(device, shape, point.prefill_tokens)
    return decode_energy_per_token_j(device, shape, point.decode_batch_size, point.decode_mean_context_tokens)


def _node_energy(pod: PodDemand, node: GpuNode, settings: NodeScoringSettings) -> float | None:
    if pod.role is None or node.gpu.spec is None:
        return None
    return energy_per_token_j(node.gpu.spec, pod.role, pod.model, pod.needed_gpus, settings.operating_point)


def score_energy(pod: PodDemand, node: GpuNode, context: ScoringContext, settings: NodeScoringSettings) -> float:
    energy = _node_energy(pod, node, settings)
    if energy is None or energy <= 0 or context.min_energy_per_token_j is None:
        return 0.5
    return min(context.min_energy_per_token_j / energy, 1.0)


def score_spread(pod: PodDemand, node: GpuNode, context: ScoringContext, _: NodeScoringSettings) -> float:
    if pod.role is None or context.max_role_pods <= 0:
        return 1.0
    return 1.0 - node.role_pods(pod.role) / (context.max_role_pods + 1)


NODE_SCORERS: Mapping[str, NodeScorer] = {
    "tier": score_tier,
    "free-gpus": score_free_gpus,
    "energy": score_energy,
    "spread": score_spread,
}


def scoring_context(pod: PodDemand, nodes: Sequence[GpuNode], settings: NodeScoringSettings) -> ScoringContext:
    """Aggregates of the candidate set. Pass one node per distinct key: the result is the same, and cheaper."""
    energies: set[float] = set()
    max_role_pods = 0
    seen_specs: set[int] = set()
    for node in nodes:
        if pod.role is not None:
            max_role_pods = max(max_role_pods, node.role_pods(pod.role))
        spec = node.gpu.spec
        if spec is not None and id(spec) not in seen_specs:
            seen_specs.add(id(spec))
            energy = _node_energy(pod, node, settings)
            if energy is not None and energy > 0:
                energies.add(energy)
    return ScoringContext(min(energies) if energies else None, max_role_pods)


def score_nodes(pod: PodDemand, nodes: Sequence[GpuNode], settings: NodeScoringSettings) -> dict[str, float]:
    """Weighted mean of the scorers for each node, in [0, 1]. Pods without a role: 0 everywhere."""
    if pod.role is None:
        return dict.fromkeys((node.name for node in nodes), 0.0)
    weight_by_name = {name: w for name, w in settings.weights.as_dict().items() if w > 0}
    total_weight = sum(weight_by_name.values())
    if total_weight <= 0:
        return dict.fromkeys((node.name for node in nodes), 0.0)
    # Nodes with equal keys score equally: decide once per distinct key, then fan out by name.
    distinct: dict[NodeKey, GpuNode] = {}
    for node in nodes:
        distinct.setdefault(node.key, node)
    representatives = list(distinct.values())
    context = scoring_context(pod, representatives, settings)
    scorers = [(NODE_SCORERS[name], w) for name, w in weight_by_name.items()]
    by_key = {
        key: min(max(sum(w * scorer(pod, node, context, settings) for scorer, w in scorers) / total_weight, 0.0), 1.0)
        for key, node in distinct.items()
    }
    return {node.name: by_key[node.key] for node in nodes}


def to_extender_score(score: float, max_priority: int = MAX_EXTENDER_PRIORITY) -> int:
    """A [0, 1] score as the extender's integer 0..max_priority (rounded half up; out-of-range clipped)."""
    if not math.isfinite(score):
        return 0
    return math.floor(min(max(score, 0.0), 1.0) * max_priority + 0.5)
