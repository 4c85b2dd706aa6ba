"""`helm install` of charts/conserve into the cluster under test, as a platform team would install it.

- The release becomes available: every Deployment's pods Running and Ready (KWOK plays them on fake nodes,
  which the chart's nodeSelector and tolerations values pick).
- Its RBAC is sufficient: the extender and the operator run here as processes with a kubeconfig holding only
  their ServiceAccount's token (TokenRequest API), and do their job: the real kube-scheduler calls the extender
  and binds a decode pod to a bandwidth-tier node; the operator (every namespace, leader election on its Lease)
  writes a DecoderPool's status, places a Conversation on a decoder, releases it on `spec.completed`, posts
  Events and gives its Lease up on stop, with no 403 in its (debug) log.
- The router too (API keys from a Secret, its tenants): with its token it creates a caller's Conversation (annotated
  with the owner) in its pool's namespace, with no 403 in its log.
- Its RBAC is least: `kubectl auth can-i --as` each ServiceAccount is refused what it must not do.
- `helm uninstall` removes everything but the kept CRDs.

The cluster is shared with the other e2e tests: CRDs already applied by them are adopted into the release
(Helm's ownership annotations) rather than refused, and are kept on uninstall, so the other tests are unaffected.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle, temporary_namespace
from conserve.testkit import Api, wait_for
from conserve.testkit.probes import http_get

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "conserve"
RELEASE = "conserve-e2e"
CHART_CRDS = (
    "conversations.conserve.dev",
    "decoderpools.conserve.dev",
)
COMPONENTS = ("operator", "extender", "scheduler", "router")
#: The router's API keys (a Secret made before the install, as the chart's README says).
ROUTER_KEYS = {"alice": "alice-key-0123456789", "ops": "ops-key-9876543210"}
BANDWIDTH_PRODUCTS = {"NVIDIA-H200", "NVIDIA-A100-SXM4-80GB", "NVIDIA-H20"}


@dataclass
class Release:
    cluster: ClusterHandle
    namespace: str
    helm_env: dict[str, str]

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.cluster.helm), f"--kubeconfig={self.cluster.kubeconfig}", f"--namespace={self.namespace}"]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=self.helm_env)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.cluster.kubectl(*args, "-o", "json").stdout)

    def service_account(self, component: str) -> str:
        return f"{RELEASE}-{component}"

    def can_i(self, component: str, verb: str, resource: str, *args: str) -> bool:
        """`kubectl auth can-i` as the component's ServiceAccount; `resource` may be `pods:binding` for a
        subresource (`pods/binding` would mean the pod named binding)."""
        user = f"system:serviceaccount:{self.namespace}:{self.service_account(component)}"
        resource, _, sub = resource.partition(":")
        extra = [f"--subresource={sub}"] if sub else []
        proc = self.cluster.kubectl("auth", "can-i", f"--as={user}", verb, resource, *extra, *args, check=False)
        answer = proc.stdout.strip()
        assert answer in ("yes", "no"), proc.stdout + proc.stderr
        return answer == "yes"

    def token_kubeconfig(self, component: str, path: Path) -> Path:
        """A kubeconfig that authenticates with nothing but a fresh token of the component's ServiceAccount."""
        token = self.cluster.kubectl(
            "create", "token", self.service_account(component), f"--namespace={self.namespace}", "--duration=1h"
        ).stdout.strip()
        admin = yaml.safe_load(Path(self.cluster.kubeconfig).read_text())
        cluster = admin["clusters"][0]["cluster"]
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": cluster}],
                    "users": [{"name": component, "user": {"token": token}}],
                    "contexts": [{"name": component, "context": {"cluster": "c", "user": component}}],
                    "current-context": component,
                }
            )
        )
        return path


def adopt(cluster: ClusterHandle, kind: str, name: str, namespace: str) -> None:
    """Mark an existing cluster-scoped object as this release's, as Helm's docs say to adopt a resource."""
    if cluster.kubectl("get", kind, name, check=False).returncode != 0:
        return
    cluster.kubectl(
        "annotate", kind, name, "--overwrite",
        f"meta.helm.sh/release-name={RELEASE}", f"meta.helm.sh/release-namespace={namespace}",
    )  # fmt: skip
    cluster.kubectl("label", kind, name, "--overwrite", "app.kubernetes.io/managed-by=Helm")


@pytest.fixture(scope="module")
def release(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    with temporary_namespace(cluster, "helm") as namespace:
        rel = Release(cluster, namespace, env)
        for crd in CHART_CRDS:
            adopt(cluster, "customresourcedefinition", crd, namespace)
        literals = [f"--from-literal={name}={key}" for name, key in ROUTER_KEYS.items()]
        cluster.kubectl("create", "secret", "generic", "router-keys", f"--namespace={namespace}", *literals)
        values = {
            # Land on KWOK's fake nodes (and tolerate the taint KWOK setups usually put on them).
            "nodeSelector": {"type": "kwok"},
            "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
            "router": {
                "enabled": True,
                "auth": {"mode": "api-keys", "apiKeysSecret": "router-keys"},
                "tenants": {"admins": ["ops"], "pools": {"alice": ["default"]}},
            },
        }
        values_file = home / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        rel.helm("install", RELEASE, str(CHART), f"--values={values_file}", "--wait", "--timeout=180s")
        try:
            yield rel
        finally:
            rel.helm("uninstall", RELEASE, "--wait", "--timeout=60s", check=False)


def test_release_is_deployed_and_every_pod_is_running(release: Release) -> None:
    status = json.loads(release.helm("status", RELEASE, "--output=json").stdout)
    assert status["info"]["status"] == "deployed"
    for component in COMPONENTS:
        name = f"{RELEASE}-{component}"
        dep = release.kubectl_json("get", "deployment", name, f"--namespace={release.namespace}")
        assert dep["status"].get("readyReplicas") == dep["spec"]["replicas"], name
        pods = release.kubectl_json(
            "get", "pods", f"--namespace={release.namespace}", f"--selector=app.kubernetes.io/component={component}"
        )["items"]
        assert len(pods) == dep["spec"]["replicas"]
        for pod in pods:
            assert pod["status"]["phase"] == "Running", pod["metadata"]["name"]
            assert pod["spec"]["nodeSelector"]["type"] == "kwok"
            assert pod["spec"]["serviceAccountName"] == release.service_account(component)


# --- RBAC is least: what each ServiceAccount must not do, and what it must ----------------------------------


@pytest.mark.parametrize(
    ("component", "verb", "resource", "allowed"),
    [
        ("operator", "get", "secrets", False),
        ("operator", "list", "secrets", False),
        ("operator", "delete", "pods", False),
        ("operator", "create", "pods", False),
        ("operator", "patch", "nodes", False),
        ("operator", "delete", "conversations.conserve.dev", False),
        # Verbs the operator README lists but the code never uses (the token test shows it needs none of them).
        ("operator", "patch", "decoderpools.conserve.dev", False),
        ("operator", "get", "conversations.conserve.dev", False),
        ("operator", "get", "decoderpools.conserve.dev:status", False),
        ("operator", "get", "pods", False),
        ("operator", "get", "nodes", False),
        ("operator", "patch", "events", False),
        ("operator", "update", "conversations.conserve.dev:status", False),
        ("operator", "patch", "pods:status", False),
        ("operator", "create", "conversations.conserve.dev", False),
        ("operator", "update", "customresourcedefinitions.apiextensions.k8s.io", False),
        ("operator", "create", "clusterroles.rbac.authorization.k8s.io", False),
        ("operator", "create", "pods:exec", False),
        ("operator", "delete", "leases.coordination.k8s.io", False),
        ("operator", "impersonate", "serviceaccounts", False),
        ("extender", "get", "secrets", False),
        ("extender", "patch", "pods", False),
        ("extender", "create", "pods:binding", False),
        ("extender", "list", "conversations.conserve.dev", False),
        ("extender", "patch", "nodes", False),
        ("extender", "list", "configmaps", False),
        ("scheduler", "get", "secrets", False),
        ("scheduler", "delete", "nodes", False),
        ("scheduler", "patch", "conversations.conserve.dev", False),
        ("router", "get", "secrets", False),
        ("router", "list", "secrets", False),
        ("router", "list", "pods", False),
        ("router", "create", "conversations.conserve.dev", False),  # not in every namespace: in its pool's only
        ("router", "patch", "conversations.conserve.dev:status", False),
        ("router", "patch", "decoderpools.conserve.dev", False),
        # --- and what each must be able to do
        ("operator", "watch", "conversations.conserve.dev", True),
        ("operator", "patch", "decoderpools.conserve.dev:status", True),
        ("operator", "list", "pods", True),
        ("operator", "create", "events", True),
        ("extender", "watch", "nodes", True),
        ("extender", "watch", "pods", True),
        ("scheduler", "create", "pods:binding", True),
        ("scheduler", "watch", "persistentvolumeclaims", True),
    ],
)
def test_service_account_rights(release: Release, component: str, verb: str, resource: str, allowed: bool) -> None:
    assert release.can_i(component, verb, resource, "--all-namespaces") is allowed


def test_router_may_write_conversations_in_its_pools_namespace_only(release: Release) -> None:
    ns = f"--namespace={release.namespace}"
    for verb in ("create", "patch", "delete", "watch"):
        assert release.can_i("router", verb, "conversations.conserve.dev", ns), verb
    assert release.can_i("router", "watch", "decoderpools.conserve.dev", ns)
    assert not release.can_i("router", "create", "conversations.conserve.dev", "--namespace=default")
    assert not release.can_i("router", "get", "secrets", ns)


def test_operator_and_scheduler_may_renew_only_their_own_lease(release: Release) -> None:
    ns = f"--namespace={release.namespace}"
    assert release.can_i("operator", "update", f"leases.coordination.k8s.io/{RELEASE}-operator", ns)
    assert not release.can_i("operator", "update", "leases.coordination.k8s.io/conserve-scheduler", ns)
    assert release.can_i("scheduler", "update", "leases.coordination.k8s.io/conserve-scheduler", ns)
    assert not release.can_i("scheduler", "update", "leases.coordination.k8s.io/other", ns)


# --- RBAC is sufficient: the components do their job with nothing but their token --------------------------


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "conserve.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def refusals(log: str) -> list[str]:
    """Lines of a component's log where RBAC refused it: the API server's message for an authorization denial
    (`... is forbidden: User "system:serviceaccount:NS:NAME" cannot VERB resource ...`).

    Not every 403 is RBAC: with all namespaces watched, the operator may try to post an Event into another
    test's namespace that is being deleted, which the API server also refuses with 403 ("is being terminated").
    Not a bare "403" either: log timestamps carry milliseconds (",403")."""
    return [line for line in log.splitlines() if re.search(r'forbidden: User \\?"[^"\\]+\\?" cannot', line)]


def test_extender_with_its_token_serves_the_real_scheduler(
    release: Release, processes: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    cluster = release.cluster
    port = cluster.extender_port
    assert port is not None, "the cluster names no extender URL (set CONSERVE_EXTENDER_URL for a given cluster)"
    kubeconfig = release.token_kubeconfig("extender", tmp_path / "extender.kubeconfig")
    log = tmp_path / "extender.log"
    proc = processes(
        "extender", "--host=127.0.0.1", f"--port={port}", f"--kubeconfig={kubeconfig}",
        f"--scheduler-name={cluster.scheduler_name}",
        log=log,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    # Ready means both watch caches (nodes, pods) listed and watch: the token is enough for them.
    wait_for("the extender's watch caches", lambda: proc.poll() is None and http_get(f"{base}/readyz")[0] == 200, 60)
    assert not refusals(log.read_text()), log.read_text()

    pod_name = "decode-helm-e2e"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "labels": {"conserve.dev/role": "decode"}},
        "spec": {
            "schedulerName": cluster.scheduler_name,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "s", "image": "registry.k8s.io/pause:3.10", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ],
        },
    }
    cluster.kubectl("apply", f"--namespace={release.namespace}", "-f", "-", input=json.dumps(pod))

    def node_of_pod() -> str | None:
        got = release.kubectl_json("get", "pod", pod_name, f"--namespace={release.namespace}")
        return str(got["spec"].get("nodeName") or "") or None

    node = wait_for("the decode pod to be bound by the conserve scheduler", node_of_pod, 60)
    product = release.kubectl_json("get", "node", node)["metadata"]["labels"]["nvidia.com/gpu.product"]
    assert product in BANDWIDTH_PRODUCTS, f"decode pod on {node} ({product})"
    metrics = http_get(f"{base}/metrics")[1]
    assert 'conserve_extender_requests_total{outcome="ok",verb="filter"}' in metrics, metrics
    cluster.kubectl("delete", "pod", pod_name, f"--namespace={release.namespace}", "--wait=false", check=False)
    assert proc.poll() is None, log.read_text()
    assert not refusals(log.read_text()), log.read_text()


def test_operator_with_its_token_places_and_releases_a_conversation(
    release: Release, processes: Callable[..., subprocess.Popen[bytes]], namespace: str, tmp_path: Path
) -> None:
    """The operator as the chart runs it (every namespace, leader election on a Lease in the release namespace)
    with nothing but its ServiceAccount's token, on a pool in another namespace: any verb the chart forgot is
    a 403 in its log (or a step below that never happens)."""
    kubeconfig = release.token_kubeconfig("operator", tmp_path / "operator.kubeconfig")
    log = tmp_path / "operator.log"
    env = {k: v for k, v in os.environ.items() if k not in ("POD_NAME", "POD_NAMESPACE", "KUBERNETES_SERVICE_HOST")}
    env["KUBECONFIG"] = str(kubeconfig)
    lease = f"{RELEASE}-operator"  # the chart's default Lease name, the only one its Role lets it renew
    proc = processes(
        "operator", "--all-namespaces", f"--lease-namespace={release.namespace}", f"--lease-name={lease}",
        "--identity=helm-e2e", "--metrics-port=0", "--pool-status-interval=0.2", "--idle-sweep-interval=0.2",
        "--verbose",  # a refused Event post is logged at DEBUG only
        log=log, env=env,
    )  # fmt: skip

    def log_says(text: str) -> bool:
        assert proc.poll() is None, f"the operator exited {proc.returncode}:\n{log.read_text()}"
        return text in log.read_text()

    # Leader election (get, create the Lease), then the ledger rebuilt from lists of nodes, pods, pools, conversations.
    wait_for("the operator's ledger rebuilt", lambda: log_says("ledger rebuilt"), 60)
    held = release.kubectl_json("get", "lease", lease, f"--namespace={release.namespace}")
    assert held["spec"]["holderIdentity"] == "helm-e2e"

    with release.cluster.api_client() as client:
        api = Api(client, namespace)  # the test's own objects, created as cluster admin
        try:
            placed = api.first_placement()
            assert placed["decoder"]["pod"] == "dec-0"
            assert placed["decoder"]["tier"] == "bandwidth"
            assert placed["reservedKvTokens"] == 4000
            wait_for("a Placed event", lambda: api.events("Placed"), 30)
            # One API write per placement: the status only, no finalizer (a delete is released from the watch).
            assert not api.get_conv("c0")["metadata"].get("finalizers")

            api.patch_conv("c0", {"completed": True})
            api.wait_conv_phase("c0", "Completed", timeout_s=60)  # released
            assert "conserve.dev/release-capacity" not in (api.get_conv("c0")["metadata"].get("finalizers") or [])
            wait_for("a Released event", lambda: api.events("Released"), 30)
            pool = wait_for(
                "the pool status to show the release",
                lambda: (s := api.get_pool("llama")["status"]).get("reservedKvTokens") == 0 and s,
                30,
            )
            assert pool["readyDecoders"] == 1

            # A clean stop gives the Lease up (get, patch) and writes owed status.
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()
            released = release.kubectl_json("get", "lease", lease, f"--namespace={release.namespace}")
            assert not released["spec"].get("holderIdentity"), log.read_text()
            assert not refusals(log.read_text()), log.read_text()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            api.strip_finalizers()


def test_router_with_its_token_creates_an_owned_conversation(
    release: Release, processes: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The router as the chart runs it (API keys mounted from the Secret, its tenants) with nothing but its
    ServiceAccount's token: a caller's first turn creates the Conversation, annotated with the caller, in the
    release namespace (no pool there: the turn then ends unplaced); a wrong key is 401; no 403 in its log."""
    kubeconfig = release.token_kubeconfig("router", tmp_path / "router.kubeconfig")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, key in ROUTER_KEYS.items():
        (keys / name).write_text(key)
    port = free_port()
    log = tmp_path / "router.log"
    proc = processes(
        "router", f"--kubeconfig={kubeconfig}", f"--namespace={release.namespace}", f"--port={port}",
        "--auth=api-keys", f"--api-keys-dir={keys}", "--placement-timeout=2", "--scrape-interval=0",
        log=log,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_for("the router", lambda: proc.poll() is None and http_get(f"{base}/health")[0] == 200, 60)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, _ = post_json(f"{base}/v1/chat/completions", body, {"Authorization": "Bearer wrong"})
    assert status == 401
    headers = {"Authorization": f"Bearer {ROUTER_KEYS['alice']}", "X-Conversation-Id": "helm-chat"}
    status, _ = post_json(f"{base}/v1/chat/completions", body, headers)
    assert status in (429, 503)  # created, never placed: no pool in this namespace
    owned = release.kubectl_json("get", "conversations.conserve.dev", f"--namespace={release.namespace}")["items"]
    assert [c["metadata"]["annotations"]["conserve.dev/owner"] for c in owned] == ["alice"]
    assert proc.poll() is None, log.read_text()
    assert not refusals(log.read_text()), log.read_text()
    release.cluster.kubectl("delete", "conversations.conserve.dev", "--all", f"--namespace={release.namespace}")


def post_json(url: str, body: Any, headers: dict[str, str]) -> tuple[int, str]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# --- helm uninstall ----------------------------------------------------------------------------------------


def test_uninstall_removes_everything_but_the_kept_crds(release: Release) -> None:
    """Last in this module: it uninstalls the release the tests above share."""
    release.helm("uninstall", RELEASE, "--wait", "--timeout=60s")
    selector = f"--selector=app.kubernetes.io/instance={RELEASE}"
    namespaced = "deployments,replicasets,services,serviceaccounts,configmaps,roles,rolebindings,networkpolicies"
    for ns in (release.namespace, "kube-system"):
        left = release.kubectl_json("get", namespaced, f"--namespace={ns}", selector)["items"]
        assert not left, [f"{o['kind']}/{o['metadata']['name']}" for o in left]
    cluster_scoped = release.kubectl_json("get", "clusterroles,clusterrolebindings", selector)["items"]
    assert not cluster_scoped, [f"{o['kind']}/{o['metadata']['name']}" for o in cluster_scoped]
    wait_for(
        "the release's pods to go",
        lambda: not release.kubectl_json("get", "pods", f"--namespace={release.namespace}", selector)["items"],
        60,
    )
    for crd in CHART_CRDS:
        kept = release.kubectl_json("get", "customresourcedefinition", crd)
        assert kept["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", crd
    assert release.helm("status", RELEASE, check=False).returncode != 0
