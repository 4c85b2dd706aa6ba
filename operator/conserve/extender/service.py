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
import itertools
import json
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

import pydantic

from conserve.api.extender_wire import (
    MAX_EXTENDER_PRIORITY,
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

    def nodes(self) -> Mapping[str, GpuNode]: ...

    def classes(self) -> Mapping[str, int]: ...

    def representatives(self) -> Mapping[int, str]: ...

    def members(self) -> Mapping[int, AbstractSet[str]]: ...

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


_NO_NAMES: frozenset[str] = frozenset()
_encode_string = json.encoder.encode_basestring_ascii
_HOST_PREFIX = '{"Host":'
_SCORE_SUFFIX = tuple(f',"Score":{score}}}' for score in range(MAX_EXTENDER_PRIORITY + 1))


@dataclass(frozen=True, slots=True)
class Priorities:
    """Prioritize's answer: a HostPriorityList, kept as two columns (encoding 5,000 models would cost more than
    deciding)."""

    hosts: Sequence[str]
    scores: Sequence[int]

    def to_wire(self) -> HostPriorityList:
        return HostPriorityList([HostPriority(Host=h, Score=s) for h, s in zip(self.hosts, self.scores, strict=True)])

    def to_json_bytes(self) -> bytes:
        """The same bytes as `to_wire().to_json_bytes()`, without building a model per host (C-level maps)."""
        hosts = map(_HOST_PREFIX.__add__, map(_encode_string, self.hosts))
        items = map(str.__add__, hosts, map(_SCORE_SUFFIX.__getitem__, self.scores))
        return f"[{','.join(items)}]".encode()

    def __len__(self) -> int:
        return len(self.hosts)


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

    def _by_class(
        self, names: Sequence[str], *, per_name: bool = True
    ) -> tuple[list[int | None] | None, dict[int, GpuNode]]:
        """Each name's node class in the cache (None: not cached; the list only with `per_name`), and one cached
        node per class present.

        Nodes of one class have equal keys and decide alike (`GpuNode.key`), so the core runs once per class and the
        answer fans out by name: a 5,000-node request costs a few C-level passes plus the core on a few hundred
        nodes.
        """
        if self.cache is None:
            return ([None] * len(names) if per_name else None), {}
        class_of = self.cache.classes()
        view = self.cache.nodes()
        rep_of = self.cache.representatives()
        classes = list(map(class_of.get, names)) if per_name else None
        present: set[int | None] = set(classes) if classes is not None else set(map(class_of.get, names))
        present.discard(None)
        reps: dict[int, GpuNode] = {}
        stale: set[int] = set()
        for cls in present:
            assert cls is not None
            rep = rep_of.get(cls)
            node = view.get(rep) if rep is not None else None
            # Any node of the class stands for it, named in the request or not; the rep may have moved on since.
            if node is not None and rep is not None and class_of.get(rep) == cls:
                reps[cls] = node
            else:
                stale.add(cls)
        if stale:
            for name in names:
                cls = class_of.get(name)
                if cls in stale and (node := view.get(name)) is not None:
                    reps[cls] = node
                    stale.discard(cls)
                    if not stale:
                        break
        return classes, reps

    def filter(self, args: ExtenderArgs) -> FilterOutcome:
        assert args.Pod is not None
        demand = self.demand(args.Pod)
        summary = f"{_pod_ref(args.Pod)} role={demand.role.value if demand.role else '-'}"
        scoring = self.settings.scoring
        if args.NodeNames is not None and args.Nodes is None:
            names = args.NodeNames
            if demand.role is None:
                result = ExtenderFilterResult(NodeNames=list(names), FailedNodes={})
                return FilterOutcome(result, {}, summary)
            _, reps = self._by_class(names, per_name=False)
            _, rejected = filter_nodes(demand, list(reps.values()), scoring)
            # Fan out per class with set operations in C: the cache knows each class's members, and the scheduler
            # does not care about the order of NodeNames.
            requested = set(names)
            members = self.cache.members() if self.cache is not None else {}
            fit_names: list[str] = []
            failed: dict[str, str] = {}
            unresolvable: dict[str, str] = {}
            counts: collections.Counter[NodeFilterReason] = collections.Counter()
            assigned = 0
            for cls, node in reps.items():
                in_request = members.get(cls, _NO_NAMES) & requested
                assigned += len(in_request)
                rejection = rejected.get(node.name)
                if rejection is None:
                    fit_names.extend(in_request)
                else:
                    (failed if rejection.resolvable else unresolvable).update(
                        dict.fromkeys(in_request, rejection.message)
                    )
                    counts[rejection.reason] += len(in_request)
            if assigned < len(requested):
                # Not cached, or moved between classes while we looked (a watch event): unknown for this call;
                # the scheduler retries.
                unknown = requested.difference(fit_names, failed, unresolvable)
                failed.update(dict.fromkeys(unknown, UNKNOWN_NODE_MESSAGE))
                counts[NodeFilterReason.UNKNOWN_NODE] += len(unknown)
            result = ExtenderFilterResult.model_construct(
                Nodes=None, NodeNames=fit_names, FailedNodes=failed, FailedAndUnresolvableNodes=unresolvable, Error=""
            )
            return FilterOutcome(result, counts, f"{summary}: {len(fit_names)}/{len(requested)} nodes fit")

        assert args.Nodes is not None
        items = args.Nodes.items or []
        kept = NodeList(apiVersion=args.Nodes.apiVersion, kind=args.Nodes.kind, metadata=args.Nodes.metadata)
        if demand.role is None:
            kept.items = list(items)
            return FilterOutcome(ExtenderFilterResult(Nodes=kept, FailedNodes={}), {}, summary)
        nodes = self._full_mode_nodes(items)
        fits, rejected = filter_nodes(demand, nodes, scoring)
        fit_set = {n.name for n in fits}
        kept.items = [item for item in items if name_of(item) in fit_set]
        failed = {}
        unresolvable = {}
        counts = collections.Counter()
        for name, rejection in rejected.items():
            (failed if rejection.resolvable else unresolvable)[name] = rejection.message
            counts[rejection.reason] += 1
        result = ExtenderFilterResult.model_construct(
            Nodes=kept, NodeNames=None, FailedNodes=failed, FailedAndUnresolvableNodes=unresolvable, Error=""
        )
        return FilterOutcome(result, counts, f"{summary}: {len(kept.items)}/{len(items)} nodes fit")

    def prioritize(self, args: ExtenderArgs) -> Priorities:
        assert args.Pod is not None
        demand = self.demand(args.Pod)
        if args.NodeNames is not None and args.Nodes is None:
            names: Sequence[str] = args.NodeNames
            if demand.role is None:
                return Priorities(names, [0] * len(names))
            classes, reps = self._by_class(names)
            rep_scores = score_nodes(demand, list(reps.values()), self.settings.scoring)
            by_class: dict[int | None, int] = {
                cls: to_extender_score(rep_scores[node.name]) for cls, node in reps.items()
            }
            assert classes is not None
            return Priorities(names, list(map(by_class.get, classes, itertools.repeat(0, len(classes)))))
        assert args.Nodes is not None
        items = args.Nodes.items or []
        names = [name_of(item) for item in items]
        if demand.role is None:
            return Priorities(names, [0] * len(names))
        scores = score_nodes(demand, self._full_mode_nodes(items), self.settings.scoring)
        scale = {score: to_extender_score(score) for score in set(scores.values())}
        scale[-1.0] = 0  # unknown nodes
        return Priorities(names, [scale[scores.get(name, -1.0)] for name in names])

    def bind(self, args: ExtenderBindingArgs) -> ExtenderBindingResult:
        return ExtenderBindingResult(
            Error=f"conserve extender does not bind (pod {args.PodNamespace}/{args.PodName}); leave bindVerb unset"
        )
