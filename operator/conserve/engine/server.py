"""One real vLLM OpenAI-compatible server (CPU build) as a child process, for a prefill or a decode role.

Prefill servers are NIXL KV producers, decode servers consumers, both with CPU buffers (UCX over TCP on
127.0.0.1); each instance gets its own NIXL side-channel port. Every server runs in its own process group (its
engine core and workers are children) with a TMPDIR and a VLLM_CACHE_ROOT of its own, so stopping it
kills the whole group and leaves nothing in /tmp; the group id is written to ``<work_dir>/pgid`` so a test can
still kill it if the parent died. The KV size is always given: otherwise the CPU worker takes most of the RAM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conserve.engine.affinity import confine_group, parse_cpu_list
from conserve.engine.install import engine_python

ROLE_KV = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}
DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_MODEL_LEN = 4096


class EngineStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log's tail."""


@dataclass(frozen=True, slots=True)
class VllmServerConfig:
    model_dir: Path
    served_model_name: str
    role: str  # prefill, decode or both
    port: int
    side_channel_port: int
    work_dir: Path
    host: str = "127.0.0.1"
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    #: VLLM_CPU_OMP_THREADS_BIND: a core list ("0", "1", "0-3") or "auto"; one core per instance on small hosts.
    cpu_bind: str = "auto"
    #: float32, not bfloat16: with bf16 on an AMX CPU, vLLM's attention kernel takes its AMX path, and a decoder
    #: whose first forward is one token after a NIXL load has never had AMX enabled by oneDNN: SIGILL (measured).
    dtype: str = "float32"
    #: Seconds a server may take to become healthy (loading the model and compiling on CPU) before it counts as failed.
    start_timeout_s: float = 600.0


def command(config: VllmServerConfig) -> list[str]:
    # `vllm serve` looks up the distribution "vllm" (this one is vllm-cpu) and crashes; the module form works.
    kv_config = {"kv_connector": "NixlConnector", "kv_role": ROLE_KV[config.role], "kv_buffer_device": "cpu"}
    return [
        str(engine_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(config.model_dir),
        "--served-model-name",
        config.served_model_name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--max-model-len",
        str(config.max_model_len),
        "--dtype",
        config.dtype,
        "-O0",
        "--kv-cache-memory-bytes",
        str(config.kv_cache_bytes),
        "--kv-transfer-config",
        json.dumps(kv_config),
    ]


def environment(config: VllmServerConfig, tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TMPDIR": str(tmp),
        "VLLM_CACHE_ROOT": str(config.work_dir / "vllm-cache"),
        "VLLM_NIXL_SIDE_CHANNEL_HOST": config.host,
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(config.side_channel_port),
        "VLLM_CPU_OMP_THREADS_BIND": config.cpu_bind,
        "PYTHONUNBUFFERED": "1",
    }


class VllmServer:
    """Start with ``start()`` (blocks until /health answers 200), stop with ``stop()``; also a context manager."""

    def __init__(self, config: VllmServerConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s: float | None = None  # seconds from launch to healthy
        self.tmp: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def log_path(self) -> Path:
        return self.config.work_dir / "server.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def launch(self) -> None:
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        # vLLM puts its ZeroMQ IPC sockets in TMPDIR, and a socket path may not exceed 107 bytes: a short folder
        # of this server's own under the system's temporary directory, removed on stop.
        self.tmp = Path(tempfile.mkdtemp(prefix="cv-"))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command(self.config),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment(self.config, self.tmp),
                cwd=self.config.work_dir,
                start_new_session=True,
            )
        (self.config.work_dir / "pgid").write_text(str(self.proc.pid))

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self) -> None:
        assert self.proc is not None
        launched = time.monotonic()
        deadline = launched + self.config.start_timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise EngineStartError(f"vLLM ({self.config.role}) exited {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise EngineStartError(
                    f"vLLM ({self.config.role}) not healthy after {self.config.start_timeout_s:.0f}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.5)
        self.started_s = time.monotonic() - launched

    def start(self) -> None:
        self.launch()
        self.wait_healthy()
        self.confine()

    def confine(self) -> int:
        """Threads that vLLM pinned off this server's cores (its NIXL worker's) back onto them (affinity.py);
        nothing where the cores are "auto". Returns how many moved."""
        cores = parse_cpu_list(self.config.cpu_bind)
        if self.proc is None or cores is None:
            return 0
        return confine_group(self.proc.pid, cores)

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc is None:
            return
        kill_group(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        # The engine core and workers may outlive the API process: the group goes in any case.
        kill_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            (self.config.work_dir / "pgid").unlink()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_leftovers(root: Path) -> int:
    """SIGKILL every server group whose ``pgid`` file lies under ``root`` (a crashed parent's servers)."""
    killed = 0
    for pgid_file in root.rglob("pgid"):
        with contextlib.suppress(OSError, ValueError):
            kill_group(int(pgid_file.read_text()), signal.SIGKILL)
            pgid_file.unlink()
            killed += 1
    return killed
