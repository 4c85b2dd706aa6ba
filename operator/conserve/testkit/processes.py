"""`conserve` subcommands as a test's own processes (operator, router, gpu-sim, fake DCGM, energy loop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


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
