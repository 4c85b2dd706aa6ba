"""The pod runner: one in-process GPU-server simulator per serving pod on a KWOK node.

KWOK plays the pods' status but runs nothing, so a pod scheduled there answers no HTTP. The runner watches pods
labelled `conserve.dev/role` (prefill, decode or both), and for each one bound to a fake node starts a
simulator on a free 127.0.0.1 port, with the GPU of the pod's node (GFD label `nvidia.com/gpu.product`), the
pod's GPU count (its `nvidia.com/gpu` limit) and its model (annotation `conserve.dev/model`, else the runner's
default); then it annotates the pod `conserve.dev/endpoint: 127.0.0.1:PORT`, which the operator and the router
use in place of the pod IP. A pod that is deleted (or terminating) has its simulator stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from conserve.api.labels import (
    ANNOTATION_ENDPOINT,
    ANNOTATION_KWOK_NODE,
    ANNOTATION_MODEL,
    LABEL_GPU_PRODUCT,
    LABEL_ROLE,
    POD_FINISHED_PHASES,
    RESOURCE_GPU,
)
from conserve.gpusim.engine import Role
from conserve.gpusim.server import GpuSimConfig, GpuSimServer
from conserve.kube import ApiError, Informer, annotations_patch
from conserve.kube.clients import CoreV1Api

log = logging.getLogger(__name__)

__all__ = ["ANNOTATION_ENDPOINT", "LABEL_ROLE", "PodRunner", "PodSpecView", "view_pod", "wants_server"]


@dataclass(frozen=True, slots=True)
class PodSpecView:
    """What the runner needs of a pod (a pure projection of the API object)."""

    namespace: str
    name: str
    uid: str
    node: str
    role: Role | None
    gpu_count: int
    model: str | None
    endpoint: str | None
    terminating: bool
    finished: bool


def view_pod(pod: Mapping[str, Any]) -> PodSpecView:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    role: Role | None
    try:
        role = Role(str(labels.get(LABEL_ROLE, "")).lower())
    except ValueError:
        role = None
    gpus = 0
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(RESOURCE_GPU) or (resources.get("requests") or {}).get(RESOURCE_GPU)
        with contextlib.suppress(TypeError, ValueError):
            gpus += int(value) if value is not None else 0
    return PodSpecView(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        node=str(spec.get("nodeName") or ""),
        role=role,
        gpu_count=max(gpus, 1),
        model=annotations.get(ANNOTATION_MODEL),
        endpoint=annotations.get(ANNOTATION_ENDPOINT),
        terminating=meta.get("deletionTimestamp") is not None,
        finished=status.get("phase") in POD_FINISHED_PHASES,
    )


def wants_server(pod: PodSpecView, node_annotations: Mapping[str, str] | None, any_node: bool) -> bool:
    if pod.role is None or not pod.node or pod.terminating or pod.finished:
        return False
    if any_node:
        return True
    return node_annotations is not None and node_annotations.get(ANNOTATION_KWOK_NODE) == "fake"


@dataclass
class _Running:
    server: GpuSimServer
    endpoint: str


class PodRunner:
    """Reconciles simulators with pods. The Kubernetes client is sync: an informer thread watches, calls run in
    threads."""

    def __init__(
        self,
        *,
        api_client: Any,
        namespace: str | None,
        base: GpuSimConfig,
        any_node: bool = False,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._core = CoreV1Api(api_client)
        self._namespace = namespace
        self._base = base
        self._any_node = any_node
        self._running: dict[str, _Running] = {}  # pod uid -> server
        self._nodes: dict[str, dict[str, Any]] = {}  # node name -> {"labels": ..., "annotations": ...}
        self._on_change = on_change

    @property
    def servers(self) -> dict[str, str]:
        """pod uid -> endpoint of the simulators running now."""
        return {uid: r.endpoint for uid, r in self._running.items()}

    async def run(self) -> None:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

        def replace(pods: list[dict[str, Any]]) -> None:
            for pod in pods:
                queue.put_nowait(("SYNC", pod))

        informer = self._informer(
            on_replace=replace,
            on_event=lambda kind, pod: queue.put_nowait((kind, pod)),
            loop=asyncio.get_running_loop(),
        )
        informer.start()
        try:
            while True:
                kind, pod = await queue.get()
                try:
                    await self._reconcile(kind, pod)
                except Exception:  # one pod's failure is logged; the others keep their servers
                    log.exception("reconciling pod %s", (pod.get("metadata") or {}).get("name"))
        finally:
            informer.stop()
            for uid in list(self._running):
                await self._stop_server(uid)

    def _informer(self, **callbacks: Any) -> Informer:
        """The role-labelled pods of the runner's namespace (or of all)."""
        scope = (
            (self._core.list_namespaced_pod, self._namespace)
            if self._namespace
            else (self._core.list_pod_for_all_namespaces,)
        )
        return Informer(*scope, name="gpusim-pods", label_selector=LABEL_ROLE, **callbacks)

    async def _node(self, name: str) -> dict[str, Any] | None:
        if name not in self._nodes:
            try:
                node: Any = await asyncio.to_thread(self._core.read_node, name)
            except ApiError as err:
                log.warning("reading node %s: %s", name, err.reason)
                return None
            self._nodes[name] = {
                "labels": dict(node.metadata.labels or {}),
                "annotations": dict(node.metadata.annotations or {}),
            }
        return self._nodes[name]

    async def _reconcile(self, kind: str, obj: dict[str, Any]) -> None:
        pod = view_pod(obj)
        if kind == "DELETED":
            await self._stop_server(pod.uid)
            return
        node = await self._node(pod.node) if pod.node else None
        wanted = wants_server(pod, node["annotations"] if node else None, self._any_node)
        if not wanted:
            await self._stop_server(pod.uid)
            return
        running = self._running.get(pod.uid)
        if running is None:
            assert pod.role is not None
            assert node is not None
            product = node["labels"].get(LABEL_GPU_PRODUCT, "") or self._base.gpu
            config = replace(
                self._base,
                role=pod.role,
                gpu=product,
                gpu_count=pod.gpu_count,
                model=pod.model or self._base.model,
                port=0,
                name=pod.name,
            )
            server = GpuSimServer(config)
            port = await server.start()
            running = _Running(server, f"{config.host}:{port}")
            self._running[pod.uid] = running
            log.info(
                "pod %s/%s (%s on %s): gpu-sim at %s", pod.namespace, pod.name, pod.role, product, running.endpoint
            )
            if self._on_change is not None:
                self._on_change()
        if pod.endpoint != running.endpoint:
            patch = annotations_patch({ANNOTATION_ENDPOINT: running.endpoint})
            try:
                await asyncio.to_thread(self._core.patch_namespaced_pod, pod.name, pod.namespace, patch)
            except ApiError as err:
                log.warning("annotating pod %s/%s: %s", pod.namespace, pod.name, err)

    async def _stop_server(self, uid: str) -> None:
        running = self._running.pop(uid, None)
        if running is not None:
            await running.server.stop()
            log.info("stopped gpu-sim at %s", running.endpoint)
            if self._on_change is not None:
                self._on_change()
