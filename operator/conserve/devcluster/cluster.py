"""A real Kubernetes control plane as local processes: etcd, kube-apiserver, kube-controller-manager,
two kube-schedulers and KWOK, all on 127.0.0.1.

Two kube-scheduler processes, one profile each: ``extenders`` in a KubeSchedulerConfiguration apply to
every profile of that process, so the ``default-scheduler`` profile would also call (and, with
``ignorable: false``, depend on) the ConServe extender. Running ``conserve-scheduler`` as its own process
keeps the default profile free of it, which is how a secondary scheduler is deployed in a real cluster.

Every process runs in its own session (process group), so ``stop()`` can end it and anything it spawned,
and a cluster started by ``conserve dev up`` outlives that command; its pids are kept in
``state_dir/state.json`` so ``LocalCluster.attach(state_dir).stop()`` works from another process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from conserve.devcluster import build, pki
from conserve.devcluster.build import Binaries

DEFAULT_SCHEDULER_NAME = "default-scheduler"
CONSERVE_SCHEDULER_NAME = "conserve-scheduler"
# Where `conserve dev up` expects `conserve extender` by default.
DEFAULT_EXTENDER_PORT = 8888
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "conserve-scheduler",
    "kwok",
)


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    conserve_scheduler: int
    kwok: int

    @classmethod
    def free(cls) -> Ports:
        """Ports the OS hands out now, so several clusters (tests, a person's `dev up`) run side by side."""
        ports: set[int] = set()
        while len(ports) < 7:
            ports.add(free_port())
        return cls(*sorted(ports))

    @classmethod
    def fixed(cls) -> Ports:
        """The well-known ports, for `conserve dev up`."""
        return cls(2379, 2380, 6443, 10257, 10259, 10269, 10247)


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid from ours
    log: str
    cmd: list[str] = field(default_factory=list)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time) of a live pid, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _alive(rec: ProcessRecord) -> bool:
    stat = _proc_stat(rec.pid)
    # A zombie is dead: with no init to reap it (some containers), it stays in /proc.
    return stat is not None and stat[0] != "Z" and stat[2] == rec.start_ticks


def _foreign(rec: ProcessRecord) -> bool:
    stat = _proc_stat(rec.pid)
    return stat is not None and stat[2] != rec.start_ticks


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask for SIGKILL when the parent dies (Linux prctl).
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, user: pki.CertPair, name: str = "conserve-local") -> None:
    """A self-contained kubeconfig (certificates embedded): it can be copied elsewhere and still work."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [
            {
                "name": f"{name}-user",
                "user": {"client-certificate-data": _b64(user.cert), "client-key-data": _b64(user.key)},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-user"}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)


class LocalCluster:
    """A local Kubernetes control plane with KWOK-managed fake nodes.

    >>> with LocalCluster(Path("/tmp/c")) as c:   # builds nothing: call build.build_all() first
    ...     print(c.kubeconfig)
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        ports: Ports | None = None,
        extender_url: str | None = None,
        binaries: Binaries | None = None,
        unlimited_inflight: bool = False,
        log_verbosity: int = 0,
        die_with_parent: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        # For test sessions: if the test process is killed outright, the kernel kills the components too,
        # so no etcd or API server outlives it. `conserve dev up` leaves this off: its cluster must outlive it.
        self.die_with_parent = die_with_parent
        self.ports = ports or Ports.free()
        if extender_url is None:
            # A free port when ports are free (tests), the well-known one for `dev up`.
            port = DEFAULT_EXTENDER_PORT if ports == Ports.fixed() else free_port()
            extender_url = f"http://127.0.0.1:{port}/"
        self.extender_url = extender_url
        self.scheduler_name = CONSERVE_SCHEDULER_NAME
        self.default_scheduler_name = DEFAULT_SCHEDULER_NAME
        self.binaries = binaries or build.binaries()
        # Load tests may burst far past the API server's default in-flight limits and APF seats.
        self.unlimited_inflight = unlimited_inflight
        self.log_verbosity = log_verbosity
        self.processes: list[ProcessRecord] = []
        self._popen: dict[int, subprocess.Popen[bytes]] = {}

    # ---- paths and addresses -------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (user in system:masters), for tests and people."""
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def extender_port(self) -> int:
        from urllib.parse import urlparse

        return urlparse(self.extender_url).port or 80

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> Self:
        """Start every component and wait until each is healthy. On failure, stops what it started."""
        missing = [str(p) for p in self._required_binaries() if not p.is_file()]
        if missing:
            raise ClusterError(f"binaries not built: {missing}; run `conserve dev build` (make controlplane)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        deadline = time.monotonic() + timeout_s
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _required_binaries(self) -> list[Path]:
        b = self.binaries
        return [b.etcd, b.kube_apiserver, b.kube_controller_manager, b.kube_scheduler, b.kwok, *b.kwok_stages]

    def _start(self, deadline: float) -> None:
        certs = pki.generate(self.pki_dir)
        write_kubeconfig(self.kubeconfig, self.server, certs.ca.cert, certs.admin)
        kc_dir = self.state_dir / "kubeconfigs"
        kc_dir.mkdir(exist_ok=True)
        kcm_kc, sched_kc = kc_dir / "controller-manager", kc_dir / "scheduler"
        write_kubeconfig(kcm_kc, self.server, certs.ca.cert, certs.controller_manager)
        write_kubeconfig(sched_kc, self.server, certs.ca.cert, certs.scheduler)
        self._write_state()

        p, b, v = self.ports, self.binaries, f"--v={self.log_verbosity}"
        etcd_url, peer_url = f"http://127.0.0.1:{p.etcd_client}", f"http://127.0.0.1:{p.etcd_peer}"
        self._spawn(
            "etcd",
            [
                str(b.etcd),
                "--name=conserve",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=conserve={peer_url}",
                # A throwaway store: durability is not worth the fsync latency.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait("etcd", lambda: self._http_ok(f"{etcd_url}/health", expect=b'"health":"true"'), deadline)

        apiserver = [
            str(b.kube_apiserver),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={p.apiserver}",
            f"--cert-dir={self.pki_dir}",
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
            v,
        ]
        if self.unlimited_inflight:
            apiserver += [
                "--max-requests-inflight=0",
                "--max-mutating-requests-inflight=0",
                "--enable-priority-and-fairness=false",
            ]
        self._spawn("kube-apiserver", apiserver)
        self._wait("kube-apiserver", lambda: self._api_ok("/readyz"), deadline)

        def delegated(kubeconfig: Path) -> list[str]:
            # Serve /healthz over HTTPS on loopback, authenticating callers through the API server.
            return [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
            ]

        self._spawn(
            "kube-controller-manager",
            [
                str(b.kube_controller_manager),
                *delegated(kcm_kc),
                f"--secure-port={p.controller_manager}",
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
                v,
            ],
        )
        for name, port, profile_extenders in (
            ("kube-scheduler", p.scheduler, False),
            ("conserve-scheduler", p.conserve_scheduler, True),
        ):
            cfg_path = self.state_dir / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(self.scheduler_config(sched_kc, profile_extenders), sort_keys=False))
            self._spawn(
                name,
                [str(b.kube_scheduler), *delegated(sched_kc), f"--config={cfg_path}", f"--secure-port={port}", v],
            )

        kwok_cfg = self.state_dir / "kwok.yaml"
        # KWOK's own default stages (copied from its module at build time): Ready nodes with Leases,
        # Running pods, Succeeded Job pods.
        kwok_cfg.write_text("\n---\n".join(s.read_text().strip() for s in b.kwok_stages) + "\n")
        self._spawn(
            "kwok",
            [
                str(b.kwok),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={kwok_cfg}",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                # Renew a Lease per node so the node-lifecycle controller sees live nodes and evicts nothing.
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{p.kwok}",
                "--cidr=10.244.0.1/16",
                "--node-ip=10.0.0.1",
            ],
        )
        self._wait(
            "kube-controller-manager",
            lambda: self._http_ok(f"https://127.0.0.1:{p.controller_manager}/healthz", expect=b"ok"),
            deadline,
        )
        self._wait(
            "kube-scheduler",
            lambda: self._http_ok(f"https://127.0.0.1:{p.scheduler}/healthz", expect=b"ok"),
            deadline,
        )
        self._wait(
            "conserve-scheduler",
            lambda: self._http_ok(f"https://127.0.0.1:{p.conserve_scheduler}/healthz", expect=b"ok"),
            deadline,
        )
        self._wait("kwok", lambda: self._http_ok(f"http://127.0.0.1:{p.kwok}/healthz"), deadline)
        # The service-account controller makes `default` in every namespace; pods need it to be admitted.
        self._wait(
            "kube-controller-manager (default ServiceAccount)",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
            deadline,
        )

    def scheduler_config(self, kubeconfig: Path, with_extender: bool) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig), "qps": 500, "burst": 1000},
            "leaderElection": {"leaderElect": False},
            "profiles": [{"schedulerName": self.scheduler_name if with_extender else self.default_scheduler_name}],
        }
        if with_extender:
            cfg["extenders"] = [
                {
                    "urlPrefix": self.extender_url,
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

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every component (newest first), each with its whole process group; raise if any survives."""
        for rec in reversed(self.processes):
            self._terminate(rec, timeout_s)
        left = self.leftover()
        self._popen.clear()
        if left:
            raise ClusterError(f"processes still running after stop: {left}")
        if self.processes:
            # Nothing of ours listens any more (a zombie, left where PID 1 reaps nothing, holds no port).
            listening = [port for port in (self.ports.apiserver, self.ports.etcd_client) if _port_open(port)]
            if listening:
                raise ClusterError(f"ports still listening after stop: {listening}")
        self.processes = []
        if self.state_file.exists():
            self._write_state()

    def leftover(self) -> list[int]:
        """Pids of any process of ours, or in one of our process groups, still alive."""
        pids: set[int] = set()
        for rec in self.processes:
            if not _foreign(rec):
                pids.update(_group_members(rec.pid))
        return sorted(pids)

    def status(self) -> dict[str, bool]:
        return {rec.name: _alive(rec) for rec in self.processes}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- state, for `dev up` / `dev down` in separate processes -------------------------------------------
    def _write_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "extender_url": self.extender_url,
            "scheduler_name": self.scheduler_name,
            "ports": asdict(self.ports),
            "unlimited_inflight": self.unlimited_inflight,
            "processes": [asdict(r) for r in self.processes],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    @classmethod
    def attach(cls, state_dir: Path | str) -> LocalCluster:
        """The cluster recorded in ``state_dir`` (started by another process), to inspect or stop it."""
        state_dir = Path(state_dir)
        try:
            state = json.loads((state_dir / "state.json").read_text())
        except FileNotFoundError as exc:
            raise ClusterError(f"no cluster state in {state_dir}") from exc
        cluster = cls(
            state_dir,
            ports=Ports(**state["ports"]),
            extender_url=state["extender_url"],
            unlimited_inflight=bool(state.get("unlimited_inflight", False)),
        )
        cluster.processes = [ProcessRecord(**r) for r in state["processes"]]
        return cluster

    # ---- processes -------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: Sequence[str]) -> None:
        log_path = self.logs_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        stat = _proc_stat(proc.pid)
        rec = ProcessRecord(name, proc.pid, stat[2] if stat else 0, str(log_path), list(cmd))
        self.processes.append(rec)
        self._popen[proc.pid] = proc
        self._write_state()

    def _terminate(self, rec: ProcessRecord, timeout_s: float) -> None:
        popen = self._popen.get(rec.pid)
        if _foreign(rec):
            return  # our process is long gone and its pid now belongs to someone else
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if popen is not None:
                popen.poll()
            if not _alive(rec) and not _group_members(rec.pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec.pid, signal.SIGKILL)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
        time.sleep(0.1)

    def _wait(self, what: str, probe: Any, deadline: float) -> None:
        last_err = ""
        while True:
            for rec in self.processes:
                popen = self._popen.get(rec.pid)
                if popen is not None and popen.poll() is not None:
                    raise ClusterError(
                        f"{rec.name} exited with {popen.returncode} while waiting for {what}; "
                        f"last log lines:\n{_tail(Path(rec.log))}"
                    )
            try:
                if probe():
                    return
            except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
                last_err = str(exc)
            if time.monotonic() > deadline:
                name = what.split()[0]
                logs = self.logs_dir / f"{name}.log"
                raise ClusterError(f"timed out waiting for {what} ({last_err}); last log lines:\n{_tail(logs)}")
            time.sleep(0.2)

    # ---- probes ----------------------------------------------------------------------------------------
    def _admin_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return ctx

    def _api_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.server + path, context=self._admin_ssl(), timeout=5) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return False

    def api_get(self, path: str) -> Any:
        """GET a path from the API server as admin; the decoded JSON."""
        with urllib.request.urlopen(self.server + path, context=self._admin_ssl(), timeout=10) as resp:
            return json.loads(resp.read())

    @staticmethod
    def _http_ok(url: str, expect: bytes = b"") -> bool:
        # The controller-manager and schedulers serve a self-signed certificate on loopback; only
        # liveness is read here, so the certificate is not verified.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
                return bool(resp.status == 200 and expect in resp.read())
        except urllib.error.HTTPError:
            return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@contextlib.contextmanager
def running_cluster(state_dir: Path | str, **kwargs: Any) -> Iterator[LocalCluster]:
    """Build (cached) and run a cluster for the duration of the block."""
    build.build_all(["etcd", "kubernetes", "kwok"])
    with LocalCluster(state_dir, **kwargs) as cluster:
        yield cluster
