"""`conserve dev up` / `status` / `down` as a person runs them: a detached cluster with tiered GPU nodes,
and nothing left running after `down`. Runs its own cluster on free ports beside the session's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def conserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conserve.cli", *args], capture_output=True, text=True, timeout=300)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie (where PID 1 reaps nothing) holds no memory, port or file


def test_dev_up_status_down(tmp_path: Path) -> None:
    state_dir = tmp_path / "dev"
    up = conserve("dev", "up", "--free-ports", "--state-dir", str(state_dir))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        kubeconfig = state_dir / "kubeconfig"
        assert f"export KUBECONFIG={kubeconfig}" in up.stdout

        status = conserve("dev", "status", "--state-dir", str(state_dir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("running") == 6

        kubectl = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
        nodes = subprocess.run(
            [kubectl, "get", "nodes", "-L", "nvidia.com/gpu.product", "--no-headers"],
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            check=True,
        ).stdout
        for product in ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H200", "NVIDIA-A100-SXM4-80GB", "NVIDIA-H20", "NVIDIA-L40S"):
            assert product in nodes
        assert " Ready " in nodes
        assert "NotReady" not in nodes

        again = conserve("dev", "up", "--free-ports", "--state-dir", str(state_dir))
        assert again.returncode == 1
        assert "already running" in again.stderr
    finally:
        state = json.loads((state_dir / "state.json").read_text())
        down = conserve("dev", "down", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "no process left" in down.stdout
    pids = [p["pid"] for p in state["processes"]]
    assert len(pids) == 6
    assert not [pid for pid in pids if _alive(pid)]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", state["ports"]["apiserver"])) != 0
    assert conserve("dev", "status", "--state-dir", str(state_dir)).returncode == 1
