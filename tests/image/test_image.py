"""The container image (`make image`) runs the chart's components as the chart runs them.

- Its configuration: `conserve` as the entrypoint, the chart's non-root UID/GID as its user.
- `conserve --help` in a read-only container, as that user.
- The extender, started from the image with the chart's arguments, its ServiceAccount's token and the pod's
  security settings (read-only root, no capabilities, non-root), answers the real `conserve-scheduler`: a decode
  pod is bound to a bandwidth-tier node; it stops cleanly on SIGTERM as the container's PID 1.
- The operator, started the same way (leader election on the chart's Lease), passes the chart's readiness probe,
  places a Conversation on a decoder, releases it, and gives its Lease up when the container is stopped.

A component runs in a container (`podman run`) made from what `helm template` renders for its Deployment: the
container's args, the pod's runAsUser/runAsGroup, a read-only root filesystem, every capability dropped, no
privilege escalation, a tmpfs on /tmp (the chart's emptyDir), and the in-cluster configuration a pod gets (its
ServiceAccount's token, the cluster CA and namespace mounted at /var/run/secrets/kubernetes.io/serviceaccount,
KUBERNETES_SERVICE_HOST/PORT). The network is the host's, where the local control plane listens on 127.0.0.1.

The image missing (or podman) fails these tests when CONSERVE_REQUIRE_IMAGE=1 (CI sets it, after `make image`)
and skips them, saying why, otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from conserve.devcluster import build
from conserve.devcluster.cluster import free_port
from conserve.devcluster.testing import ClusterHandle, temporary_namespace
from conserve.testkit import NOT_YET, Api, install_crds, wait_for
from conserve.testkit.probes import http_get

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "conserve"
RELEASE = "conserve-image"
COMPONENTS = ("operator", "extender")
# What a pod's ServiceAccount is given, and where; the chart's components find it with no kubeconfig.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
BANDWIDTH_PRODUCTS = {"NVIDIA-H200", "NVIDIA-A100-SXM4-80GB", "NVIDIA-H20"}
#: While a container starts, any failure of a probe (podman's answer, a refused read) counts as not yet; the last
#: one is in the timeout's message.
STARTING: tuple[type[Exception], ...] = (Exception,)

pytestmark = pytest.mark.image


def _missing(reason: str) -> None:
    if os.environ.get("CONSERVE_REQUIRE_IMAGE") == "1":
        pytest.fail(f"{reason} (CONSERVE_REQUIRE_IMAGE=1)")
    pytest.skip(f"{reason}; `make image` builds it (CONSERVE_REQUIRE_IMAGE=1 makes this a failure)")


def podman(*args: str, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Rendered:
    """The chart's Deployments (by component) and RBAC objects, rendered for one namespace."""

    namespace: str
    image: str
    deployments: dict[str, dict[str, Any]]
    rbac: list[dict[str, Any]]

    def pod_spec(self, component: str) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployments[component]["spec"]["template"]["spec"]
        return spec

    def container(self, component: str) -> dict[str, Any]:
        container: dict[str, Any] = self.pod_spec(component)["containers"][0]
        return container


def render_chart(namespace: str, values: dict[str, Any]) -> Rendered:
    proc = subprocess.run(
        [str(build.binaries().helm), "template", RELEASE, str(CHART), f"--namespace={namespace}", "--values=-"],
        input=json.dumps(values),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Deployment"}
    rbac = [
        d
        for d in docs
        if d["kind"] in RBAC_KINDS and d["metadata"]["labels"].get("app.kubernetes.io/component") in COMPONENTS
    ]
    images = {deployments[c]["spec"]["template"]["spec"]["containers"][0]["image"] for c in COMPONENTS}
    assert len(images) == 1, images
    return Rendered(namespace, images.pop(), deployments, rbac)


@pytest.fixture(scope="module")
def crds(cluster: ClusterHandle) -> None:
    with cluster.api_client() as client:
        install_crds(client)


def runtime_options() -> list[list[str]]:
    """`podman run` options to try, in order: podman's defaults, then what a sandboxed VM needs, where crun refuses
    a hybrid cgroup layout ("cgroups in hybrid mode not supported") and, without CAP_SYS_RESOURCE, no rlimit may
    exceed those podman's conmon runs with (open files: this process's hard limit; processes: 32768)."""

    def hard(limit: int, cap: int) -> int:
        value = resource.getrlimit(limit)[1]
        return cap if value == resource.RLIM_INFINITY else min(value, cap)

    nofile, nproc = hard(resource.RLIMIT_NOFILE, 1 << 20), hard(resource.RLIMIT_NPROC, 32768)
    return [[], ["--runtime=runc", f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]]


@dataclass(frozen=True)
class Image:
    name: str
    run_options: list[str]  # what this host's podman needs to start a container at all


@pytest.fixture(scope="session")
def image() -> Image:
    """The image the chart runs by default (`conserve:<appVersion>`), present in the local container storage,
    with the `podman run` options that start a container here."""
    if shutil.which("podman") is None:
        _missing("podman is not installed (apt-get install -y podman)")
    if not build.part("helm").is_built():
        build.build_part(build.part("helm"))
    name = render_chart("default", {}).image
    if podman("image", "exists", name, check=False).returncode != 0:
        _missing(f"the image {name} is not in the local container storage")
    errors = []
    for options in runtime_options():
        proc = podman("run", "--rm", "--network=none", *options, name, "--help", check=False)
        if proc.returncode == 0:
            return Image(name, options)
        errors.append(f"podman run {' '.join(options)}: exit {proc.returncode}: {proc.stderr.strip()}")
    raise AssertionError("no container starts from the image here:\n" + "\n".join(errors))


@dataclass
class Release:
    """The chart's RBAC for the operator and the extender applied in a namespace, and values to render with."""

    cluster: ClusterHandle
    image: Image
    rendered: Rendered
    api_server: str
    cluster_ca: bytes
    work: Path
    containers: list[str] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.rendered.namespace

    def service_account_dir(self, component: str) -> Path:
        """What the kubelet mounts in a pod: a fresh token of the component's ServiceAccount, CA, namespace."""
        sa = self.rendered.pod_spec(component)["serviceAccountName"]
        token = self.cluster.kubectl("create", "token", sa, f"--namespace={self.namespace}", "--duration=1h")
        path = self.work / f"{component}-serviceaccount"
        path.mkdir(mode=0o755)
        for name, content in (
            ("token", token.stdout.strip().encode()),
            ("ca.crt", self.cluster_ca),
            ("namespace", self.namespace.encode()),
        ):
            (path / name).write_bytes(content)
            (path / name).chmod(0o644)
        return path

    def run(self, component: str, env: dict[str, str] | None = None) -> str:
        """Start the component's container as its Deployment says; its name (stopped and removed afterwards)."""
        pod, container = self.rendered.pod_spec(component), self.rendered.container(component)
        security = container["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        host = urlparse(self.api_server)
        name = f"conserve-image-{component}-{secrets.token_hex(3)}"
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        args = [
            "run", "--detach", f"--name={name}", *self.image.run_options, "--network=host", "--read-only",
            f"--user={pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}",
            *(f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]),
            "--security-opt=no-new-privileges",
            *(f"--tmpfs={m}:rw,size=64m" for m in sorted(mounts)),
            f"--volume={self.service_account_dir(component)}:{SERVICE_ACCOUNT_DIR}:ro",
            f"--env=KUBERNETES_SERVICE_HOST={host.hostname}", f"--env=KUBERNETES_SERVICE_PORT={host.port}",
        ]  # fmt: skip
        args += [f"--env={k}={v}" for k, v in (env or {}).items()]
        podman(*args, self.image.name, *container["args"])
        self.containers.append(name)
        return name


def _cluster_endpoint(cluster: ClusterHandle) -> tuple[str, bytes]:
    """The API server's URL and CA certificate (PEM) from the cluster's admin kubeconfig."""
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    entry = config["clusters"][0]["cluster"]
    if "certificate-authority-data" in entry:
        ca = base64.b64decode(entry["certificate-authority-data"])
    else:
        ca = (Path(cluster.kubeconfig).parent / entry["certificate-authority"]).read_bytes()
    return str(entry["server"]), ca


@pytest.fixture(scope="module")
def release(
    cluster: ClusterHandle, image: Image, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    """The chart rendered for a fresh namespace, with ports free on this host and the local cluster's extender
    URL and scheduler name; its operator and extender RBAC applied (removed afterwards)."""
    assert cluster.extender_port is not None, "the cluster names no extender URL (CONSERVE_EXTENDER_URL)"
    server, ca = _cluster_endpoint(cluster)
    with temporary_namespace(cluster, "image") as namespace:
        values = {
            "operator": {"replicas": 1, "metricsPort": free_port(), "healthPort": free_port()},
            "extender": {"port": cluster.extender_port},
            "scheduler": {"name": cluster.scheduler_name},
        }
        rendered = render_chart(namespace, values)
        assert rendered.image == image.name
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": rendered.rbac})
        cluster.kubectl("apply", "-f", "-", input=manifest)
        rel = Release(cluster, image, rendered, server, ca, tmp_path_factory.mktemp("image-release"))
        try:
            yield rel
        finally:
            for name in rel.containers:
                podman("rm", "--force", "--time=5", name, check=False)
            cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifest, check=False)


# --- what the tests look at, and the tests


def logs(container: str) -> str:
    proc = podman("logs", container, check=False)
    return proc.stdout + proc.stderr


def running(container: str) -> bool:
    state = podman("inspect", "--format={{.State.Status}}", container).stdout.strip()
    assert state == "running", f"{container} is {state}:\n{logs(container)}"
    return True


def serving(container: str, url: str) -> bool:
    """The container runs and `url` answers 200 (a readiness probe)."""
    return running(container) and http_get(url)[0] == 200


def process_identity(container: str) -> tuple[str, str]:
    """The container's main process as the kernel sees it: its `Uid:` line and its root mount's options."""
    pid = podman("inspect", "--format={{.State.Pid}}", container).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    root = next(
        line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if line.split()[4] == "/"
    )
    return uid, root[5]


def stop(container: str) -> int:
    """`podman stop` (SIGTERM, then SIGKILL after 20 s, as the kubelet's grace period); the exit code."""
    podman("stop", "--time=20", container, timeout_s=60)
    return int(podman("inspect", "--format={{.State.ExitCode}}", container).stdout.strip())


def test_image_runs_conserve_as_the_charts_non_root_user(image: Image, release: Release) -> None:
    config = json.loads(podman("image", "inspect", image.name).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["conserve"]
    pod = release.rendered.pod_spec("operator")["securityContext"]
    assert config["User"] == f"{pod['runAsUser']}:{pod['runAsGroup']}"


def test_help_in_a_read_only_container(image: Image) -> None:
    proc = podman(
        "run", "--rm", *image.run_options, "--read-only", "--network=none", "--cap-drop=ALL", image.name, "--help"
    )
    for command in ("operator", "extender", "router", "gpu-sim"):
        assert command in proc.stdout, proc.stdout


def test_extender_from_the_image_answers_the_scheduler(release: Release) -> None:
    cluster = release.cluster
    container = release.run("extender")
    base = f"http://127.0.0.1:{cluster.extender_port}"
    # The chart's readiness probe: both watch caches listed, with nothing but the ServiceAccount's token.
    wait_for("the extender's /readyz", lambda: serving(container, f"{base}/readyz"), 90, 0.5, tolerate=STARTING)
    uid, root_options = process_identity(container)
    assert uid == str(release.rendered.pod_spec("extender")["securityContext"]["runAsUser"])
    assert root_options.split(",")[0] == "ro", root_options

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "decode-image", "labels": {"conserve.dev/role": "decode"}},
        "spec": {
            "schedulerName": cluster.scheduler_name,
            "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "s", "image": "fake", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }
    cluster.kubectl("apply", f"--namespace={release.namespace}", "-f", "-", input=json.dumps(pod))

    def node_of_pod() -> str:
        got = json.loads(
            cluster.kubectl("get", "pod", "decode-image", f"--namespace={release.namespace}", "-o", "json").stdout
        )
        return str(got["spec"].get("nodeName") or "")

    node = wait_for("the decode pod bound by the conserve scheduler", node_of_pod, 60, 0.25, tolerate=STARTING)
    labels = json.loads(cluster.kubectl("get", "node", node, "-o", "json").stdout)["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] in BANDWIDTH_PRODUCTS, f"decode pod on {node}"
    metrics = http_get(f"{base}/metrics")[1]
    assert 'conserve_extender_requests_total{outcome="ok",verb="filter"}' in metrics, metrics
    cluster.kubectl("delete", "pod", "decode-image", f"--namespace={release.namespace}", "--wait=false")
    assert stop(container) == 0, logs(container)
    assert "forbidden" not in logs(container)


def test_operator_from_the_image_places_and_releases_a_conversation(
    release: Release, cluster: ClusterHandle, namespace: str
) -> None:
    args = release.rendered.container("operator")["args"]
    lease = next(a.split("=", 1)[1] for a in args if a.startswith("--lease-name="))
    health_port = next(a.split("=", 1)[1] for a in args if a.startswith("--health-port="))
    # The chart's downward-API env: the replica's identity in the Lease.
    container = release.run("operator", env={"POD_NAME": "operator-image-0", "POD_NAMESPACE": release.namespace})
    health = f"http://127.0.0.1:{health_port}/healthz"
    wait_for(
        "the operator's readiness probe (/healthz)", lambda: serving(container, health), 90, 0.5, tolerate=STARTING
    )

    def ledger_rebuilt() -> bool:
        return running(container) and "ledger rebuilt" in logs(container)

    wait_for("the operator's ledger", ledger_rebuilt, 60, 0.5, tolerate=STARTING)
    uid, root_options = process_identity(container)
    assert uid == str(release.rendered.pod_spec("operator")["securityContext"]["runAsUser"])
    assert root_options.split(",")[0] == "ro", root_options
    held = json.loads(cluster.kubectl("get", "lease", lease, f"--namespace={release.namespace}", "-o", "json").stdout)
    assert held["spec"]["holderIdentity"] == "operator-image-0"

    with cluster.api_client() as client:
        api = Api(client, namespace)
        try:
            placed = api.first_placement()
            assert placed["decoder"]["pod"] == "dec-0"
            assert placed["decoder"]["tier"] == "bandwidth"
            assert placed["reservedKvTokens"] == 4000
            api.patch_conv("c0", {"completed": True})
            api.wait_conv_phase("c0", "Completed", timeout_s=60)  # released
            wait_for(
                "pool status",
                lambda: api.get_pool("llama")["status"].get("reservedKvTokens") == 0,
                30,
                0.2,
                tolerate=NOT_YET,
            )

            started = time.monotonic()
            assert stop(container) == 0, logs(container)
            assert time.monotonic() - started < 20, "the operator ignored SIGTERM (killed after the grace period)"
            released = json.loads(
                cluster.kubectl("get", "lease", lease, f"--namespace={release.namespace}", "-o", "json").stdout
            )
            assert not released["spec"].get("holderIdentity"), logs(container)
            assert "forbidden: User" not in logs(container), logs(container)
        finally:
            podman("stop", "--time=5", container, check=False)
            api.strip_finalizers()
