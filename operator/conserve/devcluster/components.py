"""The control plane's components as `LocalCluster` runs them: their command lines and configuration files.

Everything listens on 127.0.0.1; the ports come from the caller (free ones for tests, the well-known ones for
`conserve dev up`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conserve.devcluster import pki
from conserve.devcluster.build import Binaries

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


def etcd_command(binaries: Binaries, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    return [
        str(binaries.etcd),
        "--name=conserve",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=conserve={peer_url}",
        # A throwaway store: durability is not worth the fsync latency.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def apiserver_command(
    binaries: Binaries,
    certs: pki.Pki,
    *,
    etcd_port: int,
    port: int,
    cert_dir: Path,
    verbosity: int,
    unlimited_inflight: bool,
) -> list[str]:
    cmd = [
        str(binaries.kube_apiserver),
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={certs.apiserver.cert}",
        f"--tls-private-key-file={certs.apiserver.key}",
        f"--client-ca-file={certs.ca.cert}",
        "--authorization-mode=Node,RBAC",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={certs.service_account_pub}",
        f"--service-account-signing-key-file={certs.service_account_key}",
        "--allow-privileged=true",
        # The aggregation layer's request-header authentication: without it every delegating
        # component (controller-manager, schedulers, a future aggregated API) logs a missing CA.
        f"--requestheader-client-ca-file={certs.ca.cert}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={certs.front_proxy_client.cert}",
        f"--proxy-client-key-file={certs.front_proxy_client.key}",
        "--profiling=false",
        f"--v={verbosity}",
    ]
    if unlimited_inflight:
        # Load tests may burst far past the API server's default in-flight limits and APF seats.
        cmd += [
            "--max-requests-inflight=0",
            "--max-mutating-requests-inflight=0",
            "--enable-priority-and-fairness=false",
        ]
    return cmd


def _delegated(kubeconfig: Path) -> list[str]:
    # Serve /healthz over HTTPS on loopback, authenticating callers through the API server.
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
    ]


def controller_manager_command(
    binaries: Binaries, certs: pki.Pki, *, kubeconfig: Path, port: int, verbosity: int
) -> list[str]:
    return [
        str(binaries.kube_controller_manager),
        *_delegated(kubeconfig),
        f"--secure-port={port}",
        "--leader-elect=false",
        # Each controller acts with its own service account, so RBAC is exercised as in production.
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={certs.service_account_key}",
        f"--root-ca-file={certs.ca.cert}",
        f"--cluster-signing-cert-file={certs.ca.cert}",
        f"--cluster-signing-key-file={certs.ca.key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--cluster-name=conserve",
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        f"--v={verbosity}",
    ]


def scheduler_command(binaries: Binaries, *, kubeconfig: Path, config: Path, port: int, verbosity: int) -> list[str]:
    return [
        str(binaries.kube_scheduler),
        *_delegated(kubeconfig),
        f"--config={config}",
        f"--secure-port={port}",
        f"--v={verbosity}",
    ]


def scheduler_config(kubeconfig: Path, scheduler_name: str, extender_url: str | None) -> dict[str, Any]:
    """A KubeSchedulerConfiguration with one profile; with `extender_url`, that profile calls the extender."""
    cfg: dict[str, Any] = {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig), "qps": 500, "burst": 1000},
        "leaderElection": {"leaderElect": False},
        "profiles": [{"schedulerName": scheduler_name}],
    }
    if extender_url is not None:
        cfg["extenders"] = [
            {
                "urlPrefix": extender_url,
                "filterVerb": "filter",
                "prioritizeVerb": "prioritize",
                "weight": 5,  # as deploy/scheduler: ranks the right tier above the default spreading (weight 2)
                "nodeCacheCapable": True,
                "ignorable": False,
                "httpTimeout": "5s",
                "enableHTTPS": False,
                "managedResources": [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}],
            }
        ]
    return cfg


def kwok_config(binaries: Binaries) -> str:
    """KWOK's own default stages (copied from its module at build time): Ready nodes with Leases, Running pods,
    Succeeded Job pods."""
    return "\n---\n".join(s.read_text().strip() for s in binaries.kwok_stages) + "\n"


def kwok_command(binaries: Binaries, *, kubeconfig: Path, config: Path, port: int) -> list[str]:
    return [
        str(binaries.kwok),
        f"--kubeconfig={kubeconfig}",
        f"--config={config}",
        "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
        # Renew a Lease per node so the node-lifecycle controller sees live nodes and evicts nothing.
        "--node-lease-duration-seconds=40",
        f"--server-address=127.0.0.1:{port}",
        "--cidr=10.244.0.1/16",
        "--node-ip=10.0.0.1",
    ]
