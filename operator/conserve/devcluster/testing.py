"""What the pytest fixtures hand to tests: a handle on the cluster under test, local or given.

The e2e suite runs against a LocalCluster it starts itself, or against any cluster named by
``CONSERVE_KUBECONFIG`` (a kind cluster from ``kind-config.yaml``, a `conserve dev up` cluster, ...).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from conserve.devcluster import build, nodes
from conserve.devcluster.cluster import CONSERVE_SCHEDULER_NAME, DEFAULT_SCHEDULER_NAME, LocalCluster
from conserve.devcluster.commands import run_kubectl
from conserve.kube import ApiError
from conserve.kube.clients import ApiextensionsV1Api, CoreV1Api, CustomObjectsApi


@dataclass
class ClusterHandle:
    """The cluster under test.

    ``extender_url``/``extender_port`` are where the ``conserve-scheduler`` profile calls the extender
    (start ``conserve extender --port <extender_port>`` there); None on a given cluster unless
    ``CONSERVE_EXTENDER_URL`` is set.
    """

    kubeconfig: Path
    scheduler_name: str = CONSERVE_SCHEDULER_NAME
    default_scheduler_name: str = DEFAULT_SCHEDULER_NAME
    extender_url: str | None = None
    gpu_node_names: list[str] = field(default_factory=list)
    local: LocalCluster | None = None  # None when testing a given cluster

    @property
    def extender_port(self) -> int | None:
        if self.extender_url is None:
            return None
        return urlparse(self.extender_url).port

    def api_client(self, pool_size: int = 16) -> Any:
        """A new ``kubernetes.client.ApiClient`` as cluster admin; close it (or use ``with``) when done."""
        return nodes.new_api_client(self.kubeconfig, pool_size)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_kubectl(self.kubeconfig, *args, check=check, input=input)

    @property
    def helm(self) -> Path:
        """The helm binary built with the control plane."""
        return build.binaries().helm

    def apply_gpu_nodes(self, specs: Sequence[nodes.GpuNodeSpec], wait: bool = True) -> list[str]:
        names = nodes.apply_gpu_nodes(self.kubeconfig, specs)
        if wait:
            nodes.wait_nodes_ready(self.kubeconfig, names, timeout_s=max(60.0, len(names) / 10))
        return names


@contextmanager
def cluster_for_tests(state_dir: Path, nodes_file: Path | None = None) -> Iterator[ClusterHandle]:
    """The cluster for a test session: the one named by ``CONSERVE_KUBECONFIG``, or a fresh LocalCluster
    (built if needed). Never skips: if the control plane cannot be built or started, this raises."""
    specs = nodes.load_node_specs(nodes_file)
    given = os.environ.get("CONSERVE_KUBECONFIG")
    if given:
        handle = ClusterHandle(
            kubeconfig=Path(given),
            scheduler_name=os.environ.get("CONSERVE_SCHEDULER_NAME", CONSERVE_SCHEDULER_NAME),
            extender_url=os.environ.get("CONSERVE_EXTENDER_URL"),
        )
        try:
            handle.gpu_node_names = handle.apply_gpu_nodes(specs)
        except TimeoutError as exc:
            raise RuntimeError(
                f"{exc}: the cluster named by CONSERVE_KUBECONFIG needs KWOK running in it, managing nodes "
                "annotated kwok.x-k8s.io/node=fake (KWOK's kwok.yaml and stage-fast.yaml release manifests)"
            ) from exc
        yield handle
        return
    build.build_all()
    with LocalCluster(state_dir, die_with_parent=True) as local:
        handle = ClusterHandle(kubeconfig=local.kubeconfig, extender_url=local.extender_url, local=local)
        handle.gpu_node_names = handle.apply_gpu_nodes(specs)
        yield handle


def namespace_name(test_name: str) -> str:
    """A valid, unique namespace name derived from a test's name."""
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-") or "test"
    return f"t-{base}-{secrets.token_hex(3)}"


@contextmanager
def temporary_namespace(
    cluster: ClusterHandle, test_name: str, timeout_s: float = 120.0, wait_deleted_s: float = 0.0
) -> Iterator[str]:
    """Create a namespace, wait for its ``default`` ServiceAccount (pods are refused without it); afterwards
    delete it and its pods at once, and wait up to ``wait_deleted_s`` for the rest to be gone (0: no wait).

    The wait is long because the controller-manager makes the ServiceAccount: after a test that stopped the
    API server (the healing outage test), its controllers take tens of seconds to resync (CI once waited past
    30 s for the next test's namespace)."""
    name = namespace_name(test_name)
    with cluster.api_client() as api_client:
        core = CoreV1Api(api_client)
        body: Any = {"metadata": {"name": name, "labels": {"conserve.dev/test": "true"}}}
        core.create_namespace(body)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                core.read_namespaced_service_account("default", name)
                break
            except ApiError as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        try:
            yield name
        finally:
            try:
                core.delete_namespace(name)
                # The namespace is Terminating now (no new pods can be admitted in it): remove its pods at
                # once, so the fake GPUs they held are free for the next test, which shares the nodes. The
                # rest goes with the namespace controller, in the background.
                core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
                _drop_custom_finalizers(api_client, name)
            except ApiError as exc:
                if exc.status != 404:
                    raise
            if wait_deleted_s > 0:
                _wait_gone(core, name, wait_deleted_s)


def _drop_custom_finalizers(api_client: Any, namespace: str) -> None:
    """Clear the finalizers of every custom object left in a deleted test namespace. The controller that
    set them (an operator the test ran) has stopped by now, so nothing would ever remove them: the
    namespace would stay Terminating, and its objects would show up in every later test's cluster-wide
    view (an operator started later would try to act on them)."""
    custom = CustomObjectsApi(api_client)
    for crd in ApiextensionsV1Api(api_client).list_custom_resource_definition().items:
        if crd.spec.scope != "Namespaced":
            continue
        group, plural = crd.spec.group, crd.spec.names.plural
        version = next((v.name for v in crd.spec.versions if v.storage), crd.spec.versions[0].name)
        try:
            listed: Any = custom.list_namespaced_custom_object(group, version, namespace, plural)
            items = listed.get("items", [])
            for obj in items:
                if obj["metadata"].get("finalizers"):
                    custom.patch_namespaced_custom_object(
                        group, version, namespace, plural, obj["metadata"]["name"], {"metadata": {"finalizers": None}}
                    )
        except ApiError as exc:
            if exc.status not in (404, 409, 422):
                raise


def _wait_gone(core: Any, namespace: str, timeout_s: float) -> None:
    """Wait until the namespace controller has removed everything in it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.2)
    warnings.warn(f"namespace {namespace} still terminating after {timeout_s:.0f}s", stacklevel=2)
