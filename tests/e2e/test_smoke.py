"""The control plane is real: every part answers as Kubernetes does, nothing is mocked.

Each test names the component it proves: etcd and the API server (CRDs, watches, /version), the
controller-manager (Deployments, ReplicaSets, Jobs, service-account tokens), the kube-scheduler (binding
to fake GPU nodes), KWOK (node and pod status), RBAC (a real token is denied what is not granted).
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from kubernetes import client as typed_client

from conserve.api.labels import LABEL_GPU_PRODUCT, RESOURCE_GPU
from conserve.devcluster.build import KUBERNETES_VERSION
from conserve.devcluster.testing import ClusterHandle, temporary_namespace
from conserve.kube import ApiError as ApiException
from conserve.kube import Informer
from conserve.testkit import wait_for

# Plain dicts in and out: the client's stubs want its model classes.
client: Any = typed_client

GROUP = "smoke.conserve.dev"


@pytest.fixture
def api(cluster: ClusterHandle) -> Any:
    with cluster.api_client() as api_client:
        yield api_client


def test_version_is_the_pinned_kubernetes(api: Any) -> None:
    info = client.VersionApi(api).get_code()
    assert info.git_version == KUBERNETES_VERSION
    assert info.major == KUBERNETES_VERSION.lstrip("v").split(".")[0]


def _ensure_widget_crd(ext: Any) -> bool:
    """Create the smoke test's Widget CRD if missing; True once it is Established."""
    crd_name = f"widgets.{GROUP}"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as exc:
        if exc.status != 409:  # a previous test session against the same given cluster
            raise

    def established() -> bool:
        conds = ext.read_custom_resource_definition(crd_name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    return established()


def test_crd_object_created_and_watched(api: Any, namespace: str) -> None:
    ext = client.ApiextensionsV1Api(api)
    wait_for("the CRD to be Established", lambda: _ensure_widget_crd(ext), 30)

    custom = client.CustomObjectsApi(api)
    events: list[tuple[str, str, Any]] = []
    informer = Informer(
        custom.list_namespaced_custom_object,
        GROUP,
        "v1",
        namespace,
        "widgets",
        name="widgets",
        on_replace=lambda items: None,
        on_event=lambda kind, obj: events.append((kind, obj["metadata"]["name"], obj.get("spec", {}).get("size"))),
        watch_timeout_s=30,
    )
    informer.start()
    try:
        assert informer.synced.wait(30), "the widgets were never listed"
        # The watch starts from the listing's resourceVersion: it sees every change made after the listing,
        # however late its request opens.
        body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
        created = custom.create_namespaced_custom_object(GROUP, "v1", namespace, "widgets", body)
        assert created["metadata"]["uid"]
        custom.patch_namespaced_custom_object(GROUP, "v1", namespace, "widgets", "w1", {"spec": {"size": 5}})
        wait_for("the watch to bring the update", lambda: ("MODIFIED", "w1", 5) in events, 30)
    finally:
        informer.stop()
    assert events[0] == ("ADDED", "w1", 3)
    # The schema is enforced by the real API server: a wrong type is refused.
    bad = {**body, "metadata": {"name": "w2"}, "spec": {"size": "big"}}
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(GROUP, "v1", namespace, "widgets", bad)
    assert err.value.status == 422


def test_deployment_scheduled_onto_fake_gpu_nodes_and_running(api: Any, namespace: str, cluster: ClusterHandle) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    replicas = 3
    labels = {"app": "smoke-gpu"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "smoke-gpu"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "decode",
                            "image": "registry.invalid/never-pulled:latest",
                            # 8 GPUs: exactly one whole node each, so three pods need three nodes.
                            "resources": {"limits": {RESOURCE_GPU: "8"}, "requests": {RESOURCE_GPU: "8"}},
                        }
                    ],
                    "nodeSelector": {LABEL_GPU_PRODUCT: "NVIDIA-H200"},
                },
            },
        },
    }
    apps.create_namespaced_deployment(namespace, deployment)

    # The controller-manager's deployment controller makes a ReplicaSet owned by the Deployment...
    def replica_set() -> Any:
        for rs in apps.list_namespaced_replica_set(namespace).items:
            if any(o.kind == "Deployment" and o.name == "smoke-gpu" for o in rs.metadata.owner_references or []):
                return rs
        return None

    rs = wait_for("a ReplicaSet made by the deployment controller", replica_set, 30)

    # ...whose replicaset controller makes Pods owned by it.
    def pods() -> list[Any] | None:
        items = core.list_namespaced_pod(namespace, label_selector="app=smoke-gpu").items
        return items if len(items) == replicas else None

    wait_for("pods made by the replicaset controller", pods, 30)

    # Only two H200 nodes exist, each with 8 GPUs: the scheduler binds two pods and leaves one Pending.
    def placed() -> list[Any] | None:
        items = core.list_namespaced_pod(namespace, label_selector="app=smoke-gpu").items
        bound = [p for p in items if p.spec.node_name]
        return bound if len(bound) == 2 and all(p.status.phase == "Running" for p in bound) else None

    bound = wait_for("two pods bound by kube-scheduler and Running via KWOK", placed, 60)
    h200_nodes = {n for n in cluster.gpu_node_names if "h200" in n}
    assert {p.spec.node_name for p in bound} == h200_nodes
    for p in bound:
        assert p.metadata.owner_references[0].kind == "ReplicaSet"
        assert p.metadata.owner_references[0].name == rs.metadata.name
        assert p.spec.scheduler_name == cluster.default_scheduler_name
        ready = [c for c in p.status.conditions or [] if c.type == "Ready"]
        assert ready
        assert ready[0].status == "True"
        node = core.read_node(p.spec.node_name)
        assert node.metadata.labels[LABEL_GPU_PRODUCT] == "NVIDIA-H200"
        assert node.status.allocatable[RESOURCE_GPU] == "8"

    pending = [
        p for p in core.list_namespaced_pod(namespace, label_selector="app=smoke-gpu").items if not p.spec.node_name
    ]
    assert len(pending) == 1

    def unschedulable() -> bool:
        conds = core.read_namespaced_pod(pending[0].metadata.name, namespace).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conds)

    wait_for("the third pod marked Unschedulable (not enough nvidia.com/gpu)", unschedulable, 30)

    # Scale to two: the Deployment becomes fully available.
    apps.patch_namespaced_deployment_scale("smoke-gpu", namespace, {"spec": {"replicas": 2}})

    def available() -> bool:
        st = apps.read_namespaced_deployment_status("smoke-gpu", namespace).status
        return bool(st.available_replicas == 2 and st.ready_replicas == 2)

    wait_for("the Deployment to report 2 available replicas", available, 60)


def test_job_pods_succeed(api: Any, namespace: str) -> None:
    batch = client.BatchV1Api(api)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "smoke-job"},
        "spec": {
            "completions": 2,
            "parallelism": 2,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "prefill",
                            "image": "registry.invalid/never-pulled:latest",
                            "resources": {"limits": {RESOURCE_GPU: "1"}},
                        }
                    ],
                }
            },
        },
    }
    batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        st = batch.read_namespaced_job_status("smoke-job", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in st.conditions or [])

    wait_for("the Job to complete (KWOK marks its pods Succeeded)", complete, 60)
    assert batch.read_namespaced_job_status("smoke-job", namespace).status.succeeded == 2


def _client_with_token(api: Any, token: str) -> Any:
    cfg = client.Configuration()
    cfg.host = api.configuration.host
    cfg.ssl_ca_cert = api.configuration.ssl_ca_cert
    cfg.verify_ssl = api.configuration.verify_ssl
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def test_service_account_token_is_real_and_rbac_enforced(api: Any, namespace: str) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})

    # A bound token from the TokenRequest API, signed with the cluster's service-account key.
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    assert token.count(".") == 2  # a JWT

    with _client_with_token(api, token) as as_sa:
        who = client.AuthenticationV1Api(as_sa).create_self_subject_review({})
        assert who.status.user_info.username == f"system:serviceaccount:{namespace}:reader"

        sa_core = client.CoreV1Api(as_sa)
        with pytest.raises(ApiException) as denied:
            sa_core.list_namespaced_pod(namespace)
        assert denied.value.status == 403

        rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "reader-reads-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            },
        )

        def allowed() -> bool:
            try:
                sa_core.list_namespaced_pod(namespace)
            except ApiException as exc:
                if exc.status == 403:
                    return False
                raise
            return True

        wait_for("RBAC to grant the bound role", allowed, 10)
        # Granted pods, still denied everything else.
        with pytest.raises(ApiException) as still_denied:
            sa_core.list_namespaced_secret(namespace)
        assert still_denied.value.status == 403


def test_controller_manager_fills_service_account_token_secret(api: Any, namespace: str) -> None:
    """The serviceaccount-token controller signs a legacy token Secret with the cluster's key."""
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "legacy"}})
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "legacy-token", "annotations": {"kubernetes.io/service-account.name": "legacy"}},
            "type": "kubernetes.io/service-account-token",
        },
    )

    def filled() -> str | None:
        data = core.read_namespaced_secret("legacy-token", namespace).data or {}
        return data.get("token")

    token = base64.b64decode(wait_for("the token controller to fill the Secret", filled, 30)).decode()
    with _client_with_token(api, token) as as_sa:
        who = client.AuthenticationV1Api(as_sa).create_self_subject_review({})
        assert who.status.user_info.username == f"system:serviceaccount:{namespace}:legacy"


class _RecordingExtender(http.server.BaseHTTPRequestHandler):
    """Stands where `conserve extender` will listen, to check the wiring of the conserve-scheduler profile:
    it keeps only H100 nodes and prefers the one whose name ends in -1."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        args = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        verb = self.path.rstrip("/").rsplit("/", 1)[-1]
        self.calls.append((verb, args))
        names: list[str] = args.get("NodeNames") or []
        if verb == "filter":
            keep = [n for n in names if "-h100-" in n]
            failed = {n: "not an H100" for n in names if n not in keep}
            body: Any = {"NodeNames": keep, "FailedNodes": failed, "Error": ""}
        else:
            body = [{"Host": n, "Score": 10 if n.endswith("-1") else 0} for n in names]
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_conserve_scheduler_profile_calls_the_extender_url(api: Any, namespace: str, cluster: ClusterHandle) -> None:
    if cluster.extender_port is None:
        pytest.skip("the given cluster's extender URL is unknown (set CONSERVE_EXTENDER_URL)")
    _RecordingExtender.calls = []
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", cluster.extender_port), _RecordingExtender)
    except OSError as exc:
        pytest.skip(f"port {cluster.extender_port} is taken, presumably by a real extender: {exc}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    core = client.CoreV1Api(api)
    try:

        def pod(name: str, gpus: int) -> dict[str, Any]:
            res = {"limits": {RESOURCE_GPU: str(gpus)}} if gpus else {}
            return {
                "metadata": {"name": name},
                "spec": {
                    "schedulerName": cluster.scheduler_name,
                    "containers": [{"name": "c", "image": "registry.invalid/x:1", "resources": res}],
                },
            }

        core.create_namespaced_pod(namespace, pod("no-gpu", 0))
        core.create_namespaced_pod(namespace, pod("one-gpu", 1))

        def bound(name: str) -> Callable[[], str | None]:
            return lambda: core.read_namespaced_pod(name, namespace).spec.node_name

        assert wait_for("the GPU pod bound via the extender", bound("one-gpu"), 30) == "kwok-h100-1"
        wait_for("the CPU-only pod bound without the extender", bound("no-gpu"), 30)
    finally:
        server.shutdown()
        server.server_close()
    verbs = [verb for verb, _ in _RecordingExtender.calls]
    assert "filter" in verbs
    assert "prioritize" in verbs
    # nodeCacheCapable: node names only; managedResources: only the pod asking for nvidia.com/gpu is sent.
    for _, args in _RecordingExtender.calls:
        assert args["NodeNames"]
        assert not args.get("Nodes")
        assert args["Pod"]["metadata"]["name"] == "one-gpu"


def test_namespace_teardown_frees_gpus_at_once(cluster: ClusterHandle) -> None:
    """The `namespace` fixture's teardown: pods go at once, so the next test finds every fake GPU free."""
    with cluster.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        with temporary_namespace(cluster, "teardown") as ns:
            body: Any = {
                "metadata": {"name": "hog"},
                "spec": {
                    "containers": [
                        {"name": "c", "image": "registry.invalid/x:1", "resources": {"limits": {RESOURCE_GPU: "8"}}}
                    ],
                    "nodeSelector": {LABEL_GPU_PRODUCT: "NVIDIA-H20"},
                },
            }
            core.create_namespaced_pod(ns, body)
            wait_for("the pod bound", lambda: core.read_namespaced_pod("hog", ns).spec.node_name, 30)
        assert core.list_namespaced_pod(ns).items == []


def test_namespace_teardown_clears_finalizers_left_by_a_stopped_controller(cluster: ClusterHandle) -> None:
    with cluster.api_client() as api_client:
        core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
        ext = client.ApiextensionsV1Api(api_client)
        wait_for("the smoke CRD (from the CRD test)", lambda: _ensure_widget_crd(ext), 30)
        with temporary_namespace(cluster, "finalizers") as ns:
            body = {
                "apiVersion": f"{GROUP}/v1",
                "kind": "Widget",
                "metadata": {"name": "held", "finalizers": ["smoke.conserve.dev/never-removed"]},
            }
            custom.create_namespaced_custom_object(GROUP, "v1", ns, "widgets", body)

        def gone() -> bool:
            try:
                core.read_namespace(ns)
            except ApiException as exc:
                return bool(exc.status == 404)
            return False

        wait_for("the namespace to be deleted completely", gone, 60)
