"""A watch cache of nodes and pods: what the extender knows of the cluster between scheduler calls.

`ClusterCache` is plain state fed by events (`apply_node`, `apply_pod`, `replace_*`); it is thread-safe for one
writer per kind and many readers. `KubeWatcher` feeds it from the API server with list + watch (the kubernetes
adapter's informers, in daemon threads), re-listing when a watch expires (410 Gone) or fails.

Readers see a per-node `GpuNode` that is replaced, never mutated, whenever its node or a pod bound to it
changes; a lookup is one dict read.

The cache lags the scheduler by the time a binding takes to come back as a pod event: between two scheduling
cycles the extender may count fewer used GPUs than the scheduler's own (assumed) state. The scheduler's
NodeResourcesFit filter runs before the extender with the assumed pods, so this never over-commits a node.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from conserve.core.gpus import Role
from conserve.core.node_scoring import GpuNode, NodeKey
from conserve.extender.objects import NodeUsage, PodUsage, gpu_node, name_of, pod_usage
from conserve.kube import Backoff, Informer, new_api_client
from conserve.kube.clients import CoreV1Api

log = logging.getLogger(__name__)

_MAX_CLASS_IDS = 100_000


def _pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    uid = meta.get("uid")
    if isinstance(uid, str) and uid:
        return uid
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class ClusterCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, Mapping[str, Any]] = {}
        self._pods: dict[str, PodUsage] = {}
        self._usage: dict[str, NodeUsage] = {}
        self._view: dict[str, GpuNode] = {}
        self._class_of: dict[str, int] = {}
        self._class_ids: dict[NodeKey, int] = {}
        self._rep_of: dict[int, str] = {}
        self._members: dict[int, set[str]] = {}
        self.nodes_synced = threading.Event()
        self.pods_synced = threading.Event()

    # --- readers -----------------------------------------------------------------------------------------------

    def get(self, name: str) -> GpuNode | None:
        return self._view.get(name)

    def nodes(self) -> Mapping[str, GpuNode]:
        """The live name -> node view (read it, do not keep it: entries are replaced as events arrive)."""
        return self._view

    def classes(self) -> Mapping[str, int]:
        """The live name -> class view: nodes of one class have equal `GpuNode.key`s, so they decide alike.

        Small ints rather than the key tuples: a request hashes them once per name and per pass, and a tuple
        hashes its five fields every time.
        """
        return self._class_of

    def members(self) -> Mapping[int, AbstractSet[str]]:
        """The live class -> node names view (a set is changed in place; intersect it, do not iterate it)."""
        return self._members

    def representatives(self) -> Mapping[int, str]:
        """Class -> the name of a node last seen in it (check `classes()`: that node may have moved on)."""
        return self._rep_of

    def usage(self, node: str) -> NodeUsage | None:
        return self._usage.get(node)

    @property
    def node_count(self) -> int:
        return len(self._nodes)

    @property
    def pod_count(self) -> int:
        return len(self._pods)

    # --- writers: nodes ----------------------------------------------------------------------------------------

    @staticmethod
    def _slim_node(node: Mapping[str, Any]) -> Mapping[str, Any]:
        """Keep what `gpu_node` reads: labels and allocatable (a full Node is several KiB)."""
        meta = node.get("metadata") if isinstance(node.get("metadata"), dict) else {}
        status = node.get("status") if isinstance(node.get("status"), dict) else {}
        assert isinstance(meta, dict)
        assert isinstance(status, dict)
        return {
            "metadata": {"name": meta.get("name"), "labels": meta.get("labels") or {}},
            "status": {"allocatable": status.get("allocatable") or {}},
        }

    def _set_class(self, name: str, cls: int | None) -> None:
        """Move a node between classes, keeping a live representative for every class that has members."""
        old = self._class_of.get(name)
        if old == cls:
            return
        if old is not None:
            members = self._members.get(old)
            if members is not None:
                members.discard(name)
                if not members:
                    del self._members[old]
                    self._rep_of.pop(old, None)
                elif self._rep_of.get(old) == name:
                    self._rep_of[old] = next(iter(members))
        if cls is None:
            self._class_of.pop(name, None)
            return
        self._members.setdefault(cls, set()).add(name)
        self._class_of[name] = cls
        self._rep_of.setdefault(cls, name)

    def _refresh(self, name: str) -> None:
        node = self._nodes.get(name)
        if node is None:
            self._view.pop(name, None)
            self._set_class(name, None)
            return
        view = self._view[name] = gpu_node(node, self._usage.get(name))
        if len(self._class_ids) > _MAX_CLASS_IDS:
            # Keys seen long ago pile up: renumber. Readers that mix old and new ids see a class without a
            # representative and fall back to a scan, never a wrong answer.
            self._class_ids = {}
            self._class_of, self._rep_of, self._members = {}, {}, {}
            for other, other_view in self._view.items():
                self._set_class(other, self._class_ids.setdefault(other_view.key, len(self._class_ids)))
        self._set_class(name, self._class_ids.setdefault(view.key, len(self._class_ids)))

    def apply_node(self, event_type: str, node: Mapping[str, Any]) -> None:
        name = name_of(node)
        if not name:
            return
        with self._lock:
            if event_type == "DELETED":
                self._nodes.pop(name, None)
            else:
                self._nodes[name] = self._slim_node(node)
            self._refresh(name)

    def replace_nodes(self, nodes: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            self._nodes = {name: self._slim_node(n) for n in nodes if (name := name_of(n))}
            for name in set(self._view) - set(self._nodes):
                self._view.pop(name, None)
                self._set_class(name, None)
            for name in self._nodes:
                self._refresh(name)
        self.nodes_synced.set()

    # --- writers: pods -----------------------------------------------------------------------------------------

    def _add_usage(self, usage: PodUsage, sign: int) -> None:
        current = self._usage.get(usage.node, NodeUsage())
        updated = NodeUsage(
            gpus=current.gpus + sign * usage.gpus,
            prefill_pods=current.prefill_pods + (sign if usage.role is Role.PREFILL else 0),
            decode_pods=current.decode_pods + (sign if usage.role is Role.DECODE else 0),
        )
        if updated == NodeUsage():
            self._usage.pop(usage.node, None)
        else:
            self._usage[usage.node] = updated
        self._refresh(usage.node)

    def apply_pod(self, event_type: str, pod: Mapping[str, Any]) -> None:
        key = _pod_key(pod)
        new = None if event_type == "DELETED" else pod_usage(pod)
        with self._lock:
            old = self._pods.pop(key, None)
            if old is not None:
                self._add_usage(old, -1)
            if new is not None:
                self._pods[key] = new
                self._add_usage(new, +1)

    def replace_pods(self, pods: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            touched = set(self._usage)
            self._pods = {}
            self._usage = {}
            for pod in pods:
                usage = pod_usage(pod)
                if usage is not None:
                    self._pods[_pod_key(pod)] = usage
                    current = self._usage.get(usage.node, NodeUsage())
                    self._usage[usage.node] = NodeUsage(
                        current.gpus + usage.gpus,
                        current.prefill_pods + (usage.role is Role.PREFILL),
                        current.decode_pods + (usage.role is Role.DECODE),
                    )
            for name in touched | set(self._usage):
                self._refresh(name)
        self.pods_synced.set()


# --- feeding the cache from the API server -------------------------------------------------------------------


@dataclass
class KubeWatcher:
    """List + watch nodes (optional) and pods into a `ClusterCache` with two informers, until `stop()`."""

    cache: ClusterCache
    _: KW_ONLY
    kubeconfig: str | None = None
    watch_nodes: bool = True
    watch_timeout_s: int = 60
    retry_delay_s: float = 1.0
    _informers: list[Informer] = field(default_factory=list, init=False, repr=False)

    def start(self) -> None:
        core = CoreV1Api(new_api_client(self.kubeconfig))
        if self.watch_nodes:
            self._spawn("nodes", core.list_node, self.cache.replace_nodes, self.cache.apply_node)
        else:
            self.cache.nodes_synced.set()
        self._spawn("pods", core.list_pod_for_all_namespaces, self.cache.replace_pods, self.cache.apply_pod)

    def _spawn(
        self,
        kind: str,
        list_func: Callable[..., Any],
        replace: Callable[[list[dict[str, Any]]], None],
        apply: Callable[[str, dict[str, Any]], None],
    ) -> None:
        informer = Informer(
            list_func,
            name=f"extender-{kind}",
            on_replace=replace,
            on_event=apply,
            watch_timeout_s=self.watch_timeout_s,
            backoff=Backoff(first_s=self.retry_delay_s),
        )
        self._informers.append(informer)
        informer.start()

    def stop(self) -> None:
        for informer in self._informers:
            informer.stop()
