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
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from conserve.api.corev1 import Pod
from conserve.api.labels import (
    ANNOTATION_ENDPOINT,
    ANNOTATION_KWOK_NODE,
    ANNOTATION_MODEL,
    LABEL_GPU_PRODUCT,
    LABEL_ROLE,
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


def view_pod(obj: Mapping[str, Any]) -> PodSpecView:
    pod = Pod.model_validate(obj)
    meta = pod.metadata
    role: Role | None
    try:
        role = Role(pod.role)
    except ValueError:
        role = None
    return PodSpecView(
        namespace=meta.namespace,
        name=meta.name,
        uid=meta.uid,
        node=pod.spec.node_name,
        role=role,
        gpu_count=max(pod.gpus, 1),
        model=meta.annotations.get(ANNOTATION_MODEL),
        endpoint=meta.annotations.get(ANNOTATION_ENDPOINT),
        terminating=pod.terminating,
        finished=pod.finished,
    )


def wants_server(pod: PodSpecView, node_annotations: Mapping[str, str] | None, any_node: bool) -> bool:
    if pod.role is None or not pod.node or pod.terminating or pod.finished:
        return False
    if any_node:
        return True
    return node_annotations is not None and node_annotations.get(ANNOTATION_KWOK_NODE) == "fake"


class PodServer(Protocol):
    """A serving process fronting one pod: gpu-sim here, a real vLLM under `conserve engine pods`."""

    async def start(self) -> str:
        """Start serving; returns the endpoint (host:port)."""
        ...

    async def stop(self) -> None: ...


#: Makes the server of a pod, given the pod and its node's GPU product.
ServerFactory = Callable[[PodSpecView, str], PodServer]


class _GpuSimPodServer:
    def __init__(self, config: GpuSimConfig) -> None:
        self._server = GpuSimServer(config)
        self._host = config.host

    async def start(self) -> str:
        return f"{self._host}:{await self._server.start()}"

    async def stop(self) -> None:
        await self._server.stop()


def gpusim_factory(base: GpuSimConfig) -> ServerFactory:
    def make(pod: PodSpecView, product: str) -> PodServer:
        assert pod.role is not None
        config = replace(
            base,
            role=pod.role,
            gpu=product or base.gpu,
            gpu_count=pod.gpu_count,
            model=pod.model or base.model,
            port=0,
            name=pod.name,
        )
        return _GpuSimPodServer(config)

    return make


@dataclass
class _Running:
    server: PodServer
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
        server_factory: ServerFactory | None = None,
    ) -> None:
        self._core = CoreV1Api(api_client)
        self._namespace = namespace
        self._make_server = server_factory or gpusim_factory(base)
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
            product = str(node["labels"].get(LABEL_GPU_PRODUCT, ""))
            server = self._make_server(pod, product)
            running = _Running(server, await server.start())
            self._running[pod.uid] = running
            log.info(
                "pod %s/%s (%s on %s): serving at %s", pod.namespace, pod.name, pod.role, product, running.endpoint
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
            log.info("stopped the server at %s", running.endpoint)
            if self._on_change is not None:
                self._on_change()
