"""Real vLLM servers behind the serving pods of fake (KWOK) nodes: the gpu-sim pod runner with another factory.

For each pod labelled ``conserve.dev/role`` the runner starts a vLLM CPU server (prefill: NIXL producer,
decode: consumer) with the tiny local model, served under the pod's model name (annotation
``conserve.dev/model``, else the runner's default, which should be the DecoderPool's model name: vLLM rejects
requests for another name), and annotates the pod with its endpoint. Servers start one at a time (each takes
half a minute on a small host). On small hosts each role gets a core of its own: the NIXL progress thread of
every instance spins, and two engines sharing all cores were measured 10-50x slower.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from conserve.devcluster.cluster import free_port
from conserve.engine.server import DEFAULT_KV_CACHE_BYTES, VllmServer, VllmServerConfig
from conserve.gpusim.pods import PodServer, PodSpecView, ServerFactory


@dataclass(frozen=True, slots=True)
class EnginePodsConfig:
    model_dir: Path
    work_dir: Path
    default_model_name: str
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    start_timeout_s: float = 600.0


def cpu_bind_for(role: str, cpus: int) -> str:
    """Prefill servers on the first core, decoders on the last (``auto`` where cores are plenty)."""
    if cpus >= 8:
        return "auto"
    return "0" if role == "prefill" else str(max(cpus - 1, 0))


class _VllmPodServer:
    def __init__(self, server: VllmServer) -> None:
        self.server = server

    async def start(self) -> str:
        await asyncio.to_thread(self.server.start)
        return self.server.endpoint

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)


def vllm_factory(config: EnginePodsConfig) -> ServerFactory:
    serial = itertools.count()
    cpus = os.cpu_count() or 1

    def make(pod: PodSpecView, _product: str) -> PodServer:
        assert pod.role is not None
        role = pod.role.value
        work = config.work_dir / f"{pod.name}-{next(serial)}"
        return _VllmPodServer(
            VllmServer(
                VllmServerConfig(
                    model_dir=config.model_dir,
                    served_model_name=pod.model or config.default_model_name,
                    role=role,
                    port=free_port(),
                    side_channel_port=free_port(),
                    work_dir=work,
                    kv_cache_bytes=config.kv_cache_bytes,
                    cpu_bind=cpu_bind_for(role, cpus),
                    start_timeout_s=config.start_timeout_s,
                )
            )
        )

    return make
