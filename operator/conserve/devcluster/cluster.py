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

import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlparse

import yaml

from conserve.devcluster import build, components, pki, processes
from conserve.devcluster.build import Binaries
from conserve.devcluster.processes import ProcessRecord

DEFAULT_SCHEDULER_NAME = "default-scheduler"
CONSERVE_SCHEDULER_NAME = "conserve-scheduler"
# Where `conserve dev up` expects `conserve extender` by default.
DEFAULT_EXTENDER_PORT = 8888
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
        self._stopped: dict[str, list[str]] = {}  # component -> its command, while `kill_component` holds it

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
        pki.write_kubeconfig(self.kubeconfig, self.server, certs.ca.cert, certs.admin)
        kc_dir = self.state_dir / "kubeconfigs"
        kc_dir.mkdir(exist_ok=True)
        kcm_kc, sched_kc = kc_dir / "controller-manager", kc_dir / "scheduler"
        pki.write_kubeconfig(kcm_kc, self.server, certs.ca.cert, certs.controller_manager)
        pki.write_kubeconfig(sched_kc, self.server, certs.ca.cert, certs.scheduler)
        self._write_state()

        p, b, v = self.ports, self.binaries, self.log_verbosity
        self._spawn("etcd", components.etcd_command(b, self.state_dir / "etcd", p.etcd_client, p.etcd_peer))
        etcd_health = f"http://127.0.0.1:{p.etcd_client}/health"
        self._wait("etcd", lambda: self._http_ok(etcd_health, expect=b'"health":"true"'), deadline)
        self._spawn(
            "kube-apiserver",
            components.apiserver_command(
                b,
                certs,
                etcd_port=p.etcd_client,
                port=p.apiserver,
                cert_dir=self.pki_dir,
                verbosity=v,
                unlimited_inflight=self.unlimited_inflight,
            ),
        )
        self._wait("kube-apiserver", lambda: self._api_ok("/readyz"), deadline)
        self._spawn(
            "kube-controller-manager",
            components.controller_manager_command(b, certs, kubeconfig=kcm_kc, port=p.controller_manager, verbosity=v),
        )
        for name, port, with_extender in (
            ("kube-scheduler", p.scheduler, False),
            ("conserve-scheduler", p.conserve_scheduler, True),
        ):
            cfg_path = self.state_dir / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(self.scheduler_config(sched_kc, with_extender), sort_keys=False))
            self._spawn(
                name, components.scheduler_command(b, kubeconfig=sched_kc, config=cfg_path, port=port, verbosity=v)
            )
        kwok_cfg = self.state_dir / "kwok.yaml"
        kwok_cfg.write_text(components.kwok_config(b))
        self._spawn("kwok", components.kwok_command(b, kubeconfig=self.kubeconfig, config=kwok_cfg, port=p.kwok))
        for name, url, expect in (
            ("kube-controller-manager", f"https://127.0.0.1:{p.controller_manager}/healthz", b"ok"),
            ("kube-scheduler", f"https://127.0.0.1:{p.scheduler}/healthz", b"ok"),
            ("conserve-scheduler", f"https://127.0.0.1:{p.conserve_scheduler}/healthz", b"ok"),
            ("kwok", f"http://127.0.0.1:{p.kwok}/healthz", b""),
        ):
            self._wait(name, functools.partial(self._http_ok, url, expect=expect), deadline)
        # The service-account controller makes `default` in every namespace; pods need it to be admitted.
        self._wait(
            "kube-controller-manager (default ServiceAccount)",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
            deadline,
        )

    def scheduler_config(self, kubeconfig: Path, with_extender: bool) -> dict[str, Any]:
        """The configuration of the conserve scheduler (`with_extender`) or of the default one."""
        if with_extender:
            return components.scheduler_config(kubeconfig, self.scheduler_name, self.extender_url)
        return components.scheduler_config(kubeconfig, self.default_scheduler_name, None)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every component (newest first), each with its whole process group; raise if any survives."""
        for rec in reversed(self.processes):
            processes.terminate(rec, self._popen.get(rec.pid), timeout_s)
        left = self.leftover()
        self._popen.clear()
        if left:
            raise ClusterError(f"processes still running after stop: {left}")
        if self.processes:
            # Nothing of ours listens any more (a zombie, left where PID 1 reaps nothing, holds no port).
            listening = [port for port in (self.ports.apiserver, self.ports.etcd_client) if processes.port_open(port)]
            if listening:
                raise ClusterError(f"ports still listening after stop: {listening}")
        self.processes = []
        if self.state_file.exists():
            self._write_state()

    def kill_component(self, name: str) -> None:
        """SIGKILL one component's process group (an outage as a crash makes it: no graceful shutdown);
        `start_component` starts it again with the same command line."""
        rec = next(r for r in self.processes if r.name == name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec.pid, signal.SIGKILL)
        popen = self._popen.pop(rec.pid, None)
        if popen is not None:
            popen.wait(15)
        self._stopped[name] = rec.cmd
        self.processes.remove(rec)
        self._write_state()

    def start_component(self, name: str, timeout_s: float = 60.0) -> None:
        """Start a component stopped by `kill_component` again; for the API server, wait until it is ready."""
        self._spawn(name, self._stopped.pop(name))
        if name == "kube-apiserver":
            self._wait(name, lambda: self._api_ok("/readyz"), time.monotonic() + timeout_s)

    def leftover(self) -> list[int]:
        """Pids of any process of ours, or in one of our process groups, still alive."""
        pids: set[int] = set()
        for rec in self.processes:
            if not processes.foreign(rec):
                pids.update(processes.group_members(rec.pid))
        return sorted(pids)

    def status(self) -> dict[str, bool]:
        return {rec.name: processes.alive(rec) for rec in self.processes}

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
        rec, proc = processes.spawn(
            name, cmd, log_path=self.logs_dir / f"{name}.log", cwd=self.state_dir, die_with_parent=self.die_with_parent
        )
        self.processes.append(rec)
        self._popen[proc.pid] = proc
        self._write_state()

    def _wait(self, what: str, probe: Callable[[], bool], deadline: float) -> None:
        last_err = ""
        while True:
            for rec in self.processes:
                popen = self._popen.get(rec.pid)
                if popen is not None and popen.poll() is not None:
                    raise ClusterError(
                        f"{rec.name} exited with {popen.returncode} while waiting for {what}; "
                        f"last log lines:\n{processes.tail(Path(rec.log))}"
                    )
            try:
                if probe():
                    return
            except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
                last_err = str(exc)
            if time.monotonic() > deadline:
                name = what.split()[0]
                logs = self.logs_dir / f"{name}.log"
                raise ClusterError(
                    f"timed out waiting for {what} ({last_err}); last log lines:\n{processes.tail(logs)}"
                )
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


@contextlib.contextmanager
def running_cluster(state_dir: Path | str, **kwargs: Any) -> Iterator[LocalCluster]:
    """Build (cached) and run a cluster for the duration of the block."""
    build.build_all(["etcd", "kubernetes", "kwok"])
    with LocalCluster(state_dir, **kwargs) as cluster:
        yield cluster
