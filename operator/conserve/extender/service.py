"""The extender's verbs as plain functions over the wire models: no web framework here.

`ExtenderService.filter` and `.prioritize` take `ExtenderArgs` (either mode: full `Nodes`, or `NodeNames` when
the scheduler is nodeCacheCapable) and return the wire result; `parse_args` turns a request body into
`ExtenderArgs` or raises `BadRequest` with a message for the caller to return and log.

Which pods the extender acts on: a pod with the `conserve.dev/role` label (prefill or decode) whose
`spec.schedulerName` is one of the configured scheduler names (all names when none is configured). Any other
pod passes through: every node fits, every score is 0.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pydantic

from conserve.api.extender_wire import (
    ExtenderArgs,
    ExtenderBindingArgs,
    ExtenderBindingResult,
    ExtenderFilterResult,
    HostPriority,
    HostPriorityList,
    NodeList,
)
from conserve.core.node_scoring import (
    GpuNode,
    NodeFilterReason,
    NodeScoringSettings,
    PodDemand,
    filter_nodes,
    score_nodes,
    to_extender_score,
)
from conserve.extender.objects import NodeUsage, gpu_node, name_of, pod_demand, pod_scheduler_name

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024

UNKNOWN_NODE_MESSAGE = "conserve: node is not in the extender's cache yet"


class BadRequest(Exception):
    """A request the extender cannot act on; the message goes back in the response's Error and to the log."""


class NodeSource(Protocol):
    """What the service reads from the watch cache."""

    def get(self, name: str) -> GpuNode | None: ...

    def usage(self, node: str) -> NodeUsage | None: ...


@dataclass(frozen=True, slots=True)
class ExtenderSettings:
    scoring: NodeScoringSettings = field(default_factory=NodeScoringSettings)
    #: Pods of these schedulers are acted on; empty: pods of every scheduler.
    scheduler_names: frozenset[str] = frozenset({"conserve-scheduler"})


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    result: ExtenderFilterResult
    #: How many nodes each reason rejected (for metrics).
    rejected: Mapping[NodeFilterReason, int]
    #: "ns/name role=..." for the log line.
    summary: str


def parse_args(body: bytes) -> ExtenderArgs:
    """ExtenderArgs from a request body; raises BadRequest on anything that is not a valid ExtenderArgs."""
    if not body:
        raise BadRequest("empty request body; expected ExtenderArgs JSON")
    try:
        args = ExtenderArgs.model_validate_json(body)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        if not errors:
            raise BadRequest(f"malformed ExtenderArgs: {exc}") from None
        where = ".".join(str(p) for p in errors[0]["loc"]) or "body"
        raise BadRequest(f"malformed ExtenderArgs at {where}: {errors[0]['msg']}") from None
    if args.Pod is None:
        raise BadRequest("ExtenderArgs.Pod is missing")
    if args.Nodes is None and args.NodeNames is None:
        raise BadRequest("ExtenderArgs has neither Nodes nor NodeNames")
    return args


def parse_binding_args(body: bytes) -> ExtenderBindingArgs:
    try:
        return ExtenderBindingArgs.model_validate_json(body or b"{}")
    except pydantic.ValidationError as exc:
        raise BadRequest(f"malformed ExtenderBindingArgs: {exc.errors(include_url=False)[0]['msg']}") from None


def _pod_ref(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata")
    namespace = meta.get("namespace", "") if isinstance(meta, dict) else ""
    return f"{namespace}/{name_of(pod)}"


class ExtenderService:
    def __init__(self, settings: ExtenderSettings, cache: NodeSource | None = None) -> None:
        self.settings = settings
        self.cache = cache

    def demand(self, pod: Mapping[str, Any]) -> PodDemand:
        """The pod's demand; role None when the extender should let it pass (no role, or another scheduler)."""
        demand = pod_demand(pod)
        names = self.settings.scheduler_names
        if demand.role is not None and names and pod_scheduler_name(pod) not in names:
            return PodDemand(role=None, gpus=demand.gpus, model=demand.model)
        return demand

    def _full_mode_nodes(self, items: Sequence[Mapping[str, Any]]) -> list[GpuNode]:
        cache = self.cache
        return [gpu_node(item, cache.usage(name_of(item)) if cache is not None else None) for item in items]

    def _cached_nodes(self, names: Sequence[str]) -> tuple[list[GpuNode], list[str]]:
        known: list[GpuNode] = []
        unknown: list[str] = []
        get = self.cache.get if self.cache is not None else (lambda _: None)
        for name in names:
            node = get(name)
            if node is None:
                unknown.append(name)
            else:
                known.append(node)
        return known, unknown

    def filter(self, args: ExtenderArgs) -> FilterOutcome:
        assert args.Pod is not None
        demand = self.demand(args.Pod)
        summary = f"{_pod_ref(args.Pod)} role={demand.role.value if demand.role else '-'}"
        scoring = self.settings.scoring
        if args.NodeNames is not None and args.Nodes is None:
            if demand.role is None:
                result = ExtenderFilterResult(NodeNames=list(args.NodeNames), FailedNodes={})
                return FilterOutcome(result, {}, summary)
            known, unknown = self._cached_nodes(args.NodeNames)
            fits, rejected = filter_nodes(demand, known, scoring)
            failed = {name: UNKNOWN_NODE_MESSAGE for name in unknown}
            unresolvable: dict[str, str] = {}
            counts: collections.Counter[NodeFilterReason] = collections.Counter()
            if unknown:
                counts[NodeFilterReason.UNKNOWN_NODE] = len(unknown)
            for name, rejection in rejected.items():
                (failed if rejection.resolvable else unresolvable)[name] = rejection.message
                counts[rejection.reason] += 1
            result = ExtenderFilterResult(
                NodeNames=[n.name for n in fits], FailedNodes=failed, FailedAndUnresolvableNodes=unresolvable
            )
            return FilterOutcome(result, counts, f"{summary}: {len(fits)}/{len(args.NodeNames)} nodes fit")

        assert args.Nodes is not None
        items = args.Nodes.items or []
        kept = NodeList(apiVersion=args.Nodes.apiVersion, kind=args.Nodes.kind, metadata=args.Nodes.metadata)
        if demand.role is None:
            kept.items = list(items)
            return FilterOutcome(ExtenderFilterResult(Nodes=kept, FailedNodes={}), {}, summary)
        nodes = self._full_mode_nodes(items)
        fits, rejected = filter_nodes(demand, nodes, scoring)
        fit_names = {n.name for n in fits}
        kept.items = [item for item in items if name_of(item) in fit_names]
        failed = {}
        unresolvable = {}
        counts = collections.Counter()
        for name, rejection in rejected.items():
            (failed if rejection.resolvable else unresolvable)[name] = rejection.message
            counts[rejection.reason] += 1
        result = ExtenderFilterResult(Nodes=kept, FailedNodes=failed, FailedAndUnresolvableNodes=unresolvable)
        return FilterOutcome(result, counts, f"{summary}: {len(kept.items)}/{len(items)} nodes fit")

    def prioritize(self, args: ExtenderArgs) -> HostPriorityList:
        assert args.Pod is not None
        demand = self.demand(args.Pod)
        if args.NodeNames is not None and args.Nodes is None:
            if demand.role is None:
                return HostPriorityList([HostPriority(Host=name, Score=0) for name in args.NodeNames])
            known, _ = self._cached_nodes(args.NodeNames)
            scores = score_nodes(demand, known, self.settings.scoring)
            names: Sequence[str] = args.NodeNames
        else:
            assert args.Nodes is not None
            items = args.Nodes.items or []
            names = [name_of(item) for item in items]
            if demand.role is None:
                return HostPriorityList([HostPriority(Host=name, Score=0) for name in names])
            scores = score_nodes(demand, self._full_mode_nodes(items), self.settings.scoring)
        return HostPriorityList(
            [HostPriority.model_construct(Host=name, Score=to_extender_score(scores.get(name, 0.0))) for name in names]
        )

    def bind(self, args: ExtenderBindingArgs) -> ExtenderBindingResult:
        return ExtenderBindingResult(
            Error=f"conserve extender does not bind (pod {args.PodNamespace}/{args.PodName}); leave bindVerb unset"
        )
