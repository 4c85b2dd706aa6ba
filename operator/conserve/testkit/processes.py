"""`conserve` subcommands as a test's (or a benchmark's) own processes: the operator, which a test can kill and
restart, and the other subcommands (router, gpu-sim, fake DCGM, energy loop), each logging to its own file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conserve.testkit.wait import wait_for


class ConserveProcesses:
    """`conserve` subcommands started by one test, each logging to its own file (KUBECONFIG set for Kopf)."""

    def __init__(self, kubeconfig: Path, log_dir: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log_dir = log_dir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str) -> None:
        log = self.log_dir / f"{name}.log"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "conserve.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.procs.append((proc, log))

    def kill(self, name: str) -> None:
        """SIGKILL the process started as `name` (a crash, not a shutdown) and reap it."""
        for proc, log in self.procs:
            if log.name == f"{name}.log" and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=15)

    def write_logs(self) -> None:
        for _, log in self.procs:
            sys.stderr.write(f"--- {log.name}\n{log.read_text()[-4000:]}\n")

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


class OperatorProcess:
    """`conserve operator` as a subprocess: start, wait until its ledger is rebuilt, kill, restart."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_path: Path,
        extra_args: Sequence[str] = (),
        *,
        fast: bool = True,
        entry: Sequence[str] = ("-m", "conserve.cli"),
    ) -> None:
        self.entry = list(entry)  # what the interpreter runs before `operator ...` (a benchmark's launcher)
        self.fast = fast  # short sweep and status intervals (tests); False: the command's defaults (benchmarks)
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, *, wait_ready: bool = True, timeout_s: float = 30.0) -> OperatorProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [sys.executable, *self.entry, "operator", "--namespace", self.namespace, "--metrics-port", "0"]
        if self.fast:
            args += ["--idle-sweep-interval", "0.2", "--pool-status-interval", "0.2"]
            if "--events" not in self.extra_args:
                args += ["--events", "all"]  # tests follow each conversation's Events
        args += self.extra_args
        if "--lease-name" not in self.extra_args:
            args.append("--no-leader-elect")
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if wait_ready:
            self.wait_log("ledger rebuilt", timeout_s)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, since_start: bool = True) -> str:
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        return data[self._log_offset if since_start else 0 :].decode(errors="replace")

    def wait_log(self, text: str, timeout_s: float = 30.0) -> None:
        """Wait until the operator logs `text`; a RuntimeError with its log if it exits first."""

        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"operator exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return text in self.log_text()

        try:
            wait_for(f"the operator to log {text!r}", seen, timeout_s, 0.05)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_text()[-3000:]}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@dataclass(frozen=True)
class ServingStack:
    """A DecoderPool with its prefill and decode Deployments, and the operator, the gpu-sim pod runner and the
    router as processes (the e2e `serving_stack` fixture starts one; the router answers at `router_url`)."""

    router_url: str
    custom: Any  # kubernetes CustomObjectsApi, as cluster admin
    core: Any  # kubernetes CoreV1Api


#: The `serving_stack` fixture: (the DecoderPool body, the number of decode pods) -> the running stack.
StartServingStack = Callable[[dict[str, Any], int], ServingStack]
