"""The HTTP face of the GPU-server simulator: what a vLLM OpenAI-compatible server answers.

Endpoints: POST /v1/chat/completions and /v1/completions (streaming SSE and not), GET /v1/models, /health,
/metrics (vllm:-named metrics plus the modelled power and energy), GET /conserve/stats (JSON, for tests).

vLLM disaggregated prefill (NixlConnector protocol): a request to a prefill server with
`kv_transfer_params: {"do_remote_decode": true}` (and max_tokens 1) is answered with `kv_transfer_params`
`{"do_remote_prefill": true, "remote_block_ids": [...], "remote_engine_id", "remote_host", "remote_port"}`; a
decode server given those pulls the KV (modelled transfer time) instead of prefilling.

Every request may carry `X-Conversation-Id`: the decode server's prefix cache is keyed by it (a stand-in for
vLLM's automatic prefix caching, which hashes the token blocks). The simulator always generates exactly
`max_tokens` tokens (as with `ignore_eos`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from conserve.api.openai_wire import prompt_tokens_of
from conserve.core.gpus import GpuSpec, lookup_product
from conserve.core.llm import ModelShape, kv_capacity_tokens, lookup_model
from conserve.core.perf import LINKS, Device
from conserve.core.tokens import FILLER_TOKEN
from conserve.gpusim.engine import BLOCK_TOKENS, Engine, RequestRejected, Role, SimRequest, remote_block_ids

CONVERSATION_HEADER = "X-Conversation-Id"
SERVER_HEADER = "X-Conserve-Server"
DEFAULT_MAX_TOKENS = 16
#: The simulator's modelled power (W) and energy counter (J; exposed with `_total`), which the fake DCGM
#: exporter (`conserve.gpusim.fakedcgm_cluster`) follows.
POWER_METRIC = "conserve_gpusim_power_watts"
ENERGY_METRIC = "conserve_gpusim_energy_joules"


@dataclass(frozen=True, slots=True)
class GpuSimConfig:
    role: Role
    gpu: str = "H200"
    gpu_count: int = 1
    model: str = "llama-3-8b"
    host: str = "127.0.0.1"
    port: int = 8000
    time_scale: float = 1.0
    memory_fraction: float = 0.9
    link: str = "rdma"
    name: str = ""  # reported in X-Conserve-Server (the pod name under the pod runner)
    stream_interval: int = 1
    max_batch: int = 256
    kv_capacity_tokens: int | None = None  # None: derived from the GPU memory and the model


def resolve(config: GpuSimConfig) -> tuple[GpuSpec, ModelShape]:
    gpu = lookup_product(config.gpu)
    if gpu is None:
        raise ValueError(f"unknown GPU product {config.gpu!r}")
    model = lookup_model(config.model)
    if model is None:
        raise ValueError(f"unknown model {config.model!r}")
    return gpu, model


def build_engine(config: GpuSimConfig) -> Engine:
    gpu, model = resolve(config)
    capacity = config.kv_capacity_tokens
    if capacity is None:
        capacity = kv_capacity_tokens(
            gpu_memory_bytes=gpu.memory_bytes,
            gpu_count=config.gpu_count,
            model=model,
            memory_fraction=config.memory_fraction,
        )
    return Engine(
        role=config.role,
        device=Device(gpu, config.gpu_count),
        model=model,
        kv_capacity_tokens=capacity,
        link=LINKS[config.link],
        time_scale=config.time_scale,
        max_batch=config.max_batch,
        stream_interval=config.stream_interval,
    )


class _EngineCollector(Collector):
    """Reads the engine at scrape time; one per server, in its own registry."""

    def __init__(self, engine: Engine, config: GpuSimConfig) -> None:
        self._engine = engine
        self._config = config

    def collect(self) -> Iterator[Metric]:
        e, s = self._engine, self._engine.stats
        model = {"model_name": self._config.model}
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([model["model_name"]], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([model["model_name"]], value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", e.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting for admission.", e.num_waiting)
        yield gauge("vllm:gpu_cache_usage_perc", "KV cache usage, 0 to 1 (vLLM V0 name).", e.kv_usage_fraction)
        yield gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0 to 1.", e.kv_usage_fraction)
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("vllm:request_success", "Requests finished.", s.requests_finished_total)
        yield counter(
            "vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_cache_hit_tokens_total
        )
        g = GaugeMetricFamily(POWER_METRIC, "Modelled board power of this server's GPUs.", labels=["gpu", "role"])
        g.add_metric([self._config.gpu, self._config.role.value], s.power_w)
        yield g
        c = CounterMetricFamily(ENERGY_METRIC, "Modelled energy drawn (modelled time).", labels=["gpu", "role"])
        c.add_metric([self._config.gpu, self._config.role.value], e.energy_j_now())
        yield c
        yield counter(
            "conserve_gpusim_kv_transfers_received",
            "KV hand-offs pulled from prefill servers.",
            s.kv_transfers_received_total,
        )
        yield gauge("conserve_gpusim_kv_capacity_tokens", "KV capacity in tokens.", e.kv_capacity_tokens)


def _max_tokens(body: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_TOKENS


class GpuSimServer:
    def __init__(self, config: GpuSimConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine if engine is not None else build_engine(config)
        self.engine_id = str(uuid.uuid4())
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(self.engine, config))
        self._runner: web.AppRunner | None = None
        self.port = config.port

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/conserve/stats", self._stats)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self.engine.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.engine.stop()

    async def start(self) -> int:
        """Serve on config.host:config.port (0 picks a free port); returns the port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers -------------------------------------------------------------------------------------------
    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _models(self, _request: web.Request) -> web.Response:
        data = [{"id": self.config.model, "object": "model", "owned_by": "conserve-gpusim"}]
        return web.json_response({"object": "list", "data": data})

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    async def _stats(self, _request: web.Request) -> web.Response:
        e = self.engine
        return web.json_response(
            {
                "name": self.config.name,
                "role": self.config.role.value,
                "gpu": self.config.gpu,
                "running": e.num_running,
                "waiting": e.num_waiting,
                "kvCapacityTokens": e.kv_capacity_tokens,
                "kvUsedTokens": e.used_kv_tokens,
                "kvTransfersReceived": e.stats.kv_transfers_received_total,
                "prefixCacheHitTokens": e.stats.prefix_cache_hit_tokens_total,
                "energyJoules": e.energy_j_now(),
                "conversationTurns": dict(e.stats.conversation_turns),
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        prompt_tokens = prompt_tokens_of(body, chat)
        max_tokens = _max_tokens(body)
        kv_params = body.get("kv_transfer_params")
        kv_params = kv_params if isinstance(kv_params, dict) else {}
        remote_decode = bool(kv_params.get("do_remote_decode"))
        remote_tokens = 0
        if kv_params.get("do_remote_prefill"):
            blocks = kv_params.get("remote_block_ids")
            remote_tokens = prompt_tokens
            if isinstance(blocks, list) and blocks:
                remote_tokens = min(prompt_tokens, len(blocks) * BLOCK_TOKENS)
        if remote_decode:
            max_tokens = 1  # a prefill for a remote decoder produces only the first token
        sim = SimRequest(
            request_id=self.engine.next_request_id(),
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            conversation_id=request.headers.get(CONVERSATION_HEADER) or None,
            remote_kv_tokens=remote_tokens,
        )
        try:
            self.engine.submit(sim)
        except RequestRejected as err:
            return _error(400, str(err))
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + sim.request_id
        model = str(body.get("model") or self.config.model)
        out_params: dict[str, Any] | None = None
        if remote_decode:
            out_params = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": remote_block_ids(prompt_tokens),
                "remote_engine_id": self.engine_id,
                "remote_host": self.config.host,
                "remote_port": self.port,
                "tp_size": self.config.gpu_count,
            }
        headers = {SERVER_HEADER: self.config.name or f"{self.config.host}:{self.port}"}
        usage_base = {"prompt_tokens": prompt_tokens}
        if not body.get("stream"):
            generated = 0
            while True:
                event = await sim.events.get()
                generated += event.tokens
                if event.finished:
                    break
            text = FILLER_TOKEN * generated
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            payload: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": {**usage_base, "completion_tokens": generated, "total_tokens": prompt_tokens + generated},
            }
            if out_params is not None:
                payload["kv_transfer_params"] = out_params
            return web.json_response(payload, headers=headers)

        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        generated = 0
        first = True
        while True:
            event = await sim.events.get()
            generated += event.tokens
            text = FILLER_TOKEN * event.tokens
            c: dict[str, Any] = {"index": 0, "finish_reason": "length" if event.finished else None}
            if chat:
                c["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
            else:
                c["text"] = text
            first = False
            chunk: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": [c]}
            if event.finished and out_params is not None:
                chunk["kv_transfer_params"] = out_params
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if event.finished:
                break
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {**usage_base, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}
            chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)
